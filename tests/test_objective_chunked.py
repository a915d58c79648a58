"""The objective's default chunked logit terms equal the logits path through the real models
(loss, metrics, gradients), and the train step then never forms a `[B, T, V]` array."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

import tiny
from distill_jax import losses, models
from distill_jax.objective.objective import build_objective
from distill_jax.objective.terms import ObjectiveConfig
from distill_jax.schema import ConfigError
from distill_jax.training import step as step_lib
from distill_jax.training.state import create_train_state
from test_metrics_chunked import largest_vocab_array

TERMS = (
    {"loss": "forward_kl", "temperature": 2.0},
    {"loss": "reverse_kl", "weight": 0.5},
    {"loss": "generalized_jsd", "beta": 0.3, "positions": "labels"},
    {"loss": "skew_kl", "skew": 0.2},
    {"loss": "skew_reverse_kl"},
    {"loss": "total_variation"},
    {"loss": "cross_entropy", "label_smoothing": 0.1},
    {"loss": "sparse_forward_kl", "top_k": 8},
    {"loss": "sparse_generalized_jsd", "top_k": 5, "beta": 0.6},
)
ROWS, LENGTH = 2, 40


def _model(family, seed, **overrides):
  model = models.model_from_config(tiny.config_for(family, **overrides), "causal_lm",
                                   tokenizer=tiny.tokenizer_for(family), seed=seed)
  return model, _sharpened(model.params)


@jax.jit  # one program for the whole tree (eager: a compiled multiply per leaf shape)
def _sharpened(params):
  return jax.tree.map(lambda p: p * 8.0 if p.ndim >= 2 else p, params)


@pytest.fixture(scope="module")
def setup():
  # Gemma 2: tied heads and final soft-capping; padded vocabularies of different widths.
  student, s_params = _model("gemma2", 1, vocab_size=400)
  teacher, t_params = _model("gemma2", 2, hidden_size=48, vocab_size=416)
  rng = np.random.RandomState(0)
  mask = np.ones((ROWS, LENGTH), np.int32)
  mask[1, 17:] = 0
  batch = {"input_ids": rng.randint(0, 384, (ROWS, LENGTH)).astype(np.int32), "attention_mask": mask,
           "labels": rng.randint(0, 384, (ROWS, LENGTH)).astype(np.int32),
           "loss_mask": (rng.rand(ROWS, LENGTH) > 0.3).astype(np.int32)}
  return student, s_params, teacher, t_params, batch


def _loss_fn(objective, student, teacher, t_params, batch):
  t_out = jax.tree.map(jax.lax.stop_gradient,
                       teacher.apply(t_params, batch, outputs=objective.outputs_for("teacher")))

  def loss(params):
    s_out = student.apply(params, batch, outputs=objective.outputs_for("student"))
    return objective(s_out, {"teacher": t_out}, batch, {}, np.int32(0))

  return loss


def test_chunked_objective_equals_the_logits_path(setup):
  student, s_params, teacher, t_params, batch = setup
  chunked = build_objective(TERMS, student=student, teachers={"teacher": teacher}, chunk_size=5)
  dense = build_objective(TERMS, student=student, teachers={"teacher": teacher}, chunk_size=None)
  assert chunked.outputs_for("student") == ("final_hidden", "head")
  assert dense.outputs_for("student") == ("logits",)
  grad = lambda obj: jax.jit(jax.value_and_grad(  # noqa: E731
      _loss_fn(obj, student, teacher, t_params, batch), has_aux=True))(s_params)
  (l_got, m_got), g_got = grad(chunked)
  (l_want, m_want), g_want = grad(dense)
  np.testing.assert_allclose(l_got, l_want, rtol=1e-5)
  for name, (total, count) in m_want.items():
    assert float(total) > 1e-3, name
    np.testing.assert_allclose(m_got[name][0], total, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(m_got[name][1], count)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g_want))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * scale), g_got, g_want)


def test_ensemble_kl_equals_the_logits_path_and_a_bad_chunk_size_is_refused(setup):
  student, s_params, teacher, t_params, batch = setup
  teachers = {"a": teacher, "b": _model("gemma2", 3)[0]}
  terms = ({"loss": "ensemble_kl", "temperature": 1.5, "teacher": ["a", "b"]},)
  assert build_objective(terms, student=student, teachers=teachers).outputs_for("a") == ("final_hidden", "head")
  params = {"a": t_params, "b": _sharpened(teachers["b"].params)}
  results = []
  for chunk_size in (7, None):
    obj = build_objective(terms, student=student, teachers=teachers, chunk_size=chunk_size)

    @jax.jit  # one program (eager, every op of the models and the chunk loop compiles on its own)
    def loss(s_params, params, obj=obj):
      t_outs = {n: teachers[n].apply(params[n], batch, outputs=obj.outputs_for(n)) for n in teachers}
      s_out = student.apply(s_params, batch, outputs=obj.outputs_for("student"))
      return obj(s_out, t_outs, batch, {}, np.int32(0))[0]

    results.append(loss(s_params, params))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5)
  with pytest.raises(ValueError, match=r"^objective.chunk_size: 0 must be a positive integer or null"):
    build_objective(terms, student=student, teachers=teachers, chunk_size=0)


def test_train_step_never_forms_batch_by_length_by_vocab(setup):
  student, s_params, teacher, t_params, batch = setup
  optimizer = optax.adamw(1e-3)
  for chunk_size, materialized in ((4, False), (None, True)):
    objective = build_objective(TERMS, student=student, teachers={"teacher": teacher}, chunk_size=chunk_size)
    state = create_train_state(s_params, optimizer=optimizer, seed=0)
    train = functools.partial(step_lib.train_step, student_apply=student.apply,
                              teacher_applies={"teacher": teacher.apply}, objective=objective, optimizer=optimizer)
    jaxpr = jax.make_jaxpr(train)(state, {"teacher": t_params}, batch)
    largest = max(largest_vocab_array(jaxpr, v) for v in (384, 400, 416))
    # Heads and their gradients are [H, V] (at most 48 × 416); a logits array is ≥ 2 × 40 × 384.
    assert (largest >= ROWS * LENGTH * 384) == materialized, (chunk_size, largest)


def test_config_knob():
  terms = ({"loss": "forward_kl"},)
  assert ObjectiveConfig(terms=terms).chunk_size == losses.DEFAULT_CHUNK_SIZE
  assert ObjectiveConfig(terms=terms, chunk_size=None).chunk_size is None
  with pytest.raises(ConfigError, match=r"^config: objective.chunk_size: "):
    ObjectiveConfig(terms=terms, chunk_size=0)
