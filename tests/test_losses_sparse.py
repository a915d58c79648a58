"""Sparse top-k + tail logit losses against an independent NumPy/SciPy reference, plus properties."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from distill_jax import losses
from test_losses_logit import _np_entropy, _ref_jsd  # the dense references, on bucket probabilities

VOCAB, K = 37, 6


def _logits(seed, lead, vocab=VOCAB, scale=2.0):
  return (scale * np.random.RandomState(seed).randn(*lead, vocab)).astype(np.float32)


def _teacher(t, k=K, quantize=False):
  """The cache ``(ids, logprobs, log_tail)`` of teacher logits ``t``: its top-k and the rest."""
  logp = scipy.special.log_softmax(np.asarray(t, np.float64), axis=-1)
  order = np.argsort(-logp, axis=-1, kind="stable")
  ids = order[..., :k].astype(np.int32)
  logprobs = np.take_along_axis(logp, ids, axis=-1)
  if k == t.shape[-1]:
    log_tail = np.full(t.shape[:-1], -np.inf)
  else:
    log_tail = scipy.special.logsumexp(np.take_along_axis(logp, order[..., k:], -1), axis=-1)
  if quantize:  # a bf16 cache: the K+1 stored probabilities no longer sum to one
    logprobs, log_tail = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
                          for x in (logprobs, log_tail))
  return ids, logprobs.astype(np.float32), log_tail.astype(np.float32)


def _np_bucket_probs(s, ids, logprobs, log_tail, temperature):
  """Tempered K+1 bucket probabilities (student, teacher), float64, from the definitions."""
  logq = scipy.special.log_softmax(np.asarray(s, np.float64), axis=-1)
  student = np.empty(ids.shape[:-1] + (ids.shape[-1] + 1,))
  for i in np.ndindex(*ids.shape[:-1]):
    others = np.setdiff1d(np.arange(s.shape[-1]), ids[i])
    tail = scipy.special.logsumexp(logq[i][others]) if others.size else -np.inf
    student[i] = np.append(logq[i][ids[i]], tail)
  teacher = np.concatenate([logprobs, log_tail[..., None]], axis=-1).astype(np.float64)
  teacher = teacher - scipy.special.logsumexp(teacher, axis=-1, keepdims=True)  # renormalize
  return tuple(scipy.special.softmax(b / temperature, axis=-1) for b in (student, teacher))


# name -> (sparse loss, dense loss, kwargs, numpy reference on bucket probabilities (qs, pt))
CASES = {
    "forward_kl": (losses.sparse_forward_kl, losses.forward_kl, {},
                   lambda qs, pt: _np_entropy(pt, qs)),
    "reverse_kl": (losses.sparse_reverse_kl, losses.reverse_kl, {},
                   lambda qs, pt: _np_entropy(qs, pt)),
    "jsd": (losses.sparse_generalized_jsd, losses.generalized_jsd, {"beta": 0.3},
            lambda qs, pt: _ref_jsd(qs, pt, 0.3)),
    "jsd_normalized": (losses.sparse_generalized_jsd, losses.generalized_jsd,
                       {"beta": 0.7, "normalized": True},
                       lambda qs, pt: _ref_jsd(qs, pt, 0.7, normalized=True)),
}
NAMES = sorted(CASES)
CHUNKED = {
    "forward_kl": losses.chunked_sparse_forward_kl,
    "jsd": losses.chunked_sparse_generalized_jsd,
    "jsd_normalized": losses.chunked_sparse_generalized_jsd,
}


def _sparse(name):
  """The sparse loss ``name`` with its hyperparameters bound (not jitted)."""
  fn, _, kwargs, _ = CASES[name]
  return functools.partial(fn, **kwargs)


def _each(fn_of_name, names=NAMES):
  """``{name: fn_of_name(name)}``: under one ``jax.jit``, every loss in a single compile."""
  return {name: fn_of_name(name) for name in names}


def _values_and_grads(fn, *xs):
  """``fn(*xs)`` and the gradients of its sum with respect to each of ``xs``."""
  values, vjp = jax.vjp(fn, *xs)
  return values, vjp(jnp.ones_like(values))


@pytest.mark.parametrize("lead, chunk_size, quantize", [
    ((13,), 4, False), ((2, 7), 5, True), ((2, 3, 5), 512, True)])
def test_golden_against_numpy(lead, chunk_size, quantize):
  s, t = _logits(0, lead), _logits(1, lead)
  teacher = _teacher(t, quantize=quantize)
  where = np.random.RandomState(2).rand(*lead) > 0.25
  run = jax.jit(lambda s, teacher, where, temperature: _each(lambda name: _sparse(name)(
      s, *teacher, temperature=temperature, where=where, chunk_size=chunk_size)))
  for temperature in (1.0, 2.5):
    got = run(s, teacher, where, temperature)
    probs = _np_bucket_probs(s, *teacher, temperature)
    for name in NAMES:
      want = CASES[name][3](*probs) * temperature**2
      assert got[name].shape == lead and got[name].dtype == jnp.float32
      np.testing.assert_allclose(got[name], np.where(where, want, 0.0), rtol=2e-5, atol=1e-6,
                                 err_msg=f"{name} T={temperature}")


def test_full_support_equals_dense_loss():
  s, t = _logits(3, (3, 5)), _logits(4, (3, 5))
  teacher = _teacher(t, k=VOCAB)
  assert np.all(np.isneginf(teacher[2]))

  def both(s, temperature):
    def pair(name):
      dense = functools.partial(CASES[name][1], temperature=temperature, **CASES[name][2])
      return (_values_and_grads(lambda s: _sparse(name)(
                  s, *teacher, temperature=temperature, chunk_size=4), s),
              _values_and_grads(lambda s: dense(s, t), s))
    return _each(pair)

  run = jax.jit(both)
  for temperature in (1.0, 2.5):
    for name, ((v_sparse, (g_sparse,)), (v_dense, (g_dense,))) in run(s, temperature).items():
      message = f"{name} T={temperature}"
      np.testing.assert_allclose(v_sparse, v_dense, rtol=1e-5, atol=1e-6, err_msg=message)
      assert np.all(np.isfinite(g_sparse)), message
      np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-4, atol=1e-6, err_msg=message)


def test_zero_when_student_equals_teacher():
  t = _logits(5, (4, 6))
  got = jax.jit(lambda s: _each(lambda name: _sparse(name)(
      s, *_teacher(t), temperature=1.7, chunk_size=5)))(t + 3.0)  # shifted: the same p
  for name in NAMES:
    np.testing.assert_allclose(got[name], 0.0, atol=1e-5, err_msg=name)


def _jax_reference(name, s, ids, logprobs, log_tail, temperature):
  """The bucket divergences written directly in jax from the definitions (no chunks)."""
  _, _, kwargs, _ = CASES[name]
  logq = jax.nn.log_softmax(jnp.asarray(s, jnp.float32), axis=-1)
  kept = jnp.any(jnp.arange(s.shape[-1]) == ids[..., None], axis=-2)
  tail = jax.nn.logsumexp(jnp.where(kept, -jnp.inf, logq), axis=-1)
  student = jnp.concatenate([jnp.take_along_axis(logq, ids, -1), tail[..., None]], -1)
  teacher = jnp.concatenate([logprobs, log_tail[..., None]], -1)
  ls, lt = (jax.nn.log_softmax(b / temperature, axis=-1) for b in (student, teacher))
  if name == "forward_kl":
    value = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
  elif name == "reverse_kl":
    value = jnp.sum(jnp.exp(ls) * (ls - lt), -1)
  else:
    beta = kwargs["beta"]
    lm = jnp.logaddexp(np.log(beta) + lt, np.log1p(-beta) + ls)
    value = (beta * jnp.sum(jnp.exp(lt) * (lt - lm), -1)
             + (1 - beta) * jnp.sum(jnp.exp(ls) * (ls - lm), -1))
    if kwargs.get("normalized"):
      value = value / (beta * (1 - beta))
  return value * temperature**2


def test_gradient_equals_reference_in_jax():
  lead = (3, 7)
  s = _logits(6, lead)
  teacher = _teacher(_logits(7, lead), quantize=True)
  where = np.random.RandomState(8).rand(*lead) > 0.3
  got = jax.jit(lambda s: _each(lambda name: (
      _values_and_grads(lambda s: _sparse(name)(
          s, *teacher, temperature=2.0, where=where, chunk_size=6), s),
      _values_and_grads(lambda s: jnp.where(
          where, _jax_reference(name, s, *teacher, 2.0), 0.0), s))))(s)
  for name, ((v_sparse, (g_sparse,)), (v_ref, (g_ref,))) in got.items():
    np.testing.assert_allclose(v_sparse, v_ref, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(g_sparse, g_ref, rtol=1e-4, atol=1e-7, err_msg=name)


def _hidden(seed, lead, dim=8):
  rng = np.random.RandomState(seed)
  return (rng.randn(*lead, dim).astype(np.float32), (0.7 * rng.randn(dim, VOCAB)).astype(np.float32),
          (0.1 * rng.randn(VOCAB)).astype(np.float32))


def test_chunked_equals_sparse_of_logits():
  lead = (3, 11)  # 33 tokens: 5 chunks of 8, the last one padded
  hs, ws, bs = _hidden(9, lead)
  teacher = _teacher(_logits(10, lead), quantize=True)
  where = np.random.RandomState(11).rand(*lead) > 0.2

  def pair(name):
    kw = dict(CASES[name][2], temperature=2.0, where=where, chunk_size=8)
    chunked = lambda hs, ws, bs: CHUNKED[name](hs, ws, *teacher, student_bias=bs, **kw)
    sparse = lambda hs, ws, bs: CASES[name][0](hs @ ws + bs, *teacher, **kw)
    return _values_and_grads(chunked, hs, ws, bs), _values_and_grads(sparse, hs, ws, bs)

  got = jax.jit(lambda: _each(pair, sorted(CHUNKED)))()
  for name, ((v_fast, g_fast), (v_slow, g_slow)) in got.items():
    np.testing.assert_allclose(v_fast, v_slow, rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(g_fast, g_slow):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))),
                                 err_msg=name)


def test_chunked_without_bias_and_teacher_gets_zero_gradient():
  hs, ws, _ = _hidden(12, (10,))
  ids, logprobs, log_tail = _teacher(_logits(13, (10,)))
  chunked = lambda lp, tail: losses.chunked_sparse_forward_kl(hs, ws, ids, lp, tail, chunk_size=3)
  (values, grads), want = jax.jit(lambda lp, tail: (
      _values_and_grads(chunked, lp, tail), losses.sparse_forward_kl(hs @ ws, ids, lp, tail)))(
          logprobs, log_tail)
  np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-7)
  assert all(np.all(g == 0.0) for g in grads)


def test_check_grads():
  s = _logits(14, (2, 5), scale=1.0)
  teacher = _teacher(_logits(15, (2, 5)))
  fn = jax.jit(lambda s: jnp.stack([_sparse(name)(
      s, *teacher, temperature=1.5, chunk_size=3) for name in NAMES]))
  check_grads(fn, (s,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-3)


def test_check_grads_chunked():
  hs, ws, bs = _hidden(16, (2, 5))
  teacher = _teacher(_logits(17, (2, 5)))
  fn = jax.jit(lambda hs, ws, bs: jnp.stack([CHUNKED[name](
      hs, ws, *teacher, student_bias=bs, chunk_size=3, **CASES[name][2]) for name in CHUNKED]))
  check_grads(fn, (hs, ws, bs), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-3)


def test_bf16_student_logits_give_f32_close_to_f32_path():
  s, t = _logits(18, (4, 5)), _logits(19, (4, 5))
  teacher = _teacher(t)
  names = ["forward_kl", "jsd"]  # the cast precedes the divergence: the same for every loss
  run = jax.jit(lambda s: _each(lambda name: _values_and_grads(
      lambda s: _sparse(name)(s, *teacher, chunk_size=3), s), names))
  s16 = jnp.asarray(s, jnp.bfloat16)
  got, upcast, full = run(s16), run(np.asarray(s16, np.float32)), run(s)
  for name in names:
    (v16, (g16,)), (v_up, (g_up,)), (v32, (g32,)) = got[name], upcast[name], full[name]
    assert v16.dtype == jnp.float32 and g16.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(v16, v_up, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(g16.astype(np.float32), g_up, rtol=1e-2, atol=1e-3, err_msg=name)
    np.testing.assert_allclose(v16, v32, rtol=0.05, atol=0.02, err_msg=name)
    np.testing.assert_allclose(g16.astype(np.float32), g32, rtol=0.05, atol=0.02, err_msg=name)


def _garbage_at(where, s, ids, logprobs, log_tail):
  s, ids, logprobs, log_tail = (np.array(x) for x in (s, ids, logprobs, log_tail))
  s[~where] = np.nan
  ids[~where] = np.array([-7, VOCAB + 100, 0, 0, 1, 2])[: ids.shape[-1]]
  logprobs[~where] = np.nan
  log_tail[~where] = np.inf
  return s, ids, logprobs, log_tail


def test_masked_positions_give_zero_value_and_gradient_despite_garbage():
  lead = (3, 6)
  s = _logits(20, lead)
  teacher = _teacher(_logits(21, lead))
  where = np.ones(lead, bool)
  where[0, 1] = where[2, 5] = where[1, 0] = False
  run = jax.jit(lambda s, ids, lp, tail: _each(lambda name: _values_and_grads(
      lambda s, lp: _sparse(name)(s, ids, lp, tail, temperature=2.0, where=where, chunk_size=4),
      s, lp)))
  clean, got = run(s, *teacher), run(*_garbage_at(where, s, *teacher))
  for name, (values, grads) in got.items():
    np.testing.assert_array_equal(values[~where], 0.0, err_msg=name)
    np.testing.assert_allclose(values, clean[name][0], rtol=1e-6, atol=1e-7, err_msg=name)
    assert all(np.all(np.isfinite(g)) for g in grads), name
    assert all(np.all(g[~where] == 0.0) for g in grads), name
    for g, g_clean in zip(grads, clean[name][1]):
      np.testing.assert_allclose(g, g_clean, rtol=1e-6, atol=1e-7, err_msg=name)


def test_chunked_masked_positions_give_zero_value_and_gradient():
  lead = (11,)
  hs, ws, bs = _hidden(22, lead)
  teacher = _teacher(_logits(23, lead))
  where = np.arange(11) % 4 != 1
  run = jax.jit(lambda hs, ids, lp, tail: _each(lambda name: _values_and_grads(
      lambda hs, ws, bs: CHUNKED[name](hs, ws, ids, lp, tail, student_bias=bs, where=where,
                                       chunk_size=4, **CASES[name][2]), hs, ws, bs),
      sorted(CHUNKED)))
  clean, got = run(hs, *teacher), run(*_garbage_at(where, hs, *teacher))
  for name, (values, grads) in got.items():
    np.testing.assert_array_equal(values[~where], 0.0, err_msg=name)
    np.testing.assert_allclose(values, clean[name][0], rtol=1e-6, atol=1e-7, err_msg=name)
    assert all(np.all(np.isfinite(g)) for g in grads), name
    np.testing.assert_array_equal(grads[0][~where], 0.0, err_msg=name)
    for g, g_clean in zip(grads, clean[name][1]):
      np.testing.assert_allclose(g, g_clean, rtol=1e-5, atol=1e-7, err_msg=name)


def test_infinite_tails_give_no_nan():
  lead = (2, 5)
  s, t = _logits(24, lead), _logits(25, lead)
  ids, logprobs, log_tail = _teacher(t)
  no_tail = np.full(lead, -np.inf, np.float32)  # teacher: all mass on its top-k (K < V)
  kept = np.zeros(s.shape, bool)
  np.put_along_axis(kept, ids, True, axis=-1)
  s_no_tail = np.where(kept, s, -np.inf).astype(np.float32)  # student: no mass off the top-k
  run = jax.jit(lambda s, tail: _each(lambda name: _values_and_grads(
      lambda s: _sparse(name)(s, ids, logprobs, tail, temperature=1.5, chunk_size=3), s)))
  # KL(q‖p) with p_tail = 0 < q_tail, and KL(p‖q) with q_tail = 0 < p_tail, are +inf.
  for student, tail, infinite in ((s, no_tail, "reverse_kl"), (s_no_tail, log_tail, "forward_kl")):
    for name, (values, (grad,)) in run(student, tail).items():
      if name == infinite:
        assert np.all(np.isposinf(values)), (name, values)
      else:
        assert np.all(np.isfinite(values)) and np.all(np.isfinite(grad)), (name, values)


def test_traced_beta_and_temperature_equal_python_floats():
  s, t = _logits(26, (9,)), _logits(27, (9,))
  teacher = _teacher(t, quantize=True)
  betas = (0.0, 0.3, 1.0)
  loss = lambda s, b, temp: losses.sparse_generalized_jsd(
      s, *teacher, beta=b, temperature=temp, chunk_size=4)
  traced = jax.jit(loss)
  static = jax.jit(lambda s: [loss(s, b, 2.0) for b in betas] + [
      f(s, *teacher, temperature=2.0, chunk_size=4)
      for f in (losses.sparse_forward_kl, losses.sparse_reverse_kl)])(s)
  for beta, want in zip(betas, static):
    np.testing.assert_allclose(traced(s, beta, 2.0), want, rtol=1e-6, atol=1e-7, err_msg=beta)
  np.testing.assert_array_equal(static[0], static[3])  # beta = 0 is forward KL exactly
  np.testing.assert_array_equal(static[2], static[4])  # beta = 1 is reverse KL exactly


VOCAB_BIG, K_BIG, CHUNK = 4096, 32, 256


def _temp_bytes(fn, n, dtype=jnp.float32):
  shapes = [jax.ShapeDtypeStruct((n, VOCAB_BIG), dtype), jax.ShapeDtypeStruct((n, K_BIG), jnp.int32),
            jax.ShapeDtypeStruct((n, K_BIG), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32)]
  grad = jax.grad(lambda *a: jnp.sum(fn(*a)))
  return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def _naive(s, ids, logprobs, log_tail):
  return _jax_reference("forward_kl", s, ids, logprobs, log_tail, 1.0)


def test_temporary_memory_flat_in_tokens():
  sparse = functools.partial(losses.sparse_forward_kl, chunk_size=CHUNK)
  tokens = (512, 2000)  # 2000: not a multiple of the chunk, still no padded copy
  fast = [_temp_bytes(sparse, n) for n in tokens]
  slow = _temp_bytes(_naive, tokens[0])
  # Naive holds [tokens, V] f32 arrays (8 MiB each at 512 tokens); everything stays < 1 GB.
  assert all(0 < b < 1 << 30 for b in fast + [slow]), (fast, slow)
  assert slow > tokens[0] * VOCAB_BIG * 4, slow
  assert fast[-1] < 1.5 * fast[0] + (1 << 20), fast  # only O(tokens * K) grows
  assert fast[-1] < slow, (fast, slow)
  # bf16 logits: no float32 copy of them either (each chunk is cast inside the loop).
  assert _temp_bytes(sparse, 2000, jnp.bfloat16) < 1.5 * fast[0] + (1 << 20)


_S, _T = _logits(28, (2, 7)), _logits(29, (2, 7))
_IDS, _LP, _TAIL = _teacher(_T, k=5)
BAD_HYPERPARAMETERS = [
    ("sparse_forward_kl", {"temperature": 0.0}, "temperature: 0.0 must be > 0"),
    ("sparse_forward_kl", {"temperature": float("nan")}, "temperature: nan must be finite"),
    ("sparse_forward_kl", {"chunk_size": 0}, "chunk_size: 0 must be a positive integer"),
    ("sparse_forward_kl", {"chunk_size": 2.5}, "chunk_size: 2.5 must be a positive integer"),
    ("sparse_reverse_kl", {"temperature": -1.0}, "temperature: -1.0 must be > 0"),
    ("sparse_reverse_kl", {"chunk_size": True}, "chunk_size: True must be a positive integer"),
    ("sparse_generalized_jsd", {"beta": 1.5}, "beta: 1.5 must be in [0, 1]"),
    ("sparse_generalized_jsd", {"beta": -0.1}, "beta: -0.1 must be in [0, 1]"),
    ("sparse_generalized_jsd", {"temperature": 0}, "temperature: 0 must be > 0"),
    ("sparse_generalized_jsd", {"normalized": "yes"},
     "normalized: 'yes' must be one of [False, True]"),
    ("chunked_sparse_forward_kl", {"temperature": -2.0}, "temperature: -2.0 must be > 0"),
    ("chunked_sparse_forward_kl", {"chunk_size": -4}, "chunk_size: -4 must be a positive integer"),
    ("chunked_sparse_generalized_jsd", {"beta": 2}, "beta: 2 must be in [0, 1]"),
    ("chunked_sparse_generalized_jsd", {"chunk_size": 0}, "chunk_size: 0 must be a positive integer"),
]


def _call(name, student=None, ids=_IDS, logprobs=_LP, log_tail=_TAIL, **kwargs):
  if name.startswith("chunked"):
    hs, ws, _ = _hidden(30, (2, 7))
    return getattr(losses, name)(hs if student is None else student, ws, ids, logprobs, log_tail,
                                 **kwargs)
  return getattr(losses, name)(_S if student is None else student, ids, logprobs, log_tail,
                               **kwargs)


@pytest.mark.parametrize("name, kwargs, message", BAD_HYPERPARAMETERS,
                         ids=[f"{n}-{k}={v}" for n, kw, _ in BAD_HYPERPARAMETERS for k, v in kw.items()])
def test_bad_static_hyperparameter_raises_one_line_error(name, kwargs, message):
  with pytest.raises(ValueError) as info:
    _call(name, **kwargs)
  assert str(info.value) == message


BAD_SHAPES = [
    ({"ids": _IDS.astype(np.float32)}, "teacher_ids: dtype float32 must be an integer dtype"),
    ({"logprobs": _LP[..., :4]}, "teacher_logprobs shape (2, 7, 4) != teacher_ids shape (2, 7, 5)"),
    ({"ids": _IDS[:, :6], "logprobs": _LP[:, :6]},
     "teacher_ids shape (2, 6, 5) must be [..., K] with the student's leading axes (2, 7)"),
    ({"log_tail": _TAIL[:, 0]},
     "teacher_log_tail shape (2,) must be the student's leading axes (2, 7)"),
    ({"ids": np.zeros((2, 7, 40), np.int32), "logprobs": np.zeros((2, 7, 40), np.float32)},
     "teacher_ids: K = 40 exceeds the vocabulary size V = 37"),
]


@pytest.mark.parametrize("name", ["sparse_forward_kl", "chunked_sparse_generalized_jsd"])
@pytest.mark.parametrize("inputs, message", BAD_SHAPES, ids=[m.split(" ")[0] for _, m in BAD_SHAPES])
def test_bad_teacher_shape_or_dtype_raises_one_line_error(name, inputs, message):
  with pytest.raises(ValueError) as info:
    _call(name, **inputs)
  assert str(info.value) == message


def test_bad_student_shapes_raise_one_line_errors():
  hs, ws, bs = _hidden(31, (2, 7))
  for call, message in (
      (lambda: losses.sparse_forward_kl(np.float32(1.0), _IDS, _LP, _TAIL),
       "student_logits must have a vocabulary axis [..., V]"),
      (lambda: losses.chunked_sparse_forward_kl(hs, ws[:5], _IDS, _LP, _TAIL),
       "student_unembed shape (5, 37) must be [hidden, V] with the hidden size of "
       "student_hidden (2, 7, 8)"),
      (lambda: losses.chunked_sparse_forward_kl(hs, ws, _IDS, _LP, _TAIL, student_bias=bs[:9]),
       "student_bias shape (9,) must be [V] = (37,)")):
    with pytest.raises(ValueError) as info:
      call()
    assert str(info.value) == message
