"""Cross-tokenizer distillation from a teacher cache: the sparse ULD / hybrid ULD against NumPy
references and their dense forms, `cache-teacher` on the teacher's own tokens, training from it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from distill_jax import losses
from test_losses_cross_tokenizer import S_IDS, T_IDS, VT, _pair, _softmax

# --------------------------------------------------------------------------- the losses


def _top_k(zt, k):
  """The teacher's top-k (ids sorted ascending), log-probs and log tail, in float64 NumPy."""
  logp = np.log(_softmax(zt))
  ids = np.sort(np.argsort(-logp, axis=-1, kind="stable")[..., :k], axis=-1)
  kept = np.take_along_axis(logp, ids, -1)
  rest = np.ones(logp.shape, bool)
  np.put_along_axis(rest, ids, False, -1)
  log_tail = np.where(rest.any(-1), scipy.special.logsumexp(np.where(rest, logp, -np.inf), axis=-1), -np.inf)
  return ids.astype(np.int32), kept.astype(np.float32), log_tail.astype(np.float32)


def _buckets(logprobs, log_tails, temperature):
  """The teacher's tempered bucket probabilities (kept entries, then the tails)."""
  with np.errstate(divide="ignore"):
    return _softmax(np.concatenate([logprobs, *[t[..., None] for t in log_tails]], -1), temperature)


def _l1_with_tail(s, t_known, tail):
  """Σ_{j<n}|s↓_j − t↓_j| + |Σ_{j≥n} s↓_j − tail| for one position (n = len(t_known))."""
  s = np.sort(s)[::-1]
  s = np.concatenate([s, np.zeros(max(0, len(t_known) - len(s)))])
  t = np.sort(t_known)[::-1]
  return np.abs(s[:len(t)] - t).sum() + abs(s[len(t):].sum() - tail)


def _ref_sparse_uld(zs, ids, logprobs, log_tail, temperature=1.0):
  ps, out = _softmax(zs, temperature), np.zeros(zs.shape[:-1])
  b = _buckets(logprobs, [log_tail], temperature)
  k = ids.shape[-1]
  for idx in np.ndindex(*zs.shape[:-1]):
    out[idx] = _l1_with_tail(ps[idx], b[idx][:k], b[idx][k])
  return temperature**2 * out


def _ref_sparse_hybrid(zs, ids, logprobs, log_tail, s_ids, t_ids, vt, temperature=1.0):
  to_student = dict(zip(t_ids.tolist(), s_ids.tolist()))
  ps, out, k = _softmax(zs, temperature), np.zeros(zs.shape[:-1]), ids.shape[-1]
  for idx in np.ndindex(*zs.shape[:-1]):
    kept = ids[idx].tolist()
    shared = [t in to_student for t in kept]
    unkept_shared = len(t_ids) - sum(shared)
    tau = np.exp(log_tail[idx])
    tau_m = tau * unkept_shared / max(vt - k, 1)
    with np.errstate(divide="ignore"):
      b = _buckets(logprobs[idx], [np.log(tau_m), np.log(tau - tau_m)], temperature)
    kl = sum(b[j] * (np.log(b[j]) - np.log(ps[idx][to_student[t]])) for j, t in enumerate(kept) if shared[j] and b[j])
    rest_shared = [s for s in s_ids.tolist() if s not in {to_student[t] for t in kept if t in to_student}]
    if b[k] > 0:
      kl += b[k] * (np.log(b[k]) - np.log(ps[idx][rest_shared].sum()))
    rest_s = np.delete(ps[idx], s_ids)
    out[idx] = kl + _l1_with_tail(rest_s, b[:k][~np.asarray(shared)], b[k + 1])
  return temperature**2 * out


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 3, VT])
def test_sparse_uld_against_numpy(temperature, k):
  zs, zt = _pair(seed=1)
  ids, logprobs, log_tail = _top_k(zt, k)
  got = jax.jit(lambda *a: losses.sparse_uld(*a, temperature=temperature))(zs, ids, logprobs, log_tail)
  np.testing.assert_allclose(got, _ref_sparse_uld(zs, ids, logprobs, log_tail, temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 3, VT])
def test_sparse_hybrid_uld_against_numpy(temperature, k):
  zs, zt = _pair(seed=2)
  ids, logprobs, log_tail = _top_k(zt, k)
  fn = jax.jit(lambda *a: losses.sparse_hybrid_uld(*a, student_shared_ids=S_IDS, teacher_shared_ids=T_IDS,
                                                    teacher_vocab=VT, temperature=temperature))
  want = _ref_sparse_hybrid(zs, ids, logprobs, log_tail, S_IDS, T_IDS, VT, temperature)
  np.testing.assert_allclose(fn(zs, ids, logprobs, log_tail), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("vs,vt", [(11, 7), (7, 11)])
def test_with_the_whole_teacher_vocabulary_both_equal_their_dense_forms(temperature, vs, vt):
  zs, zt = _pair(seed=3, vs=vs, vt=vt)
  ids, logprobs, log_tail = _top_k(zt, vt)  # k = Vt: log_tail = -inf
  assert np.all(np.isneginf(log_tail))
  np.testing.assert_allclose(losses.sparse_uld(zs, ids, logprobs, log_tail, temperature=temperature),
                             losses.uld(zs, zt, temperature=temperature), rtol=1e-5, atol=1e-6)
  s_ids, t_ids = S_IDS[S_IDS < vs], T_IDS[S_IDS < vs]
  t_ok = t_ids < vt
  s_ids, t_ids = s_ids[t_ok], t_ids[t_ok]
  shared = dict(student_shared_ids=s_ids, teacher_shared_ids=t_ids, temperature=temperature)
  np.testing.assert_allclose(losses.sparse_hybrid_uld(zs, ids, logprobs, log_tail, teacher_vocab=vt, **shared),
                             losses.hybrid_uld(zs, zt, **shared), rtol=1e-5, atol=1e-6)


def test_sparse_uld_is_a_lower_bound_of_uld_against_the_whole_teacher():
  zs, zt = _pair(seed=4, shape=(64,))
  dense = np.asarray(losses.uld(zs, zt))
  previous = np.zeros_like(dense)
  for k in range(1, VT + 1):  # tighter with every kept entry, exact at k = Vt
    got = np.asarray(losses.sparse_uld(zs, *_top_k(zt, k)))
    assert np.all(got <= dense + 1e-6) and np.all(got >= previous - 1e-6)
    previous = got
  np.testing.assert_allclose(previous, dense, rtol=1e-5, atol=1e-6)


def test_sparse_hybrid_uld_with_one_tokenizer_is_sparse_forward_kl_at_temperature_1():
  # (At T != 1 the sparse KLs temper the student's buckets, the cross-tokenizer forms its whole distribution.)
  zs, zt = _pair(seed=5, vs=VT, vt=VT)
  ids, logprobs, log_tail = _top_k(zt, 3)
  every = np.arange(VT, dtype=np.int32)
  got = losses.sparse_hybrid_uld(zs, ids, logprobs, log_tail, student_shared_ids=every, teacher_shared_ids=every,
                                 teacher_vocab=VT)
  np.testing.assert_allclose(got, losses.sparse_forward_kl(zs, ids, logprobs, log_tail), rtol=1e-5, atol=1e-6)


def test_where_masks_values_and_gradients_and_the_gradients_are_right():
  zs, zt = _pair(seed=6)
  ids, logprobs, log_tail = _top_k(zt, 3)
  where = np.array([[True, False, True], [False, True, True]])
  bad = np.where(where[..., None], zs, np.nan)  # masked positions may hold anything
  hybrid = lambda z, **kw: losses.sparse_hybrid_uld(z, ids, logprobs, log_tail, student_shared_ids=S_IDS,  # noqa: E731
                                                    teacher_shared_ids=T_IDS, teacher_vocab=VT, **kw)
  uld = lambda z, **kw: losses.sparse_uld(z, ids, logprobs, log_tail, **kw)  # noqa: E731
  for fn in (uld, hybrid):
    full = np.asarray(fn(zs))
    got = fn(bad, where=where)
    np.testing.assert_allclose(got, np.where(where, full, 0.0), rtol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(fn(z, where=where)))(jnp.asarray(bad))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0)
    check_grads(lambda z: fn(z, temperature=2.0), (zs,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
