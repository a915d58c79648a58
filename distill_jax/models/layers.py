"""Building blocks shared by our decoder and encoder families: norms, RoPE, attention, dense.

Everything here is written once for every family; the families choose with flags
(`RMSNorm(offset=True)` for Gemma's ``1 + w``, a softcap for Gemma 2, ...).  Params carry
logical axis names (`LOGICAL_AXES`) that `distill_jax.training.sharding` maps onto the mesh.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Logical axis names of params; the leading axis of scanned layer params is "layers".
LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "positions", "classes")

MASKED_SCORE = -1e4  # finite pre-softmax score of masked keys in `attention_scores` (same for teacher and student)
_NEG_INF = -1e30     # additive value that removes a key from a softmax (finite: no NaN on fully masked rows)

REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(name: str) -> Optional[Callable]:
  """`jax.checkpoint` policy of a `model.remat` name (`none` is handled by not wrapping)."""
  if name == "full":
    return None  # save nothing: recompute the whole layer in the backward pass
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"remat: unknown {name!r}; allowed: {', '.join(REMAT_POLICIES)}")


def init_normal(stddev: float = 0.02) -> Callable:
  return nn.initializers.normal(stddev)


def dense(features: int | Sequence[int], axes: tuple[str, ...], *, use_bias: bool, dtype: Any, name: str,
          stddev: float = 0.02, in_axes: int | tuple[int, ...] = -1) -> nn.Module:
  """A `DenseGeneral` whose kernel has the logical `axes` (input axes first, then outputs)."""
  return nn.DenseGeneral(
      features=features, axis=in_axes, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(init_normal(stddev), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             axes[-(len(features) if isinstance(features, Sequence) else 1):]))


class RMSNorm(nn.Module):
  """RMS norm in float32; ``offset=True`` scales by ``1 + w`` (Gemma), else by ``w`` (Llama)."""

  eps: float
  offset: bool = False
  dtype: Any = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
    w = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.offset:  # Gemma multiplies in float32, then casts
      return (normed * (1.0 + w)).astype(self.dtype)
    # Llama casts the normalized activations back to the input dtype before the weight.
    return (w.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (BERT, GPT-2)."""

  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (h,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (h,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str, field: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"{field}: activation {name!r} is not implemented; allowed: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict], max_positions: int,
                  seq_len: Optional[jax.Array] = None) -> jax.Array:
  """Inverse frequencies ``[head_dim // 2]`` of RoPE with HF's scalings.

  Args:
    head_dim: rotary dimension.
    theta: the RoPE base (`rope_theta`).
    scaling: `None`/`{"rope_type": "default"}`, or a `linear`, `dynamic` or `llama3` scaling dict
      with HF's keys (`factor`, `low_freq_factor`, `high_freq_factor`,
      `original_max_position_embeddings`).
    max_positions: the config's `max_position_embeddings`.
    seq_len: `dynamic` only: the longest position + 1 of the batch (HF recomputes the base
      when it exceeds `max_positions`; a fresh HF model does the same on every call).
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  kind = (scaling or {}).get("rope_type", "default")
  if kind == "dynamic":
    factor = float(scaling["factor"])
    length = jnp.maximum(jnp.asarray(max_positions, jnp.float32), jnp.asarray(seq_len, jnp.float32))
    base = theta * ((factor * length / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** jnp.asarray(exponents, jnp.float32))
  inv_freq = 1.0 / (theta ** exponents)
  if kind == "linear":
    inv_freq = inv_freq / float(scaling["factor"])
  elif kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    inv_freq = np.where(medium, smoothed, scaled)
  elif kind != "default":
    raise ValueError(f"config.rope_scaling: rope_type {kind!r} is not implemented; allowed: default, linear, "
                     "dynamic, llama3")
  return jnp.asarray(inv_freq.astype(np.float32))


def rope_tables(position_ids_BxT: jax.Array, inv_freq_F: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(cos, sin)` ``[B, T, 2F]`` (HF's duplicated-halves layout), in float32."""
  angles_BxTxF = position_ids_BxT[..., None].astype(jnp.float32) * inv_freq_F.astype(jnp.float32)
  angles_BxTxD = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)
  return jnp.cos(angles_BxTxD), jnp.sin(angles_BxTxD)


def apply_rope(x_BxTxNxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
  """Rotates ``[B, T, N, D]`` by the tables (rotate-half convention of HF Llama)."""
  dtype = x_BxTxNxD.dtype
  x = x_BxTxNxD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BxTxD[:, :, None, :] + rotated * sin_BxTxD[:, :, None, :]
  return out.astype(dtype)


# ----------------------------------------------------------------------------- masks and attention


def attention_mask(key_mask_BxS: jax.Array, q_len: int, *, causal: bool, window: Optional[jax.Array] = None,
                   q_offset: Optional[jax.Array] = None) -> jax.Array:
  """Boolean ``[B, 1, T, S]``: True where query t may attend key s.

  Args:
    key_mask_BxS: 1 for real keys.
    q_len: number of queries `T` (the last `T` of the `S` key slots when `q_offset` is None).
    causal: keys after the query are masked.
    window: sliding window `W` (a key is kept when ``q - k < W``, HF's convention); None = global.
      May be a traced scalar (per-layer windows under scan; a huge value means global).
    q_offset: slot index of the first query (KV-cache decoding); default ``S - T``.
  """
  s_len = key_mask_BxS.shape[-1]
  offset = s_len - q_len if q_offset is None else q_offset
  q_idx_T = jnp.arange(q_len)[:, None] + offset
  k_idx_S = jnp.arange(s_len)[None, :]
  allowed_TxS = jnp.ones((q_len, s_len), bool)
  if causal:
    allowed_TxS = k_idx_S <= q_idx_T
  if window is not None:
    allowed_TxS = allowed_TxS & (q_idx_T - k_idx_S < window)
  return key_mask_BxS.astype(bool)[:, None, None, :] & allowed_TxS[None, None]


def attend(q_BxTxNxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_Bx1xTxS: jax.Array, *,
           scale: float, softcap: Optional[float] = None, explicit: bool = False,
           implementation: Optional[str] = None):
  """Multi-head attention with grouped KV heads; `(out [B,T,N,D], scores, probs)`.

  The fused path (`jax.nn.dot_product_attention`: XLA's unless `implementation="cudnn"` asks for
  cuDNN's flash kernel on GPU) is taken
  unless `explicit` (a term needs the maps) or a `softcap` (Gemma 2) asks for the scores;
  then `scores` ``[B, N, T, S]`` (scaled, capped; masked keys at `MASKED_SCORE`) and
  `probs` ``[B, N, T, S]`` are returned as well (None otherwise).
  """
  n, kv = q_BxTxNxD.shape[2], k_BxSxKxD.shape[2]
  if not explicit and softcap is None:
    out = jax.nn.dot_product_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, mask=mask_Bx1xTxS, scale=scale,
                                       implementation=implementation)
    return out, None, None
  group = n // kv
  b, t, _, d = q_BxTxNxD.shape
  q_BxTxKxGxD = q_BxTxNxD.reshape(b, t, kv, group, d)
  logits_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                                preferred_element_type=jnp.float32) * scale
  logits_BxNxTxS = logits_BxKxGxTxS.reshape(b, n, t, -1)
  if softcap is not None:
    logits_BxNxTxS = jnp.tanh(logits_BxNxTxS / softcap) * softcap
  probs_BxNxTxS = jax.nn.softmax(jnp.where(mask_Bx1xTxS, logits_BxNxTxS, _NEG_INF), axis=-1)
  probs_BxNxTxS = probs_BxNxTxS.astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs_BxNxTxS.reshape(b, kv, group, t, -1), v_BxSxKxD)
  scores_BxNxTxS = jnp.where(mask_Bx1xTxS, logits_BxNxTxS, MASKED_SCORE)
  return out_BxTxKxGxD.reshape(b, t, n, d), scores_BxNxTxS, probs_BxNxTxS


def scan_layers(block_cls: type[nn.Module], num_layers: int, remat: str, *, in_axes: tuple = ()) -> type:
  """`block_cls` scanned over stacked layer params (leading axis "layers"), with a remat policy.

  The block is called as ``block(carry, xs) -> (carry, ys)``; `in_axes` gives, for the
  block's extra positional arguments after the carry, `nn.broadcast` or 0 (scanned).
  """
  if remat != "none":
    block_cls = nn.remat(block_cls, policy=remat_policy(remat), prevent_cse=False)
  return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes, length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
