"""Decoder params to and from Hugging Face PyTorch state dicts (per-layer weights stacked).

`params_from_hf` verifies: every weight the model needs must be in the checkpoint (missing
ones listed in one line), shapes must match, unused ones warn; `params_to_hf` is its exact
inverse with the PyTorch names of `<Family>ForCausalLM` / `<Family>Model`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import numpy as np


from distill_jax.models.decoder_spec import DecoderSpec, check_task


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
  check_task(task)
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
