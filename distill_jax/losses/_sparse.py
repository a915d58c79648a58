"""Sparse logit distillation against a top-k teacher with a tail bucket (an offline cache).

The teacher is stored per token as ``(ids [..., K], logprobs [..., K], log_tail [...])``: its
top-K token ids, their log-probabilities at temperature 1 (natural log, full-vocabulary
softmax) and the log of the remaining mass ``log(1 - Σ p_topk)`` (``-inf`` when K = V).
Both distributions are compared over K+1 buckets, the K kept tokens and one tail bucket
holding every other token:

* student: :math:`\\log q_i = z_{ids_i} - \\mathrm{lse}(z)` and
  :math:`\\log q_{tail} = \\mathrm{lse}(z_{v \\notin ids}) - \\mathrm{lse}(z)`, the tail summed
  directly over the other tokens (never as :math:`\\log(1 - \\sum_i q_i)`, which cancels
  catastrophically when the tail is small);
* teacher: ``(logprobs, log_tail)`` renormalized over the K+1 buckets (stored values may be
  quantized).

The temperature acts on the bucket distributions: both sides' bucket log-probabilities are
divided by T and renormalized, and values are multiplied by T², the divergences of
:mod:`distill_jax.losses._logit` being applied to the buckets.  At T = 1 the forward KL is
the exact "top-k + tail" KL; with K = V (tail ``-inf``) each loss equals its dense
full-vocabulary form at every T.  Unlike ``_logit``'s renormalized top-k teacher, student
mass outside the teacher's top-k is penalized (it lands in the tail bucket).

``sparse_*`` take student logits `[..., V]` of any float dtype and run over chunks of
``chunk_size`` tokens (``lax.map`` over dynamic slices of the unpadded logits, rematerialized
in the backward pass), casting each chunk to float32 inside, so no float32 `[tokens, V]`
array (nor a padded copy of the logits) exists at once.  ``chunked_sparse_*``
take the student's final hidden states and unembedding instead and never form `[tokens, V]`
logits (the recomputing custom VJP of :mod:`distill_jax.losses._vocab`).  Teacher ids must
be distinct and in ``[0, V)`` at unmasked positions.  ``where`` masks positions with exactly
zero value and zero gradient, whatever (even NaN or out-of-range) inputs they hold.
Hyperparameters are checked as in :mod:`distill_jax.losses._logit`; ``chunk_size`` must be a
positive Python integer.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import _logit
from distill_jax.losses import _reduce
from distill_jax.losses import _vocab

DEFAULT_CHUNK_SIZE = 512  # tokens per chunk of the sparse_* losses of logits

# (student bucket logits [N, K+1], teacher bucket log-probs [N, K+1], where=mask [N]) -> [N]:
# a dense divergence of :mod:`_logit` with its hyperparameters bound.
Divergence = Callable[..., jax.Array]
# (ids [N, K], logprobs [N, K], log_tail [N])
SparseTeacher = tuple[jax.Array, jax.Array, jax.Array]


def _logsumexp_where(x_NxV: jax.Array, keep_NxV: jax.Array) -> jax.Array:
  """logsumexp over the kept entries of the last axis, `[N, V] -> [N]`.

  ``-inf`` with zero gradient (not NaN) where nothing is kept or every kept entry is -inf.
  """
  x = jnp.where(keep_NxV, x_NxV, -jnp.inf)
  top_N = jax.lax.stop_gradient(jnp.max(x, axis=-1))
  top_N = jnp.where(jnp.isfinite(top_N), top_N, 0.0)
  total_N = jnp.sum(jnp.exp(x - top_N[:, None]), axis=-1)
  some = total_N > 0
  return jnp.where(some, jnp.log(jnp.where(some, total_N, 1.0)) + top_N, -jnp.inf)


def _student_buckets(z_NxV: jax.Array, ids_NxK: jax.Array) -> jax.Array:
  """Student bucket log-probabilities up to a per-token shift, `[N, V] -> [N, K+1]`.

  The kept tokens' logits and the logsumexp of all other logits (the tail bucket); the
  shift (``logsumexp(z)``) cancels in the renormalization of the divergence.
  """
  rows_Nx1 = jnp.arange(z_NxV.shape[0])[:, None]
  kept_NxV = jnp.zeros(z_NxV.shape, bool).at[rows_Nx1, ids_NxK].set(True)
  tail_N = _logsumexp_where(z_NxV, ~kept_NxV)
  return jnp.concatenate([jnp.take_along_axis(z_NxV, ids_NxK, axis=-1), tail_N[:, None]], -1)


def _chunk_loss(
    divergence: Divergence, z_NxV: jax.Array, teacher: SparseTeacher, mask_N: jax.Array
) -> jax.Array:
  """Per-token bucket divergence `[N]` of one chunk of student logits (any float dtype)."""
  ids_NxK, logprobs_NxK, log_tail_N = teacher
  z_NxV = _reduce.mask_inputs(z_NxV.astype(jnp.float32), mask_N)
  ids_NxK = _reduce.mask_inputs(ids_NxK, mask_N)
  teacher_NxKp1 = jnp.concatenate(
      [logprobs_NxK.astype(jnp.float32), log_tail_N.astype(jnp.float32)[:, None]], axis=-1)
  # The dense divergence masks the teacher, divides both by T, renormalizes, scales by T².
  return divergence(_student_buckets(z_NxV, ids_NxK), teacher_NxKp1, where=mask_N)


def _flat_teacher(
    teacher_ids: ArrayLike, teacher_logprobs: ArrayLike, teacher_log_tail: ArrayLike,
    lead: tuple[int, ...], vocab: int,
) -> SparseTeacher:
  """Checks the teacher against the student's leading axes and flattens the tokens."""
  ids = jnp.asarray(teacher_ids)
  logprobs = jnp.asarray(teacher_logprobs)
  log_tail = jnp.asarray(teacher_log_tail)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"teacher_ids: dtype {ids.dtype} must be an integer dtype")
  if logprobs.shape != ids.shape:
    raise ValueError(f"teacher_logprobs shape {logprobs.shape} != teacher_ids shape {ids.shape}")
  if ids.ndim == 0 or ids.shape[:-1] != lead:
    raise ValueError(
        f"teacher_ids shape {ids.shape} must be [..., K] with the student's leading axes {lead}")
  if log_tail.shape != lead:
    raise ValueError(
        f"teacher_log_tail shape {log_tail.shape} must be the student's leading axes {lead}")
  k = ids.shape[-1]
  if k > vocab:
    raise ValueError(f"teacher_ids: K = {k} exceeds the vocabulary size V = {vocab}")
  n = math.prod(lead)
  return ids.reshape(n, k), logprobs.reshape(n, k), log_tail.reshape(n)


def _sparse_loss(
    divergence: Divergence,
    student_logits: ArrayLike,
    teacher_ids: ArrayLike, teacher_logprobs: ArrayLike, teacher_log_tail: ArrayLike,
    *,
    where: ArrayLike | None,
    chunk_size: int,
) -> jax.Array:
  """Flattens the tokens of `[..., V]` logits and maps the bucket divergence over chunks."""
  _reduce.check_positive_int("chunk_size", chunk_size)
  z = jnp.asarray(student_logits)
  if z.ndim == 0:
    raise ValueError("student_logits must have a vocabulary axis [..., V]")
  lead, vocab = z.shape[:-1], z.shape[-1]
  teacher = _flat_teacher(teacher_ids, teacher_logprobs, teacher_log_tail, lead, vocab)
  n = math.prod(lead)
  if n == 0:
    return jnp.zeros(lead, jnp.float32)
  mask_N = _reduce.mask_or_ones(where, lead).reshape(n)
  tokens = (z.reshape(n, vocab), teacher, mask_N)
  chunk = min(chunk_size, n)
  num_chunks = -(-n // chunk)

  # Each chunk is a dynamic slice of the (unpadded, uncopied) inputs; the last one is moved
  # back to end at token n and its rows already covered are dropped below.  Remat: the
  # backward pass recomputes a chunk from its start instead of keeping its intermediates.
  @jax.checkpoint
  def chunk_values(start):
    xs = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk), tokens)
    return _chunk_loss(divergence, *xs)

  values = jax.lax.map(chunk_values, jnp.minimum(jnp.arange(num_chunks) * chunk, n - chunk))
  overlap = num_chunks * chunk - n
  return jnp.concatenate([values[:-1].reshape(-1), values[-1, overlap:]]).reshape(lead)


def _chunked_sparse_loss(
    divergence: Divergence,
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_ids: ArrayLike, teacher_logprobs: ArrayLike, teacher_log_tail: ArrayLike,
    *,
    where: ArrayLike | None,
    chunk_size: int,
    student_bias: ArrayLike | None,
    student_softcap: Optional[float] = None,
    vocab: Optional[int] = None,
) -> jax.Array:
  """The bucket divergence of ``head(h)`` over chunks, recomputing logits for the VJP."""
  _reduce.check_positive_int("chunk_size", chunk_size)
  hs = jnp.asarray(student_hidden)
  head = _vocab._check_head("student", hs, _vocab.Head(student_unembed, student_bias, student_softcap))
  lead, width = hs.shape[:-1], head.kernel.shape[1]
  vocab = _vocab._check_vocab(vocab, [width])
  teacher = _flat_teacher(teacher_ids, teacher_logprobs, teacher_log_tail, lead, vocab or width)
  k = teacher[0].shape[-1]
  teacher = (teacher[0].reshape(lead + (k,)), teacher[1].reshape(lead + (k,)), teacher[2].reshape(lead))
  mask = _reduce.mask_or_ones(where, lead)

  def loss(z, tokens, shared, mask):
    del shared
    rows = z.shape[:-1]
    flat = jax.tree.map(lambda x: x.reshape((math.prod(rows),) + x.shape[len(rows):]), (z, tokens, mask))
    return _chunk_loss(divergence, *flat).reshape(rows)

  return _vocab.chunked_student_values(loss, _reduce.mask_inputs(hs, mask), head, teacher, (), mask,
                                       chunk_size=chunk_size, vocab=vocab)


def chunked_top_k_teacher(
    hidden: ArrayLike,
    unembed: ArrayLike,
    *,
    top_k: int,
    bias: ArrayLike | None = None,
    softcap: Optional[float] = None,
    vocab: Optional[int] = None,
    chunk_size: int = _vocab.DEFAULT_CHUNK_SIZE,
) -> SparseTeacher:
  """A live teacher's exact top-k ``(ids, logprobs, log_tail)`` from its hidden states, chunked.

  The same numbers as ``cache_codec.top_k_teacher(head(h)[..., :vocab], top_k)``: ids sorted
  ascending, their float32 log-probabilities, and the log of the mass outside them (``-inf``
  when k = vocab), without forming `[tokens, V]` logits.  No gradient flows.

  Args:
    hidden: `[N, D]` or `[B, T, D]` final teacher hidden states.
    unembed: `[D, V]` teacher unembedding.
    top_k: entries to keep, an integer in ``[1, vocab]``.
    bias: optional `[V]` bias.
    softcap: optional final logit soft-capping.
    vocab: only the first ``vocab`` columns count.
    chunk_size: sequence positions per chunk.

  Returns:
    ``(ids [..., k] int32, logprobs [..., k] float32, log_tail [...] float32)``.
  """
  hs = jax.lax.stop_gradient(jnp.asarray(hidden))
  head = _vocab._check_head("teacher", hs, _vocab.Head(unembed, bias, softcap))
  head = _vocab.Head(*jax.lax.stop_gradient((head.kernel, head.bias)), head.softcap)
  width = head.kernel.shape[1]
  vocab = _vocab._check_vocab(vocab, [width])
  real = vocab or width
  _check_top_k(top_k, real)
  lead = hs.shape[:-1]

  def chunk(h):
    z = _vocab.head_logits(h, head, vocab)
    logprobs = jax.nn.log_softmax(z, axis=-1)
    vals, ids = jax.lax.top_k(logprobs, top_k)
    order = jnp.argsort(ids, axis=-1)
    ids, vals = jnp.take_along_axis(ids, order, -1).astype(jnp.int32), jnp.take_along_axis(vals, order, -1)
    rows = math.prod(ids.shape[:-1])
    flat_ids = ids.reshape(rows, top_k)
    kept = jnp.zeros((rows, width), bool).at[jnp.arange(rows)[:, None], flat_ids].set(True)
    kept = kept.reshape(z.shape) | (jnp.arange(width) >= real)
    log_tail = jax.nn.logsumexp(jnp.where(kept, -jnp.inf, z), axis=-1) - jax.nn.logsumexp(z, axis=-1)
    return ids, vals, log_tail

  return _vocab.map_chunks(chunk, hs, lead, chunk_size)


def sparse_forward_kl(
    student_logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_log_tail: ArrayLike,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
  """Forward KL(p_T‖q_S)·T² over the teacher's top-K tokens and one tail bucket.

  With the buckets :math:`b \\in \\{ids_1, \\dots, ids_K, \\mathrm{tail}\\}` and the
  tempered bucket distributions :math:`\\tilde p = \\mathrm{softmax}(\\log p_b / T)`:

  .. math::
    T^2 \\sum_b \\tilde p_T(b) (\\log \\tilde p_T(b) - \\log \\tilde q_S(b)),\\quad
    q_S(\\mathrm{tail}) = \\sum_{v \\notin ids} \\mathrm{softmax}(z)_v

  At T = 1 this is the exact top-k + tail KL; with K = V (``log_tail = -inf``) it equals
  ``forward_kl(student_logits, teacher_logits, temperature=T)``.

  Args:
    student_logits: `[..., V]` student logits, any float dtype (cast to float32 per chunk).
    teacher_ids: `[..., K]` integer ids of the teacher's top-K tokens (distinct, in [0, V)).
    teacher_logprobs: `[..., K]` their teacher log-probabilities at temperature 1.
    teacher_log_tail: `[...]` log of the teacher's remaining mass, ``-inf`` when K = V.
    temperature: bucket temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`; masked positions give 0.
    chunk_size: tokens per chunk (a positive integer); the token count need not be
      divisible by it.

  Returns:
    `[...]` float32 per-position divergence.

  References:
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015;
    Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in
    LLMs", 2025 (cached top-k teachers and their bias).
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  return _sparse_loss(
      functools.partial(_logit.forward_kl, temperature=temperature), student_logits,
      teacher_ids, teacher_logprobs, teacher_log_tail, where=where, chunk_size=chunk_size)


def sparse_reverse_kl(
    student_logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_log_tail: ArrayLike,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
  """Reverse KL(q_S‖p_T)·T² over the teacher's top-K tokens and one tail bucket.

  .. math::
    T^2 \\sum_b \\tilde q_S(b) (\\log \\tilde q_S(b) - \\log \\tilde p_T(b))

  It is +inf where the teacher puts exactly zero mass on a bucket the student supports
  (e.g. ``log_tail = -inf`` with K < V), as the dense :func:`reverse_kl`.

  Args:
    student_logits: `[..., V]` student logits, any float dtype.
    teacher_ids: `[..., K]` integer ids of the teacher's top-K tokens.
    teacher_logprobs: `[..., K]` their teacher log-probabilities at temperature 1.
    teacher_log_tail: `[...]` log of the teacher's remaining mass.
    temperature: bucket temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`.
    chunk_size: tokens per chunk (a positive integer).

  Returns:
    `[...]` float32 per-position divergence.

  References:
    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", 2024.
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  return _sparse_loss(
      functools.partial(_logit.reverse_kl, temperature=temperature), student_logits,
      teacher_ids, teacher_logprobs, teacher_log_tail, where=where, chunk_size=chunk_size)


def _jsd(beta: float, temperature: float, normalized: bool) -> Divergence:
  """Checks the generalized JSD's hyperparameters and binds them."""
  _reduce.check_range("beta", beta, low=0, high=1)
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  _reduce.check_choice("normalized", normalized, (False, True))
  return functools.partial(
      _logit.generalized_jsd, beta=beta, temperature=temperature, normalized=normalized)


def sparse_generalized_jsd(
    student_logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_log_tail: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    normalized: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
  """Generalized JSD·T² (see :func:`generalized_jsd`) over top-K tokens and a tail bucket.

  With the bucket mixture :math:`M = \\beta \\tilde p_T + (1-\\beta) \\tilde q_S`:

  .. math::
    T^2 \\big(\\beta\\,KL(\\tilde p_T\\|M) + (1-\\beta)\\,KL(\\tilde q_S\\|M)\\big)

  ``beta=0`` is exactly :func:`sparse_forward_kl` and ``beta=1`` :func:`sparse_reverse_kl`.

  Args:
    student_logits: `[..., V]` student logits, any float dtype.
    teacher_ids: `[..., K]` integer ids of the teacher's top-K tokens.
    teacher_logprobs: `[..., K]` their teacher log-probabilities at temperature 1.
    teacher_log_tail: `[...]` log of the teacher's remaining mass.
    beta: mixture weight of the teacher, in [0, 1]; a jax array is not checked.
    temperature: bucket temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to `[...]`.
    normalized: divide the interior value by β(1-β) (continuous at the ends).
    chunk_size: tokens per chunk (a positive integer).

  Returns:
    `[...]` float32 per-position divergence.

  References:
    Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), 2024.
  """
  return _sparse_loss(
      _jsd(beta, temperature, normalized), student_logits,
      teacher_ids, teacher_logprobs, teacher_log_tail, where=where, chunk_size=chunk_size)


def chunked_sparse_forward_kl(
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
  """:func:`sparse_forward_kl` of ``h_S @ W_S + b_S``, never materializing `[N, V]` logits.

  Equal (value and gradients w.r.t. hidden states, unembedding and bias) to
  ``sparse_forward_kl(h_S @ W_S + b_S, ids, logprobs, log_tail, ...)``, with temporary
  memory O(chunk_size · V); each chunk's logits are recomputed in the backward pass.

  .. math::
    T^2 \\sum_b \\tilde p_T(b) (\\log \\tilde p_T(b) - \\log \\tilde q_S(b)),\\quad
    q_S = \\mathrm{softmax}(h_S W_S + b_S)

  Args:
    student_hidden: `[N, D]` or `[B, T, D]` final student hidden states.
    student_unembed: `[D, V]` student unembedding (LM head) matrix.
    teacher_ids: `[N, K]` or `[B, T, K]` integer ids of the teacher's top-K tokens.
    teacher_logprobs: same shape, their teacher log-probabilities at temperature 1.
    teacher_log_tail: `[N]` or `[B, T]` log of the teacher's remaining mass.
    temperature: bucket temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to the token axes.
    chunk_size: sequence positions per chunk (a positive integer).
    student_bias: optional `[V]` student unembedding bias (differentiated).
    student_softcap: optional final logit soft-capping ``cap·tanh(z/cap)``.
    vocab: only the first ``vocab`` columns count (a padded vocabulary).

  Returns:
    `[N]` or `[B, T]` float32 per-token divergence.

  References:
    Anshumann et al., 2025 (cached top-k teachers); chunked recomputation as in
    Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024).
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  return _chunked_sparse_loss(
      functools.partial(_logit.forward_kl, temperature=temperature),
      student_hidden, student_unembed, teacher_ids, teacher_logprobs, teacher_log_tail,
      where=where, chunk_size=chunk_size, student_bias=student_bias,
      student_softcap=student_softcap, vocab=vocab)


def chunked_sparse_generalized_jsd(
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_log_tail: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    normalized: bool = False,
    chunk_size: int = _vocab.DEFAULT_CHUNK_SIZE,
    student_bias: ArrayLike | None = None,
    student_softcap: Optional[float] = None,
    vocab: Optional[int] = None,
) -> jax.Array:
  """:func:`sparse_generalized_jsd` of ``h_S @ W_S + b_S``, chunked with recomputation.

  .. math::
    T^2 \\big(\\beta\\,KL(\\tilde p_T\\|M) + (1-\\beta)\\,KL(\\tilde q_S\\|M)\\big),\\quad
    M = \\beta \\tilde p_T + (1-\\beta) \\tilde q_S

  Args:
    student_hidden: `[N, D]` or `[B, T, D]` final student hidden states.
    student_unembed: `[D, V]` student unembedding matrix.
    teacher_ids: `[N, K]` or `[B, T, K]` integer ids of the teacher's top-K tokens.
    teacher_logprobs: same shape, their teacher log-probabilities at temperature 1.
    teacher_log_tail: `[N]` or `[B, T]` log of the teacher's remaining mass.
    beta: teacher weight of the mixture, in [0, 1]; 0 is forward KL, 1 reverse KL; a jax
      array is not checked.
    temperature: bucket temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to the token axes.
    normalized: divide the interior value by β(1-β) (continuous at the ends).
    chunk_size: sequence positions per chunk (a positive integer).
    student_bias: optional `[V]` student unembedding bias.
    student_softcap: optional final logit soft-capping.
    vocab: only the first ``vocab`` columns count (a padded vocabulary).

  Returns:
    `[N]` or `[B, T]` float32 per-token divergence.

  References:
    Agarwal et al., "On-Policy Distillation of Language Models" (GKD), 2024.
  """
  return _chunked_sparse_loss(
      _jsd(beta, temperature, normalized),
      student_hidden, student_unembed, teacher_ids, teacher_logprobs, teacher_log_tail,
      where=where, chunk_size=chunk_size, student_bias=student_bias,
      student_softcap=student_softcap, vocab=vocab)


def teacher_top_k(logits_NxV: ArrayLike, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Exact top-k of ``log_softmax(logits)`` in float32, sorted by id, with the tail mass.

  Args:
    logits_NxV: `[..., V]` teacher logits (any float dtype).
    top_k: entries to keep k, a Python integer in ``[1, V]``; ties take distinct ids.

  Returns:
    ``(ids_NxK, logprobs_NxK, log_tail_N)``: `[..., k]` int32 ids in ascending order, their
    `[..., k]` float32 log-probabilities and the `[...]` float32
    ``logsumexp(logits outside the top-k) - logsumexp(logits)`` (``-inf`` when k = V).
  """
  logits_NxV = jnp.asarray(logits_NxV).astype(jnp.float32)
  vocab = logits_NxV.shape[-1]
  _check_top_k(top_k, vocab)
  logprobs_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
  vals_NxK, ids_NxK = jax.lax.top_k(logprobs_NxV, top_k)
  order_NxK = jnp.argsort(ids_NxK, axis=-1)
  ids_NxK = jnp.take_along_axis(ids_NxK, order_NxK, axis=-1).astype(jnp.int32)
  vals_NxK = jnp.take_along_axis(vals_NxK, order_NxK, axis=-1)
  kept_NxV = jnp.put_along_axis(
      jnp.zeros(logits_NxV.shape, bool), ids_NxK, True, axis=-1, inplace=False)
  outside_N = jax.nn.logsumexp(jnp.where(kept_NxV, -jnp.inf, logits_NxV), axis=-1)
  log_tail_N = outside_N - jax.nn.logsumexp(logits_NxV, axis=-1)
  return ids_NxK, vals_NxK, log_tail_N


def _check_top_k(top_k: object, vocab: int) -> None:
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= vocab:
    raise ValueError(f"top_k: {top_k!r} must be an integer in [1, V={vocab}]")


def chunked_sparse_reverse_kl(
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
  """:func:`sparse_reverse_kl` of ``h_S @ W_S + b_S``, chunked with recomputation.

  .. math::
    T^2 \\sum_b \\tilde q_S(b) (\\log \\tilde q_S(b) - \\log \\tilde p_T(b))

  Args:
    student_hidden: `[N, D]` or `[B, T, D]` final student hidden states.
    student_unembed: `[D, V]` student unembedding matrix.
    teacher_ids: `[N, K]` or `[B, T, K]` integer ids of the teacher's top-K tokens.
    teacher_logprobs: same shape, their teacher log-probabilities at temperature 1.
    teacher_log_tail: `[N]` or `[B, T]` log of the teacher's remaining mass.
    temperature: bucket temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to the token axes.
    chunk_size: sequence positions per chunk (a positive integer).
    student_bias: optional `[V]` student unembedding bias.
    student_softcap: optional final logit soft-capping.
    vocab: only the first ``vocab`` columns count (a padded vocabulary).

  Returns:
    `[N]` or `[B, T]` float32 per-token divergence.

  References:
    Gu et al., "MiniLLM", 2024; Anshumann et al., 2025 (cached top-k teachers).
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  return _chunked_sparse_loss(
      functools.partial(_logit.reverse_kl, temperature=temperature),
      student_hidden, student_unembed, teacher_ids, teacher_logprobs, teacher_log_tail,
      where=where, chunk_size=chunk_size, student_bias=student_bias,
      student_softcap=student_softcap, vocab=vocab)
