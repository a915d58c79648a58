"""Every logged term of the real training step against an independent reference.

The step's metrics (``{name: (sum, count)}``, the loss) come from `training.step.train_step`
on an `Objective` built by `build_objective`.  The references are computed here from the
models' own outputs (`model.apply`): the layer maps, projections, masks, pooling, schedules
and weights are our own NumPy arithmetic; the per-position values are NumPy formulas where
they are short (KL, JSD-free logit terms, CE, MSE, cosine, sparse top-k KL) and the
`distill_jax.losses` function of the term otherwise, on NumPy-sliced inputs.  So a term that
reads the wrong layer, forgets a projection, masks the wrong positions, or weights with the
wrong schedule fails here, whatever the objective's internals look like.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import distill_jax as dj
import tiny
from distill_jax import losses
from distill_jax.objective import objective as objective_lib
from distill_jax.training import state as state_lib
from distill_jax.training import step as step_lib

STEP = 4  # the step the metrics are taken at (schedules are mid-ramp there)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _perturbed(params, seed, scale=0.2):
  """Params plus Gaussian noise: the tiny random models' distributions are nearly uniform
  (KL ~ 1e-7); the noise makes every term of order 1e-2..1."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p, np.float32) + scale * rng.standard_normal(np.shape(p)).astype(np.float32),
                      params)


def _batch(seed, rows, length, vocab):
  """Rows of uneven lengths, the last fully padded; labels on real tokens, a loss mask on some."""
  rng = np.random.default_rng(seed)
  lengths = np.maximum(length - 2 * np.arange(rows), 2)
  lengths[-1] = 0
  mask = (np.arange(length)[None, :] < lengths[:, None])
  ids = np.where(mask, rng.integers(5, vocab, (rows, length)), 0).astype(np.int32)
  loss_mask = mask & (rng.random((rows, length)) < 0.6)
  loss_mask[0, 0] = True
  labels = np.where(mask, rng.integers(5, vocab, (rows, length)), 0).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask.astype(np.int32), "labels": labels,
          "loss_mask": loss_mask.astype(np.int32)}


def _run_step(objective, student, teachers, s_params, t_params, batch, proj_seed=3):
  """The real jitted train step at step `STEP`; returns its metrics and the projections it used."""
  projections = objective.init_projections(jax.random.PRNGKey(proj_seed))
  optimizer = optax.sgd(0.0)
  state = state_lib.create_train_state(s_params, optimizer, projection_params=projections)
  state = state.replace(step=jnp.asarray(STEP, jnp.int32))
  step = jax.jit(functools.partial(step_lib.train_step, student_apply=student.apply,
                                   teacher_applies={n: m.apply for n, m in teachers.items()},
                                   objective=objective, optimizer=optimizer))
  _, metrics = step(state, t_params, batch)
  metrics = jax.tree.map(np.asarray, metrics)
  return metrics, jax.tree.map(np.asarray, projections)


def _f64(out):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def _outputs(model, params, batch, outputs):
  """`model.apply`'s `outputs` of `batch` in float64, run as one jitted program (eager, every op
  of the model would compile on its own)."""
  return _f64(jax.jit(functools.partial(model.apply, outputs=outputs))(params, batch))


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(logp, logq):
  """Σ p (log p − log q) over the last axis."""
  return (np.exp(logp) * (logp - logq)).sum(-1)


def _masked(values, where):
  """(sum, count) of `values` where `where` (broadcast) holds."""
  where = np.broadcast_to(np.asarray(where, bool), np.shape(values))
  return float(np.where(where, values, 0.0).sum()), float(where.sum())


def _sum_pairs(parts):
  parts = list(parts)
  return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _project(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _only(proj_of_term):
  (value,) = proj_of_term.values()
  return value


def _cosine_schedule(start, end, steps, step):
  x = min(step / steps, 1.0)
  return start + (end - start) * (1 - np.cos(np.pi * x)) / 2


def _linear_schedule(start, end, steps, step):
  return start + (end - start) * min(step / steps, 1.0)


def _check(metrics, want, weights):
  for name, (total, count) in want.items():
    got_sum, got_count = (float(v) for v in metrics[name])
    assert got_count == count, (name, got_count, count)
    assert abs(total) / max(count, 1) > 1e-5, (name, total, "the reference is too small to tell anything")
    np.testing.assert_allclose(got_sum / got_count, total / count, rtol=2e-4, atol=1e-9, err_msg=name)
  loss = sum(weights[n] * s / max(c, 1.0) for n, (s, c) in want.items())
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=2e-4)


# --------------------------------------------------------------------------- encoder: features, attention, relations


@pytest.fixture(scope="module")
def encoder_pair(tmp_path_factory):
  root = tmp_path_factory.mktemp("ref_bert")
  teacher = dj.load_model(tiny.make_checkpoint(root / "t", "bert", "masked_lm", num_hidden_layers=4, **_NO_DROPOUT),
                          "masked_lm")
  student = dj.init_student(teacher, num_layers=2, hidden_size=16)
  assert (teacher.num_layers, teacher.hidden_size, student.num_layers, student.hidden_size) == (4, 32, 2, 16)
  return teacher, student, _perturbed(teacher.params, 0), _perturbed(student.params, 1)


ENCODER_TERMS = [
    {"loss": "forward_kl", "name": "kd", "weight": 0.7,
     "temperature_schedule": {"kind": "linear", "start": 1.0, "end": 3.0, "steps": 8}},
    {"loss": "cross_entropy", "name": "ce", "positions": "labels",
     "weight_schedule": {"kind": "cosine", "start": 0.0, "end": 2.0, "steps": 6}},
    {"loss": "reverse_kl", "name": "rkl", "positions": "labels", "temperature": 1.5, "weight": 0.3},
    {"loss": "hidden_mse", "layers": "uniform", "include_embeddings": True, "projection": "linear"},
    {"loss": "hidden_cosine", "layers": [[1, 1], [2, 3]], "projection": "linear", "weight": 0.5},
    {"loss": "cls_mse", "projection": "linear"},
    {"loss": "pooled_cosine", "projection": "linear"},
    {"loss": "attention_kl", "layers": "uniform"},
    {"loss": "attention_mse", "layers": [2, 3], "weight": 0.1},
    {"loss": "value_relation", "layers": "last"},
    {"loss": "token_relation", "layers": "last", "kind": "euclidean"},
    {"loss": "similarity_preserving", "weight": 3.0, "pooling": "cls"},
    {"loss": "rkd_distance", "pooling": "cls"},
    {"loss": "rkd_angle"},
]


def test_encoder_terms_match_references(encoder_pair):
  teacher, student, t_params, s_params = encoder_pair
  objective = objective_lib.build_objective(ENCODER_TERMS, student=student, teachers={"teacher": teacher})
  batch = _batch(0, rows=5, length=9, vocab=tiny.VOCAB_SIZE)
  metrics, proj = _run_step(objective, student, {"teacher": teacher}, s_params, {"teacher": t_params}, batch)

  everything = ("logits", "hidden_states", "attention_scores", "attention_probs", "values")
  s = _outputs(student, s_params, batch, everything)
  t = _outputs(teacher, t_params, batch, everything)
  mask = batch["attention_mask"].astype(bool)
  loss_mask = batch["loss_mask"].astype(bool)
  rows = mask.any(-1)
  assert not rows[-1] and rows[:-1].all()
  want = {}

  temperature = _linear_schedule(1.0, 3.0, 8, STEP)  # 2.0
  kl = temperature ** 2 * _kl(_log_softmax(t.logits / temperature), _log_softmax(s.logits / temperature))
  want["kd"] = _masked(kl, mask)
  logp = _log_softmax(s.logits)
  ce = -np.take_along_axis(logp, batch["labels"][..., None], -1)[..., 0]
  want["ce"] = _masked(ce, loss_mask)
  rkl = 1.5 ** 2 * _kl(_log_softmax(s.logits / 1.5), _log_softmax(t.logits / 1.5))
  want["rkl"] = _masked(rkl, loss_mask)

  # Layer maps by hand: 'uniform' maps student layer i to teacher layer 2i (4 teacher layers, 2 student).
  p = proj["hidden_mse"]
  assert sorted(p) == ["s0_t0", "s1_t2", "s2_t4"]
  want["hidden_mse"] = _sum_pairs(
      _masked(((_project(p[f"s{i}_t{j}"], s.hidden_states[i]) - t.hidden_states[j]) ** 2).mean(-1), mask)
      for i, j in ((0, 0), (1, 2), (2, 4)))

  def cosine(a, b):
    return 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

  p = proj["hidden_cosine"]
  want["hidden_cosine"] = _sum_pairs(
      _masked(cosine(_project(p[f"s{i}_t{j}"], s.hidden_states[i]), t.hidden_states[j]), mask)
      for i, j in ((1, 1), (2, 3)))
  # Fully padded rows have zero-norm states; they are masked out of every term.
  cls_s, cls_t = _project(_only(proj["cls_mse"]), s.hidden_states[-1][:, 0]), t.hidden_states[-1][:, 0]
  want["cls_mse"] = _masked(((cls_s - cls_t) ** 2).mean(-1), rows)

  def mean_pool(h):
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1.0)

  pooled_s, pooled_t = mean_pool(s.hidden_states[-1]), mean_pool(t.hidden_states[-1])
  want["pooled_cosine"] = _masked(
      np.where(rows, cosine(_project(_only(proj["pooled_cosine"]), pooled_s) + (~rows)[:, None],
                            pooled_t + (~rows)[:, None]), 0.0), rows)

  # Attention maps start at layer 1: output index l - 1; values are one per (head, query).
  heads = student.num_heads
  head_mask = np.broadcast_to(mask[:, None, :], (mask.shape[0], heads, mask.shape[1]))
  # Batch relations by slicing: the padded row is dropped, not masked.
  real = np.flatnonzero(rows)
  cls_s, cls_t = s.hidden_states[-1][:, 0], t.hidden_states[-1][:, 0]
  relations = (("similarity_preserving", losses.similarity_preserving, cls_s[real], cls_t[real]),
               ("rkd_distance", losses.rkd_distance, cls_s[real], cls_t[real]),
               ("rkd_angle", losses.rkd_angle, pooled_s[real], pooled_t[real]))

  @jax.jit  # the `losses` references in one program (eager, every op compiles on its own: ~150 compiles)
  def reference_values(s, t, relation_inputs):
    return {
        "attention_kl": [losses.attention_kl(s.attention_probs[i - 1], t.attention_probs[j - 1], where=head_mask)
                         for i, j in ((1, 2), (2, 4))],
        "attention_mse": [losses.attention_mse(s.attention_scores[i - 1], t.attention_scores[j - 1],
                                               where=head_mask, key_mask=mask) for i, j in ((1, 2), (2, 3))],
        "value_relation": losses.value_relation_kl(s.values[1], t.values[3], num_heads=heads, where=head_mask,
                                                   key_mask=mask),
        "token_relation": losses.token_relation(s.hidden_states[2], t.hidden_states[4], where=mask,
                                                kind="euclidean"),
        **{name: fn(f_s, f_t) for (name, fn, _, _), (f_s, f_t) in zip(relations, relation_inputs)},
    }

  ref = _f64(reference_values(s, t, [(f_s, f_t) for _, _, f_s, f_t in relations]))
  want["attention_kl"] = _sum_pairs(_masked(v, head_mask) for v in ref["attention_kl"])
  want["attention_mse"] = _sum_pairs(_masked(v, head_mask) for v in ref["attention_mse"])
  want["value_relation"] = _masked(ref["value_relation"], head_mask)
  want["token_relation"] = _masked(ref["token_relation"], mask)
  for name, _, _, _ in relations:
    want[name] = (float(ref[name].sum()), float(len(real)))

  weights = {t_["name"] if "name" in t_ else t_["loss"]: t_.get("weight", 1.0) for t_ in ENCODER_TERMS}
  weights["ce"] = _cosine_schedule(0.0, 2.0, 6, STEP)
  assert set(want) == set(weights) == set(metrics) - {"loss", "grad_norm", "nonfinite"}
  _check(metrics, want, weights)


# --------------------------------------------------------------------------- decoder: logits, top-k, ensembles


@pytest.fixture(scope="module")
def decoder_trio(tmp_path_factory):
  root = tmp_path_factory.mktemp("ref_gpt2")
  teacher = dj.load_model(tiny.make_checkpoint(root / "t", "gpt2", "causal_lm", num_hidden_layers=2,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "causal_lm")
  student = dj.init_student(teacher, num_layers=1)
  return teacher, student, _perturbed(teacher.params, 2), _perturbed(teacher.params, 3), _perturbed(student.params, 4)


DECODER_TERMS = [
    {"loss": "forward_kl", "positions": "labels", "temperature": 2.0, "teacher": "a",
     "weight_schedule": {"kind": "linear", "start": 1.0, "end": 0.0, "steps": 10}},
    {"loss": "generalized_jsd", "beta": 0.3, "teacher": "b", "weight": 0.5},
    {"loss": "sparse_forward_kl", "top_k": 8, "teacher": "a", "temperature": 1.5},
    {"loss": "ensemble_kl", "teacher": ["a", "b"], "temperature": 1.0, "weight": 2.0},
    {"loss": "cross_entropy"},
    {"loss": "hidden_mse", "teacher": "b", "layers": [2]},
]


def test_decoder_terms_match_references(decoder_trio):
  teacher, student, a_params, b_params, s_params = decoder_trio
  teachers = {"a": teacher, "b": teacher}
  objective = objective_lib.build_objective(DECODER_TERMS, student=student, teachers=teachers)
  batch = _batch(1, rows=4, length=8, vocab=tiny.VOCAB_SIZE)
  metrics, _ = _run_step(objective, student, teachers, s_params, {"a": a_params, "b": b_params}, batch)

  outs = ("logits", "hidden_states")
  s = _outputs(student, s_params, batch, outs)
  t_apply = jax.jit(functools.partial(teacher.apply, outputs=outs))  # one compile for both teachers
  a, b = (_f64(t_apply(p, batch)) for p in (a_params, b_params))
  mask, loss_mask = batch["attention_mask"].astype(bool), batch["loss_mask"].astype(bool)
  want = {}
  logq = _log_softmax(s.logits)
  want["forward_kl"] = _masked(4.0 * _kl(_log_softmax(a.logits / 2), _log_softmax(s.logits / 2)), loss_mask)

  # Generalized JSD (TRL convention): m = β p_T + (1-β) q_S; β KL(p_T‖m) + (1-β) KL(q_S‖m).
  logp_b = _log_softmax(b.logits)
  log_m = np.logaddexp(np.log(0.3) + logp_b, np.log(0.7) + logq)
  want["generalized_jsd"] = _masked(0.3 * _kl(logp_b, log_m) + 0.7 * _kl(logq, log_m), mask)

  # Top-8 of the teacher + one tail bucket, tempered per bucket.
  logp_a = _log_softmax(a.logits)
  top = np.argsort(-logp_a, axis=-1)[..., :8]
  tail_t = np.log1p(-np.exp(np.take_along_axis(logp_a, top, -1)).sum(-1, keepdims=True))
  tail_s = np.log1p(-np.exp(np.take_along_axis(logq, top, -1)).sum(-1, keepdims=True))
  buckets_t = np.concatenate([np.take_along_axis(logp_a, top, -1), tail_t], -1)
  buckets_s = np.concatenate([np.take_along_axis(logq, top, -1), tail_s], -1)
  want["sparse_forward_kl"] = _masked(
      1.5 ** 2 * _kl(_log_softmax(buckets_t / 1.5), _log_softmax(buckets_s / 1.5)), mask)

  log_mean = np.logaddexp(logp_a, logp_b) - np.log(2.0)
  want["ensemble_kl"] = _masked(_kl(log_mean, logq), mask)
  ce = -np.take_along_axis(logq, batch["labels"][..., None], -1)[..., 0]
  want["cross_entropy"] = _masked(ce, mask)  # positions: all real tokens
  want["hidden_mse"] = _masked(((s.hidden_states[1] - b.hidden_states[2]) ** 2).mean(-1), mask)

  weights = {"forward_kl": _linear_schedule(1.0, 0.0, 10, STEP), "generalized_jsd": 0.5, "sparse_forward_kl": 1.0,
             "ensemble_kl": 2.0, "cross_entropy": 1.0, "hidden_mse": 1.0}
  assert set(want) == set(weights) == set(metrics) - {"loss", "grad_norm", "nonfinite"}
  _check(metrics, want, weights)
