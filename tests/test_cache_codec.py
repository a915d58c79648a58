"""Teacher-cache codec: exact ids, bounded log-probabilities, float16 tail, stated sizes."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

from distill_jax.data import cache_codec
from distill_jax.data.cache_codec import CacheFormat

encode = jax.jit(cache_codec.encode, static_argnums=0)
decode = jax.jit(cache_codec.decode, static_argnums=0)
top_k_teacher = jax.jit(cache_codec.top_k_teacher, static_argnums=1)


def _round_trip(fmt, ids, logprobs, log_tail):
  packed = encode(fmt, ids, logprobs, log_tail)
  assert packed.dtype == jnp.uint8 and packed.shape == ids.shape[:-1] + (fmt.bytes_per_token,)
  return tuple(np.asarray(x) for x in decode(fmt, packed))


def _np_top_k(logits, k):
  """Independent reference: sorted top-k ids, their log-probabilities and the log tail."""
  logits = np.asarray(logits, np.float64)
  ids = np.sort(np.argsort(-logits, axis=-1, kind="stable")[..., :k], axis=-1)
  logprobs = np.take_along_axis(log_softmax(logits, axis=-1), ids, axis=-1)
  outside = np.ones(logits.shape, bool)
  np.put_along_axis(outside, ids, False, axis=-1)
  tail = logsumexp(np.where(outside, logits, -np.inf), axis=-1) - logsumexp(logits, axis=-1)
  return ids, logprobs, tail


def _bucket_kl(logprobs, log_tail, student_logprobs, student_log_tail):
  """Forward KL(p‖q) over the k + 1 buckets (top-k entries and the tail), float64."""
  p, pt = np.exp(logprobs), np.exp(log_tail)
  tail_term = np.where(pt > 0, pt * (log_tail - student_log_tail), 0.0)
  return np.sum(p * (logprobs - student_logprobs), axis=-1) + tail_term


@pytest.mark.parametrize("vocab, top_k", [
    (50257, 128), (1000, 37), (1000, 1), (64, 64), (2, 1), (2, 2)])
def test_ids_round_trip_exactly(vocab, top_k):
  rng = np.random.RandomState(top_k)
  ids = np.stack([rng.choice(vocab, top_k, replace=False) for _ in range(6)]).astype(np.int32)
  ids[0, 0], ids[1, -1] = 0, vocab - 1  # the ends of the range, in any position
  if top_k > 1:
    ids[0, -1] = vocab - 1
  ids = ids.reshape(2, 3, top_k)
  got_ids, got_logprobs, got_tail = _round_trip(
      CacheFormat(vocab, top_k), ids, np.zeros(ids.shape, np.float32), np.full((2, 3), -1.0))
  np.testing.assert_array_equal(got_ids, np.sort(ids, axis=-1))
  assert got_ids.dtype == np.int32
  assert np.all(np.isfinite(got_logprobs)) and np.all(np.isfinite(got_tail))


def test_ids_at_both_ends_and_full_vocab():
  vocab = 50
  fmt = CacheFormat(vocab, 1)
  ids = np.array([[0], [vocab - 1], [vocab // 2]], np.int32)
  got, _, _ = _round_trip(fmt, ids, np.zeros((3, 1), np.float32), np.full((3,), -0.5))
  np.testing.assert_array_equal(got, ids)
  full = np.stack([np.random.RandomState(i).permutation(vocab) for i in range(3)]).astype(np.int32)
  got, _, tail = _round_trip(
      CacheFormat(vocab, vocab), full, np.zeros(full.shape, np.float32), np.full((3,), -np.inf))
  np.testing.assert_array_equal(got, np.broadcast_to(np.arange(vocab), full.shape))
  np.testing.assert_array_equal(tail, -np.inf)


def _teacher(kind, rng, n, vocab):
  if kind == "gauss":
    return 3.0 * rng.randn(n, vocab)
  if kind == "zipf":
    ranks = np.argsort(rng.rand(n, vocab), axis=-1) + 1
    return -1.1 * np.log(ranks) + 0.3 * rng.randn(n, vocab)
  logits = 2.0 * rng.randn(n, vocab)  # "peaked": one dominant token, p_max ~ 0.4..0.99
  logits[:, 0] += rng.uniform(8.0, 20.0, size=n)
  return logits


@pytest.mark.parametrize("value_bits", [4, 6, 8])
@pytest.mark.parametrize("kind", ["gauss", "zipf", "peaked"])
def test_logprobs_within_the_stated_bound(kind, value_bits):
  vocab, top_k = 1000, 64
  fmt = CacheFormat(vocab, top_k, value_bits)
  rng = np.random.RandomState(value_bits)
  ids, logprobs, tail = _np_top_k(_teacher(kind, rng, 400, vocab), top_k)  # shapes as below
  got_ids, got_logprobs, got_tail = _round_trip(fmt, ids, logprobs, tail)
  np.testing.assert_array_equal(got_ids, ids)
  # |Δ log p| <= Δ + 2^-11 with Δ <= 2^(1/16) max(G / M, 2^-11), G the gap range.
  m = 2 ** value_bits - 1
  gap_range = np.max(logprobs, -1) - np.min(logprobs, -1)
  step = 2 ** (1 / 16) * np.maximum(gap_range / m, 2.0 ** -11)
  err = np.abs(got_logprobs - logprobs)
  assert np.all(err <= step[:, None] + 2.0 ** -11 + 1e-5)
  assert np.max(err / step[:, None]) > 0.4  # the bound is not slack
  np.testing.assert_allclose(got_tail, tail, rtol=2.0 ** -11, atol=0)
  # The decoded top-k and tail sum to one.
  np.testing.assert_allclose(logsumexp(np.concatenate([got_logprobs, got_tail[:, None]], -1), -1),
                             0.0, atol=2e-6)


# Mean relative error of the k + 1-bucket forward KL, decoded vs exact teacher, random
# student, at value_bits 4 / 6 / 8: measured 4.8e-3 / 1.2e-3 / 2.7e-4 (gauss),
# 4.6e-3 / 1.2e-3 / 2.9e-4 (zipf), 9.7e-4 / 2.4e-4 / 6.4e-5 (peaked).
KL_BOUNDS = {4: 7e-3, 6: 1.8e-3, 8: 4.5e-4}


@pytest.mark.parametrize("kind", ["gauss", "zipf", "peaked"])
def test_forward_kl_error_is_small(kind):
  vocab, top_k, n = 1000, 64, 400
  rng = np.random.RandomState(0)
  ids, logprobs, tail = _np_top_k(_teacher(kind, rng, n, vocab), top_k)
  student = log_softmax(rng.randn(n, vocab), axis=-1)
  student_top = np.take_along_axis(student, ids, axis=-1)
  student_tail = np.log1p(-np.exp(logsumexp(student_top, axis=-1)))
  exact = _bucket_kl(logprobs, tail, student_top, student_tail)
  errors = {}
  for value_bits, bound in KL_BOUNDS.items():
    fmt = CacheFormat(vocab, top_k, value_bits)
    _, got_logprobs, got_tail = _round_trip(fmt, ids, logprobs, tail)
    got = _bucket_kl(got_logprobs.astype(np.float64), got_tail.astype(np.float64),
                     student_top, student_tail)
    errors[value_bits] = np.mean(np.abs(got - exact) / exact)
    assert errors[value_bits] < bound, (value_bits, errors[value_bits])
  assert errors[4] > 3 * errors[6] > 9 * errors[8]  # about halved by each bit


@pytest.mark.parametrize("log_tail", [-np.inf, -70000.0, -30.0, -3.0, -1e-3, -1e-5, 0.0, 1e-6])
def test_tail_extremes_round_trip_without_nan(log_tail):
  fmt = CacheFormat(100, 8)
  ids = np.arange(0, 80, 10, dtype=np.int32)[None]
  logprobs = np.linspace(-1.0, -6.0, 8, dtype=np.float32)[None]
  log_tail_N = np.array([log_tail], np.float32)
  got_ids, got_logprobs, got_tail = _round_trip(fmt, ids, logprobs, log_tail_N)
  want = -np.inf if log_tail < -65504 else min(log_tail, 0.0)
  np.testing.assert_allclose(got_tail, [want], rtol=2.0 ** -11, atol=2.0 ** -25)  # f16 subnormals
  np.testing.assert_array_equal(got_ids, ids)
  assert np.all(np.isfinite(got_logprobs))
  assert np.all(np.diff(got_logprobs[0]) < 0)  # the order of the values is kept


def test_padding_ties_and_masked_logits_give_no_nan():
  vocab, top_k = 300, 32
  fmt = CacheFormat(vocab, top_k)
  logits = np.zeros((4, vocab), np.float32)          # padding rows: uniform
  logits[1, ::7] = 2.0                                 # ties across the top-k boundary
  logits[2, 0] = 1000.0                                # a one-hot teacher
  logits[3, 10:] = -np.inf                             # fewer finite logits than top_k
  ids, logprobs, tail = top_k_teacher(logits, top_k)
  assert all(len(set(row)) == top_k for row in np.asarray(ids).tolist())
  got_ids, got_logprobs, got_tail = _round_trip(fmt, ids, logprobs, tail)
  np.testing.assert_array_equal(got_ids, ids)
  assert not np.any(np.isnan(got_logprobs)) and not np.any(np.isnan(got_tail))
  np.testing.assert_allclose(got_logprobs[0], np.log(1 / vocab), rtol=1e-3)
  np.testing.assert_allclose(got_tail[0], np.log1p(-top_k / vocab), rtol=2.0 ** -11)
  assert np.exp(got_logprobs[2]).max() == pytest.approx(1.0, abs=1e-6)
  finite = np.isin(got_ids[3], np.arange(10))
  np.testing.assert_allclose(got_logprobs[3][finite], np.log(0.1), atol=1e-3)
  assert np.all(np.exp(got_logprobs[3][~finite]) < 1e-40)


def test_top_k_teacher_matches_numpy_reference():
  rng = np.random.RandomState(3)
  logits = (2.0 * rng.randn(2, 5, 300)).astype(np.float32)
  ids, logprobs, tail = top_k_teacher(logits, 17)
  want_ids, want_logprobs, want_tail = _np_top_k(logits, 17)
  np.testing.assert_array_equal(ids, want_ids)
  assert ids.dtype == jnp.int32 and logprobs.dtype == jnp.float32 and tail.shape == (2, 5)
  np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tail, want_tail, rtol=1e-5, atol=1e-5)
  # Tiny tails stay accurate (no 1 - sum cancellation); k = V gives -inf; bf16 works.
  peaked = np.zeros((1, 300), np.float32)
  peaked[0, :4] = 40.0
  np.testing.assert_allclose(top_k_teacher(peaked, 4)[2], _np_top_k(peaked, 4)[2], rtol=1e-5)
  np.testing.assert_array_equal(top_k_teacher(logits, 300)[2], -np.inf)
  got16 = top_k_teacher(jnp.asarray(logits, jnp.bfloat16), 17)
  assert got16[1].dtype == jnp.float32
  with pytest.raises(ValueError, match=r"^top_k: 301 must be an integer in \[1, V=300\]$"):
    cache_codec.top_k_teacher(logits, 301)


def test_bytes_per_token_at_gpt2_vocab():
  # 24 header bits + k·b value bits + k·l low bits + (k + (50256 >> l) + 1) bitmap bits.
  want = {(128, b): -(-(24 + 128 * b + 128 * 8 + 128 + 196 + 1) // 8) for b in range(4, 9)}
  want.update({(64, b): -(-(24 + 64 * b + 64 * 9 + 64 + 98 + 1) // 8) for b in range(4, 9)})
  assert want[128, 6] == 268 and want[64, 6] == 144
  for (k, b), size in want.items():
    fmt = CacheFormat(50257, k, b)
    assert fmt.bytes_per_token == size, (k, b)
  assert CacheFormat(50257, 128).low_bits == 8 and CacheFormat(50257, 64).low_bits == 9
  assert CacheFormat(50257, 128).bytes_per_token / 128 <= 2.1
  assert CacheFormat(50, 50).low_bits == 0 and CacheFormat(50, 3).low_bits == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 1, "top_k": 1},
     r"cache.vocab_size: 1 must be in \[2, 2\^31 - 1\] \(int32 ids\)"),
    ({"vocab_size": 50, "top_k": 0}, r"cache.top_k: 0 must be in \[1, vocab_size=50\]"),
    ({"vocab_size": 50, "top_k": 51}, r"cache.top_k: 51 must be in \[1, vocab_size=50\]"),
    ({"vocab_size": 50, "top_k": 5, "value_bits": 3}, r"cache.value_bits: 3 must be in \[4, 8\]"),
    ({"vocab_size": 50, "top_k": 5, "value_bits": 9}, r"cache.value_bits: 9 must be in \[4, 8\]"),
    ({"vocab_size": 50, "top_k": 2.0}, "cache.top_k: 2.0 must be an integer"),
    ({"vocab_size": True, "top_k": 1}, "cache.vocab_size: True must be an integer"),
])
def test_format_validation_errors(kwargs, message):
  with pytest.raises(ValueError, match=f"^{message}$"):
    CacheFormat(**kwargs)


def test_format_dict_round_trip_and_errors():
  fmt = CacheFormat(np.int64(50257), 128, 5)
  d = json.loads(json.dumps(fmt.to_dict()))
  assert d["codec"] == cache_codec.CODEC and d["bytes_per_token"] == fmt.bytes_per_token == 252
  assert CacheFormat.from_dict(d) == fmt and type(CacheFormat.from_dict(d).vocab_size) is int
  bad = [({**d, "codec": "elias-fano+pow2/v0"}, "cache.codec: 'elias-fano+pow2/v0' must be"),
         ({**d, "bytes_per_token": 251}, "cache.bytes_per_token: 251 must be 252"),
         ({**d, "top_k": 0}, "cache.top_k: 0 must be"),
         ({k: v for k, v in d.items() if k != "top_k"}, "cache.top_k: missing"),
         ({**d, "gamma": 2}, "cache: unknown keys"),
         ([1], "cache: ")]
  for value, message in bad:
    with pytest.raises(ValueError, match="^" + re.escape(message)) as err:
      CacheFormat.from_dict(value)
    assert "\n" not in str(err.value)


def test_shape_errors_and_leading_axes():
  fmt = CacheFormat(100, 4)
  ids = np.arange(4, dtype=np.int32)
  with pytest.raises(ValueError, match=r"must both be \[..., top_k=4\]"):
    cache_codec.encode(fmt, ids[:3], np.zeros(3), np.zeros(()))
  with pytest.raises(ValueError, match="log_tail"):
    cache_codec.encode(fmt, ids, np.zeros(4), np.zeros(2))
  assert fmt.bytes_per_token == 10
  with pytest.raises(ValueError, match=r"^packed: uint8\[2, 9\] must be uint8\[..., 10\]$"):
    cache_codec.decode(fmt, np.zeros((2, 9), np.uint8))
  packed = encode(fmt, ids, -np.arange(4.0), np.float32(-1.0))  # a single token, no axes
  assert packed.shape == (fmt.bytes_per_token,)
  got = decode(fmt, packed)
  assert got[0].shape == (4,) and got[2].shape == ()
  encode_partial = jax.jit(functools.partial(cache_codec.encode, fmt))
  np.testing.assert_array_equal(encode_partial(ids, -np.arange(4.0), np.float32(-1.0)), packed)
