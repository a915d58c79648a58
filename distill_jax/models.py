"""Teacher/student model adapter: one output contract for every Hugging Face family.

Contract (relied on by `objective.py`, `step.py`, `evaluate.py`):

* ``batch`` is a dict of arrays with at least ``input_ids`` ``[B, T]`` int32 and
  ``attention_mask`` ``[B, T]`` (1 = real token, 0 = padding).  Optional keys:
  ``token_type_ids`` ``[B, T]``, ``position_ids`` ``[B, T]``, ``labels``
  (``[B, T]`` for language modelling, ``[B]`` for classification) and ``loss_mask``
  ``[B, T]`` (1 where a token-level label counts).  A padded *example* (eval padding) has
  an all-zero ``attention_mask`` row; per-example weights are ``attention_mask.any(-1)``.
* ``Model.apply(params, batch, *, outputs=("logits",), train=False, rng=None)`` is a pure
  function usable inside ``jax.jit`` and returns :class:`ModelOutputs` holding only the
  requested fields (the others are ``None``).
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax

OUTPUT_NAMES = ("logits", "hidden_states", "attention_scores", "attention_probs", "values", "pooled")


@flax.struct.dataclass
class ModelOutputs:
  """What a model returns; only the fields the caller asked for are set.

  Attributes:
    logits: ``[B, T, V]`` for LM tasks, ``[B, C]`` for sequence classification.
    hidden_states: tuple of ``[B, T, H]``: the embedding output first, then every layer.
    attention_scores: tuple (one per layer) of pre-softmax scores ``[B, N, T, T]``.
    attention_probs: tuple (one per layer) of probabilities ``[B, N, T, T]``.
    values: tuple (one per layer) of value projections ``[B, T, H]`` (heads not split).
    pooled: ``[B, H]`` mean-pooled (over ``attention_mask``) or CLS embedding.
  """

  logits: Optional[jax.Array] = None
  hidden_states: Optional[tuple[jax.Array, ...]] = None
  attention_scores: Optional[tuple[jax.Array, ...]] = None
  attention_probs: Optional[tuple[jax.Array, ...]] = None
  values: Optional[tuple[jax.Array, ...]] = None
  pooled: Optional[jax.Array] = None
