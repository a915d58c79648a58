"""Logit losses against independent NumPy/SciPy references, plus their properties."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from jax.test_util import check_grads

from distill_jax import losses

SHAPE = (2, 3, 7)


def _np_probs(logits, temperature=1.0):
  return scipy.special.softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


def _np_entropy(p, q):
  return scipy.stats.entropy(p, q, axis=-1)


def _ref_jsd(ps, pt, beta, normalized=False):
  m = beta * pt + (1 - beta) * ps
  value = beta * _np_entropy(pt, m) + (1 - beta) * _np_entropy(ps, m)
  return value / (beta * (1 - beta)) if normalized else value


# name -> (jax loss taking (student, teacher, temperature=, where=), numpy ref on probs (ps, pt))
DIVERGENCES = {
    "forward_kl": (losses.forward_kl, lambda ps, pt: _np_entropy(pt, ps)),
    "reverse_kl": (losses.reverse_kl, lambda ps, pt: _np_entropy(ps, pt)),
    "jsd_0.5": (functools.partial(losses.generalized_jsd, beta=0.5),
                lambda ps, pt: _ref_jsd(ps, pt, 0.5)),
    "jsd_0.3": (functools.partial(losses.generalized_jsd, beta=0.3),
                lambda ps, pt: _ref_jsd(ps, pt, 0.3)),
    "jsd_0.3_normalized": (functools.partial(losses.generalized_jsd, beta=0.3, normalized=True),
                           lambda ps, pt: _ref_jsd(ps, pt, 0.3, normalized=True)),
    "skew_kl": (losses.skew_kl, lambda ps, pt: _np_entropy(pt, 0.1 * pt + 0.9 * ps)),
    "skew_reverse_kl": (losses.skew_reverse_kl,
                        lambda ps, pt: _np_entropy(ps, 0.9 * pt + 0.1 * ps)),
    "total_variation": (losses.total_variation,
                        lambda ps, pt: 0.5 * np.sum(np.abs(pt - ps), axis=-1)),
}
NAMES = sorted(DIVERGENCES)


def _pair(seed=0, shape=SHAPE, scale=2.0):
  rng = np.random.RandomState(seed)
  return tuple((scale * rng.randn(*shape)).astype(np.float32) for _ in range(2))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name", NAMES)
def test_golden_against_numpy(name, temperature):
  fn, ref = DIVERGENCES[name]
  s, t = _pair()
  got = jax.jit(functools.partial(fn, temperature=temperature))(s, t)
  want = ref(_np_probs(s, temperature), _np_probs(t, temperature)) * temperature**2
  assert got.shape == SHAPE[:-1] and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_reference_text_worked_example_true_value():
  # The reference text prints 0.0201358; scipy.stats.entropy gives the true 0.0257321.
  teacher, student = np.array([0.8, 0.2]), np.array([0.7, 0.3])
  got = jax.jit(losses.forward_kl)(np.log(student), np.log(teacher))
  np.testing.assert_allclose(got, scipy.stats.entropy(teacher, student), rtol=1e-6)
  np.testing.assert_allclose(got, 0.0257321, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_distributions_equal(name):
  s, _ = _pair()
  # Shifted logits give the same distribution.
  np.testing.assert_allclose(DIVERGENCES[name][0](s, s + 3.0, temperature=1.7), 0.0, atol=1e-5)


def test_forward_and_reverse_kl_differ_on_asymmetric_pair():
  s, t = np.log([0.7, 0.2, 0.1]), np.log([0.1, 0.1, 0.8])
  assert abs(float(losses.forward_kl(s, t)) - float(losses.reverse_kl(s, t))) > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_temperature_squared_scaling(name):
  fn = DIVERGENCES[name][0]
  s, t = _pair(1)
  np.testing.assert_allclose(
      fn(3.0 * s, 3.0 * t, temperature=3.0), 9.0 * fn(s, t), rtol=1e-4, atol=1e-6)


def test_jsd_symmetric_at_half():
  s, t = _pair(2)
  np.testing.assert_allclose(
      losses.generalized_jsd(s, t, beta=0.5), losses.generalized_jsd(t, s, beta=0.5), rtol=1e-5)


@pytest.mark.parametrize("normalized", [False, True])
def test_jsd_exact_endpoints_static_and_traced(normalized):
  s, t = _pair(3)
  fkl, rkl = losses.forward_kl(s, t), losses.reverse_kl(s, t)
  traced = jax.jit(lambda b: losses.generalized_jsd(s, t, beta=b, normalized=normalized))
  for beta, want in ((0.0, fkl), (1.0, rkl)):
    np.testing.assert_array_equal(
        losses.generalized_jsd(s, t, beta=beta, normalized=normalized), want)
    np.testing.assert_allclose(traced(beta), want, rtol=1e-6)
  np.testing.assert_allclose(
      traced(0.3), losses.generalized_jsd(s, t, beta=0.3, normalized=normalized), rtol=1e-5)


def test_normalized_jsd_continuous_into_both_ends():
  s, t = _pair(4)
  ps, pt = _np_probs(s), _np_probs(t)
  fkl, rkl = losses.forward_kl(s, t), losses.reverse_kl(s, t)
  for beta in (1e-4, 1 - 1e-4):  # accurate near the ends, not only in the interior
    np.testing.assert_allclose(
        losses.generalized_jsd(s, t, beta=beta, normalized=True),
        _ref_jsd(ps, pt, beta, normalized=True), rtol=1e-4)
  np.testing.assert_allclose(
      losses.generalized_jsd(s, t, beta=1e-6, normalized=True), fkl, rtol=2e-4)
  np.testing.assert_allclose(
      losses.generalized_jsd(s, t, beta=1 - 1e-6, normalized=True), rkl, rtol=2e-3)
  # The unnormalized interior tends to 0 at the ends (documented jump).
  assert float(jnp.max(losses.generalized_jsd(s, t, beta=1e-4))) < 1e-3 * float(jnp.max(fkl))


def _all_logit_losses():
  fns = {name: fn for name, (fn, _) in DIVERGENCES.items()}
  # Hard labels taken from the teacher's argmax, so slicing keeps them aligned.
  fns["cross_entropy"] = lambda s, t, where=None: losses.cross_entropy(
      s, jnp.argmax(jnp.asarray(t), axis=-1), where=where, label_smoothing=0.1)
  return fns


ALL = _all_logit_losses()


@pytest.mark.parametrize("name", sorted(ALL))
def test_mask_equals_slicing_and_blocks_nan_gradients(name):
  fn = ALL[name]
  s, t = _pair(5)
  where = np.ones(SHAPE[:-1], bool)
  where[0, 1] = where[1, 2] = False
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[~where] = np.nan
  t_bad[0, 1, 0] = np.inf
  values = jax.jit(lambda s, t: fn(s, t, where=where))(s_bad, t_bad)
  np.testing.assert_allclose(values[where], fn(s[where], t[where]), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(values[~where], 0.0)
  grad = jax.jit(jax.grad(lambda s: losses.masked_mean(fn(s, t_bad, where=where), where)))(s_bad)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[~where], 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_top_k_teacher_with_full_support_equals_full_path(name):
  fn = DIVERGENCES[name][0]
  s, t = _pair(6)
  perm = np.argsort(-t, axis=-1)  # top-k order, K = V
  topk = (np.take_along_axis(t, perm, -1), perm)
  np.testing.assert_allclose(
      jax.jit(lambda s, vals, idx: fn(s, (vals, idx), temperature=1.5))(s, *topk),
      fn(s, t, temperature=1.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_top_k_teacher_renormalizes_both_over_the_support(name):
  fn, ref = DIVERGENCES[name]
  s, t = _pair(7)
  idx = np.argsort(-t, axis=-1)[..., :3]
  vals = np.take_along_axis(t, idx, -1)
  want = ref(_np_probs(np.take_along_axis(s, idx, -1)), _np_probs(vals))
  np.testing.assert_allclose(fn(s, (vals, idx)), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL))
def test_check_grads(name):
  fn = ALL[name]
  s, t = _pair(8, shape=(2, 5), scale=1.0)
  check_grads(lambda s: fn(s, t), (s,), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2, eps=1e-3)


@pytest.mark.parametrize("name", sorted(ALL))
def test_bf16_inputs_give_f32_close_to_f32_path(name):
  fn = ALL[name]
  s, t = _pair(10)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = fn(s16, t16)
  assert got.dtype == jnp.float32
  want = fn(np.asarray(s16, np.float32), np.asarray(t16, np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, fn(s, t), rtol=0.1, atol=0.05)


@pytest.mark.parametrize("name", sorted(ALL))
def test_extreme_logits_and_one_hot_teacher_are_finite(name):
  fn = ALL[name]
  rng = np.random.RandomState(11)
  s = (1e4 * np.sign(rng.randn(*SHAPE))).astype(np.float32)
  t = np.full(SHAPE, -np.inf, np.float32)
  t[..., 0] = 0.0  # one-hot teacher given as log-probabilities
  for teacher in (t, -s):
    if name == "reverse_kl" and teacher is t:
      # KL(p_S‖p_T) is genuinely infinite where p_T = 0 exactly (documented).
      assert np.all(fn(s, teacher) >= 0) and np.isposinf(fn(s, teacher)).any()
      continue
    value, grad = jax.value_and_grad(lambda s: jnp.sum(fn(s, teacher)))(s)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_cross_entropy_golden_with_smoothing_and_ignore_index():
  rng = np.random.RandomState(12)
  logits = rng.randn(4, 9).astype(np.float32)
  labels = np.array([3, -100, 0, 8])
  where = labels != -100
  got = jax.jit(functools.partial(losses.cross_entropy, label_smoothing=0.2))(
      logits, labels, where=where)
  logp = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
  target = 0.8 * np.eye(9)[np.where(where, labels, 0)] + 0.2 / 9
  want = np.where(where, -np.sum(target * logp, axis=-1), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_matches_pytorch_kl_div_batchmean(temperature):
  import torch  # the test extra installs the CPU build
  s, t = _pair(13, shape=(6, 17))
  want = torch.nn.functional.kl_div(
      torch.log_softmax(torch.from_numpy(s) / temperature, -1),
      torch.softmax(torch.from_numpy(t) / temperature, -1),
      reduction="batchmean") * temperature**2
  total, count = losses.masked_sum_and_count(losses.forward_kl(s, t, temperature=temperature))
  np.testing.assert_allclose(total / count, want.item(), rtol=1e-5)


def test_masked_reductions():
  values = np.array([[1.0, 2.0, np.nan], [4.0, np.inf, 6.0]], np.float32)
  where = np.isfinite(values)
  total, count = jax.jit(losses.masked_sum_and_count)(values, where)
  assert (float(total), float(count)) == (13.0, 4.0)
  np.testing.assert_allclose(losses.masked_mean(values, where), 13.0 / 4.0)
  np.testing.assert_allclose(losses.masked_mean(values[:1, :2]), 1.5)
  # Row mask broadcasts; all-masked gives 0 with zero gradient, not NaN.
  none = np.zeros((2, 1), bool)
  value, grad = jax.value_and_grad(losses.masked_mean)(values, none)
  assert float(value) == 0.0 and np.all(grad == 0.0)


def test_vocab_mismatch_and_bad_top_k_raise():
  s, t = _pair(14)
  with pytest.raises(ValueError, match="vocabulary"):
    losses.forward_kl(s, t[..., :5])
  with pytest.raises(ValueError, match="top-k"):
    losses.forward_kl(s, (t[..., :3], np.zeros((2, 3), np.int32)))


def test_vmap_matches_batched_call():
  s, t = _pair(15)
  np.testing.assert_allclose(
      jax.vmap(losses.generalized_jsd)(s, t), losses.generalized_jsd(s, t), rtol=1e-6)


_LABELS = np.zeros(SHAPE[:-1], np.int32)
BAD_HYPERPARAMETERS = [
    ("forward_kl", {"temperature": 0.0}, "temperature: 0.0 must be > 0"),
    ("forward_kl", {"temperature": -1}, "temperature: -1 must be > 0"),
    ("forward_kl", {"temperature": float("inf")}, "temperature: inf must be finite"),
    ("forward_kl", {"temperature": float("nan")}, "temperature: nan must be finite"),
    ("forward_kl", {"temperature": "2"}, "temperature: '2' must be a real number"),
    ("forward_kl", {"temperature": True}, "temperature: True must be a real number"),
    ("reverse_kl", {"temperature": -0.5}, "temperature: -0.5 must be > 0"),
    ("total_variation", {"temperature": 0}, "temperature: 0 must be > 0"),
    ("generalized_jsd", {"beta": 1.5}, "beta: 1.5 must be in [0, 1]"),
    ("generalized_jsd", {"beta": -0.1}, "beta: -0.1 must be in [0, 1]"),
    ("generalized_jsd", {"beta": np.float32(2.0)}, "beta: 2.0 must be in [0, 1]"),
    ("generalized_jsd", {"temperature": 0.0}, "temperature: 0.0 must be > 0"),
    ("generalized_jsd", {"normalized": "yes"}, "normalized: 'yes' must be one of [False, True]"),
    ("skew_kl", {"skew": 1.0}, "skew: 1.0 must be in [0, 1)"),
    ("skew_kl", {"skew": -0.1}, "skew: -0.1 must be in [0, 1)"),
    ("skew_reverse_kl", {"skew": 1}, "skew: 1 must be in [0, 1)"),
    ("skew_reverse_kl", {"temperature": -2.0}, "temperature: -2.0 must be > 0"),
    ("cross_entropy", {"label_smoothing": 1.0}, "label_smoothing: 1.0 must be in [0, 1)"),
    ("cross_entropy", {"label_smoothing": -0.1}, "label_smoothing: -0.1 must be in [0, 1)"),
]


@pytest.mark.parametrize("name, kwargs, message", BAD_HYPERPARAMETERS,
                         ids=[f"{n}-{k}={v}" for n, kw, _ in BAD_HYPERPARAMETERS for k, v in kw.items()])
def test_bad_static_hyperparameter_raises_one_line_error(name, kwargs, message):
  s, t = _pair(16)
  second = _LABELS if name == "cross_entropy" else t
  with pytest.raises(ValueError) as info:
    getattr(losses, name)(s, second, **kwargs)
  assert str(info.value) == message


def test_forward_kl_zero_temperature_raises_instead_of_nan():
  s, t = _pair(17)
  with pytest.raises(ValueError, match=r"^temperature: 0\.0 must be > 0$"):
    losses.forward_kl(s, t, temperature=0.0)
  with pytest.raises(ValueError) as info:  # raised at trace time (jax appends a traceback note)
    jax.jit(functools.partial(losses.forward_kl, temperature=0.0))(s, t)
  assert str(info.value).splitlines()[0] == "temperature: 0.0 must be > 0"


def _traced_and_static(fn, s, t, name, value):
  """(fn under jit with ``name`` traced, fn under jit with ``name`` a Python float)."""
  traced = jax.jit(lambda s, t, v: fn(s, t, **{name: v}))(s, t, value)
  static = jax.jit(lambda s, t: fn(s, t, **{name: value}))(s, t)
  return traced, static


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_traced_beta_equals_python_float(beta, normalized):
  s, t = _pair(18)
  fn = functools.partial(losses.generalized_jsd, normalized=normalized, temperature=1.5)
  traced, static = _traced_and_static(fn, s, t, "beta", beta)
  np.testing.assert_allclose(traced, static, rtol=1e-6, atol=1e-7)
  grad = lambda b: jax.jit(jax.grad(lambda s: jnp.sum(fn(s, t, beta=b))))(s)
  np.testing.assert_allclose(grad(jnp.float32(beta)), grad(beta), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.5])
@pytest.mark.parametrize("name", NAMES)
def test_traced_temperature_equals_python_float(name, temperature):
  s, t = _pair(19)
  traced, static = _traced_and_static(DIVERGENCES[name][0], s, t, "temperature", temperature)
  np.testing.assert_allclose(traced, static, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("skew", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("name", ["skew_kl", "skew_reverse_kl"])
def test_traced_skew_equals_python_float(name, skew):
  s, t = _pair(20)
  traced, static = _traced_and_static(getattr(losses, name), s, t, "skew", skew)
  np.testing.assert_allclose(traced, static, rtol=1e-6, atol=1e-7)


def test_skew_zero_is_the_plain_kl():
  s, t = _pair(21)
  np.testing.assert_allclose(losses.skew_kl(s, t, skew=0.0), losses.forward_kl(s, t), rtol=1e-6)
  np.testing.assert_allclose(
      losses.skew_reverse_kl(s, t, skew=0.0), losses.reverse_kl(s, t), rtol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_traced_label_smoothing_equals_python_float(label_smoothing):
  logits, _ = _pair(22)
  logits[0, 0, 3] = -np.inf  # a banned class: log p = -inf there, and 0 · -inf must not leak
  labels = np.argmax(logits, axis=-1)
  traced = jax.jit(lambda eps: losses.cross_entropy(logits, labels, label_smoothing=eps))(
      label_smoothing)
  static = losses.cross_entropy(logits, labels, label_smoothing=label_smoothing)
  np.testing.assert_allclose(traced, static, rtol=1e-6, atol=1e-7)
  assert np.isfinite(static[0, 1]) and np.isfinite(static[0, 0]) == (label_smoothing == 0)
