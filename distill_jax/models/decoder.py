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

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import layers
from distill_jax.models.decoder_spec import (FAMILIES, GLOBAL_WINDOW, LAYER_TYPES, MAPS, ROPE_TYPES, TASKS, WANTS,
                                             DecoderSpec, RopeSpec, check_task, hf_architecture, spec_from_hf)
from distill_jax.models.decoder_weights import params_from_hf, params_to_hf

__all__ = ["FAMILIES", "LAYER_TYPES", "ROPE_TYPES", "TASKS", "WANTS", "Decoder", "DecoderSpec", "RopeSpec",
           "default_position_ids", "hf_architecture", "init_cache", "params_from_hf", "params_to_hf", "spec_from_hf"]


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
  return layers.RMSNorm(spec.norm_eps, offset=spec.norm_offset, dtype=dtype, axis_name=axis_name, name=name)


# Logical axes of the layers' activations (`layers.ACTIVATION_RULES` maps them onto the mesh).
_HIDDEN_AXES = ("batch", "length", "embed")
_QKV_AXES = ("batch", "length", "heads", "head_dim")
_KV_AXES = ("batch", "length", "kv_heads", "head_dim")
_MLP_AXES = ("batch", "length", "mlp")


class _Attention(nn.Module):
  """Self-attention of one layer (q/k/v, optional q/k norm, RoPE, KV cache, output projection)."""

  spec: DecoderSpec
  dtype: Any
  want: frozenset
  deterministic: bool
  attention_impl: Optional[str]
  mesh: Optional[Any] = None

  @nn.compact
  def __call__(self, h_BxTxH, xs, ctx, cache):
    spec, dtype, mesh = self.spec, self.dtype, self.mesh
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
    q_BxTxNxD = layers.name_checkpoint(layers.constrain(q_BxTxNxD, _QKV_AXES, mesh), "query_proj")
    k_BxTxKxD = layers.name_checkpoint(layers.constrain(k_BxTxKxD, _KV_AXES, mesh), "key_proj")
    v_BxTxKxD = layers.name_checkpoint(layers.constrain(v_BxTxKxD, _KV_AXES, mesh), "value_proj")
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
    splash_mask = None
    if cache is None:  # the kernels' structured mask: causal, padding, this layer's window of the model's
      windows = tuple(sorted(set(spec.layer_windows), key=lambda w: (w is None, w or 0)))
      window_index = None
      if len(windows) > 1:
        window_values = jnp.asarray([GLOBAL_WINDOW if w is None else w for w in windows], jnp.int32)
        window_index = jnp.argmax(window_values == xs["window"])
      splash_mask = layers.SplashMask(ctx["key_mask"], causal=True, windows=windows, window_index=window_index)
    out_BxTxNxD, scores, probs = layers.attend(
        q_BxTxNxD, keys_BxSxKxD, values_BxSxKxD, mask_Bx1xTxS, scale=spec.attention_scale,
        softcap=spec.attn_softcap, explicit=bool(self.want & MAPS) or dropout, implementation=self.attention_impl,
        splash_mask=splash_mask, mesh=mesh)
    out_BxTxNxD = layers.constrain(out_BxTxNxD, _QKV_AXES, mesh)
    if dropout:  # dropout on the probabilities, as transformers does
      out_BxTxNxD = _weighted_values(nn.Dropout(spec.attention_dropout)(probs, deterministic=False), values_BxSxKxD)
    if "attention_probs" in self.want:
      ys["probs"] = probs
    if "attention_scores" in self.want:
      ys["scores"] = scores
    out_BxTxH = layers.dense(spec.hidden_size, ("heads", "head_dim", "embed"), use_bias=spec.out_bias, dtype=dtype,
                             name="o", in_axes=(-2, -1))(out_BxTxNxD)
    out_BxTxH = layers.name_checkpoint(layers.constrain(out_BxTxH, _HIDDEN_AXES, mesh), "attn_out")
    return out_BxTxH, cache, ys


class _Mlp(nn.Module):
  spec: DecoderSpec
  dtype: Any
  mesh: Optional[Any] = None

  @nn.compact
  def __call__(self, h_BxTxH):
    spec, dtype, mesh = self.spec, self.dtype, self.mesh
    act = layers.activation(spec.activation, "config.activation")
    f = spec.intermediate_size
    if spec.is_gpt2:
      up_BxTxF = layers.dense(f, ("embed", "mlp"), use_bias=True, dtype=dtype, name="fc")(h_BxTxH)
      inner_BxTxF = act(layers.constrain(up_BxTxF, _MLP_AXES, mesh))
      out_BxTxH = layers.dense(spec.hidden_size, ("mlp", "embed"), use_bias=True, dtype=dtype, name="proj")(inner_BxTxF)
    else:
      gate_BxTxF = layers.dense(f, ("embed", "mlp"), use_bias=spec.mlp_bias, dtype=dtype, name="gate")(h_BxTxH)
      up_BxTxF = layers.dense(f, ("embed", "mlp"), use_bias=spec.mlp_bias, dtype=dtype, name="up")(h_BxTxH)
      inner_BxTxF = layers.constrain(act(gate_BxTxF) * up_BxTxF, _MLP_AXES, mesh)
      out_BxTxH = layers.dense(spec.hidden_size, ("mlp", "embed"), use_bias=spec.mlp_bias, dtype=dtype,
                               name="down")(inner_BxTxF)
    return layers.name_checkpoint(layers.constrain(out_BxTxH, _HIDDEN_AXES, mesh), "mlp_out")


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
  mesh: Optional[Any] = None

  @nn.compact
  def __call__(self, carry, xs, ctx):
    x_BxTxH, cache = carry
    spec, dtype, mesh = self.spec, self.dtype, self.mesh
    residual_dropout = nn.Dropout(spec.residual_dropout, deterministic=self.deterministic)
    x_BxTxH = layers.constrain(x_BxTxH, _HIDDEN_AXES, mesh)
    h_BxTxH = _norm(spec, dtype, "attn_norm")(x_BxTxH)
    h_BxTxH, cache, ys = _Attention(spec, dtype, self.want, self.deterministic, self.attention_impl, mesh,
                                    name="attn")(h_BxTxH, xs, ctx, cache)
    if spec.sandwich_norms:
      h_BxTxH = _norm(spec, dtype, "post_attn_norm")(h_BxTxH)
    x_BxTxH = x_BxTxH + residual_dropout(h_BxTxH)
    h_BxTxH = _Mlp(spec, dtype, mesh, name="mlp")(_norm(spec, dtype, "mlp_norm")(x_BxTxH))
    if spec.sandwich_norms:
      h_BxTxH = _norm(spec, dtype, "post_mlp_norm")(h_BxTxH)
    x_BxTxH = layers.constrain(x_BxTxH + residual_dropout(h_BxTxH), _HIDDEN_AXES, mesh)
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
    remat: one of `layers.REMAT_POLICIES`: what the layer scan saves for the backward pass.
    attention_impl: one of `layers.MODULE_ATTENTION` (None: XLA's); see `layers.attend`.
    unroll_layers: run the layer scan fully unrolled (`layers.resolve_layer_loop`); same params.
    mesh: a ``(data, fsdp, tensor)`` mesh: the layers' activations carry sharding constraints
      (`layers.constrain`) and splash runs under `shard_map`; None (one device, pmap): no constraints.
  """

  spec: DecoderSpec
  task: str = "causal_lm"
  dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: Optional[str] = None
  unroll_layers: bool = False
  mesh: Optional[Any] = None

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
    check_task(self.task)
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
    if spec.embedding_scale:  # sqrt(hidden) rounded to the compute dtype, as transformers does
      x_BxTxH = x_BxTxH * jnp.asarray(spec.hidden_size ** 0.5, dtype)
    if spec.is_gpt2:
      x_BxTxH = x_BxTxH + _embed(spec.max_positions, spec.hidden_size, ("positions", "embed"), dtype,
                                 "positions")(position_ids_BxT)
      if token_type_ids_BxT is not None:
        x_BxTxH = x_BxTxH + embed(token_type_ids_BxT)
    x_BxTxH = nn.Dropout(spec.embedding_dropout)(x_BxTxH, deterministic=deterministic)
    xs = {"window": jnp.asarray([GLOBAL_WINDOW if w is None else w for w in spec.layer_windows], jnp.int32),
          "layer": jnp.arange(spec.num_layers, dtype=jnp.int32)}
    if not spec.is_gpt2:
      xs["inv_freq"] = _layer_inv_freq(spec, position_ids_BxT)
    ctx = {"positions": position_ids_BxT, "key_mask": attention_mask_BxT, "cache_index": cache_index}
    stack = layers.scan_layers(_Layer, spec.num_layers, self.remat, in_axes=(0, nn.broadcast),
                               unroll=self.unroll_layers)
    (out_BxTxH, cache), ys = stack(spec, dtype, want, deterministic, self.attention_impl, self.mesh, name="layers")(
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


def unembedding(spec: DecoderSpec, params: Any, dtype: Any) -> tuple[jax.Array, Optional[jax.Array], Optional[float]]:
  """The LM head of causal_lm `params`: ``(kernel [H, V] in `dtype`, bias (None), final softcap)``.

  ``logits = softcap · tanh(final_hidden @ kernel / softcap)`` equals the module's `logits`
  (a tied head is the embedding transposed), so a loss can chunk the vocabulary itself.
  """
  kernel = params["embed"]["embedding"].T if spec.tie_word_embeddings else params["lm_head"]["kernel"]
  return jnp.asarray(kernel).astype(dtype), None, spec.final_softcap


def init_cache(spec: DecoderSpec, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> dict:
  """An empty KV cache: ``{"key", "value"}`` each ``[L, B, max_len, K, D]`` of `dtype`."""
  shape = (spec.num_layers, batch_size, max_len, spec.num_kv_heads, spec.head_dim)
  return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
