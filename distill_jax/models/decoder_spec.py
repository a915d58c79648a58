"""Decoder families' Hugging Face configs read into a frozen `DecoderSpec` (every number honoured or refused).

`spec_from_hf` takes a transformers config (4.x `rope_theta`/`rope_scaling` or 5.x
`rope_parameters` form) of Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1-3 (text),
SmolLM3 or GPT-2; a config feature that changes the numbers and that `decoder.Decoder`
does not implement is a one-line `ValueError` naming the field and value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from distill_jax.models import layers


TASKS = ("causal_lm", "encoder")  # "encoder" = the base model, no LM head
WANTS = ("logits", "hidden_states", "attention_probs", "attention_scores", "values")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

MAPS = frozenset({"attention_probs", "attention_scores"})
GLOBAL_WINDOW = 2 ** 30  # the window of a global layer in the per-layer window array


@dataclasses.dataclass(frozen=True)
class DecoderTraits:
  """What makes a decoder family itself: read by the spec, the module and the weight map.

  Attributes:
    model_type: HF `model_type` (the registry key).
    causal_lm_class, base_class: transformers class names (config.json `architectures`).
    gpt2_layout: LayerNorm (with bias), learned positions, fused `c_attn` (Conv1D), plain
      MLP, weights under `transformer.`; otherwise RMSNorm, RoPE, gated MLP under `model.`.
    norm_offset: RMSNorm scales by ``1 + w`` (fresh ``w`` = 0).
    embedding_scale: token embeddings times ``sqrt(hidden_size)``.
    sandwich_norms: norms after attention and after the MLP as well as before.
    qk_norm: RMSNorm of every query and key head.
    qkv_bias, out_bias: fixed biases of the q/k/v and output projections; None: `config.attention_bias`.
    mlp_bias: the MLP biases follow `config.mlp_bias` (else none).
    activation_field: the config field naming the MLP activation.
    query_pre_attn_scalar: q·k is scaled by `config.query_pre_attn_scalar ** -0.5` (else `head_dim ** -0.5`).
    attn_softcap, final_softcap: `config.attn_logit_softcapping` / `final_logit_softcapping` are applied.
    layer_typed: layers follow `config.layer_types` (else all are full attention, as transformers does).
    one_window: `config.sliding_window` applies to every layer.
    rope_per_layer_type: `config.rope_parameters` holds one RoPE per layer type.
    no_rope_layers: `config.no_rope_layers` turns RoPE off per layer.
    causal_only: `config.use_bidirectional_attention` is refused (must be false).
  """

  model_type: str
  causal_lm_class: str
  base_class: str
  gpt2_layout: bool = False
  norm_offset: bool = False
  embedding_scale: bool = False
  sandwich_norms: bool = False
  qk_norm: bool = False
  qkv_bias: Optional[bool] = None
  out_bias: Optional[bool] = None
  mlp_bias: bool = False
  activation_field: str = "hidden_act"
  query_pre_attn_scalar: bool = False
  attn_softcap: bool = False
  final_softcap: bool = False
  layer_typed: bool = False
  one_window: bool = False
  rope_per_layer_type: bool = False
  no_rope_layers: bool = False
  causal_only: bool = False


REGISTRY: dict[str, DecoderTraits] = {}


def register(traits: DecoderTraits) -> DecoderTraits:
  """Adds a family to `REGISTRY` (a new Llama-like family is one call)."""
  if traits.model_type in REGISTRY:
    raise ValueError(f"model_type: {traits.model_type!r} is registered already")
  REGISTRY[traits.model_type] = traits
  return traits


def _rotary(model_type: str, stem: str, **traits) -> DecoderTraits:
  return register(DecoderTraits(model_type, f"{stem}ForCausalLM", f"{stem}Model", **traits))


_GEMMA = dict(norm_offset=True, embedding_scale=True, causal_only=True)
_GEMMA23 = dict(_GEMMA, sandwich_norms=True, activation_field="hidden_activation", query_pre_attn_scalar=True,
                final_softcap=True, layer_typed=True)
_rotary("llama", "Llama", mlp_bias=True)
_rotary("mistral", "Mistral", qkv_bias=False, out_bias=False, one_window=True)
_rotary("qwen2", "Qwen2", qkv_bias=True, out_bias=False, layer_typed=True)
_rotary("qwen3", "Qwen3", qk_norm=True, layer_typed=True)
_rotary("gemma", "Gemma", **_GEMMA)
_rotary("gemma2", "Gemma2", attn_softcap=True, **_GEMMA23)
# transformers 5 applies Gemma 3's attn_logit_softcapping nowhere, so neither do we.
register(DecoderTraits("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextModel", qk_norm=True, rope_per_layer_type=True,
                       **_GEMMA23))
_rotary("smollm3", "SmolLM3", mlp_bias=True, layer_typed=True, no_rope_layers=True)
register(DecoderTraits("gpt2", "GPT2LMHeadModel", "GPT2Model", gpt2_layout=True))

FAMILIES = tuple(REGISTRY)


def traits_of(family: Optional[str]) -> DecoderTraits:
  """The registered traits of `family`; one-line error naming the allowed ones."""
  if family not in REGISTRY:
    raise ValueError(f"config.model_type: {family!r} is not a decoder family; allowed: {', '.join(REGISTRY)}")
  return REGISTRY[family]


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
    traits: the family's registered `DecoderTraits` (`family` is its `model_type`).
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

  traits: DecoderTraits
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
  def family(self) -> str:
    """HF `model_type`."""
    return self.traits.model_type

  @property
  def is_gpt2(self) -> bool:
    """GPT-2 layout (`DecoderTraits.gpt2_layout`): LayerNorm, learned positions, fused c_attn, plain MLP."""
    return self.traits.gpt2_layout

  @property
  def norm_offset(self) -> bool:
    """RMSNorm scaled by ``1 + w`` (`DecoderTraits.norm_offset`)."""
    return self.traits.norm_offset

  @property
  def embedding_scale(self) -> bool:
    """Embeddings scaled by ``sqrt(hidden)`` (`DecoderTraits.embedding_scale`)."""
    return self.traits.embedding_scale

  @property
  def sandwich_norms(self) -> bool:
    """Norms after attention and after the MLP as well as before (`DecoderTraits.sandwich_norms`)."""
    return self.traits.sandwich_norms


# ----------------------------------------------------------------------------- config -> spec


def _hf_config(config: Mapping[str, Any]) -> Any:
  """The transformers config class of `config` (a `to_dict()` or a raw 4.x/5.x config.json)."""
  import transformers

  config = dict(config)
  family = traits_of(config.pop("model_type", None)).model_type
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


def _layer_types(cfg: Any, traits: DecoderTraits, num_layers: int) -> list[str]:
  if not traits.layer_typed:
    return ["full_attention"] * num_layers
  types = list(cfg.layer_types)
  if len(types) != num_layers:
    raise ValueError(f"config.layer_types: {len(types)} entries for {num_layers} layers")
  for kind in types:
    if kind not in LAYER_TYPES:
      raise ValueError(f"config.layer_types: {kind!r} is not implemented; allowed: {', '.join(LAYER_TYPES)}")
  return types


def _windows(cfg: Any, traits: DecoderTraits, types: list[str]) -> tuple[Optional[int], ...]:
  """Per-layer sliding windows, as transformers' masks apply them for the family."""
  window = getattr(cfg, "sliding_window", None)
  if traits.one_window:
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
      traits=traits_of(cfg.model_type), vocab_size=int(cfg.vocab_size), hidden_size=h, num_layers=num_layers, num_heads=n,
      num_kv_heads=n, head_dim=h // n, intermediate_size=int(cfg.n_inner or 4 * h),
      activation=cfg.activation_function, norm_eps=float(cfg.layer_norm_epsilon),
      tie_word_embeddings=bool(cfg.tie_word_embeddings), max_positions=int(cfg.max_position_embeddings),
      attention_scale=(h // n) ** -0.5, qkv_bias=True, out_bias=True, mlp_bias=True,
      layer_rope=(-1,) * num_layers, layer_windows=(None,) * num_layers,
      embedding_dropout=float(cfg.embd_pdrop), attention_dropout=float(cfg.attn_pdrop),
      residual_dropout=float(cfg.resid_pdrop))


def _rotary_spec(cfg: Any, traits: DecoderTraits) -> DecoderSpec:
  h, n, num_layers = int(cfg.hidden_size), int(cfg.num_attention_heads), int(cfg.num_hidden_layers)
  kv = int(getattr(cfg, "num_key_value_heads", None) or n)
  if n % kv:
    raise ValueError(f"config.num_key_value_heads: {kv} does not divide num_attention_heads={n}")
  head_dim = int(getattr(cfg, "head_dim", None) or h // n)
  activation = getattr(cfg, traits.activation_field)
  layers.activation(activation, f"config.{traits.activation_field}")
  if traits.causal_only:
    _refuse_flag(cfg, "use_bidirectional_attention", False)
  types = _layer_types(cfg, traits, num_layers)
  if traits.rope_per_layer_type:  # one RoPE per layer type (Gemma 3's local and global bases)
    names = sorted(set(types))
    ropes = tuple(_rope_spec(cfg.rope_parameters[t], f"config.rope_parameters.{t}") for t in names)
    layer_rope = tuple(names.index(t) for t in types)
  else:
    ropes = (_rope_spec(cfg.rope_parameters, "config.rope_parameters"),)
    use_rope = list(cfg.no_rope_layers) if traits.no_rope_layers else [1] * num_layers
    if len(use_rope) != num_layers:
      raise ValueError(f"config.no_rope_layers: {len(use_rope)} entries for {num_layers} layers")
    layer_rope = tuple(0 if use else -1 for use in use_rope)
  attention_bias = bool(getattr(cfg, "attention_bias", False))
  return DecoderSpec(
      traits=traits, vocab_size=int(cfg.vocab_size), hidden_size=h, num_layers=num_layers, num_heads=n,
      num_kv_heads=kv, head_dim=head_dim, intermediate_size=int(cfg.intermediate_size), activation=activation,
      norm_eps=float(cfg.rms_norm_eps), tie_word_embeddings=bool(cfg.tie_word_embeddings),
      max_positions=int(cfg.max_position_embeddings),
      attention_scale=float(cfg.query_pre_attn_scalar) ** -0.5 if traits.query_pre_attn_scalar else head_dim ** -0.5,
      qkv_bias=attention_bias if traits.qkv_bias is None else traits.qkv_bias,
      out_bias=attention_bias if traits.out_bias is None else traits.out_bias,
      mlp_bias=traits.mlp_bias and bool(getattr(cfg, "mlp_bias", False)),
      qk_norm=traits.qk_norm,
      attn_softcap=_optional_float(cfg.attn_logit_softcapping) if traits.attn_softcap else None,
      final_softcap=_optional_float(cfg.final_logit_softcapping) if traits.final_softcap else None,
      ropes=ropes, layer_rope=layer_rope, layer_windows=_windows(cfg, traits, types),
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
  traits = traits_of(cfg.model_type)
  return _gpt2_spec(cfg) if traits.gpt2_layout else _rotary_spec(cfg, traits)


def hf_architecture(spec: DecoderSpec, task: str) -> str:
  """The transformers class name of `spec`'s family and `task` (config.json `architectures`)."""
  check_task(task)
  return spec.traits.base_class if task == "encoder" else spec.traits.causal_lm_class


def check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task: {task!r} is not a decoder task; allowed: {', '.join(TASKS)}")
