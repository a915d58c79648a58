"""The names every part of the project shares about models: tasks, outputs, `ModelOutputs`."""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

TASKS = ("causal_lm", "masked_lm", "sequence_classification", "encoder")
LM_TASKS = ("causal_lm", "masked_lm")  # tasks whose logits are per token
OUTPUT_NAMES = ("logits", "hidden_states", "attention_scores", "attention_probs", "values", "pooled", "final_hidden",
                "head")
POOLINGS = ("mean", "cls")


@flax.struct.dataclass
class ModelOutputs:
  """What a model returns; only the fields the caller asked for are set.

  Per-layer outputs come out of the scanned layer stack as stacked arrays: index them like
  a tuple (`hidden_states[i]`, `len(hidden_states)`).

  Attributes:
    logits: ``[B, T, V]`` for LM tasks, ``[B, C]`` for sequence classification (float32).
    hidden_states: ``[L + 1, B, T, H]``: the embedding output first, then every layer
      (for decoders the last one is after the final norm, as in Hugging Face).
    attention_scores: ``[L, B, N, T, T]`` pre-softmax scores (scaled; masked keys at -1e4).
    attention_probs: ``[L, B, N, T, T]`` probabilities.
    values: ``[L, B, T, H_v]`` value projections (heads not split).
    pooled: ``[B, H]`` mean-pooled (over ``attention_mask``) or CLS embedding.
    final_hidden: ``[B, T, H]`` the trunk's output (after a decoder's final norm), in the
      compute dtype: with `Model.head` it gives the logits without forming them.
    head: the causal LM's `Head` (``Model.head(params)``), so that a loss can chunk the
      vocabulary from ``final_hidden`` and the params it was computed with.
  """

  logits: Optional[jax.Array] = None
  hidden_states: Optional[jax.Array] = None
  attention_scores: Optional[jax.Array] = None
  attention_probs: Optional[jax.Array] = None
  values: Optional[jax.Array] = None
  pooled: Optional[jax.Array] = None
  final_hidden: Optional[jax.Array] = None
  head: Optional["Head"] = None


@flax.struct.dataclass
class Head:
  """A causal LM's unembedding: ``logits = cap · tanh((final_hidden @ kernel + bias) / cap)[..., :vocab]``.

  A pytree of its arrays; ``softcap`` and ``vocab`` are static (they survive ``jax.tree.map``).

  Attributes:
    kernel: ``[H, V]`` in the compute dtype (a tied head: the embedding transposed).
    bias: ``[V]`` or None.
    softcap: final logit soft-capping (Gemma 2/3), or None.
    vocab: the usable vocabulary (columns from ``vocab`` on are padding).
  """

  kernel: jax.Array
  bias: Optional[jax.Array]
  softcap: Optional[float] = flax.struct.field(pytree_node=False)
  vocab: int = flax.struct.field(pytree_node=False)


def pool(hidden_BxTxH: jax.Array, mask_BxT: jax.Array, pooling: str) -> jax.Array:
  """``[B, H]`` embedding of ``[B, T, H]`` states: the mean over real tokens or the first (CLS)."""
  if pooling == "cls":
    return hidden_BxTxH[:, 0]
  mask_BxTx1 = mask_BxT[..., None].astype(hidden_BxTxH.dtype)
  total_BxH = jnp.sum(hidden_BxTxH * mask_BxTx1, axis=1)
  return total_BxH / jnp.maximum(jnp.sum(mask_BxTx1, axis=1), 1)
