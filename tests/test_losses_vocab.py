"""Chunked large-vocabulary KL: equal to the naive loss, with flat temporary memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses


def _inputs(seed, n, ds=8, dt=12, vocab=50, lead=None):
  rng = np.random.RandomState(seed)
  lead = lead or (n,)
  return (rng.randn(*lead, ds).astype(np.float32), (0.5 * rng.randn(ds, vocab)).astype(np.float32),
          rng.randn(*lead, dt).astype(np.float32), (0.5 * rng.randn(dt, vocab)).astype(np.float32),
          (0.1 * rng.randn(vocab)).astype(np.float32), (0.1 * rng.randn(vocab)).astype(np.float32))


CASES = {
    "forward_kl": (losses.chunked_forward_kl, losses.forward_kl, {}),
    "jsd": (losses.chunked_generalized_jsd, losses.generalized_jsd, {"beta": 0.3}),
    "jsd_normalized": (losses.chunked_generalized_jsd, losses.generalized_jsd,
                       {"beta": 0.9, "normalized": True}),
}


def _naive(loss, hs, ws, ht, wt, bs=None, bt=None, **kw):
  s = hs @ ws + (0.0 if bs is None else bs)
  t = ht @ wt + (0.0 if bt is None else bt)
  return loss(s, t, **kw)


@pytest.mark.parametrize("name, lead", [
    ("forward_kl", (3, 11)), ("jsd", (37,)), ("jsd_normalized", (37,))])
def test_value_and_gradient_equal_naive(name, lead):
  chunked, loss, kw = CASES[name]
  hs, ws, ht, wt, bs, bt = _inputs(0, 0, lead=lead)
  where = np.random.RandomState(1).rand(*lead) > 0.2
  kw = dict(kw, temperature=2.0, where=where)

  def total(fn):
    return lambda hs, ws, bs: losses.masked_mean(fn(hs, ws, bs), where)

  fast = total(lambda hs, ws, bs: chunked(
      hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, chunk_size=8, **kw))
  slow = total(lambda hs, ws, bs: _naive(loss, hs, ws, ht, wt, bs, bt, **kw))
  np.testing.assert_allclose(
      jax.jit(lambda *a: chunked(*a, chunk_size=8, **kw))(hs, ws, ht, wt),
      _naive(loss, hs, ws, ht, wt, **kw), rtol=1e-5, atol=1e-7)
  v_fast, g_fast = jax.jit(jax.value_and_grad(fast, argnums=(0, 1, 2)))(hs, ws, bs)
  v_slow, g_slow = jax.jit(jax.value_and_grad(slow, argnums=(0, 1, 2)))(hs, ws, bs)
  np.testing.assert_allclose(v_fast, v_slow, rtol=1e-5)
  for a, b in zip(g_fast, g_slow):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))


def test_teacher_gets_zero_gradient_and_masked_nan_rows_are_inert():
  hs, ws, ht, wt, _, _ = _inputs(2, 20)
  where = np.arange(20) < 15
  hs[~where] = np.nan
  ht[~where] = np.inf
  fn = lambda hs, ws, ht, wt: jnp.sum(
      losses.chunked_forward_kl(hs, ws, ht, wt, where=where, chunk_size=6))
  grads = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(grads[0][~where], 0.0)
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)


def test_bf16_weights_accumulate_in_f32():
  hs, ws, ht, wt, _, _ = _inputs(3, 16)
  args16 = [jnp.asarray(x, jnp.bfloat16) for x in (hs, ws, ht, wt)]
  got = losses.chunked_forward_kl(*args16, chunk_size=4)
  assert got.dtype == jnp.float32
  want = losses.forward_kl(*(jnp.dot(a, b, preferred_element_type=jnp.float32)
                              for a, b in (args16[:2], args16[2:])))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  grads = jax.grad(lambda h, w: jnp.sum(losses.chunked_forward_kl(h, w, *args16[2:], chunk_size=4)),
                   argnums=(0, 1))(*args16[:2])
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_shape_errors():
  hs, ws, ht, wt, _, _ = _inputs(4, 8)
  with pytest.raises(ValueError, match="same V"):
    losses.chunked_forward_kl(hs, ws, ht, wt[:, :10])
  with pytest.raises(ValueError, match="token axes"):
    losses.chunked_forward_kl(hs, ws, ht[:4], wt)


VOCAB, HIDDEN, CHUNK = 4096, 64, 256


def _temp_bytes(fn, n):
  shapes = [jax.ShapeDtypeStruct(s, jnp.float32)
            for s in ((n, HIDDEN), (HIDDEN, VOCAB), (n, HIDDEN), (HIDDEN, VOCAB))]
  grad = jax.grad(lambda hs, ws, ht, wt: jnp.sum(fn(hs, ws, ht, wt)), argnums=(0, 1))
  return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_temporary_memory_flat_in_tokens_while_naive_grows():
  chunked = functools.partial(losses.chunked_forward_kl, chunk_size=CHUNK)
  naive = lambda hs, ws, ht, wt: losses.forward_kl(hs @ ws, ht @ wt)
  tokens = (512, 1024, 2048)
  fast = [_temp_bytes(chunked, n) for n in tokens]
  slow = [_temp_bytes(naive, n) for n in tokens]
  # Naive holds several [tokens, V] f32 arrays (8 MiB each at 512 tokens); stays < 1 GB.
  assert all(0 < b < 1 << 30 for b in fast + slow), (fast, slow)
  assert slow[-1] > 3.0 * slow[0], slow
  assert fast[-1] < 1.5 * fast[0] + (1 << 20), fast  # only O(tokens * hidden) grows
  assert fast[-1] < slow[0], (fast, slow)


@pytest.mark.parametrize("fn, kwargs, message", [
    (losses.chunked_forward_kl, {"chunk_size": 0}, "chunk_size: 0 must be a positive integer"),
    (losses.chunked_forward_kl, {"chunk_size": -4}, "chunk_size: -4 must be a positive integer"),
    (losses.chunked_forward_kl, {"chunk_size": 2.5}, "chunk_size: 2.5 must be a positive integer"),
    (losses.chunked_forward_kl, {"chunk_size": True}, "chunk_size: True must be a positive integer"),
    (losses.chunked_forward_kl, {"temperature": 0.0}, "temperature: 0.0 must be > 0"),
    (losses.chunked_generalized_jsd, {"beta": 1.5}, "beta: 1.5 must be in [0, 1]"),
    (losses.chunked_generalized_jsd, {"temperature": -1.0}, "temperature: -1.0 must be > 0"),
    (losses.chunked_generalized_jsd, {"chunk_size": 0}, "chunk_size: 0 must be a positive integer"),
], ids=lambda x: x.__name__ if callable(x) else str(x))
def test_bad_static_hyperparameter_raises_one_line_error(fn, kwargs, message):
  hs, ws, ht, wt, _, _ = _inputs(5, 8)
  with pytest.raises(ValueError) as info:
    fn(hs, ws, ht, wt, **kwargs)
  assert str(info.value) == message


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_traced_beta_and_temperature_equal_python_floats(beta):
  hs, ws, ht, wt, _, _ = _inputs(6, 13)
  loss = lambda hs, b, t: losses.chunked_generalized_jsd(
      hs, ws, ht, wt, beta=b, temperature=t, chunk_size=4)
  traced = jax.jit(loss)(hs, beta, 2.0)
  static = jax.jit(lambda hs: loss(hs, beta, 2.0))(hs)
  np.testing.assert_allclose(traced, static, rtol=1e-6, atol=1e-7)


def test_forward_kl_traced_temperature_equals_python_float():
  hs, ws, ht, wt, _, _ = _inputs(7, 13)
  loss = lambda hs, t: losses.chunked_forward_kl(hs, ws, ht, wt, temperature=t, chunk_size=4)
  np.testing.assert_allclose(
      jax.jit(loss)(hs, 2.0), jax.jit(lambda hs: loss(hs, 2.0))(hs), rtol=1e-6, atol=1e-7)
