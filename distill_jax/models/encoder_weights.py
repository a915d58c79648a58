"""Encoder params to and from Hugging Face PyTorch state dicts (per-layer weights stacked).

`params_from_hf` verifies (missing weights listed in one line, shapes checked, unused ones
warned); `params_to_hf` is its exact inverse with the PyTorch names of the task's class.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping
import flax.linen as nn
import numpy as np

from distill_jax.models.encoder_spec import BUFFERS, TASKS, EncoderSpec


# ----------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class _Weight:
  """One param and its PyTorch weight: ``flax = reshape(pt.T if kernel else pt, shape)``.

  `pt` holds ``{i}`` for per-layer weights (stacked on a leading axis of `shape`); base
  weights are named without the family prefix (`_hf_name` adds it).
  """

  path: tuple[str, ...]
  pt: str
  shape: tuple[int, ...]
  pt_shape: tuple[int, ...]
  kernel: bool = False
  base: bool = True  # part of the base model (prefixed by "bert." etc. in a task checkpoint)
  aliases: tuple[str, ...] = ()  # names accepted in place of `pt` (tied duplicates)


def _linear(path: tuple[str, ...], pt: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], *,
            bias: bool = True, base: bool = True) -> list[_Weight]:
  i, o = math.prod(in_shape), math.prod(out_shape)
  weights = [_Weight((*path, "kernel"), f"{pt}.weight", (*in_shape, *out_shape), (o, i), kernel=True, base=base)]
  if bias:
    weights.append(_Weight((*path, "bias"), f"{pt}.bias", tuple(out_shape), (o,), base=base))
  return weights


def _norm(path: tuple[str, ...], pt: str, h: int, *, base: bool = True) -> list[_Weight]:
  return [_Weight((*path, "scale"), f"{pt}.weight", (h,), (h,), base=base),
          _Weight((*path, "bias"), f"{pt}.bias", (h,), (h,), base=base)]


def _layer_weights(spec: EncoderSpec) -> list[_Weight]:
  """Per-layer weights with a `{i}` layer index (shapes without the layer axis)."""
  h, n, d, f = spec.hidden_size, spec.num_heads, spec.head_dim, spec.intermediate_size
  if not spec.traits.bert_layout:  # DistilBERT's names
    at, q, k, v, o = "transformer.layer.{i}.attention", "q_lin", "k_lin", "v_lin", "out_lin"
    names = dict(query=f"{at}.{q}", key=f"{at}.{k}", value=f"{at}.{v}", attention_out=f"{at}.{o}",
                 attention_norm="transformer.layer.{i}.sa_layer_norm", mlp_in="transformer.layer.{i}.ffn.lin1",
                 mlp_out="transformer.layer.{i}.ffn.lin2", mlp_norm="transformer.layer.{i}.output_layer_norm")
  else:
    lay = "encoder.layer.{i}"
    names = dict(query=f"{lay}.attention.self.query", key=f"{lay}.attention.self.key",
                 value=f"{lay}.attention.self.value", attention_out=f"{lay}.attention.output.dense",
                 attention_norm=f"{lay}.attention.output.LayerNorm", mlp_in=f"{lay}.intermediate.dense",
                 mlp_out=f"{lay}.output.dense", mlp_norm=f"{lay}.output.LayerNorm")
  return [*_linear(("query",), names["query"], (h,), (n, d)), *_linear(("key",), names["key"], (h,), (n, d)),
          *_linear(("value",), names["value"], (h,), (n, d)),
          *_linear(("attention_out",), names["attention_out"], (n, d), (h,)),
          *_norm(("attention_norm",), names["attention_norm"], h),
          *_linear(("mlp_in",), names["mlp_in"], (h,), (f,)), *_linear(("mlp_out",), names["mlp_out"], (f,), (h,)),
          *_norm(("mlp_norm",), names["mlp_norm"], h)]


def _head_weights(spec: EncoderSpec, task: str) -> tuple[list[_Weight], tuple[str, ...]]:
  """The task head's weights and the checkpoint names it leaves unused without a warning.

  Without a tied decoder, PyTorch's forward adds the decoder's own bias and never reads the
  head's `bias` param (still in its checkpoints): that one is ignored.
  """
  h, v, c = spec.hidden_size, spec.vocab_size, spec.num_labels
  tied = spec.tie_word_embeddings
  if task == "masked_lm":
    dense, norm, decoder, bias = spec.traits.mlm_names
    decoder_bias = f"{decoder}.bias"
    if tied or bias == decoder_bias:
      bias_weight = _Weight(("mlm_bias",), bias, (v,), (v,), base=False, aliases=(decoder_bias,))
      ignored = (decoder_bias,)
    else:
      bias_weight = _Weight(("mlm_bias",), decoder_bias, (v,), (v,), base=False)
      ignored = (bias,)
    weights = [*_linear(("mlm_dense",), dense, (h,), (h,), base=False), *_norm(("mlm_norm",), norm, h, base=False),
               bias_weight]
    if not tied:
      weights += _linear(("mlm_decoder",), decoder, (h,), (v,), bias=False, base=False)
    return weights, ignored + ((f"{decoder}.weight",) if tied else ())
  if task == "sequence_classification":
    pooler, classifier = spec.traits.classifier_names
    return (_linear(("pooler",), pooler, (h,), (h,), base=spec.traits.pooler_in_base)
            + _linear(("classifier",), classifier, (h,), (c,), base=False)), ()
  return [], ()


def _weights(spec: EncoderSpec, task: str) -> tuple[list[_Weight], list[_Weight], tuple[str, ...]]:
  """(non-layer weights, per-layer weights, silently ignored names) of `task`."""
  h = spec.hidden_size
  top = [_Weight(("word_embeddings", "embedding"), "embeddings.word_embeddings.weight", (spec.vocab_size, h),
                 (spec.vocab_size, h)),
         _Weight(("position_embeddings", "embedding"), "embeddings.position_embeddings.weight",
                 (spec.max_position_embeddings, h), (spec.max_position_embeddings, h))]
  if spec.type_vocab_size:
    top.append(_Weight(("token_type_embeddings", "embedding"), "embeddings.token_type_embeddings.weight",
                       (spec.type_vocab_size, h), (spec.type_vocab_size, h)))
  top += _norm(("embeddings_norm",), "embeddings.LayerNorm", h)
  head, ignored = _head_weights(spec, task)
  if not (spec.traits.pooler_in_base and task == "sequence_classification"):
    ignored += ("pooler.dense.weight", "pooler.dense.bias")  # BertModel/RobertaModel's unused pooler
  return top + head, _layer_weights(spec), ignored + BUFFERS


def _hf_name(name: str, w: _Weight, spec: EncoderSpec, task: str) -> str:
  """The PyTorch name in the `task` class (base weights prefixed unless it is the base model)."""
  return f"{spec.traits.prefix}.{name}" if w.base and task != "encoder" else name


def _normalize(state: Mapping[str, np.ndarray], spec: EncoderSpec) -> dict[str, np.ndarray]:
  """Names without the family prefix, legacy `LayerNorm.gamma/beta` renamed."""
  prefix = spec.traits.prefix + "."
  out = {}
  for name, value in state.items():
    name = name[len(prefix):] if name.startswith(prefix) else name
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    out[name] = value
  return out


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_hf(state: Mapping[str, np.ndarray], spec: EncoderSpec, task: str) -> dict:
  """Our nested float32 params (per-layer weights stacked) from a PyTorch-named state dict.

  Accepts the names of the `task` class and of the base model (with or without the
  `bert.`/`roberta.`/`distilbert.` prefix), so a masked-LM checkpoint loads as `encoder`.

  Raises:
    ValueError: listing every missing weight, then every wrong shape; or a present decoder
      weight that differs from the word embeddings it is tied to.
  """
  if task not in TASKS:
    raise ValueError(f"task: {task!r} is not available for encoders; allowed: {', '.join(TASKS)}")
  named = _normalize(state, spec)
  top, per_layer, ignored = _weights(spec, task)
  wanted = [(w, w.pt, w.aliases) for w in top]
  wanted += [(w, w.pt.format(i=i), tuple(a.format(i=i) for a in w.aliases))
             for w in per_layer for i in range(spec.num_layers)]
  found, missing, wrong = {}, [], []
  for w, name, aliases in wanted:
    source = next((n for n in (name, *aliases) if n in named), None)
    if source is None:
      missing.append(_hf_name(name, w, spec, task))
      continue
    value = np.asarray(named[source])
    if value.shape != w.pt_shape:
      wrong.append(f"{_hf_name(source, w, spec, task)} {list(value.shape)} (expected {list(w.pt_shape)})")
    found[name] = source
  if missing:
    raise ValueError(f"checkpoint: lacks {len(missing)} weight(s) the {spec.family} {task} model needs: "
                     f"{', '.join(missing)}")
  if wrong:
    raise ValueError(f"checkpoint: {len(wrong)} weight(s) of the wrong shape for the {spec.family} {task} model: "
                     f"{', '.join(wrong)}")

  def convert(w: _Weight, name: str) -> np.ndarray:
    value = np.asarray(named[found[name]], np.float32)
    return (value.T if w.kernel else value).reshape(w.shape)

  params: dict = {}
  for w in top:
    _set(params, w.path, convert(w, w.pt))
  for w in per_layer:
    _set(params, ("layers", *w.path), np.stack([convert(w, w.pt.format(i=i)) for i in range(spec.num_layers)]))
  _check_tied(named, params, spec, task)
  unused = sorted(set(named) - set(found.values()) - set(ignored))
  if unused:
    warnings.warn(f"checkpoint: {len(unused)} weight(s) unused by the {spec.family} {task} model: "
                  f"{', '.join(unused)}", stacklevel=2)
  return params


def _check_tied(named: Mapping[str, np.ndarray], params: dict, spec: EncoderSpec, task: str) -> None:
  """A tied decoder weight the checkpoint also stores must be the word embeddings."""
  if task != "masked_lm" or not spec.tie_word_embeddings:
    return
  decoder = spec.traits.mlm_names[2] + ".weight"
  if decoder in named and not np.array_equal(np.asarray(named[decoder], np.float32),
                                             params["word_embeddings"]["embedding"]):
    raise ValueError(f"checkpoint: {decoder} differs from the word embeddings, but config.tie_word_embeddings is "
                     "true; set it to false to load an untied decoder")


def params_to_hf(params: Any, spec: EncoderSpec, task: str) -> dict[str, np.ndarray]:
  """The PyTorch-named float32 state of the `task` class (`hf_architecture`); inverse of `params_from_hf`.

  A tied decoder weight is left out (transformers re-ties it).  Without a tied decoder the
  head's unread `bias` param is written too, equal to the decoder bias, so PyTorch misses
  nothing.
  """
  params = nn.meta.unbox(params)
  top, per_layer, _ = _weights(spec, task)

  def get(path: tuple[str, ...]) -> np.ndarray:
    node = params
    for key in path:
      node = node[key]
    return np.asarray(node, np.float32)

  def convert(w: _Weight, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.reshape(w.pt_shape[::-1]).T if w.kernel else value.reshape(w.pt_shape))

  state = {_hf_name(w.pt, w, spec, task): convert(w, get(w.path)) for w in top}
  for w in per_layer:
    stacked = get(("layers", *w.path))
    for i in range(spec.num_layers):
      state[_hf_name(w.pt.format(i=i), w, spec, task)] = convert(w, stacked[i])
  bias = spec.traits.mlm_names[3]
  if task == "masked_lm" and not spec.tie_word_embeddings and bias != spec.traits.mlm_names[2] + ".bias":
    state[bias] = get(("mlm_bias",))
  return state
