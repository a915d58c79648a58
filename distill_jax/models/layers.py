"""Building blocks shared by our decoder and encoder families: norms, RoPE, attention, dense.

Everything here is written once for every family; the families choose with flags
(`RMSNorm(offset=True)` for Gemma's ``1 + w``, a softcap for Gemma 2, ...).  Params carry
logical axis names (`LOGICAL_AXES`) that `distill_jax.training.sharding` maps onto the mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_log = logging.getLogger(__name__)

# Logical axis names of params; the leading axis of scanned layer params is "layers".
LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "positions", "classes")

MASKED_SCORE = -1e4  # finite pre-softmax score of masked keys in `attention_scores` (same for teacher and student)
_NEG_INF = -1e30     # additive value that removes a key from a softmax (finite: no NaN on fully masked rows)

# ----------------------------------------------------------------------------- remat by name

# `checkpoint_name`s the layer bodies give their activations: the q/k/v projections (after
# norm and RoPE), the attention block's output (after its output projection) and the MLP's.
QKV_NAMES = ("query_proj", "key_proj", "value_proj")
BLOCK_NAMES = ("attn_out", "mlp_out")
CHECKPOINT_NAMES = QKV_NAMES + BLOCK_NAMES

# What the layer scan keeps for the backward pass (`student.remat`; the one list of names):
#   none: everything (no remat); full: nothing (recompute the layer); dots: matmul outputs
#   without batch dims; save_block_outputs: attn_out, mlp_out; save_qkv_block_outputs: those and
#   q, k, v; offload_block_outputs: attn_out, mlp_out moved to pinned host memory, fetched back
#   for the backward pass (XLA's host offload on TPU and GPU; CPU runs it too).
REMAT_POLICIES = ("none", "full", "dots", "save_block_outputs", "save_qkv_block_outputs", "offload_block_outputs")


def check_remat(name: str, field: str = "remat") -> None:
  """One-line `ValueError` naming `field` unless `name` is one of `REMAT_POLICIES`."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"{field}: unknown {name!r}; allowed: {', '.join(REMAT_POLICIES)}")


def remat_policy(name: str) -> Optional[Callable]:
  """`jax.checkpoint` policy of a `REMAT_POLICIES` name (`none` is handled by not wrapping)."""
  check_remat(name)
  policies = jax.checkpoint_policies
  return {
      "none": None,
      "full": None,  # save nothing: recompute the whole layer in the backward pass
      "dots": policies.dots_with_no_batch_dims_saveable,
      "save_block_outputs": policies.save_only_these_names(*BLOCK_NAMES),
      "save_qkv_block_outputs": policies.save_only_these_names(*CHECKPOINT_NAMES),
      "offload_block_outputs": policies.save_and_offload_only_these_names(
          names_which_can_be_saved=(), names_which_can_be_offloaded=BLOCK_NAMES,
          offload_src="device", offload_dst="pinned_host"),
  }[name]


def name_checkpoint(x: jax.Array, name: str) -> jax.Array:
  """`x` tagged with one of `CHECKPOINT_NAMES` (an identity; a remat policy may save it)."""
  assert name in CHECKPOINT_NAMES, name
  return checkpoint_name(x, name)


# ----------------------------------------------------------------------------- activation sharding

# Logical axis of an activation dimension -> mesh axes (`distill_jax.training.sharding.MESH_AXES`
# names them): the batch over data × fsdp, heads and MLP width over tensor; the rest replicated.
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"), "heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",)}


def activation_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> P:
  """`PartitionSpec` of an activation with logical axis `names` under `ACTIVATION_RULES`.

  A dimension is split over its mesh axes when they exist in `mesh`, hold more than one device
  together and divide the dimension; otherwise it is replicated.
  """
  spec = []
  for name, size in zip(names, shape):
    axes = tuple(a for a in ACTIVATION_RULES.get(name, ()) if mesh.shape.get(a, 1) > 1)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    spec.append((axes if len(axes) > 1 else axes[0]) if axes and size % n == 0 else None)
  return P(*spec)


def constrain(x: jax.Array, names: Sequence[Optional[str]], mesh: Optional[Mesh]) -> jax.Array:
  """`x` under a sharding constraint by logical axis `names`; the identity when `mesh` is None.

  Models built without a mesh (one device, `pmap`) are unchanged; under ``jit`` over a mesh the
  constraint tells XLA where each layer's activations live.
  """
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(names, x.shape, mesh)))


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


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """``x + bias`` over the last axis, whose bias gradient is a matrix-vector product.

  Autodiff's bias gradient is a ``sum`` of the cotangent over every leading axis: a column
  reduction of a ``[tokens, V]`` array, which XLA's CPU backend runs slowly; ``ones @ cotangent``
  is the same sum (the accumulation order may differ). On the 30,522-wide BERT MLM head the
  head's gradient went from 945 to 870 ms (benchmarks/RESULTS.md).
  """
  return x + bias


def _add_bias_fwd(x, bias):
  return x + bias, (jnp.zeros((), x.dtype), jnp.zeros((), bias.dtype))  # only the dtypes are kept


def _add_bias_bwd(zeros, g):
  x_zero, bias_zero = zeros
  g_NxV = g.reshape(-1, g.shape[-1])
  ones_N = jnp.ones((g_NxV.shape[0],), g.dtype)
  db_V = jnp.einsum("n,nv->v", ones_N, g_NxV, preferred_element_type=jnp.float32)
  return g.astype(x_zero.dtype), db_V.astype(bias_zero.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


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


# Config values of `train.attention`; `auto` picks by platform (`resolve_attention`).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# A module's resolved `attention_impl`: "splash_interpret" runs the Pallas kernel in interpret
# mode (any platform: tests); None is "xla".
MODULE_ATTENTION = ("xla", "cudnn", "splash", "splash_interpret")
SPLASH_BLOCKS = (512, 256, 128)  # splash tile sizes tried, largest first (multiples of 128 lanes)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_attention(name: str, platform: str, field: str = "train.attention") -> str:
  """The module `attention_impl` of a `ATTENTION_IMPLS` name on `platform` ("cpu", "gpu", "tpu").

  `auto` is splash on TPU, cuDNN on GPU and XLA elsewhere; a kernel asked for on a platform
  that lacks it is a one-line `ValueError` naming `field`.
  """
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"{field}: unknown {name!r}; allowed: {', '.join(ATTENTION_IMPLS)}")
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  if name == "auto":
    return {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
  needs = {"cudnn": "gpu", "splash": "tpu"}.get(name)
  if needs is not None and platform != needs:
    raise ValueError(f"{field}: {name} needs a {needs.upper()} (this platform is {platform}); "
                     "allowed here: auto, xla")
  return name


# Config values of `train.layer_loop`; `auto` picks by platform (`resolve_layer_loop`).
LAYER_LOOPS = ("auto", "scan", "unroll")


def resolve_layer_loop(name: str, platform: str, field: str = "train.layer_loop") -> bool:
  """Whether the layer stack runs unrolled (a module's `unroll_layers`) for a `LAYER_LOOPS` name.

  `auto` unrolls on CPU and scans elsewhere. A scan compiles one layer body whatever the depth,
  but each iteration slices its layer's weights out of the stacked params, and the backward
  pass stacks residuals and per-layer gradients in zero-initialized buffers: on an accelerator
  that bookkeeping is small next to the matmuls; on a CPU, unrolling made a BERT-base step 13%
  faster (benchmarks/RESULTS.md). Unrolled, the indices are static and most of it folds away; the
  compile time then grows with depth. A bad name is a one-line `ValueError` naming `field`.
  """
  if name not in LAYER_LOOPS:
    raise ValueError(f"{field}: unknown {name!r}; allowed: {', '.join(LAYER_LOOPS)}")
  if name == "auto":
    return platform == "cpu"
  return name == "unroll"


@dataclasses.dataclass(frozen=True)
class SplashMask:
  """The structure of a self-attention mask, which splash takes instead of a dense ``[B, 1, T, S]`` one.

  Attributes:
    key_mask_BxS: 1 for real tokens (queries and keys are the same ``T == S`` positions); becomes
      splash's segment ids (padding is segment 0, so real tokens never see it).
    causal: keys after the query are masked.
    windows: the model's distinct sliding windows (None: global), static.
    window_index: traced index into `windows` of this layer (None when there is one window).
  """

  key_mask_BxS: jax.Array
  causal: bool
  windows: tuple[Optional[int], ...] = (None,)
  window_index: Optional[jax.Array] = None


_FALLBACKS_LOGGED: set[str] = set()


def _fallback(impl: str, reason: str) -> None:
  """Logs (once per message) that `impl` attention runs on XLA's path instead."""
  msg = f"attention: {impl} falls back to XLA's attention: {reason}"
  if msg not in _FALLBACKS_LOGGED:
    _FALLBACKS_LOGGED.add(msg)
    _log.warning(msg)


def splash_block(length: int) -> Optional[int]:
  """The largest of `SPLASH_BLOCKS` that divides `length` (None: splash can't tile it)."""
  return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


def attention_kernel(implementation: Optional[str], *, explicit: bool, softcap: Optional[float], dtype: Any,
                     q_len: int, kv_len: int, head_dim: int, splash_mask: Optional[SplashMask]) -> str:
  """Which path `attend` takes: "explicit" (maps), "xla", "cudnn" or "splash"; a fallback is logged."""
  impl = implementation or "xla"
  if impl not in MODULE_ATTENTION:
    raise ValueError(f"attention_impl: unknown {impl!r}; allowed: {', '.join(MODULE_ATTENTION)}")
  if explicit:  # the maps themselves are wanted
    if impl != "xla":
      _fallback(impl, "attention maps are needed (an attention/value feature term, or attention dropout)")
    return "explicit"
  if impl == "cudnn":
    if softcap is not None:
      _fallback(impl, "cuDNN has no attention score soft-capping (Gemma 2)")
      return "explicit"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
      _fallback(impl, f"cuDNN attention runs in bfloat16/float16, this model computes in {jnp.dtype(dtype).name}")
      return "xla"
    if head_dim % 8 or head_dim > 256:
      _fallback(impl, f"cuDNN needs a head_dim that is a multiple of 8 and <= 256, got {head_dim}")
      return "xla"
    return "cudnn"
  if impl.startswith("splash"):
    if splash_mask is None:
      _fallback(impl, "KV-cache decoding (queries and keys of different lengths)")
    elif q_len != kv_len or splash_block(q_len) is None:
      _fallback(impl, f"sequence length {q_len} is not a multiple of {SPLASH_BLOCKS[-1]} (splash's smallest block)")
    else:
      return "splash"
  return "explicit" if softcap is not None else "xla"


def attend(q_BxTxNxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_Bx1xTxS: jax.Array, *,
           scale: float, softcap: Optional[float] = None, explicit: bool = False,
           implementation: Optional[str] = None, splash_mask: Optional[SplashMask] = None,
           mesh: Optional[Mesh] = None):
  """Multi-head attention with grouped KV heads; `(out [B,T,N,D], scores, probs)`.

  Paths (`attention_kernel` chooses, logging any fallback): "splash" (the Pallas TPU kernel,
  from `splash_mask`, never ``[T, S]`` scores; "splash_interpret" runs it in interpret mode);
  "cudnn" (cuDNN's flash kernel through `jax.nn.dot_product_attention`); "xla" (XLA's fused
  `dot_product_attention`); "explicit" when a term needs the maps (or a `softcap` off splash):
  then `scores` ``[B, N, T, S]`` (scaled, capped; masked keys at `MASKED_SCORE`) and `probs`
  ``[B, N, T, S]`` are returned as well (None otherwise).  `mask_Bx1xTxS` is what the non-splash
  paths read; `mesh` (optional) runs splash under `shard_map` (batch over data × fsdp, heads
  over tensor).
  """
  n, kv = q_BxTxNxD.shape[2], k_BxSxKxD.shape[2]
  path = attention_kernel(implementation, explicit=explicit, softcap=softcap, dtype=q_BxTxNxD.dtype,
                          q_len=q_BxTxNxD.shape[1], kv_len=k_BxSxKxD.shape[1], head_dim=q_BxTxNxD.shape[-1],
                          splash_mask=splash_mask)
  if path == "splash":
    out = splash_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, splash_mask, scale=scale, softcap=softcap,
                           interpret=implementation == "splash_interpret", mesh=mesh)
    return out, None, None
  if path in ("xla", "cudnn"):
    out = jax.nn.dot_product_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, mask=mask_Bx1xTxS, scale=scale,
                                       implementation="cudnn" if path == "cudnn" else None)
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


def splash_attention(q_BxTxNxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, mask: SplashMask, *,
                     scale: float, softcap: Optional[float] = None, interpret: bool = False,
                     mesh: Optional[Mesh] = None) -> jax.Array:
  """Self-attention ``[B, T, N, D]`` through jax's splash-attention Pallas kernel (TPU).

  Args:
    q_BxTxNxD: queries; `N` a multiple of the `K` KV heads (grouped-query attention).
    k_BxTxKxD: keys. v_BxTxKxD: values.
    mask: causal / sliding-window structure and the padding (`SplashMask`); `T` must be a
      multiple of 128 (`splash_block`).
    scale: applied to the queries (splash takes pre-scaled queries).
    softcap: Gemma 2's ``tanh(s / c) * c`` on the scaled scores.
    interpret: run the kernel in Pallas interpret mode (CPU tests).
    mesh: a ``(data, fsdp, tensor)`` mesh to `shard_map` the kernel over (batch and heads).

  Returns:
    ``[B, T, N, D]`` in the queries' dtype.
  """
  # Deferred: the Pallas TPU ops are only needed (and only imported) when splash is chosen.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, t, n, d = q_BxTxNxD.shape
  kv = k_BxTxKxD.shape[2]
  block = splash_block(t)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  batch_spec, head_spec = None, None
  if mesh is not None:
    batch_spec = activation_spec(("batch",), (b,), mesh)[0]
    tensor = mesh.shape.get("tensor", 1)
    head_spec = "tensor" if tensor > 1 and n % tensor == 0 and kv % tensor == 0 else None
  local_heads = n // (mesh.shape["tensor"] if head_spec else 1)

  def kernel(window: Optional[int]):
    if not mask.causal:
      base = splash.FullMask((t, t))
    elif window is None or window >= t:
      base = splash.CausalMask((t, t))
    else:  # HF keeps key k for query q when q - k < window
      base = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    return splash.make_splash_mha(splash.MultiHeadMask([base] * local_heads), head_shards=1, q_seq_shards=1,
                                  block_sizes=sizes, attn_logits_soft_cap=softcap, interpret=interpret)

  def run(q_BxNxTxD, k_BxKxTxD, v_BxKxTxD, segments_BxT, index):
    def one(window, q, k, v, seg):
      fn = kernel(window)
      return jax.vmap(lambda q1, k1, v1, s1: fn(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))(
          q, k, v, seg)
    branches = [lambda *a, w=w: one(w, *a) for w in mask.windows]
    if len(branches) == 1:
      return branches[0](q_BxNxTxD, k_BxKxTxD, v_BxKxTxD, segments_BxT)
    return jax.lax.switch(index, branches, q_BxNxTxD, k_BxKxTxD, v_BxKxTxD, segments_BxT)

  q_BxNxTxD = (q_BxTxNxD.astype(jnp.float32) * scale).astype(q_BxTxNxD.dtype).transpose(0, 2, 1, 3)
  k_BxKxTxD = k_BxTxKxD.transpose(0, 2, 1, 3)
  v_BxKxTxD = v_BxTxKxD.transpose(0, 2, 1, 3)
  segments_BxT = mask.key_mask_BxS.astype(jnp.int32)
  index = jnp.zeros((), jnp.int32) if mask.window_index is None else jnp.asarray(mask.window_index, jnp.int32)
  if mesh is not None:
    heads = P(batch_spec, head_spec, None, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(heads, heads, heads, P(batch_spec, None), P()),
                        out_specs=heads, check_vma=False)
  out_BxNxTxD = run(q_BxNxTxD, k_BxKxTxD, v_BxKxTxD, segments_BxT, index)
  return out_BxNxTxD.transpose(0, 2, 1, 3).astype(q_BxTxNxD.dtype)


def scan_layers(block_cls: type[nn.Module], num_layers: int, remat: str, *, in_axes: tuple = (),
                unroll: bool = False) -> type:
  """`block_cls` scanned over stacked layer params (leading axis "layers"), with a remat policy.

  The block is called as ``block(carry, xs) -> (carry, ys)``; `in_axes` gives, for the
  block's extra positional arguments after the carry, `nn.broadcast` or 0 (scanned).
  ``unroll``: the scan is fully unrolled (no loop; the params keep their stacked layout), see
  `resolve_layer_loop`.
  """
  if remat != "none":
    block_cls = nn.remat(block_cls, policy=remat_policy(remat), prevent_cse=False)
  return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=in_axes, length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
                 unroll=max(num_layers, 1) if unroll else 1)
