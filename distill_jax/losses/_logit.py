"""Logit distillation: divergences between teacher and student output distributions.

Every divergence takes ``student_logits [..., V]`` and a teacher given either as full
logits ``[..., V]`` or as a top-k pair ``(top_k_logits [..., K], top_k_indices [..., K])``
(an offline teacher cache).  With a top-k teacher both distributions are restricted to
the teacher's support and renormalized over it: the teacher is ``softmax(top_k_logits / T)``
and the student is ``softmax(student_logits[..., top_k_indices] / T)``.  This keeps every
divergence a divergence between two proper distributions over the same K outcomes
(KL(p‖p)=0 holds, and with K=V it is exactly the full-vocabulary loss); the price is that
student mass outside the teacher's top-k is not penalized.

All math is float32 whatever the input dtype; values are unreduced over the vocab axis
(``[..., V] -> [...]``), multiplied by ``temperature**2`` (Hinton et al., 2015) so that
gradient magnitudes do not shrink with the temperature; ``where`` masks positions with
exactly zero value and zero gradient.

Hyperparameters (``temperature`` > 0, ``beta`` in [0, 1], ``skew`` in [0, 1),
``label_smoothing`` in [0, 1)) given as Python numbers raise a one-line ``ValueError``
outside their range.  A jax array (a traced value, e.g. a temperature schedule's output) is
unchecked; for every valid value it gives the same result as the equal Python float.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import _reduce

Teacher = Union[ArrayLike, tuple[ArrayLike, ArrayLike]]


def _kl(logp_x: jax.Array, logp_y: jax.Array) -> jax.Array:
  """KL(p_x‖p_y) over the last axis from log-probabilities, with 0·log 0 = 0."""
  p_x = jnp.exp(logp_x)
  support = p_x != 0  # NaN stays in: a non-finite teacher must not silently give 0
  log_ratio = jnp.where(support, logp_x - logp_y, 0.0)
  return jnp.sum(jnp.where(support, p_x * log_ratio, 0.0), axis=-1)


def _kl_to_mixture(logp_x: jax.Array, logp_y: jax.Array, weight_x: float) -> jax.Array:
  """KL(p_x ‖ w·p_x + (1-w)·p_y) over the last axis, from log-probabilities.

  Uses ``log M - log p_x = logaddexp(log w, log(1-w) + log p_y - log p_x)``, which is
  accurate even when the divergence is tiny (w close to 0 or 1).
  """
  weight_x = jnp.asarray(weight_x, jnp.float32)
  p_x = jnp.exp(logp_x)
  support = p_x != 0  # NaN stays in: a non-finite teacher must not silently give 0
  log_ratio = jnp.where(support, logp_y - logp_x, 0.0)
  log_mix_over_x = jnp.logaddexp(jnp.log(weight_x), jnp.log1p(-weight_x) + log_ratio)
  return -jnp.sum(jnp.where(support, p_x * log_mix_over_x, 0.0), axis=-1)


def _log_probs(
    student_logits: ArrayLike, teacher: Teacher, temperature: float, where: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Masked, temperature-scaled f32 log-probabilities of student and teacher.

  Handles the top-k teacher (restrict the student to the teacher's support, renormalize
  both) so that every divergence treats both teacher forms uniformly.
  """
  student = jnp.asarray(student_logits, jnp.float32)
  mask = _reduce.broadcast_mask(where, student.shape[:-1])
  student = _reduce.mask_inputs(student, mask)
  if isinstance(teacher, tuple):
    if len(teacher) != 2:
      raise ValueError("a top-k teacher must be the pair (top_k_logits, top_k_indices)")
    teacher_logits = jnp.asarray(teacher[0], jnp.float32)
    indices = jnp.asarray(teacher[1])
    if teacher_logits.shape != indices.shape or indices.shape[:-1] != student.shape[:-1]:
      raise ValueError(
          f"top-k teacher shapes {teacher_logits.shape} / {indices.shape} do not match "
          f"student_logits {student.shape} (expected [..., K] with the student's leading axes)")
    indices = _reduce.mask_inputs(indices, mask)
    student = jnp.take_along_axis(student, indices, axis=-1)
  else:
    teacher_logits = jnp.asarray(teacher, jnp.float32)
    if teacher_logits.shape != student.shape:
      raise ValueError(
          f"teacher_logits shape {teacher_logits.shape} != student_logits shape "
          f"{student.shape}: teacher and student must share the vocabulary")
  teacher_logits = _reduce.mask_inputs(teacher_logits, mask)
  inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)
  logp_s = jax.nn.log_softmax(student * inv_t, axis=-1)
  logp_t = jax.nn.log_softmax(teacher_logits * inv_t, axis=-1)
  return logp_s, logp_t, mask


def _divergence(
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    student_logits: ArrayLike,
    teacher: Teacher,
    temperature: float,
    where: ArrayLike | None,
) -> jax.Array:
  """Checks ``temperature``, applies ``fn(logp_student, logp_teacher)``, scales by T², masks."""
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  logp_s, logp_t, mask = _log_probs(student_logits, teacher, temperature, where)
  values = fn(logp_s, logp_t) * jnp.square(jnp.asarray(temperature, jnp.float32))
  return _reduce.mask_outputs(values, mask)


def forward_kl(
    student_logits: ArrayLike,
    teacher_logits: Teacher,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
  """Forward KL divergence KL(p_T‖p_S) of softened distributions, times T².

  .. math::
    T^2 \\sum_v p_T(v) (\\log p_T(v) - \\log p_S(v)),\\quad p = \\mathrm{softmax}(z / T)

  Worked example of the method's reference text: teacher ``[0.8, 0.2]`` against student
  ``[0.7, 0.3]`` (pass ``log p`` as logits) gives 0.0257321 — the value of
  ``scipy.stats.entropy([0.8, 0.2], [0.7, 0.3])`` — not the 0.0201358 that text prints.

  Args:
    student_logits: `[..., V]` student logits, any float dtype.
    teacher_logits: `[..., V]` teacher logits, or a top-k pair
      ``(top_k_logits [..., K], top_k_indices [..., K])`` (see the module docstring).
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`; masked positions give 0.

  Returns:
    `[...]` float32 per-position divergence.

  References:
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
  """
  return _divergence(lambda s, t: _kl(t, s), student_logits, teacher_logits, temperature, where)


def reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: Teacher,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
  """Reverse (mode-seeking) KL divergence KL(p_S‖p_T), times T².

  .. math::
    T^2 \\sum_v p_S(v) (\\log p_S(v) - \\log p_T(v))

  It is +inf where the teacher puts exactly zero mass (``-inf`` teacher logits) on a
  class the student supports; a teacher one-hot given by finite logits (e.g. ±1e4) is
  finite. Use :func:`skew_reverse_kl` for a bounded alternative.

  Args:
    student_logits: `[..., V]` student logits.
    teacher_logits: `[..., V]` teacher logits or a top-k pair (see module docstring).
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`.

  Returns:
    `[...]` float32 per-position divergence.

  References:
    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", 2024.
  """
  return _divergence(_kl, student_logits, teacher_logits, temperature, where)


def generalized_jsd(
    student_logits: ArrayLike,
    teacher_logits: Teacher,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    normalized: bool = False,
) -> jax.Array:
  """Generalized Jensen-Shannon divergence (GKD, TRL ``GKDTrainer`` convention), times T².

  With the mixture :math:`M = \\beta p_T + (1-\\beta) p_S`:

  .. math::
    \\mathrm{JSD}_\\beta = \\beta\\,KL(p_T\\|M) + (1-\\beta)\\,KL(p_S\\|M)

  ``beta=0`` is *defined* as forward KL(p_T‖p_S) and ``beta=1`` as reverse KL(p_S‖p_T),
  exactly. Note that the interior formula tends to 0 at both ends (it is
  :math:`\\approx \\beta KL(p_T\\|p_S)` near 0), so the unnormalized loss jumps at the
  endpoints. ``normalized=True`` divides the interior by :math:`\\beta(1-\\beta)`, which is
  continuous: it tends to forward KL as β→0 and reverse KL as β→1. ``beta`` may be a
  traced scalar: it selects the exact ends with ``jnp.where`` (a Python float selects them
  statically), so both give the same result for every β in [0, 1].

  Args:
    student_logits: `[..., V]` student logits.
    teacher_logits: `[..., V]` teacher logits or a top-k pair (see module docstring).
    beta: mixture weight of the teacher, in [0, 1]; a jax array is not checked (values
      outside act as the nearest end).
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`.
    normalized: divide the interior value by β(1-β).

  Returns:
    `[...]` float32 per-position divergence.

  References:
    Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), 2024.
  """
  _reduce.check_range("beta", beta, low=0, high=1)
  _reduce.check_choice("normalized", normalized, (False, True))
  static = _reduce.is_static(beta)

  def jsd(s: jax.Array, t: jax.Array) -> jax.Array:
    if static and beta == 0:
      return _kl(t, s)
    if static and beta == 1:
      return _kl(s, t)
    b = jnp.asarray(beta, jnp.float32)
    # Keep the interior branch finite at the ends when beta is traced.
    b_in = jnp.clip(b, 1e-12, 1.0 - 1e-7)
    interior = b_in * _kl_to_mixture(t, s, b_in) + (1.0 - b_in) * _kl_to_mixture(s, t, 1.0 - b_in)
    if normalized:
      interior = interior / (b_in * (1.0 - b_in))
    if static:
      return interior
    return jnp.where(b <= 0, _kl(t, s), jnp.where(b >= 1, _kl(s, t), interior))

  return _divergence(jsd, student_logits, teacher_logits, temperature, where)


def skew_kl(
    student_logits: ArrayLike,
    teacher_logits: Teacher,
    *,
    skew: float = 0.1,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
  """Skew KL divergence KL(p_T ‖ α p_T + (1-α) p_S), times T² (α = ``skew``).

  .. math::
    T^2\\,KL\\big(p_T \\,\\|\\, \\alpha p_T + (1-\\alpha) p_S\\big)

  Zero when p_S = p_T; ``skew=0`` is forward KL.

  Args:
    student_logits: `[..., V]` student logits.
    teacher_logits: `[..., V]` teacher logits or a top-k pair (see module docstring).
    skew: α in [0, 1), the teacher's weight in the skewed student distribution (α = 1
      would make the loss identically 0); a jax array is not checked.
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`.

  Returns:
    `[...]` float32 per-position divergence.

  References:
    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", 2024.
  """
  _reduce.check_range("skew", skew, low=0, high=1, high_open=True)
  return _divergence(
      lambda s, t: _kl_to_mixture(t, s, skew), student_logits, teacher_logits, temperature, where)


def skew_reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: Teacher,
    *,
    skew: float = 0.1,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
  """Skew reverse KL divergence KL(p_S ‖ (1-α) p_T + α p_S), times T² (α = ``skew``).

  .. math::
    T^2\\,KL\\big(p_S \\,\\|\\, (1-\\alpha) p_T + \\alpha p_S\\big)

  Zero when p_S = p_T; ``skew=0`` is reverse KL.

  Args:
    student_logits: `[..., V]` student logits.
    teacher_logits: `[..., V]` teacher logits or a top-k pair (see module docstring).
    skew: α in [0, 1), the student's weight in the skewed teacher distribution (α = 1
      would make the loss identically 0); a jax array is not checked.
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`.

  Returns:
    `[...]` float32 per-position divergence.

  References:
    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", 2024.
  """
  _reduce.check_range("skew", skew, low=0, high=1, high_open=True)
  return _divergence(
      lambda s, t: _kl_to_mixture(s, t, skew), student_logits, teacher_logits, temperature, where)


def total_variation(
    student_logits: ArrayLike,
    teacher_logits: Teacher,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
  """Total variation distance between teacher and student distributions, times T².

  .. math::
    \\frac{T^2}{2} \\sum_v |p_T(v) - p_S(v)|

  The T² factor is applied for uniformity with the other logit losses.

  Args:
    student_logits: `[..., V]` student logits.
    teacher_logits: `[..., V]` teacher logits or a top-k pair (see module docstring).
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`.

  Returns:
    `[...]` float32 per-position distance in [0, T²].

  References:
    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation", 2023.
  """
  return _divergence(
      lambda s, t: 0.5 * jnp.sum(jnp.abs(jnp.exp(t) - jnp.exp(s)), axis=-1),
      student_logits, teacher_logits, temperature, where)


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """Cross-entropy against hard integer labels, with optional label smoothing.

  With ε = ``label_smoothing`` the target is ``(1-ε)·onehot(y) + ε/V``:

  .. math::
    -(1-\\varepsilon) \\log p(y) - \\frac{\\varepsilon}{V} \\sum_v \\log p(v)

  Ignored tokens (e.g. label -100) are excluded through ``where``; their labels may be
  out of range.

  Args:
    logits: `[..., V]` logits.
    labels: `[...]` integer class indices.
    where: optional boolean mask broadcastable to `[...]`.
    label_smoothing: ε in [0, 1); a jax array is not checked.

  Returns:
    `[...]` float32 per-position loss.

  References:
    Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", 2016.
  """
  _reduce.check_range("label_smoothing", label_smoothing, low=0, high=1, high_open=True)
  logits = jnp.asarray(logits, jnp.float32)
  mask = _reduce.broadcast_mask(where, logits.shape[:-1])
  logits = _reduce.mask_inputs(logits, mask)
  labels = _reduce.mask_inputs(jnp.asarray(labels), mask)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  eps = label_smoothing
  if _reduce.is_static(eps) and not eps:
    return _reduce.mask_outputs(nll, mask)
  smoothed = (1.0 - eps) * nll - eps * jnp.mean(logp, axis=-1)
  if not _reduce.is_static(eps):
    # A traced ε = 0 must equal the static 0 also where logp holds -inf (0 · -inf is NaN).
    smoothed = jnp.where(eps == 0, nll, smoothed)
  return _reduce.mask_outputs(smoothed, mask)
