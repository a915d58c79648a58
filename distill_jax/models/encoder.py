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

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import layers
from distill_jax.models.encoder_spec import EncoderSpec, FAMILIES, TASKS, hf_architecture, spec_from_hf
from distill_jax.models.encoder_weights import params_from_hf, params_to_hf

__all__ = ["FAMILIES", "TASKS", "Encoder", "EncoderSpec", "hf_architecture", "params_from_hf", "params_to_hf",
           "spec_from_hf"]


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


# Logical axes of the layers' activations (`layers.ACTIVATION_RULES` maps them onto the mesh).
_HIDDEN_AXES = ("batch", "length", "embed")
_QKV_AXES = ("batch", "length", "heads", "head_dim")
_MLP_AXES = ("batch", "length", "mlp")


class _Layer(nn.Module):
  """One post-LayerNorm transformer layer (the scanned block): ``(h, mask, key_mask) -> (h, intermediates)``."""

  spec: EncoderSpec
  dtype: Any
  attention_impl: Optional[str]
  want: frozenset
  deterministic: bool
  mesh: Optional[Any] = None

  @nn.compact
  def __call__(self, h_BxTxH: jax.Array, mask_Bx1xTxT: jax.Array,
               key_mask_BxT: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    s, mesh = self.spec, self.mesh
    std = s.initializer_range
    n, d = s.num_heads, s.head_dim
    qkv_axes = ("embed", "heads", "head_dim")
    q_BxTxNxD = layers.dense((n, d), qkv_axes, use_bias=True, dtype=self.dtype, name="query", stddev=std)(h_BxTxH)
    k_BxTxNxD = layers.dense((n, d), qkv_axes, use_bias=True, dtype=self.dtype, name="key", stddev=std)(h_BxTxH)
    v_BxTxNxD = layers.dense((n, d), qkv_axes, use_bias=True, dtype=self.dtype, name="value", stddev=std)(h_BxTxH)
    q_BxTxNxD = layers.name_checkpoint(layers.constrain(q_BxTxNxD, _QKV_AXES, mesh), "query_proj")
    k_BxTxNxD = layers.name_checkpoint(layers.constrain(k_BxTxNxD, _QKV_AXES, mesh), "key_proj")
    v_BxTxNxD = layers.name_checkpoint(layers.constrain(v_BxTxNxD, _QKV_AXES, mesh), "value_proj")
    drop_probs = not self.deterministic and s.attention_probs_dropout_prob > 0
    explicit = drop_probs or bool(self.want & {"attention_probs", "attention_scores"})
    out_BxTxNxD, scores_BxNxTxT, probs_BxNxTxT = layers.attend(
        q_BxTxNxD, k_BxTxNxD, v_BxTxNxD, mask_Bx1xTxT, scale=d ** -0.5, explicit=explicit,
        implementation=self.attention_impl, splash_mask=layers.SplashMask(key_mask_BxT, causal=False), mesh=mesh)
    if drop_probs:
      dropped_BxNxTxT = nn.Dropout(s.attention_probs_dropout_prob)(probs_BxNxTxT, deterministic=False)
      out_BxTxNxD = jnp.einsum("bnts,bsnd->btnd", dropped_BxNxTxT, v_BxTxNxD)
    out_BxTxNxD = layers.constrain(out_BxTxNxD, _QKV_AXES, mesh)
    a_BxTxH = layers.dense(s.hidden_size, ("heads", "head_dim", "embed"), use_bias=True, dtype=self.dtype,
                           name="attention_out", stddev=std, in_axes=(-2, -1))(out_BxTxNxD)
    a_BxTxH = layers.name_checkpoint(layers.constrain(a_BxTxH, _HIDDEN_AXES, mesh), "attn_out")
    if s.traits.attention_out_dropout:
      a_BxTxH = nn.Dropout(s.hidden_dropout_prob)(a_BxTxH, deterministic=self.deterministic)
    h_BxTxH = layers.LayerNorm(s.layer_norm_eps, self.dtype, name="attention_norm")(a_BxTxH + h_BxTxH)
    f_BxTxF = layers.dense(s.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="mlp_in",
                           stddev=std)(h_BxTxH)
    f_BxTxF = layers.activation(s.hidden_act, "config.hidden_act")(layers.constrain(f_BxTxF, _MLP_AXES, mesh))
    f_BxTxH = layers.dense(s.hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="mlp_out",
                           stddev=std)(f_BxTxF)
    f_BxTxH = layers.name_checkpoint(layers.constrain(f_BxTxH, _HIDDEN_AXES, mesh), "mlp_out")
    f_BxTxH = nn.Dropout(s.hidden_dropout_prob)(f_BxTxH, deterministic=self.deterministic)
    h_BxTxH = layers.LayerNorm(s.layer_norm_eps, self.dtype, name="mlp_norm")(f_BxTxH + h_BxTxH)
    h_BxTxH = layers.constrain(h_BxTxH, _HIDDEN_AXES, mesh)
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


# The classification heads' pooler activations (`EncoderTraits.pooler_activation`).
_POOLER_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class Encoder(nn.Module):
  """BERT / RoBERTa / DistilBERT with a masked-LM head, a classification head or none.

  Attributes:
    spec: the family's numbers (`spec_from_hf`).
    task: `"masked_lm"`, `"sequence_classification"` or `"encoder"` (the base model).
    dtype: computation dtype (LayerNorm statistics and softmax are float32; logits too).
    remat: one of `layers.REMAT_POLICIES` for the layer scan.
    attention_impl: one of `layers.MODULE_ATTENTION` (None: XLA's); see `layers.attend`.
    unroll_layers: run the layer scan fully unrolled (`layers.resolve_layer_loop`); same params.
    mesh: a ``(data, fsdp, tensor)`` mesh for the activations' sharding constraints (None: none).
  """

  spec: EncoderSpec
  task: str = "masked_lm"
  dtype: Any = jnp.float32
  remat: str = "none"
  attention_impl: Optional[str] = None
  unroll_layers: bool = False
  mesh: Optional[Any] = None

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
      position_ids_BxT = (roberta_position_ids(input_ids_BxT, s.pad_token_id) if s.traits.positions_from_pad
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
    stack = layers.scan_layers(_Layer, s.num_layers, self.remat, in_axes=(nn.broadcast, nn.broadcast),
                               unroll=self.unroll_layers)
    mask_Bx1xTxT = layers.attention_mask(attention_mask_BxT, t, causal=False)
    h_BxTxH, ys = stack(spec=s, dtype=self.dtype, attention_impl=self.attention_impl, want=maps,
                        deterministic=deterministic, mesh=self.mesh, name="layers")(
                            x_BxTxH, mask_Bx1xTxT, attention_mask_BxT)
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
    return layers.add_bias(logits_BxTxV.astype(jnp.float32), bias_V.astype(jnp.float32))

  def _classifier_logits(self, first_BxH: jax.Array, deterministic: bool) -> jax.Array:
    s = self.spec
    std = s.initializer_range
    dropout = nn.Dropout(s.classifier_dropout)
    pooler = layers.dense(s.hidden_size, ("embed", None), use_bias=True, dtype=self.dtype, name="pooler",
                          stddev=std)
    x_BxH = dropout(first_BxH, deterministic=deterministic) if s.traits.dropout_before_pooler else first_BxH
    x_BxH = _POOLER_ACTIVATIONS[s.traits.pooler_activation](pooler(x_BxH))
    x_BxH = dropout(x_BxH, deterministic=deterministic)
    logits_BxC = layers.dense(s.num_labels, ("embed", "classes"), use_bias=True, dtype=self.dtype,
                              name="classifier", stddev=std)(x_BxH)
    return logits_BxC.astype(jnp.float32)
