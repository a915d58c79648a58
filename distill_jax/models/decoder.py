"""Decoder LMs of the Hugging Face families, in Flax Linen, reading PyTorch checkpoints directly.

One module, `Decoder`, covers Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1-3 (text),
SmolLM3 and GPT-2; a frozen `DecoderSpec` (built by `spec_from_hf` from a transformers
config) holds every number that changes the computation.  The layers run under one
`nn.scan` over stacked params (leading axis "layers"); what differs between layers (sliding
vs global attention, local vs global RoPE base, SmolLM3's layers without RoPE) enters as
scanned per-layer arrays.  The formulas follow transformers 5's PyTorch code; config
features we do not implement are refused with a one-line `ValueError` naming the field.

Param tree (float32, nested dicts; ``[L, ...]`` under "layers")::

  embed/embedding [V, H]            positions/embedding [P, H]  (GPT-2)
  layers/attn_norm/scale (+bias)    layers/attn/{q,k,v}/kernel [L, H, N|K, D] (+bias [L, N|K, D])
  layers/attn/o/kernel [L, N, D, H] layers/attn/{q_norm,k_norm}/scale [L, D]  (Qwen3, Gemma 3)
  layers/post_attn_norm/scale       layers/mlp_norm/scale (+bias)     layers/post_mlp_norm/scale
  layers/mlp/{gate,up}/kernel [L, H, F], layers/mlp/down/kernel [L, F, H]  (GPT-2: fc, proj)
  final_norm/scale (+bias)          lm_head/kernel [H, V]  (untied causal_lm only)

A tied head is the embedding itself (``logits = h @ embedding.T``): no separate param.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import layers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "gpt2")
TASKS = ("causal_lm", "encoder")  # "encoder" = the base model, no LM head
WANTS = ("logits", "hidden_states", "attention_probs", "attention_scores", "values")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

_GEMMA = ("gemma", "gemma2", "gemma3_text")
_MAPS = frozenset({"attention_probs", "attention_scores"})
_GLOBAL_WINDOW = 2 ** 30  # the window of a global layer in the per-layer window array


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """One RoPE setting (HF `rope_parameters`): base, scaling type and its factors."""

  theta: float
  rope_type: str = "default"
  factor: Optional[float] = None
  low_freq_factor: Optional[float] = None
  high_freq_factor: Optional[float] = None
  original_max_position_embeddings: Optional[int] = None

  @property
  def scaling(self) -> dict:
    """The scaling dict `layers.rope_inv_freq` takes (HF's key names)."""
    return {"rope_type": self.rope_type, "factor": self.factor, "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings}


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """Every number of a decoder family that changes the computation (hashable: a static arg).

  Attributes:
    family: HF `model_type`.
    num_heads, num_kv_heads, head_dim: query heads, key/value heads (GQA), per-head width.
    intermediate_size: MLP width.
    activation: `layers.ACTIVATIONS` name.
    norm_eps: epsilon of every norm (RMSNorm, or GPT-2's LayerNorm).
    max_positions: `max_position_embeddings` (GPT-2's position table, dynamic RoPE).
    qkv_bias, out_bias, mlp_bias: biases of the q/k/v, output and MLP projections.
    qk_norm: RMSNorm of each query and key head (Qwen3, Gemma 3).
    attention_scale: the factor of q·k (`head_dim ** -0.5`, Gemma 2/3: `query_pre_attn_scalar ** -0.5`).
    attn_softcap, final_softcap: Gemma 2/3 tanh caps of attention scores and of logits.
    ropes: the distinct RoPE settings (Gemma 3: one per layer type).
    layer_rope: per layer, the index into `ropes`; -1 = no RoPE (SmolLM3's NoPE layers).
    layer_windows: per layer, the sliding window (a key is kept when ``q - k < W``); None = global.
    embedding_dropout, attention_dropout, residual_dropout: training-time dropout rates.
  """

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  activation: str
  norm_eps: float
  tie_word_embeddings: bool
  max_positions: int
  attention_scale: float
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  attn_softcap: Optional[float] = None
  final_softcap: Optional[float] = None
  ropes: tuple[RopeSpec, ...] = ()
  layer_rope: tuple[int, ...] = ()
  layer_windows: tuple[Optional[int], ...] = ()
  embedding_dropout: float = 0.0
  attention_dropout: float = 0.0
  residual_dropout: float = 0.0

  @property
  def is_gpt2(self) -> bool:
    """GPT-2 layout: LayerNorm, learned positions, fused c_attn, plain (ungated) MLP."""
    return self.family == "gpt2"

  @property
  def is_gemma(self) -> bool:
    """Gemma: RMSNorm scaled by ``1 + w`` and embeddings scaled by ``sqrt(hidden)``."""
    return self.family in _GEMMA

  @property
  def sandwich_norms(self) -> bool:
    """Gemma 2/3: norms after attention and after the MLP as well as before."""
    return self.family in ("gemma2", "gemma3_text")


# ----------------------------------------------------------------------------- config -> spec


def _hf_config(config: Mapping[str, Any]) -> Any:
  """The transformers config class of `config` (a `to_dict()` or a raw 4.x/5.x config.json)."""
  import transformers

  config = dict(config)
  family = config.pop("model_type", None)
  if family not in FAMILIES:
    raise ValueError(f"config.model_type: {family!r} is not a decoder family; allowed: {', '.join(FAMILIES)}")
  # The config class fills HF's defaults and converts 4.x `rope_theta`/`rope_scaling` to `rope_parameters`.
  return transformers.AutoConfig.for_model(family, **config)


def _rope_number(params: Mapping[str, Any], key: str, field: str, cast: Callable = float) -> Any:
  if params.get(key) is None:
    raise ValueError(f"{field}: rope_type {params.get('rope_type')!r} needs {key!r}")
  return cast(params[key])


def _rope_spec(params: Mapping[str, Any], field: str) -> RopeSpec:
  params = {**params, "rope_type": params.get("rope_type", params.get("type", "default"))}
  kind = params["rope_type"]
  if kind not in ROPE_TYPES:
    raise ValueError(f"config.rope_scaling: rope_type {kind!r} is not implemented; allowed: {', '.join(ROPE_TYPES)}")
  partial = params.get("partial_rotary_factor", 1.0)
  if partial is not None and float(partial) != 1.0:
    raise ValueError(f"{field}.partial_rotary_factor: {partial} is not implemented; allowed: 1.0")
  theta = _rope_number(params, "rope_theta", field)
  if kind == "default":
    return RopeSpec(theta=theta)
  factor = _rope_number(params, "factor", field)
  if kind in ("linear", "dynamic"):
    return RopeSpec(theta=theta, rope_type=kind, factor=factor)
  return RopeSpec(theta=theta, rope_type=kind, factor=factor,
                  low_freq_factor=_rope_number(params, "low_freq_factor", field),
                  high_freq_factor=_rope_number(params, "high_freq_factor", field),
                  original_max_position_embeddings=_rope_number(params, "original_max_position_embeddings", field, int))


# Families whose layers follow `config.layer_types` (the others ignore it, as transformers does).
_LAYER_TYPED = ("qwen2", "qwen3", "gemma2", "gemma3_text", "smollm3")


def _layer_types(cfg: Any, family: str, num_layers: int) -> list[str]:
  if family not in _LAYER_TYPED:
    return ["full_attention"] * num_layers
  types = list(cfg.layer_types)
  if len(types) != num_layers:
    raise ValueError(f"config.layer_types: {len(types)} entries for {num_layers} layers")
  for kind in types:
    if kind not in LAYER_TYPES:
      raise ValueError(f"config.layer_types: {kind!r} is not implemented; allowed: {', '.join(LAYER_TYPES)}")
  return types


def _windows(cfg: Any, family: str, types: list[str]) -> tuple[Optional[int], ...]:
  """Per-layer sliding windows, as transformers' masks apply them for `family`."""
  window = getattr(cfg, "sliding_window", None)
  if family == "mistral":  # one window for every layer
    return (None if window is None else int(window),) * len(types)
  if "sliding_attention" in types and window is None:
    raise ValueError("config.sliding_window: None, but config.layer_types has 'sliding_attention' layers "
                     "(for Qwen, set use_sliding_window)")
  return tuple(int(window) if kind == "sliding_attention" else None for kind in types)


def _refuse_flag(cfg: Any, field: str, allowed: Any) -> None:
  value = getattr(cfg, field, allowed)
  if bool(value) != bool(allowed):
    raise ValueError(f"config.{field}: {value!r} is not implemented; allowed: {allowed!r}")


def _gpt2_spec(cfg: Any) -> DecoderSpec:
  _refuse_flag(cfg, "scale_attn_weights", True)
  _refuse_flag(cfg, "scale_attn_by_inverse_layer_idx", False)
  _refuse_flag(cfg, "reorder_and_upcast_attn", False)
  _refuse_flag(cfg, "add_cross_attention", False)
  layers.activation(cfg.activation_function, "config.activation_function")
  h, n, num_layers = int(cfg.hidden_size), int(cfg.num_attention_heads), int(cfg.num_hidden_layers)
  if h % n:
    raise ValueError(f"config.n_embd: {h} is not a multiple of n_head={n}")
  return DecoderSpec(
      family="gpt2", vocab_size=int(cfg.vocab_size), hidden_size=h, num_layers=num_layers, num_heads=n,
      num_kv_heads=n, head_dim=h // n, intermediate_size=int(cfg.n_inner or 4 * h),
      activation=cfg.activation_function, norm_eps=float(cfg.layer_norm_epsilon),
      tie_word_embeddings=bool(cfg.tie_word_embeddings), max_positions=int(cfg.max_position_embeddings),
      attention_scale=(h // n) ** -0.5, qkv_bias=True, out_bias=True, mlp_bias=True,
      layer_rope=(-1,) * num_layers, layer_windows=(None,) * num_layers,
      embedding_dropout=float(cfg.embd_pdrop), attention_dropout=float(cfg.attn_pdrop),
      residual_dropout=float(cfg.resid_pdrop))


def _rotary_spec(cfg: Any, family: str) -> DecoderSpec:
  h, n, num_layers = int(cfg.hidden_size), int(cfg.num_attention_heads), int(cfg.num_hidden_layers)
  kv = int(getattr(cfg, "num_key_value_heads", None) or n)
  if n % kv:
    raise ValueError(f"config.num_key_value_heads: {kv} does not divide num_attention_heads={n}")
  head_dim = int(getattr(cfg, "head_dim", None) or h // n)
  act_field = "hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"
  activation = getattr(cfg, act_field)
  layers.activation(activation, f"config.{act_field}")
  if family in _GEMMA:
    _refuse_flag(cfg, "use_bidirectional_attention", False)
  types = _layer_types(cfg, family, num_layers)
  if family == "gemma3_text":  # one RoPE per layer type (local and global bases)
    names = sorted(set(types))
    ropes = tuple(_rope_spec(cfg.rope_parameters[t], f"config.rope_parameters.{t}") for t in names)
    layer_rope = tuple(names.index(t) for t in types)
  else:
    ropes = (_rope_spec(cfg.rope_parameters, "config.rope_parameters"),)
    use_rope = list(cfg.no_rope_layers) if family == "smollm3" else [1] * num_layers
    if len(use_rope) != num_layers:
      raise ValueError(f"config.no_rope_layers: {len(use_rope)} entries for {num_layers} layers")
    layer_rope = tuple(0 if use else -1 for use in use_rope)
  attention_bias = bool(getattr(cfg, "attention_bias", False))
  qkv_bias, out_bias = {"mistral": (False, False), "qwen2": (True, False)}.get(family, (attention_bias,) * 2)
  gemma23 = family in ("gemma2", "gemma3_text")
  return DecoderSpec(
      family=family, vocab_size=int(cfg.vocab_size), hidden_size=h, num_layers=num_layers, num_heads=n,
      num_kv_heads=kv, head_dim=head_dim, intermediate_size=int(cfg.intermediate_size), activation=activation,
      norm_eps=float(cfg.rms_norm_eps), tie_word_embeddings=bool(cfg.tie_word_embeddings),
      max_positions=int(cfg.max_position_embeddings),
      attention_scale=float(cfg.query_pre_attn_scalar) ** -0.5 if gemma23 else head_dim ** -0.5,
      qkv_bias=qkv_bias, out_bias=out_bias,
      mlp_bias=bool(getattr(cfg, "mlp_bias", False)) if family in ("llama", "smollm3") else False,
      qk_norm=family in ("qwen3", "gemma3_text"),
      # transformers 5 applies Gemma 3's attn_logit_softcapping nowhere, so neither do we.
      attn_softcap=_optional_float(cfg.attn_logit_softcapping) if family == "gemma2" else None,
      final_softcap=_optional_float(cfg.final_logit_softcapping) if gemma23 else None,
      ropes=ropes, layer_rope=layer_rope, layer_windows=_windows(cfg, family, types),
      attention_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0))


def _optional_float(x: Any) -> Optional[float]:
  return None if x is None else float(x)


def spec_from_hf(config: Mapping[str, Any]) -> DecoderSpec:
  """The `DecoderSpec` of an HF config.

  Args:
    config: a transformers `PretrainedConfig.to_dict()` or a raw config.json dict (4.x
      `rope_theta`/`rope_scaling` or 5.x `rope_parameters`), with its `model_type`.

  Returns:
    The spec; HF's defaults fill what the dict leaves out (through the config class).

  Raises:
    ValueError: an unknown family, or a config feature that changes the numbers and that we
      do not implement (one line naming the field, the value and what is allowed).
  """
  cfg = _hf_config(config)
  family = cfg.model_type
  return _gpt2_spec(cfg) if family == "gpt2" else _rotary_spec(cfg, family)


def hf_architecture(spec: DecoderSpec, task: str) -> str:
  """The transformers class name of `spec`'s family and `task` (config.json `architectures`)."""
  _check_task(task)
  names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
           "gemma2": "Gemma2", "gemma3_text": "Gemma3", "smollm3": "SmolLM3", "gpt2": "GPT2"}
  stem = names[spec.family]
  if task == "encoder":
    return "Gemma3TextModel" if spec.family == "gemma3_text" else f"{stem}Model"
  return "GPT2LMHeadModel" if spec.is_gpt2 else f"{stem}ForCausalLM"


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task: {task!r} is not a decoder task; allowed: {', '.join(TASKS)}")


# ----------------------------------------------------------------------------- the module


def default_position_ids(attention_mask_BxS: jax.Array, q_len: int, cache_index: Optional[jax.Array] = None):
  """``[B, T]`` positions of the real tokens: ``clip(cumsum(mask) - 1, 0)`` (left padding = true positions).

  With a KV cache, `attention_mask_BxS` covers every cache slot and the `q_len` queries sit at
  slots ``cache_index ...``.
  """
  pos_BxS = jnp.maximum(jnp.cumsum(attention_mask_BxS.astype(jnp.int32), axis=-1) - 1, 0)
  if cache_index is None:
    return pos_BxS
  return jax.lax.dynamic_slice_in_dim(pos_BxS, cache_index, q_len, axis=1)


def _layer_inv_freq(spec: DecoderSpec, position_ids_BxT: jax.Array) -> jax.Array:
  """``[L, head_dim / 2]`` inverse frequencies of every layer (zeros: no RoPE, an exact identity)."""
  seq_len = jnp.max(position_ids_BxT) + 1  # dynamic RoPE's length, as transformers takes it
  tables = [layers.rope_inv_freq(spec.head_dim, r.theta, r.scaling, spec.max_positions, seq_len)
            for r in spec.ropes]
  zeros = jnp.zeros((spec.head_dim // 2,), jnp.float32)
  return jnp.stack([tables[i] if i >= 0 else zeros for i in spec.layer_rope])


def _attention_mask(key_mask_BxS: jax.Array, q_len: int, window: jax.Array,
                    cache_index: Optional[jax.Array]) -> jax.Array:
  """Causal (sliding) mask ``[B, 1, T, S]``; each query also sees its own slot.

  The own slot changes nothing for real tokens and gives padding queries (and all-padding
  rows) one key, so no attention kernel meets a fully masked row.
  """
  s_len = key_mask_BxS.shape[-1]
  allowed = layers.attention_mask(key_mask_BxS, q_len, causal=True, window=window, q_offset=cache_index)
  offset = s_len - q_len if cache_index is None else cache_index
  own_TxS = (jnp.arange(q_len)[:, None] + offset) == jnp.arange(s_len)[None, :]
  return allowed | own_TxS[None, None]


def _weighted_values(probs_BxNxTxS: jax.Array, v_BxSxKxD: jax.Array) -> jax.Array:
  """``[B, T, N, D]`` = probs · values with grouped KV heads."""
  b, n, t, s = probs_BxNxTxS.shape
  kv, d = v_BxSxKxD.shape[2:]
  probs_BxKxGxTxS = probs_BxNxTxS.reshape(b, kv, n // kv, t, s).astype(v_BxSxKxD.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxD).reshape(b, t, n, d)


def _norm(spec: DecoderSpec, dtype: Any, name: str, axis_name: str = "embed") -> nn.Module:
  if spec.is_gpt2:
    return layers.LayerNorm(spec.norm_eps, dtype=dtype, name=name)
  return layers.RMSNorm(spec.norm_eps, offset=spec.is_gemma, dtype=dtype, axis_name=axis_name, name=name)


class _Attention(nn.Module):
  """Self-attention of one layer (q/k/v, optional q/k norm, RoPE, KV cache, output projection)."""

  spec: DecoderSpec
  dtype: Any
  want: frozenset
  deterministic: bool
  attention_impl: Optional[str]

  @nn.compact
  def __call__(self, h_BxTxH, xs, ctx, cache):
    spec, dtype = self.spec, self.dtype
    n, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    b, t = h_BxTxH.shape[:2]
    q_BxTxNxD = layers.dense((n, d), ("embed", "heads", "head_dim"), use_bias=spec.qkv_bias, dtype=dtype,
                             name="q")(h_BxTxH)
    k_BxTxKxD = layers.dense((kv, d), ("embed", "kv_heads", "head_dim"), use_bias=spec.qkv_bias, dtype=dtype,
                             name="k")(h_BxTxH)
    v_BxTxKxD = layers.dense((kv, d), ("embed", "kv_heads", "head_dim"), use_bias=spec.qkv_bias, dtype=dtype,
                             name="v")(h_BxTxH)
    if spec.qk_norm:
      q_BxTxNxD = _norm(spec, dtype, "q_norm", "head_dim")(q_BxTxNxD)
      k_BxTxKxD = _norm(spec, dtype, "k_norm", "head_dim")(k_BxTxKxD)
    if "inv_freq" in xs:
      cos_BxTxD, sin_BxTxD = layers.rope_tables(ctx["positions"], xs["inv_freq"])
      q_BxTxNxD = layers.apply_rope(q_BxTxNxD, cos_BxTxD, sin_BxTxD)
      k_BxTxKxD = layers.apply_rope(k_BxTxKxD, cos_BxTxD, sin_BxTxD)
    ys = {"values": v_BxTxKxD.reshape(b, t, kv * d)} if "values" in self.want else {}
    keys_BxSxKxD, values_BxSxKxD = k_BxTxKxD, v_BxTxKxD
    if cache is not None:  # write this step's keys/values at slots cache_index..., attend over all slots
      start = (xs["layer"], 0, ctx["cache_index"], 0, 0)
      cache = {name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype), start)
               for name, new in (("key", k_BxTxKxD), ("value", v_BxTxKxD))}
      keys_BxSxKxD = cache["key"][xs["layer"]].astype(dtype)
      values_BxSxKxD = cache["value"][xs["layer"]].astype(dtype)
    mask_Bx1xTxS = _attention_mask(ctx["key_mask"], t, xs["window"], ctx["cache_index"])
    dropout = not self.deterministic and spec.attention_dropout > 0
    out_BxTxNxD, scores, probs = layers.attend(
        q_BxTxNxD, keys_BxSxKxD, values_BxSxKxD, mask_Bx1xTxS, scale=spec.attention_scale,
        softcap=spec.attn_softcap, explicit=bool(self.want & _MAPS) or dropout, implementation=self.attention_impl)
    if dropout:  # dropout on the probabilities, as transformers does
      out_BxTxNxD = _weighted_values(nn.Dropout(spec.attention_dropout)(probs, deterministic=False), values_BxSxKxD)
    if "attention_probs" in self.want:
      ys["probs"] = probs
    if "attention_scores" in self.want:
      ys["scores"] = scores
    out_BxTxH = layers.dense(spec.hidden_size, ("heads", "head_dim", "embed"), use_bias=spec.out_bias, dtype=dtype,
                             name="o", in_axes=(-2, -1))(out_BxTxNxD)
    return out_BxTxH, cache, ys


class _Mlp(nn.Module):
  spec: DecoderSpec
  dtype: Any

  @nn.compact
  def __call__(self, h_BxTxH):
    spec, dtype = self.spec, self.dtype
    act = layers.activation(spec.activation, "config.activation")
    f = spec.intermediate_size
    if spec.is_gpt2:
      up_BxTxF = layers.dense(f, ("embed", "mlp"), use_bias=True, dtype=dtype, name="fc")(h_BxTxH)
      return layers.dense(spec.hidden_size, ("mlp", "embed"), use_bias=True, dtype=dtype, name="proj")(act(up_BxTxF))
    gate_BxTxF = layers.dense(f, ("embed", "mlp"), use_bias=spec.mlp_bias, dtype=dtype, name="gate")(h_BxTxH)
    up_BxTxF = layers.dense(f, ("embed", "mlp"), use_bias=spec.mlp_bias, dtype=dtype, name="up")(h_BxTxH)
    return layers.dense(spec.hidden_size, ("mlp", "embed"), use_bias=spec.mlp_bias, dtype=dtype,
                        name="down")(act(gate_BxTxF) * up_BxTxF)


class _Layer(nn.Module):
  """One decoder layer, scanned: ``((x, cache), xs, ctx) -> ((x, cache), ys)``.

  `xs` holds this layer's slices (`window`, `layer` index, `inv_freq` when the family has
  RoPE); `ctx` is broadcast (`positions`, `key_mask`, `cache_index`); `ys` holds only the
  wanted intermediates.
  """

  spec: DecoderSpec
  dtype: Any
  want: frozenset
  deterministic: bool
  attention_impl: Optional[str]

  @nn.compact
  def __call__(self, carry, xs, ctx):
    x_BxTxH, cache = carry
    spec, dtype = self.spec, self.dtype
    residual_dropout = nn.Dropout(spec.residual_dropout, deterministic=self.deterministic)
    h_BxTxH = _norm(spec, dtype, "attn_norm")(x_BxTxH)
    h_BxTxH, cache, ys = _Attention(spec, dtype, self.want, self.deterministic, self.attention_impl,
                                    name="attn")(h_BxTxH, xs, ctx, cache)
    if spec.sandwich_norms:
      h_BxTxH = _norm(spec, dtype, "post_attn_norm")(h_BxTxH)
    x_BxTxH = x_BxTxH + residual_dropout(h_BxTxH)
    h_BxTxH = _Mlp(spec, dtype, name="mlp")(_norm(spec, dtype, "mlp_norm")(x_BxTxH))
    if spec.sandwich_norms:
      h_BxTxH = _norm(spec, dtype, "post_mlp_norm")(h_BxTxH)
    x_BxTxH = x_BxTxH + residual_dropout(h_BxTxH)
    if "hidden_states" in self.want:
      ys["hidden"] = x_BxTxH
    return (x_BxTxH, cache), ys


def _embed(num: int, features: int, axes: tuple[str, str], dtype: Any, name: str) -> nn.Embed:
  return nn.Embed(num, features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  embedding_init=nn.with_logical_partitioning(layers.init_normal(), axes))


class Decoder(nn.Module):
  """A decoder LM of any `FAMILIES` member; numbers equal transformers' PyTorch model's.

  Attributes:
    spec: the family's `DecoderSpec`.
    task: "causal_lm" (with the LM head) or "encoder" (the base model).
    dtype: compute dtype (params may be float32 or bf16; norms and softmax run in float32).
    remat: "none" | "full" | "dots": what the layer scan saves for the backward pass.
    attention_impl: `implementation` of `jax.nn.dot_product_attention` (None = best available).
  """

  spec: DecoderSpec
  task: str = "causal_lm"
  dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT, position_ids_BxT=None, token_type_ids_BxT=None, *,
               want: frozenset = frozenset({"logits"}), deterministic: bool = True, cache=None,
               cache_index=None) -> dict[str, jax.Array]:
    """Runs the model, computing only what `want` names.

    Args:
      input_ids_BxT: ``[B, T]`` token ids.
      attention_mask_BxT: ``[B, T]`` 1 for real tokens; with a `cache`, ``[B, S]`` over every
        cache slot (1 for the real tokens written so far and for the current ones).
      position_ids_BxT: ``[B, T]``; default `default_position_ids` (true positions under left padding).
      token_type_ids_BxT: GPT-2 only (embedded with the token embedding, as transformers does);
        the other families have no such input and ignore it.
      want: names from `WANTS`.
      deterministic: False turns dropout on (needs a "dropout" rng).
      cache: `init_cache`'s pytree for KV-cache decoding; the `T` new keys/values are written at
        slots ``cache_index ... cache_index + T - 1``.
      cache_index: the first slot of this call's tokens (a scalar, the same for every row).

    Returns:
      `last_hidden` ``[B, T, H]`` (after the final norm) always; `logits` ``[B, T, V]`` float32
      (causal_lm; Gemma 2/3 final softcap applied); `hidden_states` ``[L+1, B, T, H]`` (the
      embedding output, layers 1..L-1, then the final-normed output, as in HF);
      `attention_probs` / `attention_scores` ``[L, B, N, T, S]`` (scores scaled and capped,
      masked keys at `layers.MASKED_SCORE`); `values` ``[L, B, T, K*D]``; `cache` when given.
    """
    spec, dtype = self.spec, self.dtype
    _check_task(self.task)
    want = frozenset(want)
    if want - set(WANTS):
      raise ValueError(f"want: unknown {sorted(want - set(WANTS))}; allowed: {', '.join(WANTS)}")
    if "logits" in want and self.task != "causal_lm":
      raise ValueError("want: 'logits' needs task 'causal_lm' (an encoder has no LM head)")
    if (cache is None) != (cache_index is None):
      raise ValueError("cache and cache_index go together: give both or neither")
    t = input_ids_BxT.shape[1]
    if cache_index is not None:
      cache_index = jnp.asarray(cache_index, jnp.int32)
    if position_ids_BxT is None:
      position_ids_BxT = default_position_ids(attention_mask_BxT, t, cache_index)
    embed = _embed(spec.vocab_size, spec.hidden_size, ("vocab", "embed"), dtype, "embed")
    x_BxTxH = embed(input_ids_BxT)
    if spec.is_gemma:  # sqrt(hidden) rounded to the compute dtype, as transformers does
      x_BxTxH = x_BxTxH * jnp.asarray(spec.hidden_size ** 0.5, dtype)
    if spec.is_gpt2:
      x_BxTxH = x_BxTxH + _embed(spec.max_positions, spec.hidden_size, ("positions", "embed"), dtype,
                                 "positions")(position_ids_BxT)
      if token_type_ids_BxT is not None:
        x_BxTxH = x_BxTxH + embed(token_type_ids_BxT)
    x_BxTxH = nn.Dropout(spec.embedding_dropout)(x_BxTxH, deterministic=deterministic)
    xs = {"window": jnp.asarray([_GLOBAL_WINDOW if w is None else w for w in spec.layer_windows], jnp.int32),
          "layer": jnp.arange(spec.num_layers, dtype=jnp.int32)}
    if not spec.is_gpt2:
      xs["inv_freq"] = _layer_inv_freq(spec, position_ids_BxT)
    ctx = {"positions": position_ids_BxT, "key_mask": attention_mask_BxT, "cache_index": cache_index}
    stack = layers.scan_layers(_Layer, spec.num_layers, self.remat, in_axes=(0, nn.broadcast))
    (out_BxTxH, cache), ys = stack(spec, dtype, want, deterministic, self.attention_impl, name="layers")(
        (x_BxTxH, cache), xs, ctx)
    last_BxTxH = _norm(spec, dtype, "final_norm")(out_BxTxH)
    result = {"last_hidden": last_BxTxH}
    if "hidden_states" in want:
      result["hidden_states"] = jnp.concatenate([x_BxTxH[None], ys["hidden"][:-1], last_BxTxH[None]], axis=0)
    for name, key in (("attention_probs", "probs"), ("attention_scores", "scores"), ("values", "values")):
      if name in want:
        result[name] = ys[key]
    if cache is not None:
      result["cache"] = cache
    if self.task == "causal_lm" and ("logits" in want or self.is_initializing()):
      if spec.tie_word_embeddings:
        logits_BxTxV = embed.attend(last_BxTxH)
      else:
        logits_BxTxV = layers.dense(spec.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype,
                                    name="lm_head")(last_BxTxH)
      logits_BxTxV = logits_BxTxV.astype(jnp.float32)
      if spec.final_softcap is not None:
        logits_BxTxV = jnp.tanh(logits_BxTxV / spec.final_softcap) * spec.final_softcap
      if "logits" in want:
        result["logits"] = logits_BxTxV
    return result


def init_cache(spec: DecoderSpec, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
  """An empty KV cache: ``{"key", "value"}`` each ``[L, B, max_len, K, D]`` of `dtype`."""
  shape = (spec.num_layers, batch_size, max_len, spec.num_kv_heads, spec.head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


# ----------------------------------------------------------------------------- HF weights in and out


@dataclasses.dataclass(frozen=True)
class _Weight:
  """One HF weight and the param(s) it fills (GPT-2's c_attn fills q, k and v)."""

  hf: str                                # name in the base model; "{i}" = the layer
  ours: tuple[tuple[str, ...], ...]      # our param paths
  hf_shape: tuple[int, ...]
  load: Callable[[np.ndarray], list[np.ndarray]]  # HF array -> our arrays (one layer)
  save: Callable[[list[np.ndarray]], np.ndarray]  # our arrays -> HF array

  @property
  def layered(self) -> bool:
    return "{i}" in self.hf


def _linear(hf: str, path: tuple[str, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            transposed: bool = True) -> _Weight:
  """A `torch.nn.Linear` weight ``[out, in]`` (or GPT-2's `Conv1D` ``[in, out]``) as a kernel ``in + out``."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  if transposed:
    return _Weight(hf, (path,), (n_out, n_in), lambda w: [w.T.reshape(in_shape + out_shape)],
                   lambda ks: ks[0].reshape(n_in, n_out).T)
  return _Weight(hf, (path,), (n_in, n_out), lambda w: [w.reshape(in_shape + out_shape)],
                 lambda ks: ks[0].reshape(n_in, n_out))


def _vector(hf: str, path: tuple[str, ...], shape: tuple[int, ...]) -> _Weight:
  size = math.prod(shape)
  return _Weight(hf, (path,), (size,), lambda w: [w.reshape(shape)], lambda ks: ks[0].reshape(size))


def _table(hf: str, path: tuple[str, ...], shape: tuple[int, int]) -> _Weight:
  return _Weight(hf, (path,), shape, lambda w: [w], lambda ks: ks[0])


def _norm_weights(spec: DecoderSpec, hf: str, path: tuple[str, ...], size: int) -> list[_Weight]:
  weights = [_vector(f"{hf}.weight", path + ("scale",), (size,))]
  if spec.is_gpt2:
    weights.append(_vector(f"{hf}.bias", path + ("bias",), (size,)))
  return weights


def _gpt2_weights(spec: DecoderSpec) -> list[_Weight]:
  h, n, d, f = spec.hidden_size, spec.num_heads, spec.head_dim, spec.intermediate_size
  qkv = tuple(("layers", "attn", name) for name in "qkv")
  attn = "h.{i}.attn"
  return [
      _table("wte.weight", ("embed", "embedding"), (spec.vocab_size, h)),
      _table("wpe.weight", ("positions", "embedding"), (spec.max_positions, h)),
      *_norm_weights(spec, "h.{i}.ln_1", ("layers", "attn_norm"), h),
      _Weight(f"{attn}.c_attn.weight", tuple(p + ("kernel",) for p in qkv), (h, 3 * h),
              lambda w: [part.reshape(h, n, d) for part in np.split(w, 3, axis=1)],
              lambda ks: np.concatenate([k.reshape(h, h) for k in ks], axis=1)),
      _Weight(f"{attn}.c_attn.bias", tuple(p + ("bias",) for p in qkv), (3 * h,),
              lambda w: [part.reshape(n, d) for part in np.split(w, 3)],
              lambda ks: np.concatenate([k.reshape(h) for k in ks])),
      _linear(f"{attn}.c_proj.weight", ("layers", "attn", "o", "kernel"), (n, d), (h,), transposed=False),
      _vector(f"{attn}.c_proj.bias", ("layers", "attn", "o", "bias"), (h,)),
      *_norm_weights(spec, "h.{i}.ln_2", ("layers", "mlp_norm"), h),
      _linear("h.{i}.mlp.c_fc.weight", ("layers", "mlp", "fc", "kernel"), (h,), (f,), transposed=False),
      _vector("h.{i}.mlp.c_fc.bias", ("layers", "mlp", "fc", "bias"), (f,)),
      _linear("h.{i}.mlp.c_proj.weight", ("layers", "mlp", "proj", "kernel"), (f,), (h,), transposed=False),
      _vector("h.{i}.mlp.c_proj.bias", ("layers", "mlp", "proj", "bias"), (h,)),
      *_norm_weights(spec, "ln_f", ("final_norm",), h),
  ]


def _rotary_weights(spec: DecoderSpec) -> list[_Weight]:
  h, n, kv, d, f = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size
  attn, mlp = "layers.{i}.self_attn", "layers.{i}.mlp"
  weights = [_table("embed_tokens.weight", ("embed", "embedding"), (spec.vocab_size, h)),
             *_norm_weights(spec, "layers.{i}.input_layernorm", ("layers", "attn_norm"), h)]
  for name, heads in (("q", n), ("k", kv), ("v", kv)):
    weights.append(_linear(f"{attn}.{name}_proj.weight", ("layers", "attn", name, "kernel"), (h,), (heads, d)))
    if spec.qkv_bias:
      weights.append(_vector(f"{attn}.{name}_proj.bias", ("layers", "attn", name, "bias"), (heads, d)))
  weights.append(_linear(f"{attn}.o_proj.weight", ("layers", "attn", "o", "kernel"), (n, d), (h,)))
  if spec.out_bias:
    weights.append(_vector(f"{attn}.o_proj.bias", ("layers", "attn", "o", "bias"), (h,)))
  if spec.qk_norm:
    weights += [*_norm_weights(spec, f"{attn}.q_norm", ("layers", "attn", "q_norm"), d),
                *_norm_weights(spec, f"{attn}.k_norm", ("layers", "attn", "k_norm"), d)]
  if spec.sandwich_norms:  # Gemma 2/3's post_attention_layernorm follows attention; pre_feedforward precedes the MLP
    weights += [*_norm_weights(spec, "layers.{i}.post_attention_layernorm", ("layers", "post_attn_norm"), h),
                *_norm_weights(spec, "layers.{i}.pre_feedforward_layernorm", ("layers", "mlp_norm"), h),
                *_norm_weights(spec, "layers.{i}.post_feedforward_layernorm", ("layers", "post_mlp_norm"), h)]
  else:
    weights += _norm_weights(spec, "layers.{i}.post_attention_layernorm", ("layers", "mlp_norm"), h)
  for name, (fan_in, fan_out) in (("gate", (h, f)), ("up", (h, f)), ("down", (f, h))):
    weights.append(_linear(f"{mlp}.{name}_proj.weight", ("layers", "mlp", name, "kernel"), (fan_in,), (fan_out,)))
    if spec.mlp_bias:
      weights.append(_vector(f"{mlp}.{name}_proj.bias", ("layers", "mlp", name, "bias"), (fan_out,)))
  return weights + _norm_weights(spec, "norm", ("final_norm",), h)


def _weights(spec: DecoderSpec, task: str) -> list[_Weight]:
  """Every HF weight of `spec`/`task` (base-model names; the LM head's as is)."""
  _check_task(task)
  weights = _gpt2_weights(spec) if spec.is_gpt2 else _rotary_weights(spec)
  if task == "causal_lm" and not spec.tie_word_embeddings:
    weights.append(_linear("lm_head.weight", ("lm_head", "kernel"), (spec.hidden_size,), (spec.vocab_size,)))
  return weights


def _prefix(spec: DecoderSpec) -> str:
  """The base model's attribute in `<Family>ForCausalLM` (HF weight names start with it)."""
  return "transformer." if spec.is_gpt2 else "model."


def _is_head(name: str) -> bool:
  return name.startswith("lm_head.")


# Buffers some checkpoints carry that are no weights (last two name parts): RoPE tables, GPT-2's masks.
_BUFFERS = frozenset({("rotary_emb", "inv_freq"), ("attn", "bias"), ("attn", "masked_bias")})


def params_from_hf(state: Mapping[str, np.ndarray], spec: DecoderSpec, task: str) -> dict:
  """Our nested float32 params from a PyTorch-named state dict (per-layer weights stacked).

  Args:
    state: `checkpoints.read_state_dict`'s ``{name: array}``; names with the causal LM's
      prefix (``model.``, ``transformer.``) or without (a base-model checkpoint) both work.
    spec: the family's spec.
    task: "causal_lm" or "encoder".

  Returns:
    The params tree `Decoder.init` gives (unboxed), filled from `state`.

  Raises:
    ValueError: weights missing (all listed) or of the wrong shape (all listed).

  Warns:
    Unused checkpoint weights (buffers such as `rotary_emb.inv_freq` aside).
  """
  prefix, used, missing, bad = _prefix(spec), set(), [], []
  flat: dict[tuple[str, ...], list] = {}

  def lookup(name: str) -> Optional[np.ndarray]:
    for key in ((name,) if _is_head(name) else (prefix + name, name)):
      if key in state:
        used.add(key)
        return np.asarray(state[key], np.float32)
    missing.append(prefix + name if task == "causal_lm" and not _is_head(name) else name)
    return None

  for weight in _weights(spec, task):
    names = [weight.hf.format(i=i) for i in range(spec.num_layers)] if weight.layered else [weight.hf]
    parts = []
    for name in names:
      array = lookup(name)
      if array is None:
        continue
      if array.shape != weight.hf_shape:
        bad.append(f"{name} {tuple(array.shape)} (needs {weight.hf_shape})")
        continue
      parts.append(weight.load(array))
    if len(parts) == len(names):
      for j, path in enumerate(weight.ours):
        flat[path] = np.stack([p[j] for p in parts]) if weight.layered else parts[0][j]
  model = f"{spec.family} {'model' if task == 'causal_lm' else 'encoder'}"
  if missing:
    raise ValueError(f"checkpoint: lacks {len(missing)} weight(s) the {model} needs: {', '.join(missing)}")
  if bad:
    raise ValueError(f"checkpoint: {len(bad)} weight(s) of the wrong shape for the {model}: {', '.join(bad)}")
  if spec.tie_word_embeddings and "lm_head.weight" in state and np.array_equal(
      np.asarray(state["lm_head.weight"], np.float32), flat[("embed", "embedding")]):
    used.add("lm_head.weight")  # a tied head saved alongside its embedding
  unused = sorted(k for k in state if k not in used and tuple(k.split(".")[-2:]) not in _BUFFERS)
  if unused:
    warnings.warn(f"checkpoint: {len(unused)} weight(s) unused by the {model}: {', '.join(unused)}",
                  stacklevel=2)
  params: dict = {}
  for path, value in flat.items():
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return params


def params_to_hf(params: Any, spec: DecoderSpec, task: str) -> dict[str, np.ndarray]:
  """The exact inverse of `params_from_hf`: PyTorch names of `hf_architecture(spec, task)`.

  Float32 contiguous arrays; a tied head is left out (transformers re-ties it on load).
  """
  params = nn.meta.unbox(params)
  prefix = _prefix(spec) if task == "causal_lm" else ""

  def get(path: tuple[str, ...]) -> np.ndarray:
    node = params
    for key in path:
      node = node[key]
    return np.asarray(node, np.float32)

  state = {}
  for weight in _weights(spec, task):
    arrays = [get(path) for path in weight.ours]
    names = range(spec.num_layers) if weight.layered else [None]
    for i in names:
      value = weight.save([a[i] for a in arrays] if weight.layered else arrays)
      name = weight.hf.format(i=i) if weight.layered else weight.hf
      state[name if _is_head(name) else prefix + name] = np.ascontiguousarray(value, np.float32)
  return state
