"""Every line that touches `transformers`: checkpoints, Flax modules, tokenizers, export.

`models.py` sees only plain values: a Flax module, a params pytree, the HF config and the
tokenizer.  Loading is *verified*: every parameter the module needs must come from the
checkpoint (tied embeddings are filled from the embedding matrix), otherwise a
`ValueError` lists the missing weights.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Mapping, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

import transformers
from transformers import modeling_flax_pytorch_utils

from distill_jax.models import TASKS

logger = logging.getLogger(__name__)


# family (HF model_type) -> task -> transformers Flax class name.
_FLAX_CLASSES: dict[str, dict[str, str]] = {
    "bert": {"masked_lm": "FlaxBertForMaskedLM", "encoder": "FlaxBertModel",
             "sequence_classification": "FlaxBertForSequenceClassification"},
    "roberta": {"masked_lm": "FlaxRobertaForMaskedLM", "encoder": "FlaxRobertaModel",
                "sequence_classification": "FlaxRobertaForSequenceClassification"},
    "distilbert": {"masked_lm": "FlaxDistilBertForMaskedLM", "encoder": "FlaxDistilBertModel",
                   "sequence_classification": "FlaxDistilBertForSequenceClassification"},
    "gpt2": {"causal_lm": "FlaxGPT2LMHeadModel", "encoder": "FlaxGPT2Model"},
    "llama": {"causal_lm": "FlaxLlamaForCausalLM", "encoder": "FlaxLlamaModel"},
    "mistral": {"causal_lm": "FlaxMistralForCausalLM", "encoder": "FlaxMistralModel"},
    "gemma": {"causal_lm": "FlaxGemmaForCausalLM", "encoder": "FlaxGemmaModel"},
    "opt": {"causal_lm": "FlaxOPTForCausalLM", "encoder": "FlaxOPTModel"},
    "gpt_neo": {"causal_lm": "FlaxGPTNeoForCausalLM", "encoder": "FlaxGPTNeoModel"},
}
FAMILIES = tuple(_FLAX_CLASSES)
CAUSAL_FAMILIES = frozenset({"gpt2", "llama", "mistral", "gemma", "opt", "gpt_neo"})

# Names of the Dense submodules whose outputs are the query/key/value projections
# (one fused name for GPT-2's `c_attn`).  Families absent here cannot give
# `attention_scores` / `values` (rotary embeddings or local windows are applied after
# the projection, so q·kᵀ of the captured projections would not be the model's scores).
ATTENTION_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value"),
    "roberta": ("query", "key", "value"),
    "distilbert": ("q_lin", "k_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "opt": ("q_proj", "k_proj", "v_proj"),
}

# Word-embedding params, used to fill a tied LM head the Flax module does not tie itself.
_WORD_EMBEDDINGS = {
    "llama": ("model", "embed_tokens", "embedding"),
    "mistral": ("model", "embed_tokens", "embedding"),
    "gemma": ("model", "embed_tokens", "embedding"),
}

# PyTorch buffers some checkpoints carry (not weights): never reported as unused.
_BUFFERS = frozenset({"position_ids", "masked_bias", "inv_freq"})


def _is_buffer(key: tuple[str, ...]) -> bool:
  return key[-1] in _BUFFERS or key[-2:] == ("attn", "bias")  # GPT-2's causal-mask buffer

_FLAX_WEIGHTS = "flax_model.msgpack"
_SAFE_WEIGHTS = "model.safetensors"
_PT_WEIGHTS = "pytorch_model.bin"
_WEIGHT_FILES = (_FLAX_WEIGHTS, _SAFE_WEIGHTS, _PT_WEIGHTS)

transformers.logging.set_verbosity_error()  # silence the Flax deprecation banner


def check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task: unknown {task!r}; allowed: {', '.join(TASKS)}")


def flax_class(family: str, task: str) -> type:
  """The transformers Flax class for `family` and `task`."""
  check_task(task)
  if family not in _FLAX_CLASSES:
    raise ValueError(f"family: unknown {family!r}; allowed: {', '.join(FAMILIES)}")
  by_task = _FLAX_CLASSES[family]
  if task not in by_task:
    raise ValueError(f"task: {task!r} is not available for family {family!r} in transformers' Flax "
                     f"classes; allowed: {', '.join(by_task)}")
  return getattr(transformers, by_task[task])


# ----------------------------------------------------------------------------- sources


def _weight_files(path: pathlib.Path, base: str) -> list[str]:
  """The files of weight format `base` in `path`: its shards when indexed, else itself; [] if absent."""
  index = path / f"{base}.index.json"
  if index.exists():
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))
  return [base] if (path / base).exists() else []


def _has_weights(path: pathlib.Path) -> bool:
  return any((path / name).exists() or (path / f"{name}.index.json").exists() for name in _WEIGHT_FILES)


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: Optional[str] = None) -> pathlib.Path:
  """A local directory holding `name_or_path`'s config and weights (hub ids via the HF cache)."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    if not (path / "config.json").exists() or not _has_weights(path):
      raise ValueError(f"name_or_path: {str(path)!r} holds no checkpoint (need config.json and one of "
                       f"{', '.join(_WEIGHT_FILES)}, possibly sharded)")
    return path
  name = str(name_or_path)
  if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
    raise ValueError(f"name_or_path: {name!r} is not a directory holding a checkpoint")
  import huggingface_hub
  from huggingface_hub import errors

  offline = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
  patterns = ["*.json", "*.txt", "*.model", "*.msgpack", "*.safetensors"]
  try:
    local = pathlib.Path(huggingface_hub.snapshot_download(
        name, revision=revision, allow_patterns=patterns, local_files_only=offline))
    if not _has_weights(local):
      local = pathlib.Path(huggingface_hub.snapshot_download(
          name, revision=revision, allow_patterns=patterns + ["*.bin"], local_files_only=offline))
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
    raise ValueError(f"name_or_path: {name!r} (revision {revision!r}) is not a directory and not a hub "
                     f"repository: {type(e).__name__}") from None
  except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
    raise ValueError(f"name_or_path: {name!r} is not a local directory, not in the Hugging Face cache, and "
                     f"the hub cannot be reached (no network, or HF_HUB_OFFLINE={int(offline)}); download "
                     f"it once with network access and HF_HUB_OFFLINE unset, or pass a local path "
                     f"({type(e).__name__})") from None
  if not _has_weights(local):
    raise ValueError(f"name_or_path: hub repository {name!r} holds no Flax/safetensors/PyTorch weights")
  return local


def load_config(source: str | os.PathLike | Mapping[str, Any] | transformers.PretrainedConfig,
                **overrides) -> transformers.PretrainedConfig:
  """An HF config from a checkpoint directory, a config dict (with `model_type`) or a config."""
  if isinstance(source, transformers.PretrainedConfig):
    config = copy.deepcopy(source)
  elif isinstance(source, Mapping):
    source = dict(source)
    model_type = source.pop("model_type", None)
    if model_type not in FAMILIES:
      raise ValueError(f"family: unknown model_type {model_type!r}; allowed: {', '.join(FAMILIES)}")
    config = transformers.AutoConfig.for_model(model_type, **source)
  else:
    config = transformers.AutoConfig.from_pretrained(source)
  for key, value in overrides.items():
    setattr(config, key, value)
  if config.model_type not in FAMILIES:
    raise ValueError(f"family: unknown {config.model_type!r}; allowed: {', '.join(FAMILIES)}")
  return config


def load_tokenizer(path: pathlib.Path) -> Optional[transformers.PreTrainedTokenizerBase]:
  """The checkpoint's tokenizer, or None when the directory has none."""
  names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
  if not any((path / n).exists() for n in names):
    return None
  try:
    return transformers.AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    logger.warning("no usable tokenizer in %s: %s", path, e)
    return None


# ----------------------------------------------------------------------------- modules


def build_module(config: transformers.PretrainedConfig, task: str, dtype: Any, **module_kwargs):
  """(flax module, required params shape tree, base_model_prefix) without materializing params."""
  cls = flax_class(config.model_type, task)
  hf_model = cls(config, dtype=jnp.dtype(dtype), _do_init=False, **module_kwargs)
  return hf_model.module, hf_model.params_shape_tree, cls.base_model_prefix


def init_params(config: transformers.PretrainedConfig, task: str, seed: int = 0) -> dict:
  """Fresh random f32 params of `config` (HF initializers)."""
  cls = flax_class(config.model_type, task)
  hf_model = cls(config, seed=seed, dtype=jnp.float32, _do_init=True)
  return jax.tree.map(jnp.asarray, hf_model.params)


@functools.lru_cache(maxsize=None)
def _call_parameters(module_cls: type) -> frozenset[str]:
  """The argument names of a Flax module class's `__call__` (read once per class, not per trace)."""
  return frozenset(inspect.signature(module_cls.__call__).parameters)


def call_module(module, family: str, params, input_ids, attention_mask, *, token_type_ids=None,
                position_ids=None, output_attentions: bool = False, output_hidden_states: bool = False,
                deterministic: bool = True, rngs=None, capture=None):
  """Runs an HF Flax module with the positions HF's wrapper would compute.

  Decoder positions come from the attention mask (cumsum - 1, clipped at 0), so left and
  right padding both give each real token its true position.

  Returns:
    `(hf_output, intermediates)`; intermediates is `{}` unless `capture` names submodules.
  """
  if position_ids is None:
    if family in CAUSAL_FAMILIES:
      position_ids = jnp.clip(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    elif family == "roberta":
      pad = module.config.pad_token_id
      not_pad = (input_ids != pad).astype(jnp.int32)
      position_ids = jnp.cumsum(not_pad, axis=-1) * not_pad + pad
    else:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
  accepted = _call_parameters(type(module))
  kwargs = dict(attention_mask=attention_mask, deterministic=deterministic,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                return_dict=True)
  if "position_ids" in accepted:
    kwargs["position_ids"] = position_ids
  if "token_type_ids" in accepted:
    kwargs["token_type_ids"] = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
  if "head_mask" in accepted:
    kwargs["head_mask"] = None
  apply_kwargs = {}
  if capture:
    names = frozenset(capture)
    apply_kwargs = dict(capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name in names,
                        mutable=["intermediates"])
  result = module.apply({"params": params}, input_ids, rngs=rngs or {}, **kwargs, **apply_kwargs)
  if capture:
    out, state = result
    return out, flatten_dict(state["intermediates"])
  return result, {}


# ----------------------------------------------------------------------------- checkpoints


def _load_flax_weights(path: pathlib.Path, files: list[str]) -> dict:
  """Flat params of a (possibly sharded) `flax_model.msgpack` (`files`: from `_weight_files`)."""
  flat = {}
  for name in files:
    state = flax.serialization.msgpack_restore((path / name).read_bytes())
    flat.update(flatten_dict(state))
  return flat


def _load_pt_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  """PyTorch-named numpy state dict from safetensors (no torch needed) or pytorch_model.bin."""
  for base, safe in ((_SAFE_WEIGHTS, True), (_PT_WEIGHTS, False)):
    files = _weight_files(path, base)
    if not files:
      continue
    state = {}
    for name in files:
      if safe:
        import safetensors.numpy

        state.update(safetensors.numpy.load_file(path / name))
      else:
        try:
          import torch
        except ImportError:
          raise ValueError(f"name_or_path: {str(path)!r} holds only {base}, which needs PyTorch to read; "
                           "install torch or convert it to safetensors") from None
        tensors = torch.load(path / name, map_location="cpu", weights_only=True)
        state.update({k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()})
    return state
  raise ValueError(f"name_or_path: {str(path)!r} holds no checkpoint weights")


class _ShapeOnlyModel:
  """What transformers' PyTorch→Flax converter reads from a model: params and prefix."""

  def __init__(self, params_shape, base_model_prefix):
    self.params = params_shape
    self.base_model_prefix = base_model_prefix


def _fix_prefix(flat: dict, required: set, prefix: str) -> dict:
  """Adds/removes the base-model prefix like transformers' Flax `from_pretrained`."""
  need_prefix = any(k[0] == prefix for k in required)
  has_prefix = any(k[0] == prefix for k in flat)
  if need_prefix and not has_prefix:
    return {(prefix,) + k: v for k, v in flat.items()}
  if has_prefix and not need_prefix:
    return {k[1:]: v for k, v in flat.items() if k[0] == prefix}
  return flat


def load_checkpoint(path: pathlib.Path, config, task: str, *, dtype: Any, param_dtype: Any):
  """Builds the module of `config`/`task` and reads its verified params from `path`.

  An `encoder` of a checkpoint without a pooler (e.g. a masked-LM one) is built without
  the pooling layer, which `Model.apply` never uses.

  Returns:
    `(module, params)`, params a nested dict of `param_dtype` arrays (non-floats kept).

  Raises:
    ValueError: if a weight the module needs is missing (listing them) or has the wrong shape.
  """
  flax_files = _weight_files(path, _FLAX_WEIGHTS)
  is_flax = bool(flax_files)
  raw = _load_flax_weights(path, flax_files) if is_flax else _load_pt_state_dict(path)
  has_pooler = any("pooler" in (k if isinstance(k, tuple) else k.split(".")) for k in raw)
  module_kwargs = {}
  if task == "encoder" and config.model_type in ("bert", "roberta") and not has_pooler:
    module_kwargs["add_pooling_layer"] = False
  module, params_shape, prefix = build_module(config, task, dtype, **module_kwargs)
  required_shapes = flatten_dict(params_shape)
  if is_flax:
    flat = _fix_prefix(raw, set(required_shapes), prefix)
  else:
    flat = flatten_dict(modeling_flax_pytorch_utils.convert_pytorch_state_dict_to_flax(
        raw, _ShapeOnlyModel(params_shape, prefix)))
  family = config.model_type
  if getattr(config, "tie_word_embeddings", False) and family in _WORD_EMBEDDINGS:
    # transformers' Flax Llama/Mistral never tie: their lm_head is a free Dense that a tied
    # checkpoint does not hold, and from_pretrained would silently initialize it at random.
    embed_key, head_key = _WORD_EMBEDDINGS[family], ("lm_head", "kernel")
    if head_key in required_shapes and embed_key in flat:
      flat[head_key] = jnp.asarray(flat[embed_key]).T
  missing = sorted("/".join(k) for k in required_shapes if k not in flat)
  if missing:
    raise ValueError(f"checkpoint: {str(path)!r} lacks {len(missing)} weight(s) the {family} module needs: "
                     f"{', '.join(missing)}")
  unused = sorted("/".join(k) for k in flat if k not in required_shapes and not _is_buffer(k))
  if unused:
    warnings.warn(f"checkpoint {str(path)!r}: {len(unused)} unused weight(s) ignored: "
                  f"{', '.join(unused[:20])}{' ...' if len(unused) > 20 else ''}", stacklevel=3)
  wrong = [f"{'/'.join(k)} {tuple(np.shape(flat[k]))} != {s.shape}" for k, s in required_shapes.items()
           if tuple(np.shape(flat[k])) != tuple(s.shape)]
  if wrong:
    raise ValueError(f"checkpoint: weights of the wrong shape: {', '.join(wrong)}")
  floating = jnp.dtype(param_dtype)
  params = {k: jnp.asarray(flat[k], dtype=floating if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype)
            for k, s in required_shapes.items()}
  return module, unflatten_dict(params)


def flax_to_pt_state_dict(params, config) -> dict[str, np.ndarray]:
  """PyTorch-named float32 numpy state dict of Flax `params` (inverse of HF's PT→Flax renames)."""
  state = {}
  for key, value in flatten_dict(params).items():
    value = np.asarray(value, np.float32)
    *path, leaf = key
    if leaf == "kernel":
      leaf, value = "weight", value.T if value.ndim == 2 else value
    elif leaf in ("embedding", "scale"):
      leaf = "weight"
    state[".".join([*path, leaf])] = np.ascontiguousarray(value)
  if getattr(config, "tie_word_embeddings", False) and config.model_type in _WORD_EMBEDDINGS:
    state.pop("lm_head.weight", None)  # PyTorch ties it to the embedding on load
  return state


def save_checkpoint(out_dir: str | os.PathLike, params, config, tokenizer, task: str) -> pathlib.Path:
  """Writes an HF checkpoint: config.json, flax_model.msgpack, model.safetensors, tokenizer."""
  import safetensors.numpy

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config = copy.deepcopy(config)
  config.architectures = [flax_class(config.model_type, task).__name__[len("Flax"):]]
  config.save_pretrained(out)
  host_params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)  # one copy to host for both files
  (out / _FLAX_WEIGHTS).write_bytes(flax.serialization.msgpack_serialize(host_params))
  safetensors.numpy.save_file(flax_to_pt_state_dict(host_params, config), out / _SAFE_WEIGHTS,
                              metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(out)
  return out


def student_config(config: transformers.PretrainedConfig, layers: tuple[int, ...], **overrides):
  """`config` with only the (0-based) `layers`, plus HF-named `overrides`."""
  config = copy.deepcopy(config)
  config.num_hidden_layers = len(layers)
  if config.model_type == "gpt_neo":
    kinds = [config.attention_layers[i] for i in layers]
    config.attention_types = [[[kind], 1] for kind in kinds]
    config.attention_layers = kinds
  if isinstance(getattr(config, "layer_types", None), list):
    config.layer_types = [config.layer_types[i] for i in layers]
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def vocab_of(tokenizer) -> Optional[dict[str, int]]:
  return None if tokenizer is None else tokenizer.get_vocab()
