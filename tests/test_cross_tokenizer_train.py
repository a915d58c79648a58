"""A teacher and a student with different tokenizers (byte-level BPE vs WordPiece) through
`build_run` and `distill-jax train`: the teacher runs on its own tokens, uld / hybrid_uld train."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

import tiny
from distill_jax import losses
from distill_jax.config import root as config_lib
from distill_jax.data import alignment
from distill_jax.data import pipeline as data
from distill_jax.training import loop as trainer
from distill_jax.training import run_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("xtok_train")
  teacher = tiny.make_checkpoint(root / "teacher", "llama", "causal_lm", num_hidden_layers=2)  # byte-level BPE
  wordpiece = tiny.tokenizer_for("bert")
  student = tiny.make_checkpoint(root / "student", "llama", "causal_lm", num_hidden_layers=1, hidden_size=16,
                                 intermediate_size=32, seed=3, vocab_size=len(wordpiece))
  for name in os.listdir(student):  # the student's own tokenizer: WordPiece
    if name.startswith(("tokenizer", "special_tokens")):
      os.remove(student / name)
  wordpiece.save_pretrained(student)
  same = tiny.make_checkpoint(root / "student_bpe", "llama", "causal_lm", num_hidden_layers=1, seed=5)  # teacher's
  lines = tiny._corpus_lines()[:120]
  text = root / "text.jsonl"
  text.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 3])}) + "\n" for i in range(0, len(lines), 3)))
  return {"root": root, "teacher": str(teacher), "student": str(student), "text": str(text),
          "student_bpe": str(same)}


RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cross_tokenizer.yaml")


def _config(setup, run, *extra, recipe=None):
  return config_lib.load_config(recipe, [
      f"teacher.path={setup['teacher']}", "teacher.task=causal_lm", "student.init=path",
      f"student.path={setup['student']}",
      *([] if recipe else ["objective.terms=[{loss: uld, temperature: 2.0, weight: 0.5}, {loss: hybrid_uld}]"]),
      f"data.source={setup['text']}", "data.max_length=16", "data.global_batch_size=8",
      "data.validation_split=null", "data.buckets=false", "logging.progress_bar=false",
      "logging.tensorboard=false", "train.log_every=1", "eval.before_and_after=false", "export.enabled=false",
      "train.steps=3", f"train.run_dir={setup['root'] / run}", *extra])


def test_the_teacher_runs_on_its_own_tokens_and_the_step_equals_the_objective(setup):
  run = run_setup.build_run(_config(setup, "direct"))
  assert run.student.module.unroll_layers and run.teachers["teacher"].module.unroll_layers  # layer_loop auto, CPU
  assert set(alignment.TEACHER_INPUTS.values()) <= set(run.train_examples.row_arrays)
  assert run.shared_vocab is None  # never compared position by position
  batch = next(iter(data.eval_batches(run.eval_examples, global_batch_size=8, process_index=0, process_count=1)))
  got = run.step_fn.eval(run.state, run.teacher_params, batch)
  teacher, student = run.teachers["teacher"], run.student
  t_out = teacher.apply(teacher.params, {"input_ids": batch["teacher_input_ids"],
                                         "attention_mask": batch["teacher_attention_mask"]},
                        outputs=run.objective.outputs_for("teacher"))
  s_out = student.apply(run.initial_student_params, batch, outputs=run.objective.outputs_for("student"))
  assert run.objective.chunk_size is not None and t_out.logits is None  # chunked: hidden states + head
  assert t_out.final_hidden.shape[1] == batch["teacher_input_ids"].shape[1] != batch["input_ids"].shape[1]
  params = jax.tree.map(lambda x: x[0], run.state.params["projections"]) if run.mesh is None else \
      run.state.params["projections"]
  loss, want = run.objective(s_out, {"teacher": t_out}, batch, params, 0)
  for name in ("uld", "hybrid_uld"):
    np.testing.assert_allclose(np.asarray(got[name][0]), np.asarray(want[name][0]), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[name][1]), np.asarray(want[name][1]))
    assert float(want[name][1]) > 0
  np.testing.assert_allclose(float(got["loss"]), float(loss), rtol=2e-5)


@pytest.mark.slow  # end to end: 48 s on the shared 2-core machine
def test_train_across_tokenizers_with_the_recipe(setup):
  cfg = _config(setup, "train", "data.name=null", "optimizer.warmup_steps=0", "train.eval_every=0",
                "train.eval_batches=1", "checkpoint.every=0", "data.prefetch=0", "data.num_workers=0",
                recipe=RECIPE)
  assert [t.loss for t in cfg.objective.terms] == ["hybrid_uld", "uld", "cross_entropy"]
  result = trainer.train(cfg)
  assert result.step == 3
  rows = [r for r in result.history if "loss" in r or "train/loss" in r]
  assert rows
  for row in rows:
    loss = row.get("loss", row.get("train/loss"))
    assert math.isfinite(loss) and loss > 0
  names = {m["name"] for m in result.report["metrics"]}
  assert "perplexity" in names and "top1_agreement" not in names  # no position-wise comparison across tokenizers


@pytest.mark.parametrize("extra, match", [
    (["objective.terms=[{loss: uld}, {loss: forward_kl}]"],
     r"^objective\.terms\[1\]\.loss: forward_kl needs the teacher on the student's rows, but teacher 'teacher' "
     r".* tokenize differently; allowed with teacher 'teacher': uld, hybrid_uld$"),
    (["teachers.teacher.cache=/nonexistent"], r"^teachers\.teacher\.cache: '/nonexistent' holds no complete teacher "
                                                r"cache \(no manifest\.json\)$"),
])
def test_bad_input_is_one_line_before_any_model_loads(setup, extra, match, monkeypatch):
  def no_loading(*a, **k):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(run_setup, "_load_models", no_loading)
  with pytest.raises(ValueError, match=match):
    run_setup.build_run(_config(setup, "bad", *extra))


def test_a_slow_tokenizer_is_one_line_before_any_model_loads(setup, monkeypatch):
  import shutil

  import transformers

  slow_dir = setup["root"] / "slow_student"
  shutil.copytree(setup["student"], slow_dir, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
  transformers.ByT5Tokenizer().save_pretrained(slow_dir)  # no fast version: no offsets
  monkeypatch.setattr(run_setup, "_load_models", lambda *a, **k: pytest.fail("a model was loaded"))
  with pytest.raises(ValueError, match=r"^student\.path: cross-tokenizer alignment needs a fast tokenizer "
                                       r"\(character offsets\); got slow ByT5Tokenizer$"):
    run_setup.build_run(_config(setup, "slow", f"student.path={slow_dir}"))


def test_the_same_tokenizer_aligns_one_to_one_and_hybrid_uld_is_forward_kl(setup):
  run = run_setup.build_run(_config(setup, "same", f"student.path={setup['student_bpe']}",
                                    "objective.terms=[{loss: hybrid_uld}]"))
  ex = run.train_examples
  assert run.cross_tokenizer.student_tokenizer is run.cross_tokenizer.teacher_tokenizer
  rows = ex.row_arrays
  student_rows = ex.tokens["input_ids"].reshape(rows["teacher_input_ids"].shape)
  np.testing.assert_array_equal(rows["teacher_input_ids"], student_rows)  # identity alignment, same row length
  batch = next(iter(data.eval_batches(run.eval_examples, global_batch_size=8, process_index=0, process_count=1)))
  got = run.step_fn.eval(run.state, run.teacher_params, batch)
  teacher, student = run.teachers["teacher"], run.student
  t_logits = teacher.apply(teacher.params, batch, outputs=("logits",)).logits
  s_logits = student.apply(run.initial_student_params, batch, outputs=("logits",)).logits
  where = np.asarray(batch["student_span_end"] * batch["attention_mask"]).astype(bool)  # positions: all
  want = losses.forward_kl(s_logits, t_logits, where=where)
  np.testing.assert_allclose(float(got["hybrid_uld"][1]), where.sum())
  np.testing.assert_allclose(float(got["hybrid_uld"][0]), float(np.sum(np.where(where, want, 0))), rtol=1e-4)
