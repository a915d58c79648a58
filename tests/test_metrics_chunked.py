"""Evaluation metrics of causal LMs from hidden states + heads, chunked: equal to the logits path,
and the eval step never forms a `[B, T, V]` array."""

from __future__ import annotations

import jax
import jax.extend.core
import numpy as np
import pytest

import tiny
from distill_jax import models
from distill_jax.evaluation import metrics as ev


def largest_vocab_array(closed_jaxpr, vocab: int) -> int:
  """Elements of the largest intermediate of a jaxpr (sub-jaxprs included) with a `vocab`-wide axis."""
  largest = 0

  def walk(jaxpr):
    nonlocal largest
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        shape = getattr(var.aval, "shape", ())
        if vocab in shape:
          largest = max(largest, int(np.prod(shape)))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(closed_jaxpr.jaxpr)
  return largest


def _model(family, seed, **overrides):
  model = models.model_from_config(tiny.config_for(family, **overrides), "causal_lm",
                                   tokenizer=tiny.tokenizer_for(family), seed=seed)
  return model, jax.tree.map(lambda p: p * 8.0 if p.ndim >= 2 else p, model.params)


def _batches(vocab, rows=4, length=24):
  rng = np.random.RandomState(3)
  out = []
  for _ in range(2):
    mask = (np.arange(length)[None] < rng.randint(3, length + 1, (rows, 1))).astype(np.int32)
    mask[-1] = 0  # an eval padding row
    labels = np.where(rng.rand(rows, length) < 0.2, -100, rng.randint(0, vocab, (rows, length)))
    out.append({"input_ids": rng.randint(0, vocab, (rows, length)).astype(np.int32), "attention_mask": mask,
                "labels": labels.astype(np.int32)})
  return out


@pytest.fixture(scope="module")
def pair():
  # Tied heads with Gemma 2's final soft-capping; padded vocabularies of different widths.
  student = _model("gemma2", 1, vocab_size=400)
  teacher = _model("gemma2", 2, hidden_size=48, vocab_size=416)
  return student, teacher


def test_chunked_metrics_equal_logits_metrics(pair):
  (student, s_params), (teacher, t_params) = pair
  shared = models.check_vocab(teacher, student)
  batches = _batches(shared)
  got = ev.evaluate(student, s_params, teacher, t_params, batches, shared_vocab=shared, chunk_size=5)
  want = ev.evaluate(student, s_params, teacher, t_params, batches, shared_vocab=shared, chunk_size=None)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
  assert want["kl_teacher_student"] > 1e-2 and 0 < want["top1_agreement"] < 1


def test_chunked_eval_step_never_forms_batch_by_length_by_vocab(pair):
  (student, s_params), (teacher, t_params) = pair
  shared = models.check_vocab(teacher, student)
  batch = _batches(shared)[0]
  rows, length = batch["input_ids"].shape
  for chunk_size, materialized in ((4, False), (None, True)):
    step = ev.make_eval_step(student, teacher, shared_vocab=shared, chunk_size=chunk_size)
    jaxpr = jax.make_jaxpr(step)(s_params, t_params, batch)
    largest = max(largest_vocab_array(jaxpr, v) for v in (400, 416, shared))
    assert (largest >= rows * length * shared) == materialized, (chunk_size, largest)


def test_bad_chunk_size_is_a_one_line_error(pair):
  (student, _), (teacher, _) = pair
  with pytest.raises(ValueError, match=r"^chunk_size: 0 must be a positive integer or None \(logits\)$"):
    ev.make_eval_step(student, teacher, chunk_size=0)
