"""evaluate() on real (tiny, random) Hugging Face models through the real loader."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import distill_jax as dj
import tiny

ev = importlib.import_module("distill_jax.evaluation.metrics")
eff = importlib.import_module("distill_jax.evaluation.efficiency")


def _batch(task, rng, batch_size=4, seq_len=8):
  batch = {"input_ids": rng.integers(5, 50, (batch_size, seq_len)).astype(np.int32),
           "attention_mask": np.ones((batch_size, seq_len), np.int32)}
  batch["attention_mask"][-1] = 0  # one padded example
  if task == "causal_lm":
    batch["labels"] = rng.integers(5, 50, (batch_size, seq_len)).astype(np.int32)
    batch["loss_mask"] = batch["attention_mask"].copy()
  return batch


@pytest.mark.parametrize("family,task,expected", [
    ("bert", "encoder", {"embedding_cosine", "similarity_spearman", "num_examples"}),
    ("gpt2", "causal_lm", {"nll", "perplexity", "teacher_nll", "teacher_perplexity",
                           "top1_agreement", "kl_teacher_student", "num_tokens",
                           "num_examples"}),
])
def test_evaluate_and_efficiency_on_tiny_hf_models(tmp_path, family, task, expected):
  path = tmp_path / family
  tiny.make_checkpoint(path, family=family, task=task)
  teacher = dj.load_model(path, task=task)
  student = dj.init_student(teacher, num_layers=1)
  rng = np.random.default_rng(0)
  batches = [_batch(task, rng) for _ in range(2)]
  metrics = ev.evaluate(student, student.params, teacher, teacher.params, batches)
  assert set(metrics) == expected
  assert metrics["num_examples"] == 6
  assert all(np.isfinite(v) for v in metrics.values())
  self_metrics = ev.evaluate(teacher, teacher.params, teacher, teacher.params, batches)
  if task == "encoder":
    assert self_metrics["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert self_metrics["similarity_spearman"] == pytest.approx(1.0)
  else:
    assert self_metrics["top1_agreement"] == 1.0
    assert self_metrics["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
  sizes = eff.measure_efficiency(student, student.params, teacher, teacher.params, batches[0],
                                teacher_dir=path, warmup=1, iters=2)
  assert sizes["student_params"] < sizes["teacher_params"]
  assert sizes["teacher_disk_bytes"] > eff.params_nbytes(teacher.params) // 2
  assert sizes["student_examples_per_s"] > 0
