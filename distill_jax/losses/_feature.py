"""Feature distillation: hidden states, attention maps and value relations.

Inputs are intermediate representations of matching shape (use a learned projection
upstream when widths differ); values are float32 and unreduced over the feature (or key)
axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import _reduce
from distill_jax.losses._logit import _kl

# Scores at or below this are treated as mask-filled (HF fills with -1e4, -1e9 or finfo.min).
MASKED_SCORE_THRESHOLD = -1e4
_EPS = 1e-8


def _pair_f32(student: ArrayLike, teacher: ArrayLike, what: str) -> tuple[jax.Array, jax.Array]:
  student = jnp.asarray(student, jnp.float32)
  teacher = jnp.asarray(teacher, jnp.float32)
  if student.shape != teacher.shape:
    raise ValueError(
        f"{what}: student shape {student.shape} != teacher shape {teacher.shape} "
        "(project the student first when widths differ)")
  return student, teacher


def _sequence_pair_f32(
    student: ArrayLike, teacher: ArrayLike, what: str
) -> tuple[jax.Array, jax.Array]:
  """Casts `[B, T, Ds]` / `[B, T, Dt]` to f32; widths may differ, B and T may not."""
  student = jnp.asarray(student, jnp.float32)
  teacher = jnp.asarray(teacher, jnp.float32)
  if student.ndim != 3 or teacher.ndim != 3 or student.shape[:2] != teacher.shape[:2]:
    raise ValueError(
        f"{what}: expected [B, T, D] inputs with equal B, T; got "
        f"{student.shape} and {teacher.shape}")
  return student, teacher


def hidden_mse(
    student_h: ArrayLike, teacher_h: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  """Mean squared error between hidden states, averaged over the feature axis.

  .. math::
    \\frac{1}{D} \\sum_d (h^S_d - h^T_d)^2

  Worked example of the method's reference text: teacher ``[1, 2, 3]`` against student
  ``[1.1, 1.9, 3.2]`` gives exactly 0.02 ((0.01 + 0.01 + 0.04) / 3), not the 0.0266667
  that text prints.

  Args:
    student_h: `[..., D]` student features (already projected to the teacher's width).
    teacher_h: `[..., D]` teacher features.
    where: optional boolean mask broadcastable to `[...]`.

  Returns:
    `[...]` float32 per-position MSE.

  References:
    Romero et al., "FitNets: Hints for Thin Deep Nets", 2015.
  """
  student, teacher = _pair_f32(student_h, teacher_h, "hidden_mse")
  mask = _reduce.broadcast_mask(where, student.shape[:-1])
  diff = _reduce.mask_inputs(student, mask) - _reduce.mask_inputs(teacher, mask)
  return _reduce.mask_outputs(jnp.mean(jnp.square(diff), axis=-1), mask)


def _l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(‖x‖, eps), with a finite gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _EPS * _EPS))


def cosine_distance(
    student_h: ArrayLike, teacher_h: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  """Cosine distance 1 - cos(h_S, h_T) over the feature axis.

  .. math::
    1 - \\frac{\\langle h^S, h^T \\rangle}{\\max(\\|h^S\\|, \\epsilon)\\max(\\|h^T\\|, \\epsilon)}

  Args:
    student_h: `[..., D]` student features.
    teacher_h: `[..., D]` teacher features.
    where: optional boolean mask broadcastable to `[...]`.

  Returns:
    `[...]` float32 per-position distance in [0, 2].

  References:
    Sanh et al., "DistilBERT, a distilled version of BERT", 2019.
  """
  student, teacher = _pair_f32(student_h, teacher_h, "cosine_distance")
  mask = _reduce.broadcast_mask(where, student.shape[:-1])
  cos = jnp.sum(
      _l2_normalize(_reduce.mask_inputs(student, mask))
      * _l2_normalize(_reduce.mask_inputs(teacher, mask)), axis=-1)
  return _reduce.mask_outputs(1.0 - cos, mask)


def attention_mse(
    student_scores: ArrayLike,
    teacher_scores: ArrayLike,
    *,
    where: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
) -> jax.Array:
  """TinyBERT attention loss: MSE of pre-softmax attention scores per query row.

  A key position is excluded (contributes nothing, and the mean is over the valid keys
  only) when ``key_mask`` is False there, or when either score is mask-filled
  (``<= MASKED_SCORE_THRESHOLD`` = -1e4, as HF models fill padded keys).

  .. math::
    \\frac{1}{|K_b|} \\sum_{k \\in K_b} (A^S_{bnqk} - A^T_{bnqk})^2

  Args:
    student_scores: `[B, N, T, T]` student attention scores (query, key), pre-softmax.
    teacher_scores: `[B, N, T, T]` teacher attention scores with the same head count.
    where: optional boolean query mask broadcastable to `[B, N, T]`.
    key_mask: optional boolean `[B, T]` mask of valid key positions.

  Returns:
    `[B, N, T]` float32 per-(head, query) MSE.

  References:
    Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", 2020.
  """
  student, teacher = _pair_f32(student_scores, teacher_scores, "attention_mse")
  mask = _reduce.broadcast_mask(where, student.shape[:-1])
  student = _reduce.mask_inputs(student, mask)
  teacher = _reduce.mask_inputs(teacher, mask)
  valid = (student > MASKED_SCORE_THRESHOLD) & (teacher > MASKED_SCORE_THRESHOLD)
  if key_mask is not None:
    key_mask = jnp.asarray(key_mask, bool)
    valid = valid & key_mask[:, None, None, :]
  diff = jnp.where(valid, student - teacher, 0.0)
  count = jnp.sum(valid, axis=-1, dtype=jnp.float32)
  mse = jnp.sum(jnp.square(diff), axis=-1) / jnp.maximum(count, 1.0)
  return _reduce.mask_outputs(mse, mask)


def _safe_log(p: jax.Array) -> jax.Array:
  """log p with log 0 = -inf and no NaN gradient at 0 (for the distribution we average under)."""
  positive = p > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, p, 1.0)), -jnp.inf)


def attention_kl(
    student_probs: ArrayLike, teacher_probs: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  """MiniLM attention-distribution transfer: KL(A_T‖A_S) per query row.

  Inputs are post-softmax probabilities; keys with zero teacher probability (padding)
  contribute nothing. Student probabilities are clamped at the smallest normal float32
  so that the value stays finite.

  .. math::
    \\sum_k A^T_{bnqk} (\\log A^T_{bnqk} - \\log A^S_{bnqk})

  Args:
    student_probs: `[B, N, T, T]` student attention probabilities.
    teacher_probs: `[B, N, T, T]` teacher attention probabilities, same head count.
    where: optional boolean query mask broadcastable to `[B, N, T]`.

  Returns:
    `[B, N, T]` float32 per-(head, query) divergence.

  References:
    Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression
    of Pre-Trained Transformers", 2020.
  """
  student, teacher = _pair_f32(student_probs, teacher_probs, "attention_kl")
  mask = _reduce.broadcast_mask(where, student.shape[:-1])
  student = _reduce.mask_inputs(student, mask, fill=1.0)
  teacher = _reduce.mask_inputs(teacher, mask, fill=1.0)
  logp_s = jnp.log(jnp.maximum(student, jnp.finfo(jnp.float32).tiny))
  return _reduce.mask_outputs(_kl(_safe_log(teacher), logp_s), mask)


def _value_relation_log_probs(
    v_BxTxH: jax.Array, num_heads: int, key_mask_BxT: jax.Array | None
) -> jax.Array:
  """log softmax(V_n V_nᵀ / √d) per head: `[B, T, H]` -> `[B, N, T, T]`."""
  b, t, h = v_BxTxH.shape
  d = h // num_heads
  v_BxNxTxD = v_BxTxH.reshape(b, t, num_heads, d).transpose(0, 2, 1, 3)
  scores_BxNxTxT = jnp.einsum("bnqd,bnkd->bnqk", v_BxNxTxD, v_BxNxTxD) / jnp.sqrt(
      jnp.float32(d))
  if key_mask_BxT is not None:
    scores_BxNxTxT = jnp.where(key_mask_BxT[:, None, None, :], scores_BxNxTxT, -1e30)
  return jax.nn.log_softmax(scores_BxNxTxT, axis=-1)


def value_relation_kl(
    student_v: ArrayLike,
    teacher_v: ArrayLike,
    *,
    num_heads: int,
    where: ArrayLike | None = None,
    key_mask: ArrayLike | None = None,
) -> jax.Array:
  """MiniLM value-relation transfer: KL between per-head value-value attention maps.

  Values are split into ``num_heads`` heads of width ``H / num_heads`` (separately for
  student and teacher, so the hidden sizes may differ while the head count is shared),
  and each head's relation is :math:`R = \\mathrm{softmax}(V V^\\top / \\sqrt{d_{head}})`.

  .. math::
    \\sum_k R^T_{bnqk} (\\log R^T_{bnqk} - \\log R^S_{bnqk})

  Args:
    student_v: `[B, T, Hs]` student value vectors (all heads concatenated).
    teacher_v: `[B, T, Ht]` teacher value vectors.
    num_heads: number of relation heads, a positive integer dividing both Hs and Ht.
    where: optional boolean query mask broadcastable to `[B, N, T]` (pass
      ``mask_BxT[:, None, :]`` for a token mask).
    key_mask: optional boolean `[B, T]` mask of valid key tokens; masked keys get zero
      probability and their value vectors are ignored.

  Returns:
    `[B, N, T]` float32 per-(head, query) divergence.

  Raises:
    ValueError: if ``num_heads`` is not a positive integer dividing both hidden sizes.

  References:
    Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression
    of Pre-Trained Transformers", 2020.
  """
  _reduce.check_positive_int("num_heads", num_heads)
  student, teacher = _sequence_pair_f32(student_v, teacher_v, "value_relation_kl")
  if student.shape[-1] % num_heads or teacher.shape[-1] % num_heads:
    raise ValueError(
        f"num_heads: {num_heads} must divide both the student value width "
        f"{student.shape[-1]} and the teacher value width {teacher.shape[-1]}")
  b, t, _ = student.shape
  mask = _reduce.broadcast_mask(where, (b, num_heads, t))
  token_mask = None if key_mask is None else jnp.asarray(key_mask, bool)
  if token_mask is not None:
    student = _reduce.mask_inputs(student, token_mask)
    teacher = _reduce.mask_inputs(teacher, token_mask)
  logp_s = _value_relation_log_probs(student, num_heads, token_mask)
  logp_t = _value_relation_log_probs(teacher, num_heads, token_mask)
  return _reduce.mask_outputs(_kl(logp_t, logp_s), mask)
