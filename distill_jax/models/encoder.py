"""BERT, RoBERTa and DistilBERT (MiniLM is BERT): one post-LayerNorm encoder in Flax Linen.

Numerically the PyTorch classes of transformers 5 (`BertForMaskedLM`, `RobertaModel`,
`DistilBertForSequenceClassification`, ...), read from their checkpoints by
`params_from_hf` and written back by `params_to_hf`.  The families differ only in data:

* BERT: word + token type + position embeddings, dropout after every sublayer output,
  MLM head dense → `hidden_act` → LayerNorm → tied decoder, classifier on the tanh pooler.
* RoBERTa: BERT with padding-based position ids, an exact-GELU MLM head and a
  classification head of its own (dropout → dense → tanh → dropout → out_proj).
* DistilBERT: no token types, LayerNorm eps fixed at 1e-12, no dropout after the attention
  output projection, classifier on ReLU(pre_classifier).

Param tree (``Encoder.init(...)["params"]`` and `params_from_hf` alike; `L` layers stacked):

  word_embeddings/embedding [V, H]          position_embeddings/embedding [P, H]
  token_type_embeddings/embedding [TV, H]   (BERT, RoBERTa)
  embeddings_norm/{scale, bias} [H]
  layers/query|key|value/{kernel [L, H, N, D], bias [L, N, D]}
  layers/attention_out/{kernel [L, N, D, H], bias [L, H]}    layers/attention_norm/{scale, bias}
  layers/mlp_in/{kernel [L, H, F], bias [L, F]}   layers/mlp_out/{kernel [L, F, H], bias [L, H]}
  layers/mlp_norm/{scale, bias}
  masked_lm: mlm_dense/{kernel, bias}, mlm_norm/{scale, bias}, mlm_bias [V],
             mlm_decoder/kernel [H, V] only when the decoder is not tied to word_embeddings
  sequence_classification: pooler/{kernel, bias} (BERT pooler, RoBERTa classifier.dense,
             DistilBERT pre_classifier), classifier/{kernel [H, C], bias [C]}
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import layers

FAMILIES = ("bert", "roberta", "distilbert")
TASKS = ("masked_lm", "sequence_classification", "encoder")

_PREFIX = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert"}
_CLASS = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}
_SUFFIX = {"masked_lm": "ForMaskedLM", "sequence_classification": "ForSequenceClassification", "encoder": "Model"}

# HF config defaults (a saved config.json omits the fields equal to them).
_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                      initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, classifier_dropout=None,
                      tie_word_embeddings=True)
_DEFAULTS = {
    "bert": _BERT_DEFAULTS,
    "roberta": {**_BERT_DEFAULTS, "vocab_size": 50265, "pad_token_id": 1},
    "distilbert": dict(vocab_size=30522, max_position_embeddings=512, sinusoidal_pos_embds=False, n_layers=6,
                       n_heads=12, dim=768, hidden_dim=3072, dropout=0.1, attention_dropout=0.1,
                       activation="gelu", initializer_range=0.02, seq_classif_dropout=0.2, pad_token_id=0,
                       tie_word_embeddings=True),
}
_DISTILBERT_LAYER_NORM_EPS = 1e-12  # hard-coded in modeling_distilbert.py

# Non-persistent buffers some checkpoints carry; never params.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Every number of an encoder config that changes the computation (hashable).

  Attributes:
    family: `"bert"`, `"roberta"` or `"distilbert"`.
    vocab_size, hidden_size, num_layers, num_heads, intermediate_size: the shapes.
    max_position_embeddings: rows of the position table.
    type_vocab_size: rows of the token type table (0: none, DistilBERT).
    hidden_act: activation of the MLP (DistilBERT's `activation`).
    layer_norm_eps: of every LayerNorm.
    pad_token_id: RoBERTa's padding index of positions (None when the config has none).
    num_labels: classes of `sequence_classification`.
    tie_word_embeddings: the MLM decoder is the word embedding matrix.
    hidden_dropout_prob: dropout of embeddings and sublayer outputs (DistilBERT's `dropout`).
    attention_probs_dropout_prob: dropout of attention probabilities (`attention_dropout`).
    classifier_dropout: dropout of the classification head (resolved: BERT/RoBERTa's
      `classifier_dropout` or else `hidden_dropout_prob`; DistilBERT's `seq_classif_dropout`).
    initializer_range: std of fresh normal kernels and embeddings.
    sinusoidal_pos_embds: DistilBERT: fresh position tables are sinusoidal.
  """

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  hidden_act: str
  layer_norm_eps: float
  pad_token_id: Optional[int]
  num_labels: int
  tie_word_embeddings: bool
  hidden_dropout_prob: float
  attention_probs_dropout_prob: float
  classifier_dropout: float
  initializer_range: float = 0.02
  sinusoidal_pos_embds: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlm_act(self) -> str:
    """Activation of the MLM head transform (RoBERTa's is always exact GELU)."""
    return "gelu" if self.family == "roberta" else self.hidden_act


def _refuse(field: str, value: Any, allowed: str) -> ValueError:
  return ValueError(f"config.{field}: {value!r} is not implemented; allowed: {allowed}")


def spec_from_hf(config: Mapping[str, Any]) -> EncoderSpec:
  """The `EncoderSpec` of an HF config dict (`PretrainedConfig.to_dict()` or a config.json).

  Args:
    config: with `model_type`; omitted fields take the HF class defaults (DistilBERT's
      own names: `dim`, `n_layers`, `n_heads`, `hidden_dim`, `activation`, `dropout`, ...).

  Returns:
    The spec; `num_labels` is the config's `num_labels`, else the size of `id2label`.

  Raises:
    ValueError: one line naming the config field, for a family or feature we do not
      implement (relative position embeddings, decoder / cross-attention use, an
      activation we lack, heads that do not divide the width).
  """
  family = config.get("model_type")
  if family not in FAMILIES:
    raise _refuse("model_type", family, ", ".join(FAMILIES))
  c = {**_DEFAULTS[family], **config}
  for field in ("is_decoder", "add_cross_attention"):
    if c.get(field, False):
      raise _refuse(field, c[field], "False")
  if c.get("position_embedding_type", "absolute") != "absolute":
    raise _refuse("position_embedding_type", c["position_embedding_type"], "absolute")
  labels = c.get("id2label")
  num_labels = int(c.get("num_labels", len(labels) if labels else 2))
  if family == "distilbert":
    act_field = "activation"
    spec = EncoderSpec(
        family=family, vocab_size=int(c["vocab_size"]), hidden_size=int(c["dim"]), num_layers=int(c["n_layers"]),
        num_heads=int(c["n_heads"]), intermediate_size=int(c["hidden_dim"]),
        max_position_embeddings=int(c["max_position_embeddings"]), type_vocab_size=0, hidden_act=c["activation"],
        layer_norm_eps=_DISTILBERT_LAYER_NORM_EPS, pad_token_id=c["pad_token_id"], num_labels=num_labels,
        tie_word_embeddings=bool(c["tie_word_embeddings"]), hidden_dropout_prob=float(c["dropout"]),
        attention_probs_dropout_prob=float(c["attention_dropout"]),
        classifier_dropout=float(c["seq_classif_dropout"]), initializer_range=float(c["initializer_range"]),
        sinusoidal_pos_embds=bool(c["sinusoidal_pos_embds"]))
  else:
    act_field = "hidden_act"
    classifier_dropout = c["classifier_dropout"]
    spec = EncoderSpec(
        family=family, vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
        num_layers=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
        intermediate_size=int(c["intermediate_size"]), max_position_embeddings=int(c["max_position_embeddings"]),
        type_vocab_size=int(c["type_vocab_size"]), hidden_act=c["hidden_act"],
        layer_norm_eps=float(c["layer_norm_eps"]), pad_token_id=c["pad_token_id"], num_labels=num_labels,
        tie_word_embeddings=bool(c["tie_word_embeddings"]), hidden_dropout_prob=float(c["hidden_dropout_prob"]),
        attention_probs_dropout_prob=float(c["attention_probs_dropout_prob"]),
        classifier_dropout=float(c["hidden_dropout_prob"] if classifier_dropout is None else classifier_dropout),
        initializer_range=float(c["initializer_range"]))
  layers.activation(spec.hidden_act, f"config.{act_field}")
  if spec.hidden_size % spec.num_heads:
    raise ValueError(f"config: the width {spec.hidden_size} is not a multiple of the {spec.num_heads} attention "
                     "heads")
  if family == "roberta" and spec.pad_token_id is None:
    raise _refuse("pad_token_id", None, "an integer (RoBERTa's position ids count from it)")
  return spec


def hf_architecture(spec: EncoderSpec, task: str) -> str:
  """The transformers class of `task`, e.g. `"BertForMaskedLM"`, `"RobertaModel"`."""
  return _CLASS[spec.family] + _SUFFIX[task]


# ----------------------------------------------------------------------------- the module


def _sinusoidal_init(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
  """DistilBERT's fixed table: sin on even columns, cos on odd ones, of ``pos / 10000^(2⌊j/2⌋/dim)``."""
  del key
  n_pos, dim = shape
  j = np.arange(dim)
  angles = np.arange(n_pos)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]
  table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))
  return jnp.asarray(table, dtype)


def _embed(num: int, features: int, axes: tuple[Optional[str], str], *, dtype: Any, stddev: float, name: str,
           init: Optional[Any] = None) -> nn.Embed:
  return nn.Embed(num, features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  embedding_init=nn.with_logical_partitioning(init or layers.init_normal(stddev), axes))


def roberta_position_ids(input_ids_BxT: jax.Array, pad_token_id: int) -> jax.Array:
  """RoBERTa's positions: ``pad + 1, pad + 2, ...`` over non-pad tokens, ``pad`` on pad tokens."""
  real_BxT = (input_ids_BxT != pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real_BxT, axis=1) * real_BxT + pad_token_id


class _Layer(nn.Module):
  """One post-LayerNorm transformer layer (the scanned block): ``(h, mask) -> (h, intermediates)``."""

  spec: EncoderSpec
  dtype: Any
  attention_impl: Optional[str]
  want: frozenset
  deterministic: bool

  @nn.compact
  def __call__(self, h_BxTxH: jax.Array, mask_Bx1xTxT: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    s = self.spec
    std = s.initializer_range
    n, d = s.num_heads, s.head_dim
    qkv_axes = ("embed", "heads", "head_dim")
    q_BxTxNxD = layers.dense((n, d), qkv_axes, use_bias=True, dtype=self.dtype, name="query", stddev=std)(h_BxTxH)
    k_BxTxNxD = layers.dense((n, d), qkv_axes, use_bias=True, dtype=self.dtype, name="key", stddev=std)(h_BxTxH)
    v_BxTxNxD = layers.dense((n, d), qkv_axes, use_bias=True, dtype=self.dtype, name="value", stddev=std)(h_BxTxH)
    drop_probs = not self.deterministic and s.attention_probs_dropout_prob > 0
    explicit = drop_probs or bool(self.want & {"attention_probs", "attention_scores"})
    out_BxTxNxD, scores_BxNxTxT, probs_BxNxTxT = layers.attend(
        q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, mask_Bx1xTxT, scale=d ** -0.5, explicit=explicit,
        implementation=self.attention_impl)
    if drop_probs:
      dropped_BxNxTxT = nn.Dropout(s.attention_probs_dropout_prob)(probs_BxNxTxT, deterministic=False)
      out_BxTxNxD = jnp.einsum("bnts,bsnd->btnd", dropped_BxNxTxT, v_BxTxNxD)
    a_BxTxH = layers.dense(s.hidden_size, ("heads", "head_dim", "embed"), use_bias=True, dtype=self.dtype,
                           name="attention_out", stddev=std, in_axes=(-2, -1))(out_BxTxNxD)
    if s.family != "distilbert":
      a_BxTxH = nn.Dropout(s.hidden_dropout_prob)(a_BxTxH, deterministic=self.deterministic)
    h_BxTxH = layers.LayerNorm(s.layer_norm_eps, self.dtype, name="attention_norm")(a_BxTxH + h_BxTxH)
    f_BxTxF = layers.dense(s.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="mlp_in",
                           stddev=std)(h_BxTxH)
    f_BxTxF = layers.activation(s.hidden_act, "config.hidden_act")(f_BxTxF)
    f_BxTxH = layers.dense(s.hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="mlp_out",
                           stddev=std)(f_BxTxF)
    f_BxTxH = nn.Dropout(s.hidden_dropout_prob)(f_BxTxH, deterministic=self.deterministic)
    h_BxTxH = layers.LayerNorm(s.layer_norm_eps, self.dtype, name="mlp_norm")(f_BxTxH + h_BxTxH)
    ys = {}
    if "hidden_states" in self.want:
      ys["hidden_states"] = h_BxTxH
    if "attention_probs" in self.want:
      ys["attention_probs"] = probs_BxNxTxT
    if "attention_scores" in self.want:
      ys["attention_scores"] = scores_BxNxTxT
    if "values" in self.want:
      ys["values"] = v_BxTxNxD.reshape(*v_BxTxNxD.shape[:2], -1)
    return h_BxTxH, ys


class Encoder(nn.Module):
  """BERT / RoBERTa / DistilBERT with a masked-LM head, a classification head or none.

  Attributes:
    spec: the family's numbers (`spec_from_hf`).
    task: `"masked_lm"`, `"sequence_classification"` or `"encoder"` (the base model).
    dtype: computation dtype (LayerNorm statistics and softmax are float32; logits too).
    remat: `"none"`, `"full"` or `"dots"` for the layer scan.
    attention_impl: `implementation` of `jax.nn.dot_product_attention` (None: XLA picks).
  """

  spec: EncoderSpec
  task: str = "masked_lm"
  dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array,
               position_ids_BxT: Optional[jax.Array] = None, token_type_ids_BxT: Optional[jax.Array] = None, *,
               want: frozenset = frozenset({"logits"}), deterministic: bool = True) -> dict[str, jax.Array]:
    """Runs the encoder on a right-padded batch.

    Args:
      input_ids_BxT: token ids.
      attention_mask_BxT: 1 for real tokens, 0 for padding (padded keys are never attended).
      position_ids_BxT: default: ``0..T-1`` (BERT, DistilBERT), padding-based (RoBERTa).
      token_type_ids_BxT: default zeros (ignored by DistilBERT, which has none).
      want: names among `"logits"`, `"hidden_states"`, `"attention_probs"`,
        `"attention_scores"`, `"values"`; others are ignored.
      deterministic: False applies the config's dropout rates with the `"dropout"` rng.

    Returns:
      `"last_hidden"` ``[B, T, H]`` always, and when wanted: `"logits"` (float32; ``[B, T, V]``
      masked_lm, ``[B, C]`` sequence_classification, never for encoder), `"hidden_states"`
      ``[L + 1, B, T, H]`` (embedding output first), `"attention_probs"` and
      `"attention_scores"` ``[L, B, N, T, T]`` (probabilities before dropout; scores scaled,
      padded keys at `layers.MASKED_SCORE`), `"values"` ``[L, B, T, H]``.
    """
    s = self.spec
    if self.task not in TASKS:
      raise ValueError(f"task: {self.task!r} is not available for encoders; allowed: {', '.join(TASKS)}")
    std = s.initializer_range
    b, t = input_ids_BxT.shape
    if position_ids_BxT is None:
      position_ids_BxT = (roberta_position_ids(input_ids_BxT, s.pad_token_id) if s.family == "roberta"
                          else jnp.broadcast_to(jnp.arange(t), (b, t)))
    word = _embed(s.vocab_size, s.hidden_size, ("vocab", "embed"), dtype=self.dtype, stddev=std,
                  name="word_embeddings")
    x_BxTxH = word(input_ids_BxT)
    if s.type_vocab_size:
      types_BxT = jnp.zeros_like(input_ids_BxT) if token_type_ids_BxT is None else token_type_ids_BxT
      x_BxTxH = x_BxTxH + _embed(s.type_vocab_size, s.hidden_size, (None, "embed"), dtype=self.dtype, stddev=std,
                                 name="token_type_embeddings")(types_BxT)
    position_init = _sinusoidal_init if s.sinusoidal_pos_embds else None
    x_BxTxH = x_BxTxH + _embed(s.max_position_embeddings, s.hidden_size, ("positions", "embed"), dtype=self.dtype,
                               stddev=std, name="position_embeddings", init=position_init)(position_ids_BxT)
    x_BxTxH = layers.LayerNorm(s.layer_norm_eps, self.dtype, name="embeddings_norm")(x_BxTxH)
    x_BxTxH = nn.Dropout(s.hidden_dropout_prob)(x_BxTxH, deterministic=deterministic)

    maps = frozenset(want) & {"hidden_states", "attention_probs", "attention_scores", "values"}
    stack = layers.scan_layers(_Layer, s.num_layers, self.remat, in_axes=(nn.broadcast,))
    mask_Bx1xTxT = layers.attention_mask(attention_mask_BxT, t, causal=False)
    h_BxTxH, ys = stack(spec=s, dtype=self.dtype, attention_impl=self.attention_impl, want=maps,
                        deterministic=deterministic, name="layers")(x_BxTxH, mask_Bx1xTxT)
    out = {"last_hidden": h_BxTxH, **ys}
    if "hidden_states" in maps:
      out["hidden_states"] = jnp.concatenate([x_BxTxH[None], ys["hidden_states"]], axis=0)
    if "logits" in want and self.task == "masked_lm":
      out["logits"] = self._mlm_logits(h_BxTxH, word)
    elif "logits" in want and self.task == "sequence_classification":
      out["logits"] = self._classifier_logits(h_BxTxH[:, 0], deterministic)
    return out

  def _mlm_logits(self, h_BxTxH: jax.Array, word: nn.Embed) -> jax.Array:
    s = self.spec
    std = s.initializer_range
    x_BxTxH = layers.dense(s.hidden_size, ("embed", None), use_bias=True, dtype=self.dtype, name="mlm_dense",
                           stddev=std)(h_BxTxH)
    x_BxTxH = layers.activation(s.mlm_act, "config.hidden_act")(x_BxTxH)
    x_BxTxH = layers.LayerNorm(s.layer_norm_eps, self.dtype, name="mlm_norm")(x_BxTxH)
    if s.tie_word_embeddings:
      logits_BxTxV = word.attend(x_BxTxH)
    else:
      logits_BxTxV = layers.dense(s.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                                  name="mlm_decoder", stddev=std)(x_BxTxH)
    bias_V = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                        (s.vocab_size,), jnp.float32)
    return logits_BxTxV.astype(jnp.float32) + bias_V.astype(jnp.float32)

  def _classifier_logits(self, first_BxH: jax.Array, deterministic: bool) -> jax.Array:
    s = self.spec
    std = s.initializer_range
    dropout = nn.Dropout(s.classifier_dropout)
    pooler = layers.dense(s.hidden_size, ("embed", None), use_bias=True, dtype=self.dtype, name="pooler",
                          stddev=std)
    if s.family == "bert":
      x_BxH = dropout(jnp.tanh(pooler(first_BxH)), deterministic=deterministic)
    elif s.family == "roberta":
      x_BxH = jnp.tanh(pooler(dropout(first_BxH, deterministic=deterministic)))
      x_BxH = dropout(x_BxH, deterministic=deterministic)
    else:
      x_BxH = dropout(jax.nn.relu(pooler(first_BxH)), deterministic=deterministic)
    logits_BxC = layers.dense(s.num_labels, ("embed", "classes"), use_bias=True, dtype=self.dtype,
                              name="classifier", stddev=std)(x_BxH)
    return logits_BxC.astype(jnp.float32)


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
  if spec.family == "distilbert":
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
  h, v, c, fam = spec.hidden_size, spec.vocab_size, spec.num_labels, spec.family
  tied = spec.tie_word_embeddings
  if task == "masked_lm":
    dense, norm, decoder, bias = {
        "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                 "cls.predictions.decoder", "cls.predictions.bias"),
        "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias"),
        "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector", "vocab_projector.bias"),
    }[fam]
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
    if fam == "bert":
      return _linear(("pooler",), "pooler.dense", (h,), (h,)) + _linear(("classifier",), "classifier", (h,), (c,),
                                                                         base=False), ()
    pooler, classifier = ("classifier.dense", "classifier.out_proj") if fam == "roberta" else ("pre_classifier",
                                                                                                "classifier")
    return (_linear(("pooler",), pooler, (h,), (h,), base=False)
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
  if not (spec.family == "bert" and task == "sequence_classification"):
    ignored += ("pooler.dense.weight", "pooler.dense.bias")  # BertModel/RobertaModel's unused pooler
  return top + head, _layer_weights(spec), ignored + _BUFFERS


def _hf_name(name: str, w: _Weight, spec: EncoderSpec, task: str) -> str:
  """The PyTorch name in the `task` class (base weights prefixed unless it is the base model)."""
  return f"{_PREFIX[spec.family]}.{name}" if w.base and task != "encoder" else name


def _normalize(state: Mapping[str, np.ndarray], spec: EncoderSpec) -> dict[str, np.ndarray]:
  """Names without the family prefix, legacy `LayerNorm.gamma/beta` renamed."""
  prefix = _PREFIX[spec.family] + "."
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
  decoder = {"bert": "cls.predictions.decoder.weight", "roberta": "lm_head.decoder.weight",
             "distilbert": "vocab_projector.weight"}[spec.family]
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
  if task == "masked_lm" and not spec.tie_word_embeddings and spec.family != "distilbert":
    state["cls.predictions.bias" if spec.family == "bert" else "lm_head.bias"] = get(("mlm_bias",))
  return state
