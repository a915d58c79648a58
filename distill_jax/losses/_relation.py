"""Relation distillation: match relations *between* samples (or tokens), not the samples.

Relations are computed inside each model's own space, so student and teacher widths may
differ.  Every loss takes a mask of valid examples (or tokens) that is applied to the
relation statistics themselves — padded examples neither appear in a Gram matrix row
normalization nor in a mean distance — and returns one value per anchor so that
``masked_mean`` / ``masked_sum_and_count`` reduce it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import _reduce
from distill_jax.losses._feature import _l2_normalize
from distill_jax.losses._feature import _sequence_pair_f32


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) with zero (not NaN/inf) gradient at 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _dot(f: jax.Array) -> jax.Array:
  return jnp.einsum("...id,...jd->...ij", f, f)


def _cosine(f: jax.Array) -> jax.Array:
  return _dot(_l2_normalize(f))


def _euclidean(f: jax.Array) -> jax.Array:
  sq_norms = jnp.sum(jnp.square(f), axis=-1)
  sq_dist = sq_norms[..., :, None] + sq_norms[..., None, :] - 2.0 * _dot(f)
  off_diagonal = ~jnp.eye(f.shape[-2], dtype=bool)
  return _safe_sqrt(jnp.where(off_diagonal, sq_dist, 0.0))


_RELATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "cosine": _cosine,
    "dot": _dot,
    "euclidean": _euclidean,
}


def relation_matrix(features: ArrayLike, *, kind: str = "cosine") -> jax.Array:
  """Pairwise relation matrix between the rows of ``features``.

  ``"cosine"``: :math:`\\hat f_i^\\top \\hat f_j` (unit-normalized rows); ``"dot"``:
  :math:`f_i^\\top f_j`; ``"euclidean"``: :math:`\\|f_i - f_j\\|_2` (zero diagonal, finite
  gradient for coincident rows).

  Args:
    features: `[B, D]` (relations between examples) or `[B, T, D]` (between the tokens of
      each sequence).
    kind: one of ``"cosine"``, ``"dot"``, ``"euclidean"``.

  Returns:
    `[B, B]` or `[B, T, T]` float32 relations.

  Raises:
    ValueError: for an unknown ``kind``.

  References:
    Park et al., "Relational Knowledge Distillation", 2019.
  """
  _reduce.check_choice("kind", kind, sorted(_RELATIONS))
  return _RELATIONS[kind](jnp.asarray(features, jnp.float32))


def _examples(
    student_f: ArrayLike, teacher_f: ArrayLike, where: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Flattens `[B, ...]` features to `[B, D]` f32, zeroes masked rows, returns the mask."""
  student = jnp.asarray(student_f, jnp.float32)
  teacher = jnp.asarray(teacher_f, jnp.float32)
  b = student.shape[0]
  if teacher.shape[0] != b:
    raise ValueError(f"batch sizes differ: student {student.shape}, teacher {teacher.shape}")
  mask = _reduce.mask_or_ones(where, (b,))
  student = _reduce.mask_inputs(student.reshape(b, -1), mask)
  teacher = _reduce.mask_inputs(teacher.reshape(b, -1), mask)
  return student, teacher, mask


def similarity_preserving(
    student_f: ArrayLike, teacher_f: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  """Similarity-preserving loss: match row-normalized batch Gram matrices.

  With :math:`G = \\mathrm{rownorm}(F F^\\top)` over the b valid examples, the value of
  example i is its row's share of the paper's loss, so summing the rows gives it:

  .. math::
    \\frac{1}{b^2} \\sum_j (G^T_{ij} - G^S_{ij})^2, \\qquad
    \\sum_i \\cdot = \\frac{1}{b^2}\\|G^T - G^S\\|_F^2

  Invariant to a global rescaling of either model's features.

  Args:
    student_f: `[B, ...]` student features (flattened per example).
    teacher_f: `[B, ...]` teacher features, any width.
    where: optional boolean `[B]` mask of valid examples.

  Returns:
    `[B]` float32 per-example values (0 for masked examples).

  References:
    Tung & Mori, "Similarity-Preserving Knowledge Distillation", 2019.
  """
  student, teacher, mask = _examples(student_f, teacher_f, where)
  gram_s = _l2_normalize(_dot(student))
  gram_t = _l2_normalize(_dot(teacher))
  b = jnp.sum(mask, dtype=jnp.float32)
  values = jnp.sum(jnp.square(gram_t - gram_s), axis=-1) / jnp.maximum(b * b, 1.0)
  return _reduce.mask_outputs(values, mask)


def _huber(x: jax.Array) -> jax.Array:
  """Smooth L1 (Huber, delta = 1)."""
  abs_x = jnp.abs(x)
  return jnp.where(abs_x < 1.0, 0.5 * jnp.square(x), abs_x - 0.5)


def _pair_mask(mask: jax.Array) -> jax.Array:
  """`[B]` -> `[B, B]`: both valid and distinct."""
  return mask[:, None] & mask[None, :] & ~jnp.eye(mask.shape[0], dtype=bool)


def _normalized_distances(f: jax.Array, pairs: jax.Array) -> jax.Array:
  dist = jnp.where(pairs, _euclidean(f), 0.0)
  mean = jnp.sum(dist) / jnp.maximum(jnp.sum(pairs, dtype=jnp.float32), 1.0)
  return dist / jnp.maximum(mean, 1e-12)


def rkd_distance(
    student_f: ArrayLike, teacher_f: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  """RKD distance-wise loss: Huber between mean-normalized pairwise distances.

  :math:`\\psi_D(i, j) = \\|f_i - f_j\\| / \\mu` with μ the mean distance over the valid
  distinct pairs. The value of anchor i averages over the other valid examples j, so the
  masked mean over anchors is the mean over all ordered distinct pairs:

  .. math::
    \\frac{1}{b-1} \\sum_{j \\ne i} \\ell_{\\delta=1}\\big(\\psi_D^S(i,j) - \\psi_D^T(i,j)\\big)

  Invariant to a global rescaling of either model's features.

  Args:
    student_f: `[B, ...]` student features.
    teacher_f: `[B, ...]` teacher features, any width.
    where: optional boolean `[B]` mask of valid examples.

  Returns:
    `[B]` float32 per-anchor values (0 for masked examples).

  References:
    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.
  """
  student, teacher, mask = _examples(student_f, teacher_f, where)
  pairs = _pair_mask(mask)
  diff = _normalized_distances(student, pairs) - _normalized_distances(teacher, pairs)
  per_pair = jnp.where(pairs, _huber(diff), 0.0)
  others = jnp.maximum(jnp.sum(mask, dtype=jnp.float32) - 1.0, 1.0)
  return _reduce.mask_outputs(jnp.sum(per_pair, axis=-1) / others, mask)


def _angles(f: jax.Array, pairs: jax.Array) -> jax.Array:
  """`[B, B, B]`: cos of the angle at vertex i between f_j and f_k (0 if j or k invalid)."""
  unit_BxBxD = _l2_normalize(f[None, :, :] - f[:, None, :])
  unit_BxBxD = jnp.where(pairs[:, :, None], unit_BxBxD, 0.0)
  return jnp.einsum("ijd,ikd->ijk", unit_BxBxD, unit_BxBxD)


def rkd_angle(
    student_f: ArrayLike, teacher_f: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  """RKD angle-wise loss: Huber between the cosines of the angles of example triplets.

  :math:`\\psi_A(i, j, k) = \\langle e_{ij}, e_{ik} \\rangle` with
  :math:`e_{ij} = (f_j - f_i) / \\|f_j - f_i\\|`, the angle at vertex i. The value of
  vertex i averages over the valid j, k ≠ i:

  .. math::
    \\frac{1}{(b-1)^2} \\sum_{j, k \\ne i}
    \\ell_{\\delta=1}\\big(\\psi_A^S(i,j,k) - \\psi_A^T(i,j,k)\\big)

  Invariant to a global rescaling (and translation) of either model's features.

  Args:
    student_f: `[B, ...]` student features.
    teacher_f: `[B, ...]` teacher features, any width.
    where: optional boolean `[B]` mask of valid examples.

  Returns:
    `[B]` float32 per-vertex values (0 for masked examples).

  References:
    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.
  """
  student, teacher, mask = _examples(student_f, teacher_f, where)
  pairs = _pair_mask(mask)
  per_triplet = _huber(_angles(student, pairs) - _angles(teacher, pairs))
  others = jnp.maximum(jnp.sum(mask, dtype=jnp.float32) - 1.0, 1.0)
  return _reduce.mask_outputs(jnp.sum(per_triplet, axis=(-2, -1)) / jnp.square(others), mask)


def token_relation(
    student_h: ArrayLike,
    teacher_h: ArrayLike,
    *,
    where: ArrayLike | None = None,
    kind: str = "cosine",
) -> jax.Array:
  """Token-level relation loss: MSE between per-sequence token-token relation matrices.

  :math:`R = \\mathrm{relation\\_matrix}(h, kind)` is `[T, T]` per sequence; the value of
  token i of sequence b averages over the valid tokens j of that sequence:

  .. math::
    \\frac{1}{|V_b|} \\sum_{j \\in V_b} (R^S_{bij} - R^T_{bij})^2

  Args:
    student_h: `[B, T, Ds]` student hidden states.
    teacher_h: `[B, T, Dt]` teacher hidden states, any width.
    where: optional boolean `[B, T]` mask of valid tokens (applied to both rows and
      columns of the relation matrices).
    kind: relation kind, see :func:`relation_matrix`.

  Raises:
    ValueError: for an unknown ``kind``.

  Returns:
    `[B, T]` float32 per-token values (0 for masked tokens).

  References:
    Park et al., "Relational Knowledge Distillation", 2019; Wang et al., "MiniLMv2", 2021.
  """
  _reduce.check_choice("kind", kind, sorted(_RELATIONS))
  student, teacher = _sequence_pair_f32(student_h, teacher_h, "token_relation")
  mask = _reduce.mask_or_ones(where, student.shape[:2])
  rel_s = relation_matrix(_reduce.mask_inputs(student, mask), kind=kind)
  rel_t = relation_matrix(_reduce.mask_inputs(teacher, mask), kind=kind)
  keys_BxTxT = mask[:, None, :] & mask[:, :, None]
  sq = jnp.where(keys_BxTxT, jnp.square(rel_s - rel_t), 0.0)
  count_B = jnp.sum(mask, axis=-1, dtype=jnp.float32)
  values = jnp.sum(sq, axis=-1) / jnp.maximum(count_B, 1.0)[:, None]
  return _reduce.mask_outputs(values, mask)
