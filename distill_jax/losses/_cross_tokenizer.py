"""Cross-tokenizer distillation: losses between distributions over *different* vocabularies.

The host aligns the two token sequences into spans (:mod:`distill_jax.data.alignment`); a
span-final student position ``i`` and the teacher position ``teacher_index[i]`` (the same
span's last teacher token) have read exactly the same text, so their next-token
distributions are compared there.  :func:`span_gather` brings the teacher's values to the
student's positions; the losses then take ``student_logits [..., Vs]`` and
``teacher_logits [..., Vt]`` with equal leading axes.

* :func:`uld`: Universal Logit Distillation, an L1 (1-D Wasserstein) distance between the
  two *sorted* probability vectors, the shorter zero-padded.
* :func:`hybrid_uld`: exact KL over the tokens both vocabularies share (a mapping built once
  from the tokenizers), plus ULD over the probabilities of the tokens they do not.
* :func:`chunked_uld` / :func:`chunked_hybrid_uld`: the same from both models' final hidden
  states and heads (the teacher's gathered to the student's positions), chunked along the
  sequence as the losses of :mod:`distill_jax.losses._vocab`: never `[B, T, V]` of either model.
* :func:`span_sum` / :func:`span_mean` / :func:`span_log_probs`: span-level pooling
  (log-probability of a multi-token span = sum over its tokens; span-mean features).

All math is float32; values are unreduced; ``where`` masks positions with exactly zero value
and zero gradient; divergences are multiplied by ``temperature**2`` like every logit loss.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import _reduce
from distill_jax.losses import _vocab


def _probs(logits: ArrayLike, mask: jax.Array | None, temperature: float) -> tuple[jax.Array, jax.Array]:
  logits = _reduce.mask_inputs(jnp.asarray(logits, jnp.float32), mask)
  logp = jax.nn.log_softmax(logits / jnp.asarray(temperature, jnp.float32), axis=-1)
  return logp, jnp.exp(logp)


def _check_pair(student: jax.Array, teacher: jax.Array, what: str) -> None:
  if student.shape[:-1] != teacher.shape[:-1]:
    raise ValueError(f"{what}: student_logits {student.shape} and teacher_logits {teacher.shape} must share "
                     "their leading axes (gather the teacher at the aligned positions with span_gather)")


def _sorted_l1(p_x: jax.Array, p_y: jax.Array, top_k: int | None) -> jax.Array:
  """Σ_k |sort↓(p_x)_k − sort↓(p_y)_k| over the last axis, the shorter zero-padded."""
  width = max(p_x.shape[-1], p_y.shape[-1])
  pad = lambda p: jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - p.shape[-1])])
  if top_k is None:
    sx, sy = -jnp.sort(-pad(p_x), axis=-1), -jnp.sort(-pad(p_y), axis=-1)
  else:
    k = min(top_k, width)
    sx, sy = jax.lax.top_k(pad(p_x), k)[0], jax.lax.top_k(pad(p_y), k)[0]
  return jnp.sum(jnp.abs(sx - sy), axis=-1)


def uld(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
  """Universal Logit Distillation: L1 between sorted probability vectors, times T².

  .. math::
    T^2 \\sum_{k=1}^{\\max(V_S, V_T)} \\left| p^{\\downarrow}_S(k) - p^{\\downarrow}_T(k) \\right|,
    \\quad p = \\mathrm{softmax}(z / T), \\ p^{\\downarrow} \\text{ sorted descending, zero-padded}

  Args:
    student_logits: `[..., Vs]` student logits at aligned positions.
    teacher_logits: `[..., Vt]` teacher logits at the same positions (any `Vt`).
    temperature: softmax temperature T > 0.
    top_k: compare only the `k` largest probabilities of each side (``None``: all).
    where: optional boolean mask broadcastable to `[...]`; masked positions give 0.

  Returns:
    `[...]` float32 per-position distance.

  References:
    Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit
    Distillation Loss for LLMs", 2024.
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  if top_k is not None:
    _reduce.check_positive_int("top_k", top_k)
  student = jnp.asarray(student_logits)
  teacher = jnp.asarray(teacher_logits)
  _check_pair(student, teacher, "uld")
  mask = _reduce.broadcast_mask(where, student.shape[:-1])
  _, p_s = _probs(student, mask, temperature)
  _, p_t = _probs(teacher, mask, temperature)
  values = _sorted_l1(p_s, p_t, top_k) * jnp.square(jnp.asarray(temperature, jnp.float32))
  return _reduce.mask_outputs(values, mask)


def hybrid_uld(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    student_shared_ids: ArrayLike,
    teacher_shared_ids: ArrayLike,
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    top_k: int | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
  """Exact KL over the shared tokens plus ULD over the rest (TRL GOLD's hybrid mode), times T².

  With ``M`` = the pairs ``(s_m, t_m)`` of student and teacher ids of the same token string:

  .. math::
    T^2 \\Big[ w_m \\sum_{m} p_T(t_m) (\\log p_T(t_m) - \\log p_S(s_m))
      + w_u \\sum_k | \\tilde p^{\\downarrow}_S(k) - \\tilde p^{\\downarrow}_T(k) | \\Big]

  where :math:`\\tilde p` is ``p`` with the shared tokens' entries set to 0 (the residual
  mass, not renormalized).  Both distributions are softmaxed over their full vocabulary.
  With the same tokenizer on both sides (``M`` = every id with itself) this is
  :func:`forward_kl`.

  Args:
    student_logits: `[..., Vs]` student logits at aligned positions.
    teacher_logits: `[..., Vt]` teacher logits at the same positions.
    student_shared_ids: `[M]` int student ids of the shared tokens (distinct).
    teacher_shared_ids: `[M]` int teacher ids of the same tokens, in the same order (distinct).
    temperature: softmax temperature T > 0.
    matched_weight: weight `w_m` of the KL over the shared tokens (>= 0).
    unmatched_weight: weight `w_u` of the ULD over the other tokens (>= 0).
    top_k: ULD over the `k` largest residual probabilities only (``None``: all).
    where: optional boolean mask broadcastable to `[...]`; masked positions give 0.

  Returns:
    `[...]` float32 per-position loss.

  References:
    Boizard et al., 2024 (ULD); Hugging Face TRL, GOLD trainer (hybrid ULD), 2025.
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  _reduce.check_range("matched_weight", matched_weight, low=0)
  _reduce.check_range("unmatched_weight", unmatched_weight, low=0)
  if top_k is not None:
    _reduce.check_positive_int("top_k", top_k)
  student = jnp.asarray(student_logits)
  teacher = jnp.asarray(teacher_logits)
  _check_pair(student, teacher, "hybrid_uld")
  s_ids = jnp.asarray(student_shared_ids, jnp.int32)
  t_ids = jnp.asarray(teacher_shared_ids, jnp.int32)
  if s_ids.ndim != 1 or s_ids.shape != t_ids.shape:
    raise ValueError(f"hybrid_uld: student_shared_ids {s_ids.shape} and teacher_shared_ids {t_ids.shape} "
                     "must be equal-length 1-D id lists")
  mask = _reduce.broadcast_mask(where, student.shape[:-1])
  logp_s, p_s = _probs(student, mask, temperature)
  logp_t, p_t = _probs(teacher, mask, temperature)
  logp_s_m, logp_t_m = logp_s[..., s_ids], logp_t[..., t_ids]
  p_t_m = p_t[..., t_ids]
  support = p_t_m != 0
  kl = jnp.sum(jnp.where(support, p_t_m * jnp.where(support, logp_t_m - logp_s_m, 0.0), 0.0), axis=-1)
  rest_s = p_s.at[..., s_ids].set(0.0)
  rest_t = p_t.at[..., t_ids].set(0.0)
  values = matched_weight * kl + unmatched_weight * _sorted_l1(rest_s, rest_t, top_k)
  values = values * jnp.square(jnp.asarray(temperature, jnp.float32))
  return _reduce.mask_outputs(values, mask)


_CHUNKED_ARGS = """
  Args:
    student_hidden: `[N, Ds]` or `[B, T, Ds]` final (normed) student hidden states.
    student_unembed: `[Ds, Ws]` student unembedding (LM head; a tied head's embedding transposed).
    teacher_hidden: `[N, Dt]` / `[B, T, Dt]` final teacher hidden states at the student's
      positions (``span_gather(teacher_final_hidden, teacher_index)``); a constant.
    teacher_unembed: `[Dt, Wt]` teacher unembedding (a constant).
    where: optional boolean mask broadcastable to the token axes; masked positions give 0.
    chunk_size: sequence positions per chunk (a positive integer; each chunk holds every row
      of `[B, T]` inputs); T need not be divisible by it.
    student_bias, teacher_bias: optional `[Ws]` / `[Wt]` unembedding biases.
    student_softcap, teacher_softcap: optional final logit soft-capping ``cap·tanh(z/cap)``.
    student_vocab, teacher_vocab: only the first ``vocab`` columns of each head count (padded
      vocabularies; None: all).
"""


def _chunked_fn(dense: Callable[..., jax.Array], doc: str, ids: tuple[str, ...] = ()) -> Callable[..., jax.Array]:
  """A public ``chunked_<dense>``: ``dense(student_logits, teacher_logits, where=mask, **hyper)`` per
  token, chunk by chunk.

  Both models' logits are formed one chunk at a time (the teacher's inside the chunk loss, a
  constant; the student's by `_vocab.chunked_student_values`, whose custom VJP recomputes them
  in the backward pass).  The ``ids`` keyword arguments (integer arrays) are handed to every
  chunk as inputs, the other ``hyper`` are bound to ``dense``.
  """

  def fn(student_hidden, student_unembed, teacher_hidden, teacher_unembed, *, where=None,
         chunk_size=_vocab.DEFAULT_CHUNK_SIZE, student_bias=None, teacher_bias=None, student_softcap=None,
         teacher_softcap=None, student_vocab=None, teacher_vocab=None, **hyper):
    missing = [k for k in ids if k not in hyper]
    if missing:
      raise TypeError(f"{fn.__name__}() missing keyword arguments: {', '.join(missing)}")
    chunk_ids = {k: jnp.asarray(hyper.pop(k), jnp.int32) for k in ids}
    loss_of_logits = functools.partial(dense, **hyper)
    _reduce.check_positive_int("chunk_size", chunk_size)
    hs = jnp.asarray(student_hidden)
    ht = jax.lax.stop_gradient(jnp.asarray(teacher_hidden))
    student = _vocab._check_head("student", hs, _vocab.Head(student_unembed, student_bias, student_softcap))
    teacher = _vocab._check_head("teacher", ht, _vocab.Head(teacher_unembed, teacher_bias, teacher_softcap))
    lead = hs.shape[:-1]
    if ht.shape[:-1] != lead:
      raise ValueError(f"token axes differ: student_hidden {hs.shape}, teacher_hidden {ht.shape} (gather the "
                       "teacher at the aligned positions with span_gather)")
    s_vocab = _vocab._check_vocab(student_vocab, [student.kernel.shape[1]], "student_vocab")
    t_vocab = _vocab._check_vocab(teacher_vocab, [teacher.kernel.shape[1]], "teacher_vocab")
    t_cap = teacher.softcap  # static: closed over, not a chunk input

    def loss(s_logits, t_h, shared, mask):
      (w, b), kw = shared
      t_logits = _vocab.head_logits(t_h, _vocab.Head(w, b, t_cap), t_vocab)
      return loss_of_logits(s_logits, t_logits, where=mask, **kw)

    mask = _reduce.mask_or_ones(where, lead)
    return _vocab.chunked_student_values(
        loss, _reduce.mask_inputs(hs, mask), student, _reduce.mask_inputs(ht, mask),
        ((teacher.kernel, teacher.bias), chunk_ids), mask, chunk_size=chunk_size, vocab=s_vocab)

  fn.__name__ = fn.__qualname__ = f"chunked_{dense.__name__}"
  fn.__doc__ = doc
  return fn


chunked_uld = _chunked_fn(uld, """\
Universal Logit Distillation (see :func:`uld`) from hidden states and heads, chunked.

  Equal (value and student gradients) to ``uld(head_S(h_S)[..., :student_vocab],
  head_T(h_T)[..., :teacher_vocab], ...)``; memory per chunk only, never `[B, T, V]`.
""" + _CHUNKED_ARGS + """    temperature, top_k: as in :func:`uld`.

  Returns:
    `[N]` or `[B, T]` float32 per-position distance.
""")
chunked_hybrid_uld = _chunked_fn(hybrid_uld, """\
KL over the shared tokens plus ULD on the rest (see :func:`hybrid_uld`) from hidden states, chunked.

  Equal (value and student gradients) to ``hybrid_uld(head_S(h_S)[..., :student_vocab],
  head_T(h_T)[..., :teacher_vocab], ...)``; memory per chunk only, never `[B, T, V]`.
""" + _CHUNKED_ARGS + """    student_shared_ids, teacher_shared_ids: required, as in :func:`hybrid_uld` (ids below
      the vocabularies).
    temperature, matched_weight, unmatched_weight, top_k: as in :func:`hybrid_uld`.

  Returns:
    `[N]` or `[B, T]` float32 per-position loss.
""", ids=("student_shared_ids", "teacher_shared_ids"))


def span_gather(values: ArrayLike, index: ArrayLike) -> jax.Array:
  """Per batch row, the values at other positions: ``out[b, i] = values[b, index[b, i]]``.

  Args:
    values: `[B, Lt, ...]` (teacher logits, log-probabilities or hidden states).
    index: `[B, Ls]` int positions into axis 1 (the alignment's ``teacher_index``).

  Returns:
    `[B, Ls, ...]` the gathered values (dtype kept).
  """
  values = jnp.asarray(values)
  index = jnp.asarray(index, jnp.int32)
  index = index.reshape(index.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, index, axis=1)


def _segment_totals(values_BxTxD: jax.Array, span_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per position, the sum of its span's values and its span's size (0 for span -1)."""
  b, t = span_BxT.shape
  valid = span_BxT >= 0
  seg = jnp.where(valid, span_BxT + t * jnp.arange(b)[:, None], b * t).reshape(-1)
  flat = jnp.where(valid[..., None], values_BxTxD, 0.0).reshape(b * t, -1)
  sums = jax.ops.segment_sum(flat, seg, num_segments=b * t + 1)
  counts = jax.ops.segment_sum(valid.reshape(-1).astype(jnp.float32), seg, num_segments=b * t + 1)
  return sums[seg].reshape(values_BxTxD.shape), jnp.where(valid, counts[seg].reshape(b, t), 0.0)


def span_sum(values: ArrayLike, span: ArrayLike) -> jax.Array:
  """At every position, the sum of ``values`` over the position's span (0 outside any span).

  Args:
    values: `[B, T]` or `[B, T, D]` float values.
    span: `[B, T]` int span ids (row-local, ``-1`` = no span); a span's positions are consecutive.

  Returns:
    float32, the shape of ``values``.
  """
  values = jnp.asarray(values, jnp.float32)
  span = jnp.asarray(span, jnp.int32)
  squeeze = values.ndim == 2
  sums, _ = _segment_totals(values[..., None] if squeeze else values, span)
  return sums[..., 0] if squeeze else sums


def span_mean(hidden: ArrayLike, span: ArrayLike) -> jax.Array:
  """At every position, the mean of ``hidden`` over the position's span (0 outside any span).

  Feature terms across tokenizers compare ``span_mean(student_h)`` at the student's span-final
  positions with ``span_gather(span_mean(teacher_h), teacher_index)``.

  Args:
    hidden: `[B, T, D]` hidden states.
    span: `[B, T]` int span ids (``-1`` = no span).

  Returns:
    `[B, T, D]` float32 span-mean-pooled states.
  """
  hidden = jnp.asarray(hidden, jnp.float32)
  sums, counts = _segment_totals(hidden, jnp.asarray(span, jnp.int32))
  return sums / jnp.maximum(counts, 1.0)[..., None]


def span_log_probs(logits: ArrayLike, labels: ArrayLike, span: ArrayLike, *,
                   where: ArrayLike | None = None) -> jax.Array:
  """Log-probability of each span's tokens: the sum of the per-token label log-probabilities.

  For a causal LM pass the span of the *predicted* token (``span[b, j]`` = the span of
  ``labels[b, j]``); every position of a span then holds ``log p(span | text before it)``,
  which a span-level term reads at the span's first predicting position (the previous
  span's final token).

  Args:
    logits: `[B, T, V]` logits.
    labels: `[B, T]` int the token each position predicts.
    span: `[B, T]` int span id of each label (``-1`` = none).
    where: optional `[B, T]` mask; masked positions contribute 0 to their span and get 0.

  Returns:
    `[B, T]` float32 span log-probabilities.
  """
  mask = _reduce.broadcast_mask(where, jnp.shape(labels))
  logp = jax.nn.log_softmax(_reduce.mask_inputs(jnp.asarray(logits, jnp.float32), mask), axis=-1)
  token = jnp.take_along_axis(logp, jnp.asarray(labels, jnp.int32)[..., None], axis=-1)[..., 0]
  token = _reduce.mask_outputs(token, mask)
  return _reduce.mask_outputs(span_sum(token, span), mask)
