"""Cross-tokenizer losses against NumPy references, plus their properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from distill_jax import losses

VS, VT = 11, 7


def _softmax(z, temperature=1.0):
  return scipy.special.softmax(np.asarray(z, np.float64) / temperature, axis=-1)


def _ref_sorted_l1(ps, pt, top_k=None):
  width = max(ps.shape[-1], pt.shape[-1])
  out = np.zeros(ps.shape[:-1])
  for idx in np.ndindex(*ps.shape[:-1]):
    a = np.zeros(width)
    b = np.zeros(width)
    a[:ps.shape[-1]] = sorted(ps[idx], reverse=True)
    b[:pt.shape[-1]] = sorted(pt[idx], reverse=True)
    k = width if top_k is None else min(top_k, width)
    out[idx] = np.abs(a[:k] - b[:k]).sum()
  return out


def _ref_uld(zs, zt, temperature=1.0, top_k=None):
  return temperature**2 * _ref_sorted_l1(_softmax(zs, temperature), _softmax(zt, temperature), top_k)


def _ref_hybrid(zs, zt, s_ids, t_ids, temperature=1.0, wm=1.0, wu=1.0):
  ps, pt = _softmax(zs, temperature), _softmax(zt, temperature)
  kl = np.sum(pt[..., t_ids] * (np.log(pt[..., t_ids]) - np.log(ps[..., s_ids])), axis=-1)
  rest_s = np.delete(ps, s_ids, axis=-1)
  rest_t = np.delete(pt, t_ids, axis=-1)
  return temperature**2 * (wm * kl + wu * _ref_sorted_l1(rest_s, rest_t))


def _pair(seed=0, shape=(2, 3), vs=VS, vt=VT, scale=2.0):
  rng = np.random.RandomState(seed)
  return ((scale * rng.randn(*shape, vs)).astype(np.float32), (scale * rng.randn(*shape, vt)).astype(np.float32))


S_IDS = np.array([0, 3, 4, 9], np.int32)  # student ids of the shared tokens
T_IDS = np.array([6, 1, 2, 0], np.int32)  # the teacher's ids of the same tokens


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("vs,vt", [(VS, VT), (VT, VS), (VT, VT)])
def test_uld_against_numpy(temperature, vs, vt):
  zs, zt = _pair(vs=vs, vt=vt)
  got = jax.jit(lambda a, b: losses.uld(a, b, temperature=temperature))(zs, zt)
  np.testing.assert_allclose(got, _ref_uld(zs, zt, temperature), rtol=1e-5, atol=1e-6)
  assert got.dtype == jnp.float32 and got.shape == (2, 3)


def test_uld_top_k_against_numpy():
  zs, zt = _pair(1)
  np.testing.assert_allclose(losses.uld(zs, zt, top_k=3), _ref_uld(zs, zt, top_k=3), rtol=1e-5, atol=1e-6)


def test_uld_is_zero_for_a_permuted_distribution_and_positive_otherwise():
  zs, _ = _pair(2, vt=VS)
  perm = np.random.RandomState(0).permutation(VS)
  np.testing.assert_allclose(losses.uld(zs, zs[..., perm]), 0.0, atol=1e-6)
  # A teacher with more (zero-probability) entries: padding makes no difference.
  padded = np.concatenate([zs, np.full(zs.shape[:-1] + (3,), -np.inf, np.float32)], axis=-1)
  np.testing.assert_allclose(losses.uld(zs, padded), 0.0, atol=1e-6)
  assert np.all(np.asarray(losses.uld(*_pair(3))) > 0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 2.0)])
def test_hybrid_uld_against_numpy(temperature, weights):
  zs, zt = _pair(4)
  fn = jax.jit(lambda a, b: losses.hybrid_uld(a, b, student_shared_ids=S_IDS, teacher_shared_ids=T_IDS,
                                              temperature=temperature, matched_weight=weights[0],
                                              unmatched_weight=weights[1]))
  np.testing.assert_allclose(fn(zs, zt), _ref_hybrid(zs, zt, S_IDS, T_IDS, temperature, *weights),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hybrid_uld_equals_forward_kl_for_the_same_tokenizer(temperature):
  zs, zt = _pair(5, vt=VS)
  ids = np.arange(VS, dtype=np.int32)
  got = losses.hybrid_uld(zs, zt, student_shared_ids=ids, teacher_shared_ids=ids, temperature=temperature)
  np.testing.assert_allclose(got, losses.forward_kl(zs, zt, temperature=temperature), rtol=1e-5, atol=1e-7)
  # The same vocabulary in another order: the mapping undoes the permutation.
  perm = np.random.RandomState(1).permutation(VS).astype(np.int32)
  got = losses.hybrid_uld(zs, zt[..., perm], student_shared_ids=perm, teacher_shared_ids=ids,
                          temperature=temperature)
  np.testing.assert_allclose(got, losses.forward_kl(zs, zt, temperature=temperature), rtol=1e-5, atol=1e-7)


def test_hybrid_uld_without_shared_tokens_is_uld():
  zs, zt = _pair(6)
  none = np.zeros((0,), np.int32)
  np.testing.assert_allclose(losses.hybrid_uld(zs, zt, student_shared_ids=none, teacher_shared_ids=none),
                             losses.uld(zs, zt), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["uld", "hybrid_uld"])
def test_where_matches_slicing_and_masks_nan(name):
  fn = (losses.uld if name == "uld" else
        lambda a, b, **kw: losses.hybrid_uld(a, b, student_shared_ids=S_IDS, teacher_shared_ids=T_IDS, **kw))
  zs, zt = _pair(7)
  where = np.array([[True, False, True], [False, True, True]])
  zs_bad = np.where(where[..., None], zs, np.nan).astype(np.float32)
  zt_bad = np.where(where[..., None], zt, np.inf).astype(np.float32)
  got = fn(zs_bad, zt_bad, where=where)
  np.testing.assert_allclose(np.asarray(got)[where], np.asarray(fn(zs[where], zt[where])), rtol=1e-6)
  assert np.all(np.asarray(got)[~where] == 0)
  grads = jax.grad(lambda a: jnp.sum(fn(a, zt_bad, where=where)))(zs_bad)
  assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[~where] == 0)


def test_grads():
  zs, zt = _pair(8, shape=(2,))
  check_grads(lambda a: losses.uld(a, zt, temperature=1.5), (zs,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
  check_grads(lambda a: losses.hybrid_uld(a, zt, student_shared_ids=S_IDS, teacher_shared_ids=T_IDS),
              (zs,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_bad_arguments_are_one_line_errors():
  zs, zt = _pair(9)
  with pytest.raises(ValueError, match="^temperature: 0 must be > 0$"):
    losses.uld(zs, zt, temperature=0)
  with pytest.raises(ValueError, match="^top_k: 0 must be a positive integer$"):
    losses.uld(zs, zt, top_k=0)
  with pytest.raises(ValueError, match="^uld: .*leading axes"):
    losses.uld(zs, zt[:1])
  with pytest.raises(ValueError, match="^hybrid_uld: .*equal-length 1-D"):
    losses.hybrid_uld(zs, zt, student_shared_ids=S_IDS, teacher_shared_ids=T_IDS[:2])
  with pytest.raises(ValueError, match="^unmatched_weight: -1.0 must be >= 0$"):
    losses.hybrid_uld(zs, zt, student_shared_ids=S_IDS, teacher_shared_ids=T_IDS, unmatched_weight=-1.0)


SPAN = np.array([[0, 0, 1, -1, 2, 2, 2, -1], [-1, 0, 1, 1, 1, 2, 3, 3]], np.int32)


def _ref_span_pool(values, span, mean):
  out = np.zeros_like(values, dtype=np.float64)
  for b in range(span.shape[0]):
    for i in range(span.shape[1]):
      if span[b, i] >= 0:
        members = values[b][span[b] == span[b, i]]
        out[b, i] = members.mean(0) if mean else members.sum(0)
  return out


def test_span_sum_and_mean_against_loops():
  rng = np.random.RandomState(0)
  values = rng.randn(2, 8).astype(np.float32)
  hidden = rng.randn(2, 8, 5).astype(np.float32)
  np.testing.assert_allclose(jax.jit(losses.span_sum)(values, SPAN), _ref_span_pool(values, SPAN, False),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.span_sum(hidden, SPAN), _ref_span_pool(hidden, SPAN, False), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(losses.span_mean)(hidden, SPAN), _ref_span_pool(hidden, SPAN, True),
                             rtol=1e-5, atol=1e-6)


def test_span_log_probs_against_numpy():
  rng = np.random.RandomState(1)
  logits = rng.randn(2, 8, 6).astype(np.float32)
  labels = rng.randint(0, 6, (2, 8))
  logp = np.log(_softmax(logits))
  token = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  got = losses.span_log_probs(logits, labels, SPAN)
  np.testing.assert_allclose(got, _ref_span_pool(token, SPAN, False), rtol=1e-5, atol=1e-5)
  # A span of one token is that token's log-probability; a masked position leaves its span.
  where = np.ones((2, 8), bool)
  where[0, 1] = False
  got = np.asarray(losses.span_log_probs(logits, labels, SPAN, where=where))
  np.testing.assert_allclose(got[0, 0], token[0, 0], rtol=1e-5)
  assert got[0, 1] == 0


def test_span_gather():
  rng = np.random.RandomState(2)
  values = rng.randn(2, 5, 3).astype(np.float32)
  index = np.array([[4, 0, 0, 2], [1, 1, 3, 0]])
  want = np.stack([values[b, index[b]] for b in range(2)])
  np.testing.assert_array_equal(losses.span_gather(values, index), want)
  np.testing.assert_array_equal(losses.span_gather(values[..., 0], index), want[..., 0])
