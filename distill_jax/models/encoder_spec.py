"""BERT, RoBERTa and DistilBERT configs read into a frozen `EncoderSpec` (every number honoured or refused)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from distill_jax.models import layers

TASKS = ("masked_lm", "sequence_classification", "encoder")
_SUFFIX = {"masked_lm": "ForMaskedLM", "sequence_classification": "ForSequenceClassification", "encoder": "Model"}

# Non-persistent buffers some checkpoints carry; never params.
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")

# The HF config fields `spec_from_hf` reads, by their BERT names (a family may rename them).
_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "pad_token_id",
           "tie_word_embeddings", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
           "initializer_range", "sinusoidal_pos_embds")


@dataclasses.dataclass(frozen=True)
class EncoderTraits:
  """What makes an encoder family itself: read by the spec, the module and the weight map.

  Attributes:
    model_type: HF `model_type` (the registry key).
    class_stem: transformers class prefix (`"Bert"` -> `BertForMaskedLM`, `BertModel`).
    prefix: the base model's attribute in the task classes (weight name prefix).
    renamed: (BERT name, this family's config name) pairs of `_FIELDS` (DistilBERT: `dim`, ...).
    defaults: the HF config class defaults (a saved config.json omits the fields equal to them).
    fixed_layer_norm_eps: an eps hard-coded in the modeling file (no config field), else None.
    token_types: has a token type table (`type_vocab_size`).
    positions_from_pad: position ids count real tokens from `pad_token_id` (RoBERTa).
    exact_gelu_mlm: the MLM head transform is exact GELU whatever `hidden_act` (RoBERTa).
    bert_layout: weights under `encoder.layer.{i}` (else DistilBERT's `transformer.layer.{i}`).
    mlm_names: (dense, norm, decoder, bias) weights of the MLM head.
    classifier_names: (pooler, classifier) of the classification head; the pooler is
      in the base model when `pooler_in_base`.
    attention_out_dropout: dropout on the attention output before its residual (not DistilBERT).
    pooler_activation: of the classification head's pooler (`tanh`; DistilBERT `relu`).
    dropout_before_pooler: the classification head drops out its input too (RoBERTa).
  """

  model_type: str
  class_stem: str
  prefix: str
  renamed: tuple[tuple[str, str], ...] = ()
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False, repr=False)
  fixed_layer_norm_eps: Optional[float] = None
  token_types: bool = True
  positions_from_pad: bool = False
  exact_gelu_mlm: bool = False
  bert_layout: bool = True
  mlm_names: tuple[str, str, str, str] = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                          "cls.predictions.decoder", "cls.predictions.bias")
  classifier_names: tuple[str, str] = ("pooler.dense", "classifier")
  pooler_in_base: bool = False
  attention_out_dropout: bool = True
  pooler_activation: str = "tanh"
  dropout_before_pooler: bool = False

  def config_name(self, field: str) -> str:
    """This family's config name of the BERT field `field`."""
    return dict(self.renamed).get(field, field)


REGISTRY: dict[str, EncoderTraits] = {}


def register(traits: EncoderTraits) -> EncoderTraits:
  """Adds a family to `REGISTRY`."""
  if traits.model_type in REGISTRY:
    raise ValueError(f"model_type: {traits.model_type!r} is registered already")
  REGISTRY[traits.model_type] = traits
  return traits


_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                      initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, classifier_dropout=None,
                      tie_word_embeddings=True)
register(EncoderTraits("bert", "Bert", "bert", defaults=_BERT_DEFAULTS, pooler_in_base=True))
register(EncoderTraits("roberta", "Roberta", "roberta", defaults={**_BERT_DEFAULTS, "vocab_size": 50265,
                                                                  "pad_token_id": 1},
                       positions_from_pad=True, exact_gelu_mlm=True, dropout_before_pooler=True,
                       mlm_names=("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias"),
                       classifier_names=("classifier.dense", "classifier.out_proj")))
register(EncoderTraits(
    "distilbert", "DistilBert", "distilbert",
    renamed=(("hidden_size", "dim"), ("num_hidden_layers", "n_layers"), ("num_attention_heads", "n_heads"),
             ("intermediate_size", "hidden_dim"), ("hidden_act", "activation"), ("hidden_dropout_prob", "dropout"),
             ("attention_probs_dropout_prob", "attention_dropout"), ("classifier_dropout", "seq_classif_dropout")),
    defaults=dict(vocab_size=30522, max_position_embeddings=512, sinusoidal_pos_embds=False, n_layers=6,
                  n_heads=12, dim=768, hidden_dim=3072, dropout=0.1, attention_dropout=0.1, activation="gelu",
                  initializer_range=0.02, seq_classif_dropout=0.2, pad_token_id=0, tie_word_embeddings=True),
    fixed_layer_norm_eps=1e-12,  # hard-coded in modeling_distilbert.py
    token_types=False, bert_layout=False, attention_out_dropout=False, pooler_activation="relu",
    mlm_names=("vocab_transform", "vocab_layer_norm", "vocab_projector", "vocab_projector.bias"),
    classifier_names=("pre_classifier", "classifier")))

FAMILIES = tuple(REGISTRY)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Every number of an encoder config that changes the computation (hashable).

  Attributes:
    traits: the family's registered `EncoderTraits` (`family` is its `model_type`).
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

  traits: EncoderTraits
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
  def family(self) -> str:
    """HF `model_type`."""
    return self.traits.model_type

  @property
  def mlm_act(self) -> str:
    """Activation of the MLM head transform (`EncoderTraits.exact_gelu_mlm`: always exact GELU)."""
    return "gelu" if self.traits.exact_gelu_mlm else self.hidden_act


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
  if family not in REGISTRY:
    raise _refuse("model_type", family, ", ".join(REGISTRY))
  traits = REGISTRY[family]
  c = {**traits.defaults, **config}
  for field in ("is_decoder", "add_cross_attention"):
    if c.get(field, False):
      raise _refuse(field, c[field], "False")
  if c.get("position_embedding_type", "absolute") != "absolute":
    raise _refuse("position_embedding_type", c["position_embedding_type"], "absolute")
  labels = c.get("id2label")
  num_labels = int(c.get("num_labels", len(labels) if labels else 2))
  f = {field: c.get(traits.config_name(field)) for field in _FIELDS}
  classifier_dropout = f["hidden_dropout_prob"] if f["classifier_dropout"] is None else f["classifier_dropout"]
  spec = EncoderSpec(
      traits=traits, vocab_size=int(f["vocab_size"]), hidden_size=int(f["hidden_size"]),
      num_layers=int(f["num_hidden_layers"]), num_heads=int(f["num_attention_heads"]),
      intermediate_size=int(f["intermediate_size"]), max_position_embeddings=int(f["max_position_embeddings"]),
      type_vocab_size=int(f["type_vocab_size"]) if traits.token_types else 0, hidden_act=f["hidden_act"],
      layer_norm_eps=float(f["layer_norm_eps"] if traits.fixed_layer_norm_eps is None
                           else traits.fixed_layer_norm_eps),
      pad_token_id=f["pad_token_id"], num_labels=num_labels, tie_word_embeddings=bool(f["tie_word_embeddings"]),
      hidden_dropout_prob=float(f["hidden_dropout_prob"]),
      attention_probs_dropout_prob=float(f["attention_probs_dropout_prob"]),
      classifier_dropout=float(classifier_dropout), initializer_range=float(f["initializer_range"]),
      sinusoidal_pos_embds=bool(f["sinusoidal_pos_embds"]))
  layers.activation(spec.hidden_act, f"config.{traits.config_name('hidden_act')}")
  if spec.hidden_size % spec.num_heads:
    raise ValueError(f"config: the width {spec.hidden_size} is not a multiple of the {spec.num_heads} attention "
                     "heads")
  if traits.positions_from_pad and spec.pad_token_id is None:
    raise _refuse("pad_token_id", None, "an integer (RoBERTa's position ids count from it)")
  return spec


def hf_architecture(spec: EncoderSpec, task: str) -> str:
  """The transformers class of `task`, e.g. `"BertForMaskedLM"`, `"RobertaModel"`."""
  return spec.traits.class_stem + _SUFFIX[task]
