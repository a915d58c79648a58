"""Cross-tokenizer losses against a *cached* teacher: its top-k in its own vocabulary + a tail.

The teacher cache of a cross-tokenizer run stores, per teacher token, the teacher's top-K
ids (in the teacher's vocabulary ``Vt``), their log-probabilities at temperature 1 and the log
of the remaining mass (:mod:`distill_jax.losses._sparse`'s layout), gathered at the student's
span-final positions (``span_gather(..., teacher_index)``).  The student's distribution is
known in full, the teacher's only on its top-K; the unknown rest is one (or, for
:func:`sparse_hybrid_uld`, two) tail buckets:

* :func:`sparse_uld`: the K cached probabilities are the teacher's K largest, so its sorted
  vector starts with them exactly; the rest of it is unknown but sums to the tail mass τ.
  Over the positions past K the L1 distance is bounded below, tightly, by
  :math:`|\\sum_{j>K} p^{\\downarrow}_S(j) - τ|` (the triangle inequality, equal when every
  student entry there is on the same side of the teacher's), which is what is charged.
* :func:`sparse_hybrid_uld`: the exact KL over the shared tokens among the teacher's top-K,
  one bucket for the shared mass outside them (against the student's mass on the other shared
  tokens), and :func:`sparse_uld`'s form over the non-shared tokens.  The cache does not say how
  τ splits between shared and non-shared tokens; it is split as the uniform completion of the
  top-K would (τ spread evenly over the ``Vt - K`` other tokens, as the cache's evaluation
  completion does).

At temperature T the teacher is its bucket distribution (the K kept entries and the tail
bucket(s)) divided by T and renormalized, as in :mod:`distill_jax.losses._sparse`; the
student's full distribution is tempered exactly.  With K = Vt (``log_tail = -inf``) both
losses equal their dense forms (:func:`distill_jax.losses.uld`,
:func:`distill_jax.losses.hybrid_uld`) at every T.  All math is float32, values are
unreduced and multiplied by T², and ``where`` masks positions with exactly zero value and
zero gradient.  ``chunked_sparse_*`` take the student's final hidden states and unembedding
instead and never form `[tokens, Vs]` logits (:mod:`distill_jax.losses._vocab`'s chunk loop).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import _reduce
from distill_jax.losses import _vocab
from distill_jax.losses._sparse import _flat_teacher, _logsumexp_where


def _inputs(student_logits: ArrayLike, teacher_ids: ArrayLike, teacher_logprobs: ArrayLike,
            teacher_log_tail: ArrayLike, where: ArrayLike | None, temperature: float, what: str):
  """Flattened, masked float32 inputs: ``(log p_S [N, Vs], ids, logprobs, log_tail, mask [N], lead)``."""
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  z = jnp.asarray(student_logits)
  if z.ndim == 0:
    raise ValueError(f"{what}: student_logits must have a vocabulary axis [..., Vs]")
  lead, vocab = z.shape[:-1], z.shape[-1]
  # The ids index the teacher's vocabulary, not the student's: K is not bounded by Vs.
  ids_NxK, logprobs_NxK, log_tail_N = _flat_teacher(teacher_ids, teacher_logprobs, teacher_log_tail, lead, math.inf)
  n = math.prod(lead)
  mask_N = _reduce.mask_or_ones(where, lead).reshape(n)
  z_NxV = _reduce.mask_inputs(z.reshape(n, vocab).astype(jnp.float32), mask_N)
  logp_s_NxV = jax.nn.log_softmax(z_NxV / jnp.asarray(temperature, jnp.float32), axis=-1)
  ids_NxK = _reduce.mask_inputs(ids_NxK.astype(jnp.int32), mask_N)
  logprobs_NxK = _reduce.mask_inputs(logprobs_NxK.astype(jnp.float32), mask_N)
  log_tail_N = _reduce.mask_inputs(log_tail_N.astype(jnp.float32), mask_N)
  return logp_s_NxV, ids_NxK, logprobs_NxK, log_tail_N, mask_N, lead


def _tempered(buckets_NxB: jax.Array, temperature: float) -> jax.Array:
  """Log-probabilities of the teacher's bucket distribution at temperature T, `[N, B]`."""
  return jax.nn.log_softmax(buckets_NxB / jnp.asarray(temperature, jnp.float32), axis=-1)


def _sorted_desc(p_NxV: jax.Array, width: int) -> jax.Array:
  """``p`` sorted descending along the last axis, zero-padded to ``width``."""
  p = jnp.pad(p_NxV, [(0, 0), (0, max(0, width - p_NxV.shape[-1]))])
  return -jnp.sort(-p, axis=-1)


def _sorted_l1_with_tail(s_sorted_NxW: jax.Array, t_sorted_NxK: jax.Array, known_N: jax.Array,
                         tail_N: jax.Array) -> jax.Array:
  """``Σ_{j<n} |s_j − t_j| + |Σ_{j≥n} s_j − τ|``: L1 over the teacher's ``n = known_N`` known
  sorted entries, the bound of the rest against its tail mass ``τ = tail_N``, `[N]`."""
  width, k = s_sorted_NxW.shape[-1], t_sorted_NxK.shape[-1]
  t_NxW = jnp.pad(t_sorted_NxK, [(0, 0), (0, width - k)])
  known_NxW = jnp.arange(width)[None, :] < known_N[:, None]
  head_N = jnp.sum(jnp.where(known_NxW, jnp.abs(s_sorted_NxW - t_NxW), 0.0), axis=-1)
  rest_N = jnp.sum(jnp.where(known_NxW, 0.0, s_sorted_NxW), axis=-1)  # summed, never 1 − Σ (cancellation)
  return head_N + jnp.abs(rest_N - tail_N)


def sparse_uld(
    student_logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_log_tail: ArrayLike,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
  """ULD against a top-K teacher with a tail: L1 over the K known sorted entries + the tail bound, times T².

  With :math:`p^{\\downarrow}_S` the student's sorted probabilities (zero-padded to at least
  K), :math:`t^{\\downarrow}_{1..K}` the teacher's K kept probabilities sorted and τ its tail
  mass (the tempered bucket distribution):

  .. math::
    T^2 \\Big[ \\sum_{j=1}^{K} | p^{\\downarrow}_S(j) - t^{\\downarrow}(j) |
      + \\Big| \\sum_{j>K} p^{\\downarrow}_S(j) - τ \\Big| \\Big]

  the tight lower bound of :func:`uld` over every completion of the teacher's top-K; with
  K = Vt (``log_tail = -inf``) it equals ``uld(student_logits, teacher_logits)``.

  Args:
    student_logits: `[..., Vs]` student logits at the span-final positions.
    teacher_ids: `[..., K]` the teacher's top-K ids in its own vocabulary (distinct).
    teacher_logprobs: `[..., K]` their log-probabilities at temperature 1.
    teacher_log_tail: `[...]` log of the teacher's remaining mass (``-inf`` when K = Vt).
    temperature: T > 0 (the student exactly, the teacher's buckets; see the module docstring).
    where: optional boolean mask broadcastable to `[...]`; masked positions give 0.

  Returns:
    `[...]` float32 per-position distance.

  References:
    Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit
    Distillation Loss for LLMs", 2024.
  """
  logp_s, _, logprobs, log_tail, mask, lead = _inputs(student_logits, teacher_ids, teacher_logprobs,
                                                      teacher_log_tail, where, temperature, "sparse_uld")
  k = logprobs.shape[-1]
  t_NxKp1 = jnp.exp(_tempered(jnp.concatenate([logprobs, log_tail[:, None]], -1), temperature))
  s_sorted = _sorted_desc(jnp.exp(logp_s), max(logp_s.shape[-1], k))
  t_sorted = -jnp.sort(-t_NxKp1[:, :k], axis=-1)
  values = _sorted_l1_with_tail(s_sorted, t_sorted, jnp.full(mask.shape, k), t_NxKp1[:, k])
  values = values * jnp.square(jnp.asarray(temperature, jnp.float32))
  return _reduce.mask_outputs(values, mask).reshape(lead)


def _log_count(count: jax.Array) -> jax.Array:
  """``log(count)``, ``-inf`` at 0 (float32)."""
  count = jnp.asarray(count, jnp.float32)
  return jnp.where(count > 0, jnp.log(jnp.maximum(count, 1.0)), -jnp.inf)


def sparse_hybrid_uld(
    student_logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_log_tail: ArrayLike,
    *,
    student_shared_ids: ArrayLike,
    teacher_shared_ids: ArrayLike,
    teacher_vocab: int,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
  """:func:`hybrid_uld` against a top-K teacher with a tail, times T².

  With ``M`` the shared pairs ``(s_m, t_m)``, ``K_M`` / ``K_U`` the teacher's kept ids that are /
  are not shared, the tail τ split as the uniform completion would
  (:math:`τ_M = τ\\,|M \\setminus K_M| / (V_t - K)`, :math:`τ_U = τ - τ_M`) and the teacher
  tempered over its buckets (kept ids, :math:`τ_M`, :math:`τ_U`):

  .. math::
    T^2 \\Big[ w_m \\Big( \\sum_{t \\in K_M} p_T(t) \\log\\frac{p_T(t)}{p_S(s(t))}
      + τ_M \\log\\frac{τ_M}{p_S(M_S \\setminus s(K_M))} \\Big)
      + w_u \\Big( \\sum_{j \\le |K_U|} |\\tilde p^{\\downarrow}_S(j) - p^{\\downarrow}_{T,K_U}(j)|
      + \\Big|\\sum_{j > |K_U|} \\tilde p^{\\downarrow}_S(j) - τ_U\\Big| \\Big) \\Big]

  where :math:`\\tilde p_S` is the student's distribution with its shared entries set to 0.
  With K = Vt (``log_tail = -inf``) it equals ``hybrid_uld(student_logits, teacher_logits,
  ...)``; with one tokenizer on both sides (every id shared with itself) and T = 1 it is
  :func:`sparse_forward_kl` (which, at other T, tempers the student's buckets, not its distribution).

  Args:
    student_logits: `[..., Vs]` student logits at the span-final positions.
    teacher_ids: `[..., K]` the teacher's top-K ids in its own vocabulary (distinct, < ``teacher_vocab``).
    teacher_logprobs: `[..., K]` their log-probabilities at temperature 1.
    teacher_log_tail: `[...]` log of the teacher's remaining mass (``-inf`` when K = Vt).
    student_shared_ids: `[M]` student ids of the shared tokens (distinct, < Vs).
    teacher_shared_ids: `[M]` teacher ids of the same tokens, in the same order (distinct).
    teacher_vocab: the teacher's vocabulary size Vt (how many tokens the tail spreads over).
    temperature: T > 0.
    matched_weight: weight `w_m` of the KL over the shared tokens (>= 0).
    unmatched_weight: weight `w_u` of the ULD over the other tokens (>= 0).
    where: optional boolean mask broadcastable to `[...]`; masked positions give 0.

  Returns:
    `[...]` float32 per-position loss.

  References:
    Boizard et al., 2024 (ULD); Hugging Face TRL, GOLD trainer (hybrid ULD), 2025.
  """
  _reduce.check_range("matched_weight", matched_weight, low=0)
  _reduce.check_range("unmatched_weight", unmatched_weight, low=0)
  _reduce.check_positive_int("teacher_vocab", teacher_vocab)
  s_ids = jnp.asarray(student_shared_ids, jnp.int32)
  t_ids = jnp.asarray(teacher_shared_ids, jnp.int32)
  if s_ids.ndim != 1 or s_ids.shape != t_ids.shape:
    raise ValueError(f"sparse_hybrid_uld: student_shared_ids {s_ids.shape} and teacher_shared_ids {t_ids.shape} "
                     "must be equal-length 1-D id lists")
  logp_s, ids, logprobs, log_tail, mask, lead = _inputs(student_logits, teacher_ids, teacher_logprobs,
                                                        teacher_log_tail, where, temperature, "sparse_hybrid_uld")
  (n, vs), k = logp_s.shape, ids.shape[-1]
  if k > teacher_vocab:
    raise ValueError(f"sparse_hybrid_uld: K = {k} teacher entries exceed teacher_vocab = {teacher_vocab}")
  to_student_Vt = jnp.full((teacher_vocab,), -1, jnp.int32).at[t_ids].set(s_ids)
  mapped_NxK = to_student_Vt[ids]
  shared_NxK = mapped_NxK >= 0
  # The tail split as the uniform completion of the top-K would split it.
  unkept = teacher_vocab - k
  unkept_shared_N = s_ids.shape[0] - jnp.sum(shared_NxK, axis=-1)
  log_share = -math.log(max(unkept, 1))
  log_tail_m = log_tail + _log_count(unkept_shared_N) + log_share
  log_tail_u = log_tail + _log_count(unkept - unkept_shared_N) + log_share
  logp_t = _tempered(jnp.concatenate([logprobs, log_tail_m[:, None], log_tail_u[:, None]], -1), temperature)
  p_t = jnp.exp(logp_t)
  # KL over the kept shared tokens and the shared tail bucket.
  logp_s_kept = jnp.take_along_axis(logp_s, jnp.maximum(mapped_NxK, 0), axis=-1)
  shared_Vs = jnp.zeros((vs,), bool).at[s_ids].set(True)
  rows_Nx1 = jnp.arange(n)[:, None]
  kept_NxVs = jnp.zeros((n, vs), bool).at[rows_Nx1, jnp.where(shared_NxK, mapped_NxK, vs)].set(True, mode="drop")
  logp_s_rest = _logsumexp_where(logp_s, shared_Vs[None, :] & ~kept_NxVs)
  terms_NxKp1 = jnp.concatenate([logp_t[:, :k] - logp_s_kept, (logp_t[:, k] - logp_s_rest)[:, None]], -1)
  support_NxKp1 = jnp.concatenate([shared_NxK, jnp.ones((n, 1), bool)], -1) & (p_t[:, :k + 1] > 0)
  kl_N = jnp.sum(jnp.where(support_NxKp1, p_t[:, :k + 1] * jnp.where(support_NxKp1, terms_NxKp1, 0.0), 0.0), -1)
  # ULD over the non-shared tokens: the kept ones known, the rest against the non-shared tail.
  rest_s = _sorted_desc(jnp.where(shared_Vs[None, :], 0.0, jnp.exp(logp_s)), max(vs, k))
  rest_t = -jnp.sort(-jnp.where(shared_NxK, 0.0, p_t[:, :k]), axis=-1)
  uld_N = _sorted_l1_with_tail(rest_s, rest_t, k - jnp.sum(shared_NxK, axis=-1), p_t[:, k + 1])
  values = (matched_weight * kl_N + unmatched_weight * uld_N) * jnp.square(jnp.asarray(temperature, jnp.float32))
  return _reduce.mask_outputs(values, mask).reshape(lead)


def _chunked(sparse_fn, student_hidden: ArrayLike, student_unembed: ArrayLike, teacher_ids: ArrayLike,
             teacher_logprobs: ArrayLike, teacher_log_tail: ArrayLike, *, where: ArrayLike | None, chunk_size: int,
             student_bias: ArrayLike | None, student_softcap: Optional[float], vocab: Optional[int],
             ids: dict[str, jax.Array], **hyper) -> jax.Array:
  """``sparse_fn`` of the student's logits ``head(h)``, formed chunk by chunk (recomputed for the VJP)."""
  _reduce.check_positive_int("chunk_size", chunk_size)
  hs = jnp.asarray(student_hidden)
  head = _vocab._check_head("student", hs, _vocab.Head(student_unembed, student_bias, student_softcap))
  lead = hs.shape[:-1]
  vocab = _vocab._check_vocab(vocab, [head.kernel.shape[1]])
  flat = _flat_teacher(teacher_ids, teacher_logprobs, teacher_log_tail, lead, math.inf)
  k = flat[0].shape[-1]
  teacher = (flat[0].reshape(lead + (k,)), flat[1].reshape(lead + (k,)), flat[2].reshape(lead))
  mask = _reduce.mask_or_ones(where, lead)

  def loss(z, tokens, shared, mask):
    return sparse_fn(z, *tokens, where=mask, **shared, **hyper)

  return _vocab.chunked_student_values(loss, _reduce.mask_inputs(hs, mask), head, teacher, ids, mask,
                                       chunk_size=chunk_size, vocab=vocab)


def chunked_sparse_uld(
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_log_tail: ArrayLike,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    chunk_size: int = _vocab.DEFAULT_CHUNK_SIZE,
    student_bias: ArrayLike | None = None,
    student_softcap: Optional[float] = None,
    vocab: Optional[int] = None,
) -> jax.Array:
  """:func:`sparse_uld` of ``h_S @ W_S + b_S``, never materializing `[N, Vs]` logits.

  Equal (value and gradients w.r.t. hidden states, unembedding and bias) to
  ``sparse_uld(head(h_S), ids, logprobs, log_tail, ...)``; each chunk's logits are recomputed in
  the backward pass.

  Args:
    student_hidden: `[N, D]` or `[B, T, D]` final student hidden states.
    student_unembed: `[D, Vs]` student unembedding.
    teacher_ids, teacher_logprobs, teacher_log_tail: as in :func:`sparse_uld` (token axes of
      ``student_hidden``).
    temperature: T > 0.
    where: optional boolean mask broadcastable to the token axes.
    chunk_size: sequence positions per chunk (a positive integer).
    student_bias: optional `[Vs]` bias.
    student_softcap: optional final logit soft-capping.
    vocab: only the first ``vocab`` columns count (a padded vocabulary).

  Returns:
    `[N]` or `[B, T]` float32 per-position distance.
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  return _chunked(sparse_uld, student_hidden, student_unembed, teacher_ids, teacher_logprobs, teacher_log_tail,
                  where=where, chunk_size=chunk_size, student_bias=student_bias, student_softcap=student_softcap,
                  vocab=vocab, ids={}, temperature=temperature)


def chunked_sparse_hybrid_uld(
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_log_tail: ArrayLike,
    *,
    student_shared_ids: ArrayLike,
    teacher_shared_ids: ArrayLike,
    teacher_vocab: int,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    where: ArrayLike | None = None,
    chunk_size: int = _vocab.DEFAULT_CHUNK_SIZE,
    student_bias: ArrayLike | None = None,
    student_softcap: Optional[float] = None,
    vocab: Optional[int] = None,
) -> jax.Array:
  """:func:`sparse_hybrid_uld` of ``h_S @ W_S + b_S``, never materializing `[N, Vs]` logits.

  Equal (value and student gradients) to ``sparse_hybrid_uld(head(h_S), ids, logprobs, log_tail,
  ...)``; each chunk's logits are recomputed in the backward pass.

  Args:
    student_hidden: `[N, D]` or `[B, T, D]` final student hidden states.
    student_unembed: `[D, Vs]` student unembedding.
    teacher_ids, teacher_logprobs, teacher_log_tail: as in :func:`sparse_hybrid_uld`.
    student_shared_ids, teacher_shared_ids, teacher_vocab: as in :func:`sparse_hybrid_uld`.
    temperature, matched_weight, unmatched_weight: as in :func:`sparse_hybrid_uld`.
    where: optional boolean mask broadcastable to the token axes.
    chunk_size: sequence positions per chunk (a positive integer).
    student_bias: optional `[Vs]` bias.
    student_softcap: optional final logit soft-capping.
    vocab: only the first ``vocab`` columns count (a padded vocabulary).

  Returns:
    `[N]` or `[B, T]` float32 per-position loss.
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  ids = {"student_shared_ids": jnp.asarray(student_shared_ids, jnp.int32),
         "teacher_shared_ids": jnp.asarray(teacher_shared_ids, jnp.int32)}
  return _chunked(sparse_hybrid_uld, student_hidden, student_unembed, teacher_ids, teacher_logprobs,
                  teacher_log_tail, where=where, chunk_size=chunk_size, student_bias=student_bias,
                  student_softcap=student_softcap, vocab=vocab, ids=ids, teacher_vocab=teacher_vocab,
                  temperature=temperature, matched_weight=matched_weight, unmatched_weight=unmatched_weight)
