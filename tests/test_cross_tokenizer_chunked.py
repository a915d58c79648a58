"""uld / hybrid_uld from hidden states + heads, chunked: equal to the dense losses on the heads' logits
(values and student gradients), and a cross-tokenizer objective with a chunk_size takes that path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses
from distill_jax.data import pipeline as data
from distill_jax.objective import objective as objective_lib
from distill_jax.training import run_setup

from test_cross_tokenizer_train import _config, setup  # noqa: F401  (setup: its module fixture)
from test_metrics_chunked import largest_vocab_array

B, T, DS, DT = 2, 7, 8, 12
WS, WT = 40, 56  # kernel widths; the vocabularies below are narrower (padded heads)
S_IDS, T_IDS = np.array([0, 3, 5, 11, 20, 36]), np.array([2, 3, 9, 40, 17, 49])

# (loss, temperature, top_k, student_vocab, teacher_vocab, biases, softcaps, chunk_size)
CASES = [
    ("uld", 1.5, None, 37, 50, True, (30.0, 20.0), 3),
    ("uld", 1.0, 5, None, None, False, (None, None), 4),
    ("hybrid_uld", 0.7, None, 37, 50, True, (None, 15.0), 3),
    ("hybrid_uld", 2.0, 6, 37, None, False, (25.0, None), 7),
]


def _np_head(h, w, b, cap, vocab):
  """NumPy reference of a head's logits ``cap·tanh((h @ w + b) / cap)[..., :vocab]``."""
  z = np.einsum("...d,dv->...v", np.asarray(h, np.float64), np.asarray(w, np.float64))
  z = z + (0 if b is None else np.asarray(b, np.float64))
  z = z if cap is None else cap * np.tanh(z / cap)
  return z[..., :vocab]


def _inputs():
  rng = np.random.RandomState(0)
  f = lambda *shape, scale=1.0: (rng.randn(*shape) * scale).astype(np.float32)  # noqa: E731
  where = np.ones((B, T), bool)
  where[0, 2] = where[1, 5] = where[1, 6] = False
  return dict(hs=f(B, T, DS), ws=f(DS, WS, scale=2.0), bs=f(WS), ht=f(B, T, DT), wt=f(DT, WT, scale=2.0),
              bt=f(WT), where=where)


def _kwargs(case, x):
  loss, temperature, top_k, s_vocab, t_vocab, biases, (s_cap, t_cap), _ = case
  kw = dict(temperature=temperature, top_k=top_k)
  if loss == "hybrid_uld":
    kw.update(student_shared_ids=S_IDS, teacher_shared_ids=T_IDS)
  heads = dict(student_bias=x["bs"] if biases else None, teacher_bias=x["bt"] if biases else None,
               student_softcap=s_cap, teacher_softcap=t_cap)
  return kw, heads, s_vocab or WS, t_vocab or WT


@pytest.fixture(scope="module")
def results():
  x = _inputs()
  nan = np.where(x["where"][..., None], 0.0, np.nan).astype(np.float32)  # masked rows hold NaN (chunked only)

  @jax.jit
  def run(hs, ws, bs, ht, wt, bt):
    arrays = dict(x, hs=hs, ws=ws, bs=bs, ht=ht, wt=wt, bt=bt)
    out = []
    for case in CASES:
      kw, heads, s_vocab, t_vocab = _kwargs(case, arrays)
      dense, chunked = getattr(losses, case[0]), getattr(losses, "chunked_" + case[0])

      def dense_sum(hs, ws, bs, ht):
        z_s = jnp.einsum("btd,dv->btv", hs, ws) + (bs if heads["student_bias"] is not None else 0.0)
        z_t = jnp.einsum("btd,dv->btv", jax.lax.stop_gradient(ht), wt) + (
            bt if heads["teacher_bias"] is not None else 0.0)
        cap_s, cap_t = heads["student_softcap"], heads["teacher_softcap"]
        z_s = z_s if cap_s is None else cap_s * jnp.tanh(z_s / cap_s)
        z_t = z_t if cap_t is None else cap_t * jnp.tanh(z_t / cap_t)
        values = dense(z_s[..., :s_vocab], z_t[..., :t_vocab], where=x["where"], **kw)
        return jnp.sum(values * jnp.arange(1.0, 1.0 + values.size).reshape(values.shape)), values

      def chunked_sum(hs, ws, bs, ht):
        values = chunked(hs + nan, ws, ht + nan, wt, where=x["where"], chunk_size=case[-1],
                         student_vocab=case[3], teacher_vocab=case[4],
                         **dict(heads, student_bias=bs if heads["student_bias"] is not None else None), **kw)
        return jnp.sum(values * jnp.arange(1.0, 1.0 + values.size).reshape(values.shape)), values

      grads = [jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)(hs, ws, bs, ht)
               for fn in (dense_sum, chunked_sum)]
      out.append([(values, g) for (_, values), g in grads])
    return out

  return x, jax.device_get(run(x["hs"], x["ws"], x["bs"], x["ht"], x["wt"], x["bt"]))


@pytest.mark.parametrize("k", range(len(CASES)))
def test_chunked_equals_dense_values_and_student_grads(results, k):
  x, out = results
  (d_values, d_grads), (c_values, c_grads) = out[k]
  case = CASES[k]
  kw, heads, s_vocab, t_vocab = _kwargs(case, x)
  # the dense values themselves against NumPy-formed logits (the heads' formula)
  np_s = _np_head(x["hs"], x["ws"], heads["student_bias"], heads["student_softcap"], s_vocab)
  np_t = _np_head(x["ht"], x["wt"], heads["teacher_bias"], heads["teacher_softcap"], t_vocab)
  want = np.asarray(getattr(losses, case[0])(np_s.astype(np.float32), np_t.astype(np.float32), where=x["where"],
                                             **kw))
  np.testing.assert_allclose(d_values, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(c_values, d_values, rtol=1e-5, atol=1e-7)
  assert np.all(c_values[~x["where"]] == 0) and np.all(c_values[x["where"]] > 0)
  for name, d, c in zip(("student_hidden", "student_kernel", "student_bias"), d_grads[:3], c_grads[:3]):
    np.testing.assert_allclose(c, d, rtol=1e-5, atol=1e-6 * np.abs(d).max(), err_msg=name)
  assert np.abs(c_grads[0]).max() > 0 and np.all(c_grads[0][~x["where"]] == 0)
  assert np.all(np.isfinite(c_grads[1])) and np.abs(c_grads[1]).max() > 0
  if s_vocab < WS:  # padded columns get exactly nothing
    assert np.all(c_grads[1][:, s_vocab:] == 0)
  # the teacher is a constant, as in the step (its outputs are stop-gradient there)
  assert np.all(c_grads[3] == 0) and np.all(d_grads[3] == 0)


def test_bad_arguments_are_one_line():
  x = _inputs()
  with pytest.raises(ValueError, match=r"^token axes differ: student_hidden \(2, 7, 8\), teacher_hidden \(2, 6, 12\)"):
    losses.chunked_uld(x["hs"], x["ws"], x["ht"][:, :6], x["wt"])
  with pytest.raises(ValueError, match=r"^teacher_vocab: 57 exceeds the unembedding width 56$"):
    losses.chunked_uld(x["hs"], x["ws"], x["ht"], x["wt"], teacher_vocab=57)
  with pytest.raises(ValueError, match=r"^chunk_size: 0 must be a positive integer$"):
    losses.chunked_hybrid_uld(x["hs"], x["ws"], x["ht"], x["wt"], student_shared_ids=S_IDS,
                              teacher_shared_ids=T_IDS, chunk_size=0)
  with pytest.raises(ValueError, match=r"^hybrid_uld: student_shared_ids \(6,\) and teacher_shared_ids \(5,\)"):
    losses.chunked_hybrid_uld(x["hs"], x["ws"], x["ht"], x["wt"], student_shared_ids=S_IDS,
                              teacher_shared_ids=T_IDS[:5])


def test_a_cross_tokenizer_objective_is_chunked_and_equals_the_logits_path(setup):  # noqa: F811
  # The default objective.chunk_size. Scanned layers: the model is then one compiled loop body in both
  # programs below, so both objectives see the same hidden states; unrolled, XLA fuses the model's
  # ops with each objective's differently, and the sorted L1's near-ties flip with that rounding
  # (a .ci/run saw 3% of one gradient's entries differ by up to 1.5e-4).
  run = run_setup.build_run(_config(setup, "chunked", "train.layer_loop=scan"))
  assert run.objective.chunk_size == losses.DEFAULT_CHUNK_SIZE
  assert run.objective.outputs_for("teacher") == run.objective.outputs_for("student") == ("final_hidden", "head")
  teacher, student = run.teachers["teacher"], run.student
  assert not (teacher.module.unroll_layers or student.module.unroll_layers)
  build = lambda chunk_size: objective_lib.build_objective(  # noqa: E731
      run.config.resolved_terms(), student=student, teachers=run.teachers, chunk_size=chunk_size)
  batch = next(iter(data.eval_batches(run.eval_examples, global_batch_size=8, process_index=0, process_count=1)))
  rows, positions = batch["input_ids"].shape
  t_batch = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]}

  # Peaked distributions (weights × 4, as test_metrics_chunked): the L1 of near-uniform sorted
  # probabilities has near-ties whose gradient sign flips with rounding.
  peak = lambda params: jax.tree.map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)  # noqa: E731
  t_params, s_params0 = peak(teacher.params), peak(run.initial_student_params)

  def loss(obj, s_params):
    t_out = teacher.apply(t_params, t_batch, outputs=obj.outputs_for("teacher"))
    s_out = student.apply(s_params, batch, outputs=obj.outputs_for("student"))
    return obj(s_out, {"teacher": t_out}, batch, {}, 0)

  results = {}
  for chunk_size in (5, None):  # 5 does not divide the rows' length
    obj = build(chunk_size)
    assert obj.chunk_size == chunk_size
    fn = jax.value_and_grad(lambda p, o=obj: loss(o, p), has_aux=True)
    results[chunk_size] = jax.jit(fn)(s_params0)
    # the largest array with a vocabulary-wide axis (heads and their gradients are [H, V], H <= 32)
    jaxpr = jax.make_jaxpr(fn)(s_params0)
    largest = max(largest_vocab_array(jaxpr, v) for v in (student.vocab_size, teacher.vocab_size))
    assert (largest >= rows * positions * min(student.vocab_size, teacher.vocab_size)) == (chunk_size is None)
  (_, got_metrics), got_grads = results[5]
  (_, want_metrics), want_grads = results[None]
  for name in ("uld", "hybrid_uld"):
    np.testing.assert_allclose(float(got_metrics[name][0]), float(want_metrics[name][0]), rtol=1e-5)
    assert float(got_metrics[name][1]) == float(want_metrics[name][1]) > 0
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * np.abs(w).max())
