"""The step's update path: an exact skip of a non-finite AdamW update under donation, no
copies of the donated state, and dropout bits from the unrolled CPU threefry (issue 18)."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import distill_jax as dj
import tiny
from distill_jax import models
from distill_jax import optim
from distill_jax.objective import objective as objective_lib
from distill_jax.training import state as state_lib
from distill_jax.training import step as step_lib

TERMS = ({"loss": "forward_kl", "temperature": 2.0}, {"loss": "hidden_mse", "layers": "last"})


def threefry2x32_reference(key: tuple[int, int], x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011, Random123), in NumPy uint32."""
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = [np.uint32(key[0]), np.uint32(key[1]), np.uint32(key[0] ^ key[1] ^ 0x1BD11BDA)]
  x0, x1 = x0.astype(np.uint32) + ks[0], x1.astype(np.uint32) + ks[1]
  for group in range(5):
    for r in rotations[group % 2]:
      x0 = x0 + x1
      x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(group + 1) % 3]
    x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
  return x0, x1


def test_threefry_reference_matches_the_random123_vector():
  x0, x1 = threefry2x32_reference((0x13198A2E, 0x03707344), np.uint32([0x243F6A88]), np.uint32([0x85A308D3]))
  assert (int(x0[0]), int(x1[0])) == (0xC4923A9C, 0x483DF7A0)


def test_cpu_threefry_is_unrolled_and_gives_the_reference_bits():
  assert step_lib.UNROLLED_CPU_THREEFRY
  key = np.uint32([0x9E3779B9, 0x12345678])
  half = step_lib.UNROLL_MIN_SIZE + 3
  count = np.arange(2 * half, dtype=np.uint32) * np.uint32(2654435761)
  fn = jax.jit(jex_random.threefry_2x32)
  assert " while(" not in fn.lower(key, count).compile().as_text()  # no rolled fori_loop of rounds
  # Below UNROLL_MIN_SIZE the rolled loop stays (the unrolled one costs seconds of compile per call site).
  assert " while(" in fn.lower(key, count[:2 * 4099]).compile().as_text()
  got = np.asarray(fn(key, count))
  x0, x1 = threefry2x32_reference((int(key[0]), int(key[1])), count[:half], count[half:])
  np.testing.assert_array_equal(got, np.concatenate([x0, x1]))


@pytest.fixture(scope="module")
def setup():
  """A 2-layer tiny BERT teacher, a 1-layer student (dropout on), AdamW with accumulation."""
  teacher = models.model_from_config(tiny.config_for("bert"), "masked_lm", seed=0)
  student = dj.init_student(teacher, num_layers=1)
  objective = objective_lib.build_objective(TERMS, student=student, teachers={"teacher": teacher})
  optimizer = state_lib.make_optimizer("adamw", 1e-2, schedule="constant", weight_decay=0.1, clip_norm=1.0,
                                       grad_accum_steps=2)
  kw = dict(student_apply=student.apply, teacher_applies={"teacher": teacher.apply}, objective=objective,
            optimizer=optimizer)
  step = jax.jit(functools.partial(step_lib.train_step, **kw), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(5, tiny.VOCAB_SIZE, (4, 12)).astype(np.int32),
           "attention_mask": np.ones((4, 12), np.int32)}
  return teacher, student, optimizer, step, batch


def fresh_state(student, optimizer):
  return state_lib.create_train_state(jax.tree.map(jnp.array, student.params), optimizer, seed=3)


def test_nonfinite_adamw_update_is_skipped_exactly_under_donation(setup):
  teacher, student, optimizer, step, batch = setup
  state = fresh_state(student, optimizer)
  for _ in range(3):  # into the accumulation: moments, counts and the accumulator are non-trivial
    state, metrics = step(state, {"teacher": teacher.params}, batch)
    assert int(metrics["nonfinite"]) == 0
  before = jax.device_get(state)
  bad_teacher = jax.tree.map(lambda x: x, teacher.params)
  word = bad_teacher["word_embeddings"]["embedding"]
  bad_teacher["word_embeddings"]["embedding"] = jnp.asarray(word).at[batch["input_ids"][0, 0]].set(jnp.inf)
  state, metrics = step(state, {"teacher": bad_teacher}, batch)
  assert int(metrics["nonfinite"]) == 1 and int(state.step) == 4
  chex.assert_trees_all_equal(jax.device_get(state.params), before.params)
  chex.assert_trees_all_equal(jax.device_get(state.opt_state), before.opt_state)
  state, metrics = step(state, {"teacher": teacher.params}, batch)
  assert int(metrics["nonfinite"]) == 0 and int(state.step) == 5
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(state.params),
                                              before.params)))


def test_donated_state_is_updated_in_place_without_copies(setup):
  teacher, student, optimizer, step, batch = setup
  state = fresh_state(student, optimizer)
  hlo = step.lower(state, {"teacher": teacher.params}, batch).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  params = {int(n): (name, shape) for name, shape, n in re.findall(r"%(\S+) = (\S+) parameter\((\d+)\)", entry)}
  # Every array of the state (params, moments, accumulator); a copied scalar (the step) is free.
  state_params = {params[i][0] for i in range(len(jax.tree.leaves(state))) if "[]" not in params[i][1]}
  assert len(state_params) > 3 * len(jax.tree.leaves(state.params))
  copied = set(re.findall(r" copy\(%([^)]+)\)", entry))
  assert not copied & state_params, sorted(copied & state_params)[:5]


@pytest.mark.parametrize("scale", [0.01, 10.0])  # under and over the max norm
def test_clip_is_optax_clip_and_reuses_the_given_norm(scale):
  rng = np.random.default_rng(1)
  grads = {"w": jnp.asarray(rng.normal(size=(5, 3)) * scale, jnp.float32),
           "b": jnp.asarray(rng.normal(size=(3,)) * scale, jnp.float32)}
  want, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  clip = optim.clip_by_global_norm(1.0)
  norm = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads))))
  for kwargs in ({}, {"global_norm": jnp.float32(norm)}):
    got, _ = clip.update(grads, clip.init(grads), **kwargs)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
  # reuse_norm=False (gradient accumulation: the step's norm is the micro-step's) ignores it.
  ignored, _ = optim.clip_by_global_norm(1.0, reuse_norm=False).update(grads, optax.EmptyState(),
                                                                         global_norm=jnp.float32(1e6))
  chex.assert_trees_all_close(ignored, want, rtol=1e-6)
