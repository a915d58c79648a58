"""Token-level logit distillation for large vocabularies without materializing logits.

From the final hidden states and the two unembedding matrices, the per-token divergence
is computed over chunks of tokens (``lax.map``), and a ``jax.custom_vjp`` recomputes each
chunk's logits in the backward pass (``lax.scan``), so neither model's `[tokens, V]`
logits exist whole: temporary memory is O(chunk_size · V) instead of O(tokens · V).
The teacher is a constant: it gets a zero cotangent.  Hyperparameters are checked as in
:mod:`distill_jax.losses._logit`; ``chunk_size`` must be a positive Python integer.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from distill_jax.losses import _logit
from distill_jax.losses import _reduce

DEFAULT_CHUNK_SIZE = 512

# (student_logits [K, V] f32, teacher_K (a pytree of per-token [K, ...] arrays), mask [K])
# -> values [K]
ChunkLoss = Callable[[jax.Array, Any, jax.Array], jax.Array]


def _logits(h_KxD: jax.Array, w_DxV: jax.Array, b_V: jax.Array) -> jax.Array:
  return jnp.dot(h_KxD, w_DxV, preferred_element_type=jnp.float32) + b_V


def _chunked_values(
    chunk_loss: ChunkLoss,
    hs_CxKxDs: jax.Array, ws_DsxV: jax.Array, bs_V: jax.Array,
    teacher_CxK: Any,
    mask_CxK: jax.Array,
) -> jax.Array:
  """Per-token values `[C, K]` with a memory-lean custom VJP (student gradients only).

  ``teacher_CxK`` is a pytree of constant per-token teacher inputs, each `[C, K, ...]`,
  handed chunk by chunk to ``chunk_loss``.  The custom VJP's backward pass closes over no
  tracer (that breaks e.g. ``grad(jit(...))``): the teacher, the mask and the float arrays
  ``chunk_loss`` closes over (a traced temperature, ...) are explicit inputs, the latter
  differentiated (a teacher under ``stop_gradient`` gets zero).
  """
  spec = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  loss, consts = jax.closure_convert(
      chunk_loss, jax.ShapeDtypeStruct((hs_CxKxDs.shape[1], ws_DsxV.shape[1]), jnp.float32),
      jax.tree.map(spec, teacher_CxK), spec(mask_CxK))

  @jax.custom_vjp
  def run(hs, ws, bs, teacher, mask, consts):
    return jax.lax.map(
        lambda xs: loss(_logits(xs[0], ws, bs), xs[1], xs[2], *consts), (hs, teacher, mask))

  def fwd(*args):
    return run(*args), args

  def bwd(res, g_CxK):
    hs, ws, bs, teacher, mask, consts = res

    def body(carry, xs):
      dws_acc, dbs_acc, dconsts_acc = carry
      hs_KxDs, teacher_K, mask_K, g_K = xs
      s_logits_KxV = _logits(hs_KxDs, ws, bs)
      _, vjp = jax.vjp(lambda z, c: loss(z, teacher_K, mask_K, *c), s_logits_KxV, consts)
      dz_KxV, dconsts = vjp(g_K.astype(jnp.float32))
      dh_KxDs = jnp.dot(dz_KxV, ws.T.astype(jnp.float32), preferred_element_type=jnp.float32)
      dws_acc = dws_acc + jnp.dot(
          hs_KxDs.T.astype(jnp.float32), dz_KxV, preferred_element_type=jnp.float32)
      dconsts_acc = jax.tree.map(jnp.add, dconsts_acc, dconsts)
      return (dws_acc, dbs_acc + jnp.sum(dz_KxV, axis=0), dconsts_acc), dh_KxDs.astype(hs.dtype)

    init = (jnp.zeros(ws.shape, jnp.float32), jnp.zeros(bs.shape, jnp.float32),
            jax.tree.map(jnp.zeros_like, consts))
    (dws, dbs, dconsts), dhs = jax.lax.scan(body, init, (hs, teacher, mask, g_CxK))
    return dhs, dws.astype(ws.dtype), dbs.astype(bs.dtype), None, None, dconsts

  run.defvjp(fwd, bwd)
  return run(hs_CxKxDs, ws_DsxV, bs_V, teacher_CxK, mask_CxK, consts)


def chunked_student_values(
    chunk_loss: ChunkLoss,
    hs_NxD: jax.Array, ws_DxV: jax.Array, bs_V: jax.Array,
    teacher_N: Any,
    mask_N: jax.Array,
    chunk_size: int,
) -> jax.Array:
  """Per-token values `[N]` of ``chunk_loss`` over chunks of ``chunk_size`` tokens.

  The student's logits ``hs @ ws + bs`` are recomputed chunk by chunk in the backward pass;
  ``teacher_N`` (a pytree of `[N, ...]` arrays) is constant.
  """
  n = hs_NxD.shape[0]
  chunk = min(chunk_size, max(n, 1))
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n

  def split(x):  # [N, ...] -> [C, chunk, ...], zero-padded
    if pad:
      x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape((num_chunks, chunk) + x.shape[1:])

  hs, teacher, mask = jax.tree.map(split, (hs_NxD, jax.lax.stop_gradient(teacher_N), mask_N))
  return _chunked_values(chunk_loss, hs, ws_DxV, bs_V, teacher, mask).reshape(-1)[:n]


def _chunked_token_loss(
    chunk_loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_unembed: ArrayLike,
    *,
    where: ArrayLike | None,
    chunk_size: int,
    student_bias: ArrayLike | None,
    teacher_bias: ArrayLike | None,
) -> jax.Array:
  """Flattens tokens and runs ``chunk_loss(student_logits, teacher_logits, mask)`` in chunks."""
  _reduce.check_positive_int("chunk_size", chunk_size)
  hs = jnp.asarray(student_hidden)
  ws = jnp.asarray(student_unembed)
  ht = jax.lax.stop_gradient(jnp.asarray(teacher_hidden))
  wt = jax.lax.stop_gradient(jnp.asarray(teacher_unembed))
  lead = hs.shape[:-1]
  if ht.shape[:-1] != lead:
    raise ValueError(f"token axes differ: student_hidden {hs.shape}, teacher_hidden {ht.shape}")
  if ws.shape[0] != hs.shape[-1] or wt.shape[0] != ht.shape[-1] or ws.shape[1] != wt.shape[1]:
    raise ValueError(
        f"unembedding shapes {ws.shape} (student) / {wt.shape} (teacher) must be "
        f"[hidden, V] with hidden {hs.shape[-1]} / {ht.shape[-1]} and the same V")
  vocab = ws.shape[1]
  bs = jnp.zeros((vocab,), jnp.float32) if student_bias is None else jnp.asarray(student_bias)
  bt = jnp.zeros((vocab,), jnp.float32) if teacher_bias is None else jnp.asarray(teacher_bias)
  bt = jax.lax.stop_gradient(bt)

  def loss(s_logits_KxV, ht_KxDt, mask_K):
    return chunk_loss(s_logits_KxV, jax.lax.stop_gradient(_logits(ht_KxDt, wt, bt)), mask_K)

  n = math.prod(lead)
  mask_N = _reduce.mask_or_ones(where, lead).reshape(n)
  hs = _reduce.mask_inputs(hs.reshape(n, -1), mask_N)
  ht = _reduce.mask_inputs(ht.reshape(n, -1), mask_N)
  return chunked_student_values(loss, hs, ws, bs, ht, mask_N, chunk_size).reshape(lead)


def chunked_forward_kl(
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_unembed: ArrayLike,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
) -> jax.Array:
  """Token-level forward KL(p_T‖p_S)·T² from hidden states, never materializing `[N, V]`.

  Equal (value and student gradients) to
  ``forward_kl(h_S @ W_S + b_S, h_T @ W_T + b_T, temperature=T, where=where)``, with
  temporary memory O(chunk_size · V). Matmuls accumulate in float32 whatever the dtype.

  .. math::
    T^2 \\sum_v p_T(v) (\\log p_T(v) - \\log p_S(v)),\\quad
    p_S = \\mathrm{softmax}((h_S W_S + b_S) / T)

  Args:
    student_hidden: `[N, Ds]` or `[B, T, Ds]` final student hidden states.
    student_unembed: `[Ds, V]` student unembedding (LM head) matrix.
    teacher_hidden: `[N, Dt]` or `[B, T, Dt]` final teacher hidden states (constant).
    teacher_unembed: `[Dt, V]` teacher unembedding matrix (constant).
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to the token axes `[N]` / `[B, T]`.
    chunk_size: tokens per chunk (a positive integer); the token count need not be
      divisible by it.
    student_bias: optional `[V]` student unembedding bias (differentiated).
    teacher_bias: optional `[V]` teacher unembedding bias (constant).

  Returns:
    `[N]` or `[B, T]` float32 per-token divergence.

  References:
    Hinton et al., 2015; chunked recomputation as in Liger-Kernel's fused linear
    cross-entropy (Hsu et al., 2024).
  """
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  loss = functools.partial(_chunk_forward_kl, temperature=temperature)
  return _chunked_token_loss(
      loss, student_hidden, student_unembed, teacher_hidden, teacher_unembed,
      where=where, chunk_size=chunk_size, student_bias=student_bias, teacher_bias=teacher_bias)


def chunked_generalized_jsd(
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_unembed: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    normalized: bool = False,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
) -> jax.Array:
  """Token-level generalized JSD·T² (see :func:`generalized_jsd`) from hidden states, chunked.

  .. math::
    T^2 \\big(\\beta KL(p_T\\|M) + (1-\\beta) KL(p_S\\|M)\\big),\\quad
    M = \\beta p_T + (1-\\beta) p_S

  Args:
    student_hidden: `[N, Ds]` or `[B, T, Ds]` final student hidden states.
    student_unembed: `[Ds, V]` student unembedding matrix.
    teacher_hidden: `[N, Dt]` or `[B, T, Dt]` final teacher hidden states (constant).
    teacher_unembed: `[Dt, V]` teacher unembedding matrix (constant).
    beta: teacher weight of the mixture, in [0, 1]; 0 is forward KL, 1 reverse KL; a jax
      array is not checked.
    temperature: softmax temperature T > 0; a jax array is not checked.
    where: optional boolean mask broadcastable to the token axes.
    chunk_size: tokens per chunk (a positive integer).
    normalized: divide the interior value by β(1-β) (continuous at the ends).
    student_bias: optional `[V]` student unembedding bias.
    teacher_bias: optional `[V]` teacher unembedding bias (constant).

  Returns:
    `[N]` or `[B, T]` float32 per-token divergence.

  References:
    Agarwal et al., "On-Policy Distillation of Language Models" (GKD), 2024.
  """
  _reduce.check_range("beta", beta, low=0, high=1)
  _reduce.check_range("temperature", temperature, low=0, low_open=True)
  loss = functools.partial(
      _chunk_generalized_jsd, beta=beta, temperature=temperature, normalized=normalized)
  return _chunked_token_loss(
      loss, student_hidden, student_unembed, teacher_hidden, teacher_unembed,
      where=where, chunk_size=chunk_size, student_bias=student_bias, teacher_bias=teacher_bias)


def _chunk_forward_kl(s, t, mask, *, temperature):
  return _logit.forward_kl(s, t, temperature=temperature, where=mask)


def _chunk_generalized_jsd(s, t, mask, *, beta, temperature, normalized):
  return _logit.generalized_jsd(
      s, t, beta=beta, temperature=temperature, where=mask, normalized=normalized)
