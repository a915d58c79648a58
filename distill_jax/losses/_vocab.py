"""Logit losses from hidden states and unembeddings, never materializing `[tokens, V]` logits.

Every token-level logit loss of :mod:`distill_jax.losses._logit` (forward/reverse KL,
generalized JSD, skew KL/RKL, TVD, hard-label cross-entropy, the teachers' ensemble KL) has a
``chunked_*`` form here that takes the final hidden states and the LM head of each model
instead of their logits.  Logits are formed chunk by chunk along the sequence axis
(``lax.map``; a chunk holds every row of the batch and ``chunk_size`` positions, so batch
sharding is kept inside the loop), and a ``jax.custom_vjp`` recomputes a chunk's logits in
the backward pass (``lax.scan``): temporary memory is O(batch · chunk_size · V) instead of
O(batch · T · V).

A head is ``logits = cap · tanh((h @ W + b) / cap)`` (``softcap``, Gemma 2/3's final
soft-capping, optional), of which only the first ``vocab`` columns count (a padded
vocabulary: the other columns are set to a large negative logit, which gives them exactly
zero probability, the same numbers as slicing ``[..., :vocab]``; ``W`` stays whole, so a
vocabulary sharded over the ``tensor`` mesh axis stays sharded and every reduction over it
is a sum/max XLA partitions).  Matmuls accumulate in float32 whatever the dtype.

The teacher is a constant: it gets no cotangent.  ``where`` masks positions with exactly
zero value and zero gradient, whatever (even NaN) inputs they hold.  Hyperparameters are
checked as in :mod:`distill_jax.losses._logit`; ``chunk_size`` must be a positive Python
integer.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import _logit
from distill_jax.losses import _reduce

DEFAULT_CHUNK_SIZE = 128  # sequence positions per chunk (each chunk holds batch × this many tokens)
MASKED_LOGIT = -1e30  # the logit of a padded vocabulary column: probability exactly 0 in float32

# (student_logits [B, K, V] f32, tokens (a pytree of per-token [B, K, ...] arrays),
#  shared (a pytree of constant arrays, e.g. the teacher heads), mask [B, K]) -> values [B, K]
ChunkLoss = Callable[[jax.Array, Any, Any, jax.Array], jax.Array]


class Head(NamedTuple):
  """How a causal LM turns final hidden states into logits (its unembedding).

  Attributes:
    kernel: `[D, V]` unembedding matrix (a tied head: the embedding transposed).
    bias: `[V]` or None.
    softcap: final logit soft-capping ``cap · tanh(z / cap)``, or None.
  """

  kernel: jax.Array
  bias: Optional[jax.Array] = None
  softcap: Optional[float] = None


def _finish(z: jax.Array, softcap: Optional[float], vocab: Optional[int]) -> jax.Array:
  """Soft-caps f32 logits `[..., V]` and sets the columns from ``vocab`` on to `MASKED_LOGIT`."""
  if softcap is not None:
    z = jnp.tanh(z / softcap) * softcap
  if vocab is not None and vocab < z.shape[-1]:
    z = jnp.where(jnp.arange(z.shape[-1]) < vocab, z, MASKED_LOGIT)
  return z


def _raw(h: jax.Array, w_DxV: jax.Array, b_V: Optional[jax.Array]) -> jax.Array:
  z = jnp.einsum("...d,dv->...v", h, w_DxV, preferred_element_type=jnp.float32)
  return z if b_V is None else z + b_V.astype(jnp.float32)


def head_logits(h: jax.Array, head: Head, vocab: Optional[int] = None) -> jax.Array:
  """Float32 logits `[..., V]` of hidden states `[..., D]` under ``head`` (columns >= vocab masked)."""
  return _finish(_raw(h, head.kernel, head.bias), head.softcap, vocab)


# --------------------------------------------------------------------------- chunk layout


def _layout(lead: tuple[int, ...], chunk_size: int) -> tuple[int, int, int, int]:
  """``(rows, positions, chunk, num_chunks)`` of token axes ``lead``: the last axis is chunked."""
  _reduce.check_positive_int("chunk_size", chunk_size)
  rows = math.prod(lead[:-1]) if len(lead) > 1 else 1
  positions = lead[-1] if lead else 1
  chunk = min(chunk_size, max(positions, 1))
  return rows, positions, chunk, -(-positions // chunk)


def _split(x: jax.Array, lead: tuple[int, ...], chunk_size: int) -> jax.Array:
  """`[*lead, ...]` -> `[C, rows, chunk, ...]`, the sequence axis zero-padded to C · chunk."""
  rows, positions, chunk, num_chunks = _layout(lead, chunk_size)
  tail = x.shape[len(lead):]
  x = x.reshape((rows, positions) + tail)
  pad = num_chunks * chunk - positions
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * len(tail))
  return jnp.moveaxis(x.reshape((rows, num_chunks, chunk) + tail), 1, 0)


def _merge(x: jax.Array, lead: tuple[int, ...]) -> jax.Array:
  """Inverse of `_split`: `[C, rows, chunk, ...]` -> `[*lead, ...]`."""
  tail = x.shape[3:]
  x = jnp.moveaxis(x, 0, 1)
  x = x.reshape((x.shape[0], -1) + tail)[:, :(lead[-1] if lead else 1)]
  return x.reshape(lead + tail)


def map_chunks(fn: Callable[[Any], Any], tokens: Any, lead: tuple[int, ...], chunk_size: int) -> Any:
  """``fn`` over chunks of per-token arrays (no custom gradient; e.g. a teacher's top-k).

  Args:
    fn: ``chunk pytree ([rows, chunk, ...] leaves) -> pytree of [rows, chunk, ...] leaves``.
    tokens: pytree of `[*lead, ...]` arrays.
    lead: the token axes.
    chunk_size: sequence positions per chunk.

  Returns:
    ``fn``'s outputs reassembled to `[*lead, ...]`.
  """
  out = jax.lax.map(fn, jax.tree.map(lambda x: _split(x, lead, chunk_size), tokens))
  return jax.tree.map(lambda x: _merge(x, lead), out)


# --------------------------------------------------------------------------- the custom VJP


def _chunked_values(chunk_loss: ChunkLoss, hs: jax.Array, ws: jax.Array, bs: jax.Array, tokens: Any,
                    shared: Any, mask: jax.Array, softcap: Optional[float], vocab: Optional[int]) -> jax.Array:
  """Per-token values `[C, rows, chunk]` with a memory-lean custom VJP (student gradients only).

  ``tokens`` (a pytree of `[C, rows, chunk, ...]` constants) is handed to ``chunk_loss``
  chunk by chunk, ``shared`` (constants, e.g. the teacher heads) whole.  The backward pass
  closes over no tracer (that breaks e.g. ``grad(jit(...))``): the float arrays
  ``chunk_loss`` closes over (a traced temperature, ...) are explicit inputs, differentiated.
  """
  spec = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  logits_spec = jax.ShapeDtypeStruct(hs.shape[1:-1] + (ws.shape[1],), jnp.float32)
  loss, consts = jax.closure_convert(
      chunk_loss, logits_spec, jax.tree.map(spec, tokens),
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shared), spec(mask))

  def loss_of_raw(z, tok, sh, m, c):
    return loss(_finish(z, softcap, vocab), tok, sh, m, *c)

  @jax.custom_vjp
  def run(hs, ws, bs, tokens, shared, mask, consts):
    return jax.lax.map(lambda xs: loss_of_raw(_raw(xs[0], ws, bs), xs[1], shared, xs[2], consts),
                       (hs, tokens, mask))

  def fwd(*args):
    return run(*args), args

  def bwd(res, g_C):
    hs, ws, bs, tokens, shared, mask, consts = res

    def body(carry, xs):
      dws_acc, dbs_acc, dconsts_acc = carry
      h, tok, m, g = xs
      _, vjp = jax.vjp(lambda z, c: loss_of_raw(z, tok, shared, m, c), _raw(h, ws, bs), consts)
      dz, dconsts = vjp(g.astype(jnp.float32))
      dh = jnp.einsum("...v,dv->...d", dz, ws, preferred_element_type=jnp.float32)
      dws_acc = dws_acc + jnp.einsum("...d,...v->dv", h, dz, preferred_element_type=jnp.float32)
      dbs_acc = dbs_acc + jnp.sum(dz.reshape(-1, dz.shape[-1]), axis=0)
      return (dws_acc, dbs_acc, jax.tree.map(jnp.add, dconsts_acc, dconsts)), dh.astype(hs.dtype)

    init = (jnp.zeros(ws.shape, jnp.float32), jnp.zeros(bs.shape, jnp.float32),
            jax.tree.map(jnp.zeros_like, consts))
    (dws, dbs, dconsts), dhs = jax.lax.scan(body, init, (hs, tokens, mask, g_C))
    return dhs, dws.astype(ws.dtype), dbs.astype(bs.dtype), None, None, None, dconsts

  run.defvjp(fwd, bwd)
  return run(hs, ws, bs, tokens, shared, mask, consts)


def _check_head(name: str, h: jax.Array, head: Head) -> Head:
  w = jnp.asarray(head.kernel)
  if h.ndim == 0 or w.ndim != 2 or w.shape[0] != h.shape[-1]:
    raise ValueError(f"{name}_unembed shape {w.shape} must be [hidden, V] with the hidden size of "
                     f"{name}_hidden {h.shape}")
  b = None if head.bias is None else jnp.asarray(head.bias)
  if b is not None and b.shape != (w.shape[1],):
    raise ValueError(f"{name}_bias shape {b.shape} must be [V] = ({w.shape[1]},)")
  if head.softcap is not None:
    _reduce.check_range(f"{name}_softcap", head.softcap, low=0, low_open=True)
  return Head(w, b, head.softcap)


def _check_vocab(vocab: Optional[int], widths: Sequence[int], name: str = "vocab") -> Optional[int]:
  """The columns that count: ``vocab``, or the common width; one-line error (naming ``name``) when impossible."""
  if vocab is None:
    if len(set(widths)) > 1:
      raise ValueError(f"unembedding widths {list(widths)} differ: the student and teacher heads must "
                       f"have the same V, or pass vocab=<the size of the shared vocabulary>")
    return None
  _reduce.check_positive_int(name, vocab)
  if vocab > min(widths):
    raise ValueError(f"{name}: {vocab} exceeds the unembedding width {min(widths)}")
  return vocab


def _narrow(head: Head, width: int) -> Head:
  """The head cut to its first ``width`` columns (only when heads of several widths meet)."""
  if head.kernel.shape[1] == width:
    return head
  return Head(head.kernel[:, :width], None if head.bias is None else head.bias[:width], head.softcap)


def chunked_student_values(
    chunk_loss: ChunkLoss,
    student_hidden: jax.Array,
    student: Head,
    tokens: Any,
    shared: Any,
    mask: jax.Array,
    *,
    chunk_size: int,
    vocab: Optional[int] = None,
) -> jax.Array:
  """Per-token values `[*lead]` of ``chunk_loss`` over chunks of the sequence axis.

  Args:
    chunk_loss: ``(student_logits [rows, chunk, V], tokens chunk, shared, mask [rows, chunk])
      -> [rows, chunk]``.
    student_hidden: `[*lead, D]` (masked positions already zeroed).
    student: the student's (checked) `Head`; differentiated.
    tokens: pytree of constant `[*lead, ...]` per-token arrays.
    shared: pytree of constant arrays handed whole to every chunk.
    mask: `[*lead]` bool.
    chunk_size: sequence positions per chunk.
    vocab: the columns that count (None: all).

  Returns:
    `[*lead]` float32.
  """
  lead = mask.shape
  rows, positions, _, _ = _layout(lead, chunk_size)
  if rows * positions == 0:
    return jnp.zeros(lead, jnp.float32)
  split = lambda x: _split(x, lead, chunk_size)  # noqa: E731
  bias = jnp.zeros((student.kernel.shape[1],), jnp.float32) if student.bias is None else student.bias
  values = _chunked_values(chunk_loss, split(student_hidden), student.kernel, bias,
                           jax.tree.map(split, jax.lax.stop_gradient(tokens)), jax.lax.stop_gradient(shared),
                           split(mask), student.softcap, vocab)
  return _merge(values, lead)


# --------------------------------------------------------------------------- teacher-student losses


def _teacher_logits(hidden: jax.Array, head: Head, vocab: Optional[int], combine) -> jax.Array:
  """The divergence's teacher logits of one chunk: one teacher's, or ``combine`` of several."""
  if isinstance(hidden, tuple):
    return combine([head_logits(h, t, vocab) for h, t in zip(hidden, head)])
  return head_logits(hidden, head, vocab)


def _chunked_pair_loss(
    divergence: Callable[..., jax.Array],
    student_hidden: ArrayLike, student_unembed: ArrayLike,
    teacher_hidden: Any, teacher_unembed: Any,
    *,
    where: ArrayLike | None,
    chunk_size: int,
    student_bias: ArrayLike | None,
    teacher_bias: Any,
    student_softcap: Optional[float],
    teacher_softcap: Any,
    vocab: Optional[int],
    combine: Optional[Callable[[list], jax.Array]] = None,
) -> jax.Array:
  """``divergence(student_logits, teacher_logits, where=mask)`` per token, in chunks.

  With ``combine``, the teacher arguments are sequences (one entry per teacher) and
  ``combine(list of teacher logits)`` gives the divergence's teacher logits.
  """
  _reduce.check_positive_int("chunk_size", chunk_size)
  hs = jnp.asarray(student_hidden)
  student = _check_head("student", hs, Head(student_unembed, student_bias, student_softcap))
  many = combine is not None
  t_hidden = tuple(teacher_hidden) if many else (teacher_hidden,)
  t_args = (tuple(teacher_unembed), tuple(teacher_bias), tuple(teacher_softcap)) if many else (
      (teacher_unembed,), (teacher_bias,), (teacher_softcap,))
  if many and not (len(t_hidden) == len(t_args[0]) == len(t_args[1]) == len(t_args[2]) > 0):
    raise ValueError("teachers: give one hidden state, unembedding, bias and softcap per teacher")
  ht = tuple(jax.lax.stop_gradient(jnp.asarray(h)) for h in t_hidden)
  teachers = tuple(_check_head("teacher", h, Head(*a)) for h, a in zip(ht, zip(*t_args)))
  lead = hs.shape[:-1]
  for h in ht:
    if h.shape[:-1] != lead:
      raise ValueError(f"token axes differ: student_hidden {hs.shape}, teacher_hidden {h.shape}")
  widths = [student.kernel.shape[1]] + [t.kernel.shape[1] for t in teachers]
  vocab = _check_vocab(vocab, widths)
  width = min(widths)
  student, teachers = _narrow(student, width), tuple(_narrow(t, width) for t in teachers)
  caps = tuple(t.softcap for t in teachers)  # static: closed over, not a chunk input

  def loss(s_logits, t_hidden, t_arrays, mask):
    t_heads = tuple(Head(w, b, cap) for (w, b), cap in zip(t_arrays, caps))
    t_hidden, t_heads = (t_hidden, t_heads) if many else (t_hidden[0], t_heads[0])
    return divergence(s_logits, _teacher_logits(t_hidden, t_heads, vocab, combine), where=mask)

  mask = _reduce.mask_or_ones(where, lead)
  hs = _reduce.mask_inputs(hs, mask)
  ht = tuple(_reduce.mask_inputs(h, mask) for h in ht)
  shared = tuple((t.kernel, t.bias) for t in teachers)
  return chunked_student_values(loss, hs, student, ht, shared, mask, chunk_size=chunk_size, vocab=vocab)


_PAIR_ARGS = """
  Args:
    student_hidden: `[N, Ds]` or `[B, T, Ds]` final (normed) student hidden states.
    student_unembed: `[Ds, V]` student unembedding (LM head; a tied head's embedding transposed).
    teacher_hidden: `[N, Dt]` or `[B, T, Dt]` final teacher hidden states (constant).
    teacher_unembed: `[Dt, V']` teacher unembedding (constant).
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to the token axes `[N]` / `[B, T]`.
    chunk_size: sequence positions per chunk (a positive integer; each chunk holds every row
      of `[B, T]` inputs); T need not be divisible by it.
    student_bias, teacher_bias: optional `[V]` / `[V']` unembedding biases.
    student_softcap, teacher_softcap: optional final logit soft-capping ``cap·tanh(z/cap)``.
    vocab: only the first ``vocab`` columns count (a padded vocabulary); required when V != V'.

  Returns:
    `[N]` or `[B, T]` float32 per-token values.
"""


def _pair_fn(name: str, divergence: Callable[..., Callable[..., jax.Array]], doc: str) -> Callable[..., jax.Array]:
  """A public ``chunked_<name>`` of the dense divergence built by ``divergence(**hyper)``."""

  def fn(student_hidden, student_unembed, teacher_hidden, teacher_unembed, *, temperature=1.0, where=None,
         chunk_size=DEFAULT_CHUNK_SIZE, student_bias=None, teacher_bias=None, student_softcap=None,
         teacher_softcap=None, vocab=None, **hyper):
    loss = divergence(temperature=temperature, **hyper)
    return _chunked_pair_loss(loss, student_hidden, student_unembed, teacher_hidden, teacher_unembed,
                              where=where, chunk_size=chunk_size, student_bias=student_bias,
                              teacher_bias=teacher_bias, student_softcap=student_softcap,
                              teacher_softcap=teacher_softcap, vocab=vocab)

  fn.__name__ = fn.__qualname__ = f"chunked_{name}"
  fn.__doc__ = doc + _PAIR_ARGS
  return fn


def _bind(dense: Callable[..., jax.Array], check: Callable[..., None]) -> Callable[..., Callable[..., jax.Array]]:
  def bind(**hyper):
    check(**hyper)
    return functools.partial(dense, **hyper)
  return bind


def _check_t(temperature):
  _reduce.check_range("temperature", temperature, low=0, low_open=True)


def _check_jsd(temperature, beta=0.5, normalized=False):
  _check_t(temperature)
  _reduce.check_range("beta", beta, low=0, high=1)
  _reduce.check_choice("normalized", normalized, (False, True))


def _check_skew(temperature, skew=0.1):
  _check_t(temperature)
  _reduce.check_range("skew", skew, low=0, high=1, high_open=True)


chunked_forward_kl = _pair_fn("forward_kl", _bind(_logit.forward_kl, _check_t), """\
Token-level forward KL(p_T‖p_S)·T² from hidden states, never materializing `[N, V]`.

  Equal (value and student gradients) to ``forward_kl(logits_S, logits_T, temperature=T,
  where=where)`` with ``logits = head(h)[..., :vocab]`` (see the module docstring).

  .. math::
    T^2 \\sum_v p_T(v) (\\log p_T(v) - \\log p_S(v)),\\quad
    p_S = \\mathrm{softmax}(\\mathrm{cap}(h_S W_S + b_S) / T)

  References:
    Hinton et al., 2015; chunked recomputation as in Liger-Kernel's fused linear
    cross-entropy (Hsu et al., 2024).
""")
chunked_reverse_kl = _pair_fn("reverse_kl", _bind(_logit.reverse_kl, _check_t), """\
Token-level reverse KL(p_S‖p_T)·T² (see :func:`reverse_kl`) from hidden states, chunked.

  References:
    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", 2024.
""")
chunked_generalized_jsd = _pair_fn("generalized_jsd", _bind(_logit.generalized_jsd, _check_jsd), """\
Token-level generalized JSD·T² (see :func:`generalized_jsd`; takes ``beta``, ``normalized``), chunked.

  .. math::
    T^2 \\big(\\beta KL(p_T\\|M) + (1-\\beta) KL(p_S\\|M)\\big),\\quad
    M = \\beta p_T + (1-\\beta) p_S

  References:
    Agarwal et al., "On-Policy Distillation of Language Models" (GKD), 2024.
""")
chunked_skew_kl = _pair_fn("skew_kl", _bind(_logit.skew_kl, _check_skew), """\
Token-level skew KL(p_T ‖ α p_T + (1-α) p_S)·T² (see :func:`skew_kl`; takes ``skew``), chunked.

  References:
    Ko et al., "DistiLLM", 2024.
""")
chunked_skew_reverse_kl = _pair_fn("skew_reverse_kl", _bind(_logit.skew_reverse_kl, _check_skew), """\
Token-level skew reverse KL(p_S ‖ (1-α) p_T + α p_S)·T² (see :func:`skew_reverse_kl`), chunked.

  References:
    Ko et al., "DistiLLM", 2024.
""")
chunked_total_variation = _pair_fn("total_variation", _bind(_logit.total_variation, _check_t), """\
Token-level total variation ½ Σ|p_T - p_S|·T² (see :func:`total_variation`), chunked.

  References:
    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation", 2023.
""")


def chunked_ensemble_kl(
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_hiddens: Sequence[ArrayLike],
    teacher_unembeds: Sequence[ArrayLike],
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_bias: ArrayLike | None = None,
    teacher_biases: Optional[Sequence[Optional[ArrayLike]]] = None,
    student_softcap: Optional[float] = None,
    teacher_softcaps: Optional[Sequence[Optional[float]]] = None,
    vocab: Optional[int] = None,
) -> jax.Array:
  """Forward KL·T² to the teachers' mean distribution at temperature T, chunked.

  Equal to ``forward_kl(logits_S, T · (logsumexp_i log_softmax(logits_i / T) - log n))``.

  .. math::
    T^2\\,KL\\big(\\tfrac1n \\textstyle\\sum_i p_{T_i} \\,\\|\\, p_S\\big)

  Args:
    student_hidden, student_unembed, student_bias, student_softcap: as in
      :func:`chunked_forward_kl`.
    teacher_hiddens, teacher_unembeds: one `[..., Dt_i]` / `[Dt_i, V_i]` per teacher.
    temperature, where, chunk_size, vocab: as in :func:`chunked_forward_kl`.
    teacher_biases, teacher_softcaps: one entry (or None) per teacher; default all None.

  Returns:
    `[N]` or `[B, T]` float32 per-token divergence.

  References:
    Hinton et al., 2015 (ensembles as teachers).
  """
  _check_t(temperature)
  n = len(teacher_hiddens)
  inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)

  def combine(logits):
    logp = jnp.stack([jax.nn.log_softmax(z * inv_t, axis=-1) for z in logits])
    return (jax.nn.logsumexp(logp, axis=0) - math.log(len(logits))) / inv_t

  return _chunked_pair_loss(
      functools.partial(_logit.forward_kl, temperature=temperature), student_hidden, student_unembed,
      tuple(teacher_hiddens), tuple(teacher_unembeds), where=where, chunk_size=chunk_size,
      student_bias=student_bias, teacher_bias=tuple(teacher_biases or (None,) * n),
      student_softcap=student_softcap, teacher_softcap=tuple(teacher_softcaps or (None,) * n), vocab=vocab,
      combine=combine)


# --------------------------------------------------------------------------- student-only losses


def _cross_entropy_chunk(z, labels, shared, mask, *, label_smoothing, vocab):
  """Cross-entropy of one chunk by sums over the vocabulary axis (no gather: V may be sharded)."""
  del shared
  cols = jnp.arange(z.shape[-1])
  lse = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.sum(jnp.where(cols == labels[..., None], z, 0.0), axis=-1)
  nll = lse - picked
  eps = label_smoothing
  if _reduce.is_static(eps) and not eps:
    return _reduce.mask_outputs(nll, mask)
  valid = cols < (vocab or z.shape[-1])
  mean_z = jnp.sum(jnp.where(valid, z, 0.0), axis=-1) / (vocab or z.shape[-1])
  smoothed = (1.0 - eps) * nll + eps * (lse - mean_z)
  if not _reduce.is_static(eps):
    smoothed = jnp.where(eps == 0, nll, smoothed)
  return _reduce.mask_outputs(smoothed, mask)


def chunked_cross_entropy(
    hidden: ArrayLike,
    unembed: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bias: ArrayLike | None = None,
    softcap: Optional[float] = None,
    vocab: Optional[int] = None,
) -> jax.Array:
  """Hard-label cross-entropy (see :func:`cross_entropy`) of ``head(h)``, chunked.

  .. math::
    -(1-\\varepsilon) \\log p(y) - \\frac{\\varepsilon}{V} \\sum_{v < V} \\log p(v)

  Args:
    hidden: `[N, D]` or `[B, T, D]` final hidden states.
    unembed: `[D, V]` unembedding.
    labels: `[N]` / `[B, T]` integer targets in ``[0, vocab)`` where ``where`` is set.
    where: optional boolean mask broadcastable to the token axes.
    label_smoothing: ε in [0, 1) (spread over the first ``vocab`` columns); a jax array is not
      checked.
    chunk_size: sequence positions per chunk.
    bias: optional `[V]` bias.
    softcap: optional final logit soft-capping.
    vocab: only the first ``vocab`` columns count.

  Returns:
    `[N]` or `[B, T]` float32 per-token loss.

  References:
    Szegedy et al., 2016; chunked as Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024).
  """
  _reduce.check_range("label_smoothing", label_smoothing, low=0, high=1, high_open=True)
  _reduce.check_positive_int("chunk_size", chunk_size)
  hs = jnp.asarray(hidden)
  head = _check_head("student", hs, Head(unembed, bias, softcap))
  vocab = _check_vocab(vocab, [head.kernel.shape[1]])
  lead = hs.shape[:-1]
  labels = jnp.asarray(labels)
  if labels.shape != lead or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels: shape {labels.shape} dtype {labels.dtype} must be integer of the token axes {lead}")
  mask = _reduce.mask_or_ones(where, lead)
  loss = functools.partial(_cross_entropy_chunk, label_smoothing=label_smoothing, vocab=vocab)
  return chunked_student_values(loss, _reduce.mask_inputs(hs, mask), head,
                                _reduce.mask_inputs(labels.astype(jnp.int32), mask), (), mask,
                                chunk_size=chunk_size, vocab=vocab)


def chunked_argmax(hidden: ArrayLike, unembed: ArrayLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   bias: ArrayLike | None = None, softcap: Optional[float] = None,
                   vocab: Optional[int] = None) -> jax.Array:
  """``argmax(head(h)[..., :vocab], -1)`` `[*lead]` int32, chunked (no gradient; e.g. top-1 agreement).

  Args:
    hidden: `[N, D]` or `[B, T, D]` final hidden states.
    unembed: `[D, V]` unembedding.
    chunk_size: sequence positions per chunk.
    bias: optional `[V]` bias.
    softcap: optional final logit soft-capping.
    vocab: only the first ``vocab`` columns count.

  Returns:
    `[N]` or `[B, T]` int32 ids.
  """
  hs = jax.lax.stop_gradient(jnp.asarray(hidden))
  head = _check_head("student", hs, Head(unembed, bias, softcap))
  head = Head(*jax.lax.stop_gradient((head.kernel, head.bias)), head.softcap)
  vocab = _check_vocab(vocab, [head.kernel.shape[1]])
  lead = hs.shape[:-1]
  _layout(lead, chunk_size)
  return map_chunks(lambda h: jnp.argmax(head_logits(h, head, vocab), axis=-1).astype(jnp.int32),
                    hs, lead, chunk_size)
