"""BERT, RoBERTa and DistilBERT configs read into a frozen `EncoderSpec` (every number honoured or refused)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from distill_jax.models import layers

FAMILIES = ("bert", "roberta", "distilbert")
TASKS = ("masked_lm", "sequence_classification", "encoder")

PREFIX = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert"}
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
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


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
