"""Relation losses (SP, RKD, token relations) against NumPy/SciPy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
from jax.test_util import check_grads

from distill_jax import losses

B, DS, DT, T = 6, 5, 9, 4


def _randn(seed, *shape):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _np_huber(x):
  return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)


def _np_relation(f, kind):
  f = f.astype(np.float64)
  if kind == "dot":
    return f @ f.T
  if kind == "cosine":
    return 1 - scipy.spatial.distance.cdist(f, f, "cosine")
  return scipy.spatial.distance.cdist(f, f, "euclidean")


def _np_sp(s, t):
  def gram(f):
    g = f.astype(np.float64) @ f.T.astype(np.float64)
    return g / np.linalg.norm(g, axis=1, keepdims=True)
  return np.sum((gram(t) - gram(s)) ** 2) / len(s) ** 2


def _np_rkd_distance(s, t):
  off = ~np.eye(len(s), dtype=bool)
  def psi(f):
    d = _np_relation(f, "euclidean")
    return d / d[off].mean()
  return _np_huber(psi(s) - psi(t))[off].mean()


def _np_rkd_angle(s, t):
  b = len(s)
  def psi(f):
    e = f[None, :, :].astype(np.float64) - f[:, None, :]
    n = np.linalg.norm(e, axis=-1, keepdims=True)
    e = np.divide(e, n, out=np.zeros_like(e), where=n > 0)
    return np.einsum("ijd,ikd->ijk", e, e)
  return _np_huber(psi(s) - psi(t)).sum() / (b * (b - 1) ** 2)


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
def test_relation_matrix_golden(kind):
  f = _randn(0, 3, T, DS)
  got = jax.jit(functools.partial(losses.relation_matrix, kind=kind))(f)
  want = np.stack([_np_relation(x, kind) for x in f])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(losses.relation_matrix(f[0], kind=kind), want[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["manhattan", "Cosine", None])
def test_unknown_kind_raises_one_line_error_listing_allowed(kind):
  message = f"kind: {kind!r} must be one of ['cosine', 'dot', 'euclidean']"
  with pytest.raises(ValueError) as info:
    losses.relation_matrix(_randn(0, B, DS), kind=kind)
  assert str(info.value) == message
  with pytest.raises(ValueError) as info:
    losses.token_relation(_randn(1, B, T, DS), _randn(2, B, T, DS), kind=kind)
  assert str(info.value) == message


EXAMPLE_LOSSES = {
    "similarity_preserving": (losses.similarity_preserving, _np_sp),
    "rkd_distance": (losses.rkd_distance, _np_rkd_distance),
    "rkd_angle": (losses.rkd_angle, _np_rkd_angle),
}


def _reduce(name, values, where=None):
  # SP rows sum to the paper's loss; RKD per-anchor values average to it.
  if name == "similarity_preserving":
    return losses.masked_sum_and_count(values, where)[0]
  return losses.masked_mean(values, where)


@pytest.mark.parametrize("name", sorted(EXAMPLE_LOSSES))
def test_example_relation_golden(name):
  fn, ref = EXAMPLE_LOSSES[name]
  s, t = _randn(1, B, DS), _randn(2, B, DT)
  values = jax.jit(fn)(s, t)
  assert values.shape == (B,) and values.dtype == jnp.float32
  np.testing.assert_allclose(_reduce(name, values), ref(s, t), rtol=1e-4)


@pytest.mark.parametrize("name", sorted(EXAMPLE_LOSSES))
def test_example_mask_excludes_padding_from_the_statistics(name):
  fn = EXAMPLE_LOSSES[name][0]
  s, t = _randn(3, B, DS), _randn(4, B, DT)
  where = np.array([True, False, True, True, False, True])
  s_bad = s.copy()
  s_bad[~where] = np.nan
  got = jax.jit(lambda s: fn(s, t, where=where))(s_bad)
  np.testing.assert_allclose(got[where], jax.jit(fn)(s[where], t[where]), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(got[~where], 0.0)
  grad = jax.jit(jax.grad(lambda s: _reduce(name, fn(s, t, where=where), where)))(s_bad)
  assert np.all(np.isfinite(grad)) and np.all(grad[~where] == 0.0)


@pytest.mark.parametrize("name", sorted(EXAMPLE_LOSSES))
def test_example_relation_invariant_to_global_rescaling(name):
  fn = jax.jit(EXAMPLE_LOSSES[name][0])  # one compile for all four calls, not op by op
  s, t = _randn(5, B, DS), _randn(6, B, DT)
  np.testing.assert_allclose(fn(7.0 * s, 0.1 * t), fn(s, t), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(fn(s, 3.0 * s), 0.0, atol=1e-6)


def _np_token_relation(s, t, where, kind):
  out = np.zeros(where.shape)
  for b in range(len(s)):
    v = where[b]
    sq = (_np_relation(s[b][v], kind) - _np_relation(t[b][v], kind)) ** 2
    out[b, v] = sq.mean(-1)
  return out


@pytest.mark.parametrize("kind", ["cosine", "dot", "euclidean"])
def test_token_relation_golden_with_mask(kind):
  s, t = _randn(7, 2, T, DS), _randn(8, 2, T, DT)
  where = np.array([[True, True, True, True], [True, True, False, False]])
  s_bad = s.copy()
  s_bad[~where] = np.inf
  fn = jax.jit(functools.partial(losses.token_relation, kind=kind))
  got = fn(s_bad, t, where=where)
  assert got.shape == (2, T)
  np.testing.assert_allclose(got, _np_token_relation(s, t, where, kind), rtol=1e-4, atol=1e-6)
  grad = jax.jit(jax.grad(lambda s: losses.masked_mean(fn(s, t, where=where), where)))(s_bad)
  assert np.all(np.isfinite(grad)) and np.all(grad[~where] == 0.0)


def test_token_relation_cosine_rescaling_invariant():
  s, t = _randn(9, 2, T, DS), _randn(10, 2, T, DT)
  fn = jax.jit(losses.token_relation)
  np.testing.assert_allclose(fn(5.0 * s, t), fn(s, 0.2 * t), rtol=1e-4, atol=1e-7)


ALL = {
    **{name: fn for name, (fn, _) in EXAMPLE_LOSSES.items()},
    "token_relation_cosine": losses.token_relation,
    "token_relation_euclidean": functools.partial(losses.token_relation, kind="euclidean"),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_check_grads(name):
  shape = (2, T, DS) if name.startswith("token") else (B, DS)
  s, t = _randn(11, *shape), _randn(12, *shape[:-1], DT)
  check_grads(jax.jit(lambda s: ALL[name](s, t)), (s,), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2, eps=1e-3)


@pytest.mark.parametrize("name", sorted(ALL))
def test_bf16_inputs_give_f32_close_to_f32_path(name):
  shape = (2, T, DS) if name.startswith("token") else (B, DS)
  s, t = _randn(13, *shape), _randn(14, *shape[:-1], DT)
  fn = jax.jit(ALL[name])
  got = fn(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, fn(s, t), rtol=0.05, atol=0.02)
