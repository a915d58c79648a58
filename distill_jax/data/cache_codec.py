"""Compact on-disk format of an offline teacher cache: top-k log-probabilities per token.

Per token the cache keeps the teacher's top-k token ids, their log-probabilities (natural
log, temperature 1) and the log of the tail mass ``log(1 - sum of the top-k probabilities)``,
bit-packed into ``CacheFormat.bytes_per_token`` uint8 bytes.  Everything is jax.numpy with
static shapes, so :func:`encode` runs on the accelerator right after the teacher forward
and :func:`decode` inside the train step.  Bit ``j`` of a token's stream is bit ``j % 8``
(LSB first) of byte ``j // 8``; fields are unsigned, LSB first, in this order:

* header, 24 bits: ``log_tail`` as float16 bits (16), then the value step code ``e`` (8);
* values, ``k · value_bits`` bits: ``c_i = round(g_i / Δ)`` with the gap
  ``g_i = min(max_j log p_j - log p_i, 104)`` (a per-token log-uniform grid) and the step
  ``Δ = 2^((e - 176) / 16)``, the smallest such step with ``M · Δ >= max_i g_i``
  (``M = 2^value_bits - 1``; steps from ``2^-11`` up to ``30.6``);
* ids, Elias–Fano in ascending order with ``l = low_bits``: the low ``l`` bits of each id
  (``k · l`` bits), then a bitmap of ``k + ((V - 1) >> l) + 1`` bits with bit
  ``(id_i >> l) + i`` set for the i-th id; zero bits pad the stream to whole bytes.

At V = 50257, k = 128, value_bits = 6 that is 268 bytes a token (2.09 B per kept entry).
The values are stored only relative to their maximum: the decoder restores the scale from
the tail, ``sum_i p̂_i = 1 - exp(log_tail)`` (so top-k and tail sum to one).

Guarantees (up to float32 rounding):

* ids round-trip exactly (ids must lie in ``[0, V)``; others are clipped);
* ``log_tail`` round-trips through float16: ``|Δ log_tail| <= 2^-11 · |log_tail|`` for
  ``|log_tail| >= 2^-14``; ``-inf`` (k = V) and ``0`` are exact, below ``-65504`` is ``-inf``;
* every entry with gap ``g_i < 104`` satisfies ``|log p̂_i - log p_i| <= Δ + 2^-11`` where
  ``Δ <= 2^(1/16) · max(G / M, 2^-11)`` and ``G`` is the token's gap range ``max_i g_i``
  (Δ/2 from rounding, Δ/2 from renormalizing, 2^-11 from the float16 tail), provided the
  top-k mass is at least ``2^-14`` (always so when ``V / k <= 2^14``).  Entries 104 nats or
  more below the maximum (``-inf`` included) decode near ``p̂_max · e^-104``, about zero.

For a 50k-vocabulary teacher the top-128 gap range is typically 5–7 nats, so at
value_bits = 6 each probability is within ~10 % and the forward KL over the k + 1 buckets
(top-k and tail) against a random student moves by ~0.1 % on average.  A power-law
compander relative to ``p_max`` (``c = round(M · (p / p_max)^(1/γ))``, γ in 1..4) measured
2–6x worse in that KL with ``log p_max`` in the header, and 1.1–2.3x worse renormalized at
its best γ (3–4), more for peaked teachers, whose small entries it rounds to zero.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import teacher_top_k as top_k_teacher  # noqa: F401  (re-exported: the cache stores exactly this)

CODEC = "elias-fano+loggrid/v1"

_TAIL_BITS = 16
_STEP_BITS = 8
_HEADER_BITS = _TAIL_BITS + _STEP_BITS
_STEPS_PER_OCTAVE = 16
_STEP_ZERO = 176          # the step code of Δ = 1
_GAP_CAP = 104.0          # nats: exp(-104) is below float32's smallest subnormal
_MIN_HEAD = 2.0 ** -25    # floor of the top-k mass when a garbage tail rounds to 0


def _show(value: Any) -> str:
  return str(value) if isinstance(value, numbers.Number) else repr(value)


def _check_int(name: str, value: Any, low: int, high: int, allowed: str) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"cache.{name}: {_show(value)} must be an integer")
  if not low <= value <= high:
    raise ValueError(f"cache.{name}: {_show(value)} must be {allowed}")


@dataclasses.dataclass(frozen=True)
class CacheFormat:
  """Static layout of one packed token: all shapes follow from these three numbers.

  Attributes:
    vocab_size: the teacher's vocabulary size V >= 2.
    top_k: kept entries per token k, in ``[1, V]``.
    value_bits: bits per kept log-probability, in ``[4, 8]``.
  """

  vocab_size: int
  top_k: int
  value_bits: int = 6

  def __post_init__(self):
    _check_int("vocab_size", self.vocab_size, 2, 2 ** 31 - 1, "in [2, 2^31 - 1] (int32 ids)")
    _check_int("top_k", self.top_k, 1, self.vocab_size, f"in [1, vocab_size={self.vocab_size}]")
    _check_int("value_bits", self.value_bits, 4, 8, "in [4, 8]")
    for name in ("vocab_size", "top_k", "value_bits"):
      object.__setattr__(self, name, int(getattr(self, name)))

  @property
  def low_bits(self) -> int:
    """Elias–Fano low bits ``l = max(0, floor(log2(vocab_size / top_k)))``."""
    return max(0, (self.vocab_size // self.top_k).bit_length() - 1)

  @property
  def high_bits(self) -> int:
    """Length of the Elias–Fano high-part bitmap, ``k + ((V - 1) >> l) + 1``."""
    return self.top_k + ((self.vocab_size - 1) >> self.low_bits) + 1

  @property
  def bits_per_token(self) -> int:
    """Meaningful bits of one token: header, values, low bits and bitmap."""
    k = self.top_k
    return _HEADER_BITS + k * self.value_bits + k * self.low_bits + self.high_bits

  @property
  def bytes_per_token(self) -> int:
    """Total packed bytes of one token, header included."""
    return -(-self.bits_per_token // 8)

  def to_dict(self) -> dict:
    """JSON-able description, with the codec tag and the derived ``bytes_per_token``."""
    return {"codec": CODEC, "vocab_size": self.vocab_size, "top_k": self.top_k,
            "value_bits": self.value_bits, "bytes_per_token": self.bytes_per_token}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> CacheFormat:
    """Inverse of :meth:`to_dict`; checks the codec tag, the keys and ``bytes_per_token``."""
    if not isinstance(d, Mapping):
      raise ValueError(f"cache: {_show(d)} must be a mapping")
    if d.get("codec") != CODEC:
      raise ValueError(f"cache.codec: {_show(d.get('codec'))} must be {CODEC!r}")
    allowed = ("codec", "vocab_size", "top_k", "value_bits", "bytes_per_token")
    unknown = sorted(str(key) for key in d if key not in allowed)
    if unknown:
      raise ValueError(f"cache: unknown keys {unknown}, allowed {list(allowed)}")
    for key in ("vocab_size", "top_k"):
      if key not in d:
        raise ValueError(f"cache.{key}: missing")
    fmt = cls(d["vocab_size"], d["top_k"], d.get("value_bits", 6))
    stored = d.get("bytes_per_token", fmt.bytes_per_token)
    if stored != fmt.bytes_per_token:
      raise ValueError(
          f"cache.bytes_per_token: {_show(stored)} must be {fmt.bytes_per_token} for {CODEC}")
    return fmt


def _step(code_N: jax.Array) -> jax.Array:
  """Value step ``Δ = 2^((e - 176) / 16)`` `[N]` float32 of the step codes `[N]`."""
  return jnp.exp2((code_N.astype(jnp.float32) - _STEP_ZERO) / _STEPS_PER_OCTAVE)


def _to_bits(x_NxF: jax.Array, width: int) -> jax.Array:
  """Unsigned fields `[N, F]` -> their bits `[N, F · width]` uint8, LSB first."""
  shifts = jnp.arange(width, dtype=jnp.uint32)
  bits_NxFxW = (x_NxF.astype(jnp.uint32)[..., None] >> shifts) & 1
  return bits_NxFxW.reshape(x_NxF.shape[0], x_NxF.shape[1] * width).astype(jnp.uint8)


def _from_bits(bits_NxT: jax.Array, width: int) -> jax.Array:
  """Bits `[N, F · width]` -> unsigned fields `[N, F]` uint32, LSB first."""
  n, total = bits_NxT.shape
  bits_NxFxW = bits_NxT.reshape(n, total // width, width).astype(jnp.uint32)
  return jnp.sum(bits_NxFxW << jnp.arange(width, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _split(fmt: CacheFormat, bits_NxT: jax.Array) -> list[jax.Array]:
  """The bit sections `[N, width]` of a token stream: tail, step, values, low, high."""
  k = fmt.top_k
  widths = [_TAIL_BITS, _STEP_BITS, k * fmt.value_bits, k * fmt.low_bits, fmt.high_bits]
  starts = [sum(widths[:i]) for i in range(len(widths))]
  return [bits_NxT[:, s:s + w] for s, w in zip(starts, widths)]


def _check_shapes(fmt: CacheFormat, ids, logprobs, log_tail) -> None:
  if ids.shape[-1:] != (fmt.top_k,) or logprobs.shape != ids.shape:
    raise ValueError(
        f"ids {ids.shape} and logprobs {logprobs.shape} must both be [..., top_k={fmt.top_k}]")
  if log_tail.shape != ids.shape[:-1]:
    raise ValueError(f"log_tail {log_tail.shape} must be the token axes {ids.shape[:-1]} of ids")


def encode(
    fmt: CacheFormat, ids_NxK: ArrayLike, logprobs_NxK: ArrayLike, log_tail_N: ArrayLike,
) -> jax.Array:
  """Packs top-k teacher entries into bytes (jittable; ``fmt`` is static).

  Args:
    fmt: the cache layout.
    ids_NxK: `[..., k]` token ids in ``[0, V)``, in any order (sorted here).
    logprobs_NxK: `[..., k]` their log-probabilities; only differences to the token's
      maximum are kept (the scale comes back from the tail).
    log_tail_N: `[...]` log of the mass outside the top-k (clamped to <= 0, NaN to 0).

  Returns:
    `[..., B]` uint8 with ``B = fmt.bytes_per_token``.
  """
  ids = jnp.asarray(ids_NxK)
  logprobs = jnp.asarray(logprobs_NxK)
  log_tail = jnp.asarray(log_tail_N)
  _check_shapes(fmt, ids, logprobs, log_tail)
  lead, k, n = ids.shape[:-1], fmt.top_k, math.prod(ids.shape[:-1])
  m = 2 ** fmt.value_bits - 1

  ids_NxK = jnp.clip(ids.reshape(n, k).astype(jnp.int32), 0, fmt.vocab_size - 1)
  order_NxK = jnp.argsort(ids_NxK, axis=-1)
  ids_NxK = jnp.take_along_axis(ids_NxK, order_NxK, axis=-1)
  logprobs_NxK = jnp.take_along_axis(
      logprobs.reshape(n, k).astype(jnp.float32), order_NxK, axis=-1)

  log_tail_N = log_tail.reshape(n).astype(jnp.float32)
  log_tail_N = jnp.where(log_tail_N <= 0, log_tail_N, 0.0)
  tail_bits_N = jax.lax.bitcast_convert_type(log_tail_N.astype(jnp.float16), jnp.uint16)

  gap_NxK = jnp.max(logprobs_NxK, axis=-1, keepdims=True) - logprobs_NxK
  gap_NxK = jnp.minimum(jnp.where(gap_NxK >= 0, gap_NxK, _GAP_CAP), _GAP_CAP)  # NaN, -inf
  exponent_N = jnp.ceil(_STEPS_PER_OCTAVE * jnp.log2(jnp.max(gap_NxK, axis=-1) / m))
  step_code_N = jnp.clip(exponent_N + _STEP_ZERO, 0, 2 ** _STEP_BITS - 1).astype(jnp.uint32)
  codes_NxK = jnp.clip(jnp.round(gap_NxK / _step(step_code_N)[:, None]), 0, m)

  low_NxK = ids_NxK & ((1 << fmt.low_bits) - 1)
  slots_NxK = (ids_NxK >> fmt.low_bits) + jnp.arange(k, dtype=jnp.int32)
  high_NxH = jnp.zeros((n, fmt.high_bits), jnp.uint8).at[
      jnp.arange(n)[:, None], slots_NxK].set(1, mode="drop")

  pad = 8 * fmt.bytes_per_token - fmt.bits_per_token
  bits_NxT = jnp.concatenate([
      _to_bits(tail_bits_N[:, None], _TAIL_BITS), _to_bits(step_code_N[:, None], _STEP_BITS),
      _to_bits(codes_NxK, fmt.value_bits), _to_bits(low_NxK, fmt.low_bits),
      high_NxH, jnp.zeros((n, pad), jnp.uint8)], axis=-1)
  packed_NxB = _from_bits(bits_NxT, 8).astype(jnp.uint8)
  return packed_NxB.reshape(*lead, fmt.bytes_per_token)


def decode(fmt: CacheFormat, packed_NxB: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Unpacks :func:`encode`'s bytes (jittable; ``fmt`` is static).

  Args:
    fmt: the cache layout.
    packed_NxB: `[..., B]` uint8 with ``B = fmt.bytes_per_token``.

  Returns:
    ``(ids_NxK, logprobs_NxK, log_tail_N)``: `[..., k]` int32 ids in ascending order, their
    `[..., k]` float32 log-probabilities (normalized with the tail) and `[...]` float32
    log tail mass; error bounds in the module docstring.
  """
  packed = jnp.asarray(packed_NxB)
  if packed.dtype != jnp.uint8 or packed.shape[-1:] != (fmt.bytes_per_token,):
    raise ValueError(
        f"packed: {packed.dtype}{list(packed.shape)} must be uint8[..., {fmt.bytes_per_token}]")
  lead, k, n = packed.shape[:-1], fmt.top_k, math.prod(packed.shape[:-1])
  tail_bits, step_bits, value_bits, low_bits, high_NxH = _split(
      fmt, _to_bits(packed.reshape(n, fmt.bytes_per_token), 8))

  tail16_N = _from_bits(tail_bits, _TAIL_BITS)[:, 0].astype(jnp.uint16)
  log_tail_N = jax.lax.bitcast_convert_type(tail16_N, jnp.float16).astype(jnp.float32)
  step_N = _step(_from_bits(step_bits, _STEP_BITS)[:, 0])
  rel_NxK = -_from_bits(value_bits, fmt.value_bits).astype(jnp.float32) * step_N[:, None]
  log_head_N = jnp.log(jnp.maximum(-jnp.expm1(log_tail_N), _MIN_HEAD))
  logprobs_NxK = (rel_NxK - jax.nn.logsumexp(rel_NxK, axis=-1, keepdims=True)
                  + log_head_N[:, None])

  rank_NxH = jnp.cumsum(high_NxH.astype(jnp.int32), axis=-1)
  slots_NxK = jax.vmap(lambda r: jnp.searchsorted(r, jnp.arange(1, k + 1), side="left"))(rank_NxH)
  high_NxK = slots_NxK.astype(jnp.int32) - jnp.arange(k, dtype=jnp.int32)
  low_NxK = (_from_bits(low_bits, fmt.low_bits).astype(jnp.int32) if fmt.low_bits
             else jnp.zeros((n, k), jnp.int32))
  ids_NxK = jnp.clip((high_NxK << fmt.low_bits) | low_NxK, 0, fmt.vocab_size - 1)
  return (ids_NxK.reshape(*lead, k), logprobs_NxK.reshape(*lead, k),
          log_tail_N.reshape(lead))
