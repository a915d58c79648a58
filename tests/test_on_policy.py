"""On-policy distillation (GKD): prompts, the generated-token mask, the step's draw and samples."""

from __future__ import annotations

import functools
import json
import os
import signal

import chex
import jax
import numpy as np
import pytest

import distill_jax as dj
import tiny
from distill_jax.config import root as config_lib
from distill_jax.objective import objective as objective_lib
from distill_jax.training import on_policy as on_policy_lib
from distill_jax.training import sharding
from distill_jax.training import state as state_lib
from distill_jax.training import step as step_lib
from distill_jax.models import generate
from test_reliability import (assert_same_params, checkpoint_state, env, finish, jax_cache,  # noqa: F401
                              last_train_step, loss_history, ok, rows, run_cli, start_cli, wait_for, with_faults)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT, NEW = 5, 4
CLI_STEPS = 6
GKD_TERMS = ({"loss": "generalized_jsd", "beta": 0.5},)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
  path = tiny.make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", "causal_lm", num_hidden_layers=2)
  teacher = dj.load_model(path, task="causal_lm")
  return teacher, dj.init_student(teacher, num_layers=1)


def _batch(seed=0, rows=4, length=8):
  """Right-padded rows: lengths 8, 7, 3 and 0 (an empty row)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, tiny.VOCAB_SIZE, (rows, length)).astype(np.int32)
  lengths = np.array([8, 7, 3, 0])[:rows]
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def _on_policy(student, lmbda, temperature=1.0):
  """One `OnPolicy` per (student, lmbda, temperature): a jit that takes it as a static argument
  compiles once for all the tests that use it."""
  sample = functools.partial(generate.generate, student.module, max_new_tokens=NEW, temperature=temperature,
                             eos_token_id=None)
  return on_policy_lib.OnPolicy(lmbda=lmbda, prompt_length=PROMPT, sample=sample)


# `sampled_batch` jitted once for the module (its `OnPolicy` argument static); eager, its
# generation loop dispatched and compiled op by op.
_sampled_batch = jax.jit(on_policy_lib.sampled_batch, static_argnums=0)


def _objective_on(objective, student, teacher, batch, s_params, t_params, step, logit_where=None):
  """The objective on the two models' logits of `batch`, jitted as one program (a reference)."""
  def run(batch, s_params, t_params, step, logit_where):
    t_out = teacher.apply(t_params, batch, outputs=("logits",))
    s_out = student.apply(s_params, batch, outputs=("logits",))
    return objective(s_out, {"teacher": t_out}, batch, {}, step, logit_where=logit_where)

  return jax.jit(run)(batch, s_params, t_params, step, logit_where)


def _step(student, teacher, on_policy):
  objective = objective_lib.build_objective(GKD_TERMS, student=student, teachers={"teacher": teacher})
  optimizer = state_lib.make_optimizer("adamw", 1e-2, schedule="constant")
  step = jax.jit(functools.partial(step_lib.train_step, student_apply=student.apply,
                                   teacher_applies={"teacher": teacher.apply}, objective=objective,
                                   optimizer=optimizer, on_policy=on_policy))
  return step, state_lib.create_train_state(student.params, optimizer, seed=7)


def test_prompts_are_the_first_tokens_left_aligned():
  batch = _batch()
  ids, mask = jax.jit(on_policy_lib.left_aligned_prompts, static_argnums=2)(
      batch["input_ids"], batch["attention_mask"], PROMPT)
  want_ids = np.zeros((4, PROMPT), np.int32)
  want_mask = np.zeros((4, PROMPT), np.int32)
  for row, n in enumerate([5, 5, 3, 0]):
    want_ids[row, PROMPT - n:] = batch["input_ids"][row, :n]
    want_mask[row, PROMPT - n:] = 1
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)


def test_loss_mask_is_the_generated_mask_shifted_to_the_predicting_logits():
  generated = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(on_policy_lib.generated_loss_mask(generated),
                                [[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]])


def test_sampled_batch_scores_exactly_the_generated_tokens(llama_pair):
  _, student = llama_pair
  batch = _batch()
  samples = _sampled_batch(_on_policy(student, 1.0), student.params, batch, jax.random.key(3))
  ids, mask = on_policy_lib.left_aligned_prompts(batch["input_ids"], batch["attention_mask"], PROMPT)
  np.testing.assert_array_equal(samples["input_ids"][:, :PROMPT], ids)
  want = np.zeros((4, PROMPT + NEW), np.int32)
  want[:3, PROMPT - 1:PROMPT + NEW - 1] = 1  # logits at P-1 .. P+N-2 predict the N generated tokens
  np.testing.assert_array_equal(samples["loss_mask"], want)
  np.testing.assert_array_equal(samples["labels"][:, :-1], samples["input_ids"][:, 1:])
  np.testing.assert_array_equal(samples["attention_mask"][:3, PROMPT:], 1)
  np.testing.assert_array_equal(samples["attention_mask"][3], 0)
  np.testing.assert_array_equal(samples["attention_mask"][:, :PROMPT], mask)


def test_lmbda_zero_equals_the_supervised_step_bit_for_bit(llama_pair):
  teacher, student = llama_pair
  states = []
  for on_policy in (None, _on_policy(student, 0.0)):
    step, state = _step(student, teacher, on_policy)
    for i in range(3):
      state, metrics = step(state, {"teacher": teacher.params}, _batch(i))
    states.append(state)
    if on_policy is not None:
      assert float(metrics["on_policy"][0]) == 0.0
  chex.assert_trees_all_equal(*states)


def test_lmbda_one_trains_on_samples_reproducible_from_seed_and_step(llama_pair):
  teacher, student = llama_pair
  on_policy = _on_policy(student, 1.0)
  step, state = _step(student, teacher, on_policy)
  batch = _batch()
  new_state, metrics = step(state, {"teacher": teacher.params}, batch)
  again, metrics_again = step(state, {"teacher": teacher.params}, batch)
  chex.assert_trees_all_equal((new_state, metrics), (again, metrics_again))
  assert float(metrics["on_policy"][0]) == 1.0
  # The term counts the generated tokens of the non-empty rows, no prompt tokens.
  assert float(metrics["generalized_jsd"][1]) == 3 * NEW
  # The step's samples are those of its (seed, step) key; the next step samples others.
  _, sample_key = on_policy_lib.keys(jax.random.fold_in(state.rng, state.step))
  samples = _sampled_batch(on_policy, state.params["student"], batch, sample_key)
  _, next_key = on_policy_lib.keys(jax.random.fold_in(state.rng, state.step + 1))
  other = _sampled_batch(on_policy, state.params["student"], batch, next_key)
  assert not np.array_equal(samples["input_ids"], other["input_ids"])
  objective = objective_lib.build_objective(GKD_TERMS, student=student, teachers={"teacher": teacher})
  loss, _ = _objective_on(objective, student, teacher, samples, state.params["student"], teacher.params, state.step,
                          samples["loss_mask"].astype(bool))
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)


def test_under_pmap_every_device_takes_the_same_branch(llama_pair):
  teacher, student = llama_pair
  objective = objective_lib.build_objective(GKD_TERMS, student=student, teachers={"teacher": teacher})
  optimizer = state_lib.make_optimizer("sgd", 0.1, schedule="constant")
  devices = jax.local_devices()[:2]
  pstep = step_lib.make_pmap_step(student_apply=student.apply, teacher_applies={"teacher": teacher.apply},
                                  objective=objective, optimizer=optimizer, on_policy=_on_policy(student, 1.0),
                                  devices=devices)
  state = step_lib.replicate(state_lib.create_train_state(student.params, optimizer), devices)
  batch = {k: np.concatenate([v, v]) for k, v in _batch().items()}  # the same rows on both devices
  _, metrics = pstep.train(state, step_lib.replicate({"teacher": teacher.params}, devices), batch)
  assert float(metrics["on_policy"][0]) == float(metrics["on_policy"][1]) == 2.0  # psum over 2 devices
  assert float(metrics["generalized_jsd"][1]) == 2 * 3 * NEW and np.isfinite(float(metrics["loss"]))


def test_evaluation_of_an_on_policy_run_scores_the_data_rows(llama_pair):
  """The run's eval step (`JitStep.eval`, what `eval_loss` and the report use) never samples:
  with lmbda 1 its terms cover the data rows' real tokens and equal the objective on them."""
  teacher, student = llama_pair
  objective = objective_lib.build_objective(GKD_TERMS, student=student, teachers={"teacher": teacher})
  optimizer = state_lib.make_optimizer("sgd", 0.1, schedule="constant")
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  state = step_lib.init_sharded_state(student.params, optimizer, mesh, seed=7)
  t_params = {"teacher": teacher.params}
  jit = step_lib.make_jit_step(student_apply=student.apply, teacher_applies={"teacher": teacher.apply},
                               objective=objective, optimizer=optimizer, on_policy=_on_policy(student, 1.0),
                               mesh=mesh, state=state, teacher_params=t_params)
  batch = _batch()
  metrics = jit.eval(state, t_params, batch)
  assert "on_policy" not in metrics
  assert float(metrics["generalized_jsd"][1]) == batch["attention_mask"].sum() == 18  # not 3 * NEW samples
  loss, want = _objective_on(objective, student, teacher, batch, student.params, teacher.params, 0)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(metrics["generalized_jsd"]), np.asarray(want["generalized_jsd"]), rtol=1e-5)
  _, train_metrics = jit.train(state, t_params, batch)  # while training samples
  assert float(train_metrics["on_policy"][0]) == 1.0 and float(train_metrics["generalized_jsd"][1]) == 3 * NEW


def test_the_draw_has_probability_lmbda():
  draws = [bool(on_policy_lib.draw(on_policy_lib.keys(jax.random.fold_in(jax.random.key(0), s))[0], 0.3))
           for s in range(400)]
  assert 0.2 < np.mean(draws) < 0.4


@pytest.mark.parametrize("overrides, message", [
    ({"lmbda": 1.5}, "objective.on_policy.lmbda"),
    ({"top_p": 0.0}, "objective.on_policy.top_p"),
    ({"max_new_tokens": 0}, "objective.on_policy.max_new_tokens"),
    ({"prompt_length": 200}, "objective.on_policy.prompt_length (200) must be <= data.max_length (128)"),
    ({"lmbda_": 1.0}, "unknown key"),
])
def test_bad_on_policy_config_is_one_line(overrides, message):
  raw = {"teacher": {"path": "gpt2"}, "objective": {"terms": [{"loss": "generalized_jsd"}], "on_policy": overrides}}
  with pytest.raises(config_lib.ConfigError, match=r"^config: .*") as e:
    config_lib.config_from_dict(raw)
  assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def gkd_args(tmp_path_factory):
  """`distill-jax train configs/gkd.yaml` on tiny Llama stand-ins: ``args(run_dir, *extra)``."""
  root = tmp_path_factory.mktemp("gkd")
  teacher = tiny.make_checkpoint(root / "teacher", "llama", "causal_lm", num_hidden_layers=2,
                                 tie_word_embeddings=True)
  student = tiny.make_checkpoint(root / "student", "llama", "causal_lm", num_hidden_layers=1, hidden_size=16,
                                 intermediate_size=32, tie_word_embeddings=True, seed=3)
  lines = tiny._corpus_lines()[:240]
  text = root / "text.jsonl"
  text.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 3])}) + "\n" for i in range(0, 240, 3)))

  def args(run_dir, *extra):
    return ["train", os.path.join(ROOT, "configs", "gkd.yaml"), f"teacher.path={teacher}", f"student.path={student}",
            f"data.source={text}", "data.validation_split=null", "data.max_length=16", "data.global_batch_size=8",
            "data.buckets=false", "objective.on_policy.prompt_length=8", "objective.on_policy.max_new_tokens=4",
            "optimizer.warmup_steps=0", f"train.steps={CLI_STEPS}", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", f"train.run_dir={run_dir}", "checkpoint.every=2", "checkpoint.keep_last=5",
            "logging.progress_bar=false", "logging.tensorboard=false", "eval.before_and_after=false",
            "eval.throughput_batches=0", "export.enabled=false", *extra]

  return args


@pytest.mark.slow  # a CLI subprocess end to end (lmbda 1 in-process: test_lmbda_one_trains_on_samples_...)
def test_lmbda_one_runs_through_the_cli(tmp_path, gkd_args, env):
  ok(run_cli(gkd_args(tmp_path / "run", "objective.on_policy.lmbda=1.0"), env))
  history = [r for r in rows(tmp_path / "run") if "train/loss" in r]
  assert [r["step"] for r in history] == list(range(1, CLI_STEPS + 1))
  assert all(r["train/on_policy"] == 1.0 and np.isfinite(r["train/loss"]) for r in history)


@pytest.mark.slow
def test_sigterm_and_resume_equal_an_uninterrupted_on_policy_run(tmp_path, gkd_args, env):
  reference, run_dir = tmp_path / "reference", tmp_path / "run"
  ok(run_cli(gkd_args(reference), env))
  draws = [r["train/on_policy"] for r in rows(reference) if "train/loss" in r]
  assert set(draws) == {0.0, 1.0}, draws  # lmbda 0.5: both kinds of step
  args = gkd_args(run_dir)
  log = tmp_path / "log"
  proc = start_cli(args, with_faults(env, step_delay=0.5), log)
  assert wait_for(lambda: last_train_step(run_dir) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  out = finish(proc, log)
  stopped = last_train_step(run_dir)
  assert proc.returncode == 0 and 0 < stopped < CLI_STEPS, out[-3000:]
  ok(run_cli(args, env))
  assert loss_history(run_dir) == loss_history(reference)
  assert_same_params(checkpoint_state(run_dir, CLI_STEPS), checkpoint_state(reference, CLI_STEPS))
