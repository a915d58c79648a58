"""Tests for distill_jax.evaluation.metrics against independent NumPy/SciPy references."""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

# `distill_jax.evaluation.metrics` the attribute is the function; the module comes from importlib.
ev = importlib.import_module("distill_jax.evaluation.metrics")
eff = importlib.import_module("distill_jax.evaluation.efficiency")
LM_TASKS = importlib.import_module("distill_jax.models.outputs").LM_TASKS


class _Outputs(NamedTuple):
  logits: Optional[jax.Array] = None
  pooled: Optional[jax.Array] = None


class FakeModel:
  """A linear map on one-hot tokens, with the Model.apply calling convention."""

  def __init__(self, task: str):
    self.task = task
    self.traces = 0

  def apply(self, params, batch, *, outputs=("logits",), pooling="mean"):
    self.traces += 1
    w_VxH = params["embed"]
    h_BxTxH = jax.nn.one_hot(batch["input_ids"], w_VxH.shape[0]) @ w_VxH
    mask_BxT = batch["attention_mask"].astype(jnp.float32)
    pooled_BxH = (h_BxTxH * mask_BxT[..., None]).sum(1) / jnp.maximum(
        mask_BxT.sum(1, keepdims=True), 1.0)
    logits = None
    if "logits" in outputs:
      x = h_BxTxH if self.task in LM_TASKS else pooled_BxH
      logits = x @ params["head"]
    return _Outputs(logits=logits, pooled=pooled_BxH if "pooled" in outputs else None)


def numpy_forward(params, input_ids_BxT, mask_BxT, task):
  w = np.asarray(params["embed"], np.float64)
  h_BxTxH = w[input_ids_BxT]
  m = mask_BxT.astype(np.float64)
  pooled = (h_BxTxH * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1.0)
  if task == "encoder":
    return pooled
  x = h_BxTxH if task in LM_TASKS else pooled
  return x @ np.asarray(params["head"], np.float64)


def make_params(seed, vocab, hidden, out):
  rng = np.random.default_rng(seed)
  params = {"embed": rng.normal(size=(vocab, hidden)).astype(np.float32)}
  if out:
    params["head"] = rng.normal(size=(hidden, out)).astype(np.float32)
  return params


def make_data(task, num_examples=11, seq_len=6, vocab=10, num_classes=4, seed=0):
  """Examples with ragged lengths; LM labels contain -100 and loss_mask holes."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, seq_len + 1, size=num_examples)
  attention = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
  data = {"input_ids": rng.integers(0, vocab, size=(num_examples, seq_len)).astype(np.int32),
          "attention_mask": attention}
  if task == "sequence_classification":
    data["labels"] = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
  elif task in LM_TASKS:
    labels = rng.integers(0, vocab, size=(num_examples, seq_len)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.1] = -100
    data["labels"] = labels
    keep = 0.3 if task == "masked_lm" else 0.9
    data["loss_mask"] = (attention * (rng.random(labels.shape) < keep)).astype(np.int32)
  return data


def batched(data, batch_size):
  """Split into batches; the last one is padded with masked garbage examples."""
  n = len(data["input_ids"])
  out = []
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in data.items()}
    pad = batch_size - len(batch["input_ids"])
    if pad:
      batch = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], 3, v.dtype)])
               for k, v in batch.items()}
      batch["attention_mask"][-pad:] = 0
    out.append(batch)
  return out


def models(task, vocab=10, hidden=5, teacher_hidden=5, out=10, teacher_out=None):
  out = None if task == "encoder" else out
  teacher_out = out if teacher_out is None else teacher_out
  return (FakeModel(task), make_params(1, vocab, hidden, out),
          FakeModel(task), make_params(2, vocab, teacher_hidden, teacher_out))


# --------------------------------------------------------------------- references


def ref_f1_by_hand(labels, preds, num_classes):
  f1s = []
  for c in range(num_classes):
    tp = np.sum((preds == c) & (labels == c))
    fp = np.sum((preds == c) & (labels != c))
    fn = np.sum((preds != c) & (labels == c))
    if tp + fp + fn == 0:
      continue
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
  return float(np.mean(f1s))


def ref_nll(logits, labels, where):
  logp = scipy.special.log_softmax(logits, axis=-1)
  picked = np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
  return -picked[where]


def ref_kl(s_logits, t_logits, where):
  logp_s = scipy.special.log_softmax(s_logits, -1)
  logp_t = scipy.special.log_softmax(t_logits, -1)
  return (np.exp(logp_t) * (logp_t - logp_s)).sum(-1)[where]


# -------------------------------------------------------------------------- tests


def test_classification_metrics_match_hand_reference():
  task, num_classes = "sequence_classification", 4
  data = make_data(task, num_classes=num_classes)
  student, s_params, teacher, t_params = models(task, out=num_classes)
  metrics = ev.evaluate(student, s_params, teacher, t_params, batched(data, 4))

  s_logits = numpy_forward(s_params, data["input_ids"], data["attention_mask"], task)
  t_logits = numpy_forward(t_params, data["input_ids"], data["attention_mask"], task)
  labels, s_pred, t_pred = data["labels"], s_logits.argmax(-1), t_logits.argmax(-1)
  all_rows = np.ones(len(labels), bool)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(s_pred == labels), rtol=1e-6)
  np.testing.assert_allclose(metrics["macro_f1"], ref_f1_by_hand(labels, s_pred, num_classes),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["teacher_accuracy"], np.mean(t_pred == labels), rtol=1e-6)
  np.testing.assert_allclose(metrics["teacher_macro_f1"],
                             ref_f1_by_hand(labels, t_pred, num_classes), rtol=1e-6)
  np.testing.assert_allclose(metrics["top1_agreement"], np.mean(s_pred == t_pred), rtol=1e-6)
  np.testing.assert_allclose(metrics["kl_teacher_student"],
                             ref_kl(s_logits, t_logits, all_rows).mean(), rtol=1e-4)
  assert metrics["num_examples"] == len(labels)


def test_finalize_classification_skips_absent_classes():
  confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]])  # class 1: no label, one prediction
  labels = np.array([0] * 4 + [2] * 6)
  preds = np.array([0, 0, 0, 1, 0, 0, 2, 2, 2, 2])
  got = ev.finalize_classification(confusion)
  assert got["accuracy"] == pytest.approx(0.7)
  assert got["macro_f1"] == pytest.approx(ref_f1_by_hand(labels, preds, 3))
  confusion = np.array([[3, 0, 0], [0, 0, 0], [0, 0, 4]])  # class 1 nowhere: left out
  assert ev.finalize_classification(confusion)["macro_f1"] == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["causal_lm", "masked_lm"])
def test_lm_metrics_match_numpy_reference(task):
  data = make_data(task)
  student, s_params, teacher, t_params = models(task)
  metrics = ev.evaluate(student, s_params, teacher, t_params, batched(data, 4))

  s_logits = numpy_forward(s_params, data["input_ids"], data["attention_mask"], task)
  t_logits = numpy_forward(t_params, data["input_ids"], data["attention_mask"], task)
  where = data["attention_mask"].astype(bool) & data["loss_mask"].astype(bool)
  label_where = where & (data["labels"] >= 0)
  s_nll = ref_nll(s_logits, data["labels"], label_where)
  np.testing.assert_allclose(metrics["nll"], s_nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["perplexity"], np.exp(s_nll.mean()), rtol=1e-5)
  np.testing.assert_allclose(metrics["teacher_perplexity"],
                             np.exp(ref_nll(t_logits, data["labels"], label_where).mean()),
                             rtol=1e-5)
  agree = s_logits.argmax(-1) == t_logits.argmax(-1)
  np.testing.assert_allclose(metrics["top1_agreement"], agree[where].mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["kl_teacher_student"],
                             ref_kl(s_logits, t_logits, where).mean(), rtol=1e-4)
  assert metrics["num_tokens"] == where.sum()
  assert metrics["num_examples"] == len(data["input_ids"])


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification", "encoder"])
def test_uneven_padded_batches_equal_one_big_batch(task):
  data = make_data(task)
  student, s_params, teacher, t_params = models(task, out=4 if task != "causal_lm" else 10)
  pieces = ev.evaluate(student, s_params, teacher, t_params, batched(data, 4))
  whole = ev.evaluate(student, s_params, teacher, t_params, [data])
  assert pieces.keys() == whole.keys()
  for name in whole:
    np.testing.assert_allclose(pieces[name], whole[name], rtol=1e-5, err_msg=name)


def test_encoder_cosine_and_spearman_match_scipy():
  task = "encoder"
  data = make_data(task)
  student, s_params, teacher, t_params = models(task)
  metrics = ev.evaluate(student, s_params, teacher, t_params, batched(data, 4))

  s = numpy_forward(s_params, data["input_ids"], data["attention_mask"], task)
  t = numpy_forward(t_params, data["input_ids"], data["attention_mask"], task)
  cosine = (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
  np.testing.assert_allclose(metrics["embedding_cosine"], cosine.mean(), rtol=1e-5)
  s_n = s / np.linalg.norm(s, axis=-1, keepdims=True)
  t_n = t / np.linalg.norm(t, axis=-1, keepdims=True)
  iu = np.triu_indices(len(s), k=1)
  rho = scipy.stats.spearmanr((s_n @ s_n.T)[iu], (t_n @ t_n.T)[iu]).statistic
  np.testing.assert_allclose(metrics["similarity_spearman"], rho, rtol=1e-6)
  assert metrics["num_examples"] == len(s)


def test_encoder_with_different_widths_has_spearman_but_no_cosine():
  student, s_params, teacher, t_params = models("encoder", hidden=3, teacher_hidden=7)
  data = make_data("encoder")
  metrics = ev.evaluate(student, s_params, teacher, t_params, batched(data, 4))
  assert "embedding_cosine" not in metrics
  assert -1.0 <= metrics["similarity_spearman"] <= 1.0


def test_spearman_identical_and_rescaled_embeddings_is_one():
  x = np.random.default_rng(0).normal(size=(9, 4))
  assert ev.similarity_spearman(x, 3.0 * x) == pytest.approx(1.0)
  assert np.isnan(ev.similarity_spearman(x[:2], x[:2]))


def test_shared_vocab_slices_logits():
  task = "causal_lm"
  data = make_data(task)
  student, s_params, teacher, t_params = models(task, out=10, teacher_out=13)
  with pytest.raises(ValueError, match="shared_vocab"):
    ev.evaluate(student, s_params, teacher, t_params, batched(data, 4))
  metrics = ev.evaluate(student, s_params, teacher, t_params, batched(data, 4), shared_vocab=8)
  s_logits = numpy_forward(s_params, data["input_ids"], data["attention_mask"], task)[..., :8]
  t_logits = numpy_forward(t_params, data["input_ids"], data["attention_mask"], task)[..., :8]
  where = data["attention_mask"].astype(bool) & data["loss_mask"].astype(bool)
  np.testing.assert_allclose(metrics["kl_teacher_student"],
                             ref_kl(s_logits, t_logits, where).mean(), rtol=1e-4)
  agree = s_logits.argmax(-1) == t_logits.argmax(-1)
  np.testing.assert_allclose(metrics["top1_agreement"], agree[where].mean(), rtol=1e-6)


def test_kl_of_identical_models_is_zero_and_agreement_one():
  task = "causal_lm"
  student, s_params, _, _ = models(task)
  metrics = ev.evaluate(student, s_params, student, s_params, batched(make_data(task), 4))
  assert metrics["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
  assert metrics["top1_agreement"] == 1.0


def test_compiles_once_per_shape_and_requests_task_outputs():
  task = "sequence_classification"
  student, s_params, teacher, t_params = models(task, out=4)
  batches = batched(make_data(task), 4)
  ev.evaluate(student, s_params, teacher, t_params, batches)
  ev.evaluate(student, jax.tree.map(lambda x: x + 1, s_params), teacher, t_params, batches)
  assert student.traces == 1 and teacher.traces == 1
  ev.evaluate(student, s_params, teacher, t_params, batched(make_data(task), 5))
  assert student.traces == 2
  assert ev.outputs_for_task("encoder") == ("pooled",)
  assert ev.outputs_for_task("masked_lm") == ("logits",)
  with pytest.raises(ValueError, match="task"):
    ev.outputs_for_task("seq2seq")


def test_max_batches_task_mismatch_and_empty():
  task = "sequence_classification"
  student, s_params, teacher, t_params = models(task, out=4)
  batches = batched(make_data(task), 4)
  metrics = ev.evaluate(student, s_params, teacher, t_params, batches, max_batches=2)
  assert metrics["num_examples"] == 8
  with pytest.raises(ValueError, match="task"):
    ev.evaluate(student, s_params, FakeModel("encoder"), t_params, batches)
  with pytest.raises(ValueError, match="no batches"):
    ev.evaluate(student, s_params, teacher, t_params, [])


def test_param_counts_sizes_and_throughput(tmp_path):
  params = {"a": np.zeros((3, 4), np.float32), "b": {"c": jnp.zeros((5,), jnp.bfloat16)}}
  assert eff.count_params(params) == 17
  assert eff.params_nbytes(params) == 12 * 4 + 5 * 2
  (tmp_path / "sub").mkdir()
  (tmp_path / "x.bin").write_bytes(b"a" * 100)
  (tmp_path / "sub" / "y.bin").write_bytes(b"b" * 23)
  os.symlink(tmp_path / "x.bin", tmp_path / "link.bin")
  assert eff.dir_size_bytes(tmp_path) == 123
  assert eff.dir_size_bytes(tmp_path / "x.bin") == 100

  student, s_params, teacher, t_params = models("causal_lm")
  batch = batched(make_data("causal_lm"), 4)[-1]  # 3 real examples + 1 padded
  speed = eff.measure_throughput(student, s_params, batch, warmup=1, iters=3)
  assert speed["examples_per_s"] > 0
  np.testing.assert_allclose(speed["tokens_per_s"] / speed["examples_per_s"],
                             batch["attention_mask"].sum() / 3, rtol=1e-6)
  sizes = eff.measure_efficiency(student, s_params, teacher, t_params, batch,
                              student_dir=str(tmp_path), warmup=1, iters=2)
  assert sizes["student_params"] == eff.count_params(s_params)
  assert sizes["student_disk_bytes"] == 123 and sizes["teacher_disk_bytes"] is None
  assert sizes["teacher_examples_per_s"] > 0 and isinstance(sizes["device"], str)


def test_weights_size_counts_one_format_of_an_export(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"s" * 40)
  (tmp_path / "flax_model.msgpack").write_bytes(b"f" * 41)
  (tmp_path / "tokenizer.json").write_bytes(b"t" * 7)
  assert eff.weights_size_bytes(tmp_path) == 40
  (tmp_path / "model.safetensors").unlink()
  assert eff.weights_size_bytes(tmp_path) == 41
  (tmp_path / "flax_model.msgpack").unlink()
  assert eff.weights_size_bytes(tmp_path) == 7  # no weights file: the whole directory
