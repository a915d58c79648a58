"""Every logit loss chunked from hidden states + unembeddings equals its dense form.

Values to 1e-5 relative and gradients (student hidden states, unembedding, bias), with
soft-capping, padded vocabularies (only the first `vocab` columns count; heads of different
widths), masks, a sequence length the chunk does not divide, a vocabulary sharded over a
`tensor` mesh axis, and through the tiny decoder families (tied heads, Gemma 2's cap).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import tiny
from distill_jax import losses
from distill_jax import models
from distill_jax.data import cache_codec

B, T, DS, DT, WIDTH, VOCAB, CHUNK = 2, 11, 8, 12, 48, 41, 4


def _cap(z, cap):
  return z if cap is None else cap * jnp.tanh(z / cap)


def _dense_logits(h, w, b, cap, vocab):
  z = jnp.einsum("...d,dv->...v", h, w, precision="highest") + (0.0 if b is None else b)
  return _cap(z, cap)[..., :vocab]


def _inputs(seed, s_width=WIDTH, t_width=WIDTH):
  rng = np.random.RandomState(seed)
  f = lambda *s: rng.randn(*s).astype(np.float32)  # noqa: E731
  return dict(hs=f(B, T, DS), ws=0.7 * f(DS, s_width), bs=0.3 * f(s_width),
              ht=f(B, T, DT), wt=0.7 * f(DT, t_width), bt=0.3 * f(t_width),
              where=rng.rand(B, T) > 0.25)


PAIRS = {
    "forward_kl": (losses.chunked_forward_kl, losses.forward_kl, {}),
    "reverse_kl": (losses.chunked_reverse_kl, losses.reverse_kl, {}),
    "jsd": (losses.chunked_generalized_jsd, losses.generalized_jsd, {"beta": 0.3}),
    "jsd_beta0": (losses.chunked_generalized_jsd, losses.generalized_jsd, {"beta": 0.0}),
    "jsd_beta1": (losses.chunked_generalized_jsd, losses.generalized_jsd, {"beta": 1.0}),
    "jsd_normalized": (losses.chunked_generalized_jsd, losses.generalized_jsd, {"beta": 0.7, "normalized": True}),
    "skew_kl": (losses.chunked_skew_kl, losses.skew_kl, {"skew": 0.2}),
    "skew_reverse_kl": (losses.chunked_skew_reverse_kl, losses.skew_reverse_kl, {"skew": 0.3}),
    "total_variation": (losses.chunked_total_variation, losses.total_variation, {}),
}
# (student softcap, teacher softcap, student width, teacher width, vocab)
HEADS = {
    "plain": (None, None, WIDTH, WIDTH, None),
    "softcap_padded": (5.0, 3.0, WIDTH, WIDTH, VOCAB),
    "widths_differ": (None, 4.0, WIDTH, WIDTH - 3, VOCAB),
}


def _close(got, want, rtol=1e-5):
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(float(np.max(np.abs(want))), 1e-6))


def _check_value_and_grads(chunked, dense, x, vocab):
  """Values `[B, T]`, masked mean and its gradients wrt (hs, ws, bs): chunked == dense."""
  where = x["where"]
  got_values = jax.jit(chunked)(x["hs"], x["ws"], x["bs"])
  want_values = dense(x["hs"], x["ws"], x["bs"])
  _close(got_values, want_values)
  np.testing.assert_array_equal(np.asarray(got_values)[~where], 0.0)
  mean = lambda fn: lambda *a: losses.masked_mean(fn(*a), where)  # noqa: E731
  v_got, g_got = jax.jit(jax.value_and_grad(mean(chunked), argnums=(0, 1, 2)))(x["hs"], x["ws"], x["bs"])
  v_want, g_want = jax.value_and_grad(mean(dense), argnums=(0, 1, 2))(x["hs"], x["ws"], x["bs"])
  _close(v_got, v_want)
  for got, want in zip(g_got, g_want):
    _close(got, want)
  np.testing.assert_array_equal(np.asarray(g_got[0])[~where], 0.0)  # masked positions: zero gradient
  if vocab is not None:
    np.testing.assert_array_equal(np.asarray(g_got[1])[:, vocab:], 0.0)  # padding columns: no gradient


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_pair_losses_equal_dense(name, head):
  chunked_fn, dense_fn, hyper = PAIRS[name]
  s_cap, t_cap, s_width, t_width, vocab = HEADS[head]
  x = _inputs(10 * sorted(PAIRS).index(name) + sorted(HEADS).index(head), s_width, t_width)
  kw = dict(hyper, temperature=1.7, where=x["where"])
  cut = vocab or min(s_width, t_width)

  def chunked(hs, ws, bs):
    return chunked_fn(hs, ws, x["ht"], x["wt"], student_bias=bs, teacher_bias=x["bt"], student_softcap=s_cap,
                      teacher_softcap=t_cap, vocab=vocab, chunk_size=CHUNK, **kw)

  def dense(hs, ws, bs):
    return dense_fn(_dense_logits(hs, ws, bs, s_cap, cut), _dense_logits(x["ht"], x["wt"], x["bt"], t_cap, cut), **kw)

  _check_value_and_grads(chunked, dense, x, vocab)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("head", ["plain", "softcap_padded"])
def test_cross_entropy_equals_dense(head, smoothing):
  s_cap, _, _, _, vocab = HEADS[head]
  x = _inputs(11)
  labels = np.random.RandomState(12).randint(0, vocab or WIDTH, (B, T))
  labels[~x["where"]] = -100  # ignored positions may hold anything
  kw = dict(where=x["where"], label_smoothing=smoothing)
  chunked = lambda hs, ws, bs: losses.chunked_cross_entropy(  # noqa: E731
      hs, ws, labels, bias=bs, softcap=s_cap, vocab=vocab, chunk_size=CHUNK, **kw)
  dense = lambda hs, ws, bs: losses.cross_entropy(  # noqa: E731
      _dense_logits(hs, ws, bs, s_cap, vocab or WIDTH), labels, **kw)
  _check_value_and_grads(chunked, dense, x, vocab)


def test_ensemble_kl_equals_dense_mean_distribution():
  x, y = _inputs(21), _inputs(22, t_width=WIDTH - 2)
  temperature = 2.0

  def chunked(hs, ws, bs):
    return losses.chunked_ensemble_kl(
        hs, ws, (x["ht"], y["ht"]), (x["wt"], y["wt"]), student_bias=bs, teacher_biases=(x["bt"], None),
        teacher_softcaps=(None, 6.0), temperature=temperature, where=x["where"], vocab=VOCAB, chunk_size=CHUNK)

  def dense(hs, ws, bs):
    logp = [jax.nn.log_softmax(z / temperature) for z in (_dense_logits(x["ht"], x["wt"], x["bt"], None, VOCAB),
                                                          _dense_logits(y["ht"], y["wt"], None, 6.0, VOCAB))]
    t_logits = temperature * (jax.nn.logsumexp(jnp.stack(logp), axis=0) - np.log(2))
    return losses.forward_kl(_dense_logits(hs, ws, bs, None, VOCAB), t_logits, temperature=temperature,
                             where=x["where"])

  _check_value_and_grads(chunked, dense, x, VOCAB)


SPARSE = {
    "forward_kl": (losses.chunked_sparse_forward_kl, losses.sparse_forward_kl, {}),
    "reverse_kl": (losses.chunked_sparse_reverse_kl, losses.sparse_reverse_kl, {}),
    "jsd": (losses.chunked_sparse_generalized_jsd, losses.sparse_generalized_jsd, {"beta": 0.4}),
}


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_against_live_teacher_top_k_equals_dense(name):
  chunked_fn, dense_fn, hyper = SPARSE[name]
  x = _inputs(31)
  s_cap, t_cap, k = 4.0, 5.0, 6
  teacher = jax.jit(functools.partial(losses.chunked_top_k_teacher, top_k=k, bias=x["bt"], softcap=t_cap,
                                      vocab=VOCAB, chunk_size=CHUNK))(x["ht"], x["wt"])
  want_teacher = cache_codec.top_k_teacher(_dense_logits(x["ht"], x["wt"], x["bt"], t_cap, VOCAB), k)
  np.testing.assert_array_equal(teacher[0], want_teacher[0])
  for got, want in zip(teacher[1:], want_teacher[1:]):
    _close(got, want)
  kw = dict(hyper, temperature=1.5, where=x["where"])
  chunked = lambda hs, ws, bs: chunked_fn(  # noqa: E731
      hs, ws, *teacher, student_bias=bs, student_softcap=s_cap, vocab=VOCAB, chunk_size=CHUNK, **kw)
  dense = lambda hs, ws, bs: dense_fn(_dense_logits(hs, ws, bs, s_cap, VOCAB), *want_teacher, **kw)  # noqa: E731
  _check_value_and_grads(chunked, dense, x, VOCAB)


def test_top_k_teacher_keeping_the_whole_vocabulary_has_an_empty_tail():
  x = _inputs(32)
  ids, logprobs, log_tail = losses.chunked_top_k_teacher(x["ht"], x["wt"], top_k=VOCAB, vocab=VOCAB, chunk_size=3)
  np.testing.assert_array_equal(ids, np.broadcast_to(np.arange(VOCAB), (B, T, VOCAB)))
  assert np.all(np.isneginf(log_tail))
  _close(logprobs, jax.nn.log_softmax(_dense_logits(x["ht"], x["wt"], None, None, VOCAB)))


def test_argmax_equals_dense():
  x = _inputs(41)
  got = losses.chunked_argmax(x["hs"], x["ws"], bias=x["bs"], softcap=3.0, vocab=VOCAB, chunk_size=CHUNK)
  np.testing.assert_array_equal(got, jnp.argmax(_dense_logits(x["hs"], x["ws"], x["bs"], 3.0, VOCAB), -1))


def test_flat_tokens_and_chunk_larger_than_the_sequence():
  x = _inputs(42)
  flat = lambda a: a.reshape(B * T, -1)  # noqa: E731
  got = losses.chunked_forward_kl(flat(x["hs"]), x["ws"], flat(x["ht"]), x["wt"], chunk_size=1000)
  want = losses.chunked_forward_kl(x["hs"], x["ws"], x["ht"], x["wt"], chunk_size=3)
  _close(got, np.asarray(want).reshape(-1))


def test_teacher_gets_no_gradient_and_masked_garbage_is_inert():
  x = _inputs(43)
  hs, ht = x["hs"].copy(), x["ht"].copy()
  hs[~x["where"]], ht[~x["where"]] = np.nan, np.inf
  fn = lambda hs, ws, ht, wt: jnp.sum(losses.chunked_generalized_jsd(  # noqa: E731
      hs, ws, ht, wt, where=x["where"], student_softcap=3.0, teacher_softcap=3.0, vocab=VOCAB, chunk_size=CHUNK))
  grads = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))(hs, x["ws"], ht, x["wt"])
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_array_equal(grads[0][~x["where"]], 0.0)
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)


@pytest.mark.parametrize("call, message", [
    (lambda x: losses.chunked_forward_kl(x["hs"], x["ws"], x["ht"], x["wt"][:, :40]), "same V"),
    (lambda x: losses.chunked_forward_kl(x["hs"], x["ws"], x["ht"], x["wt"], vocab=WIDTH + 1),
     f"vocab: {WIDTH + 1} exceeds the unembedding width {WIDTH}"),
    (lambda x: losses.chunked_cross_entropy(x["hs"], x["ws"], np.zeros((B, T), np.int32), vocab=0),
     "vocab: 0 must be a positive integer"),
    (lambda x: losses.chunked_skew_kl(x["hs"], x["ws"], x["ht"], x["wt"], skew=1.0), "skew: 1.0 must be in [0, 1)"),
    (lambda x: losses.chunked_total_variation(x["hs"], x["ws"], x["ht"], x["wt"], student_softcap=-1.0),
     "student_softcap: -1.0 must be > 0"),
    (lambda x: losses.chunked_top_k_teacher(x["ht"], x["wt"], top_k=VOCAB + 1, vocab=VOCAB),
     f"top_k: {VOCAB + 1} must be an integer in [1, V={VOCAB}]"),
    (lambda x: losses.chunked_cross_entropy(x["hs"], x["ws"], np.zeros((B, T), np.int32), chunk_size=0),
     "chunk_size: 0 must be a positive integer"),
])
def test_bad_arguments_raise_one_line_errors(call, message):
  with pytest.raises(ValueError) as info:
    call(_inputs(44))
  assert message in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- vocabulary over `tensor`


def test_vocabulary_sharded_over_tensor_equals_unsharded_without_gathering_it():
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))  # as training.sharding builds it
  x = _inputs(51, WIDTH, WIDTH)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
  args = (put(x["hs"], P("data")), put(x["ws"], P(None, "tensor")), put(x["bs"], P("tensor")),
          put(x["ht"], P("data")), put(x["wt"], P(None, "tensor")))

  def loss(hs, ws, bs, ht, wt):
    kl = losses.chunked_forward_kl(hs, ws, ht, wt, student_bias=bs, student_softcap=5.0, teacher_softcap=5.0,
                                   vocab=VOCAB, where=x["where"], chunk_size=CHUNK)
    ce = losses.chunked_cross_entropy(hs, ws, np.ones((B, T), np.int32), bias=bs, vocab=VOCAB, chunk_size=CHUNK)
    return losses.masked_mean(kl + ce, x["where"])

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  v_sharded, g_sharded = grad(*args)
  v_single, g_single = grad(x["hs"], x["ws"], x["bs"], x["ht"], x["wt"])
  _close(v_sharded, v_single)
  for got, want in zip(g_sharded, g_single):
    _close(got, want)
  assert g_sharded[1].sharding.spec == P(None, "tensor")  # the unembedding's gradient stays vocab-sharded
  hlo = grad.lower(*args).compile().as_text()
  gathers = [line for line in hlo.splitlines() if "all-gather(" in line and f",{WIDTH}]" in line]
  assert not gathers, gathers  # nothing of vocabulary width is gathered


# --------------------------------------------------------------------------- through the tiny decoders


def _model(family, seed, **overrides):
  model = models.model_from_config(tiny.config_for(family, **overrides), "causal_lm",
                                   tokenizer=tiny.tokenizer_for(family), seed=seed)
  # Sharper distributions than the 0.02-std init, so that the losses are far from float32 noise.
  params = jax.tree.map(lambda p: p * 8.0 if p.ndim >= 2 else p, model.params)
  return model, params


def _batch(vocab):
  rng = np.random.RandomState(0)
  mask = np.ones((2, 10), np.int32)
  mask[1, 7:] = 0
  return {"input_ids": rng.randint(0, vocab, (2, 10)).astype(np.int32), "attention_mask": mask,
          "labels": rng.randint(0, vocab, (2, 10)).astype(np.int32)}


# (family, student overrides, teacher overrides): a tied head with Gemma 2's final soft-capping and
# an untied one, padded vocabularies of different widths (384 / 400 / 416 rows, 384 tokens).
MODEL_PAIRS = {
    "gemma2_padded": ("gemma2", {"vocab_size": 400}, {"hidden_size": 48, "num_attention_heads": 4}),
    "llama_padded": ("llama", {"vocab_size": 400}, {"vocab_size": 416, "hidden_size": 48}),
}
HEAD_FAMILIES = {"gpt2": {}, "gemma": {"vocab_size": 400}, "gemma2": {}, "llama": {}, "qwen3": {}}


def test_head_gives_the_models_logits():
  for family, over in HEAD_FAMILIES.items():  # tied: gpt2, gemma, gemma2
    model, params = _model(family, 1, **over)
    batch = _batch(model.vocab_size)
    head = model.head(params)
    assert head.vocab == 384 and head.kernel.shape == (model.hidden_size, model.spec.vocab_size), family
    assert (head.softcap is not None) == (family == "gemma2"), family

    @jax.jit  # one compile per family, not op by op
    def both(params, batch):
      out = model.apply(params, batch, outputs=("logits", "final_hidden"))
      head = model.head(params)
      return _dense_logits(out.final_hidden, head.kernel, head.bias, head.softcap, None), out.logits

    _close(*both(params, batch), rtol=1e-5)


def test_head_refuses_a_model_without_an_lm_head():
  encoder = dataclasses.replace(_model("llama", 1)[0], task="encoder")
  with pytest.raises(ValueError, match="head: needs task 'causal_lm'"):
    encoder.head(encoder.params)


@pytest.mark.parametrize("pair", sorted(MODEL_PAIRS))
def test_chunked_terms_through_models_equal_dense(pair):
  family, s_over, t_over = MODEL_PAIRS[pair]
  student, s_params = _model(family, 1, **s_over)
  teacher, t_params = _model(family, 2, **t_over)
  vocab = models.check_vocab(teacher, student)
  batch = _batch(vocab)
  where = batch["attention_mask"].astype(bool)
  t_dense, t_out = jax.jit(lambda p: (teacher.apply(p, batch, outputs=("logits",)).logits[..., :vocab],
                                      teacher.apply(p, batch, outputs=("final_hidden",))))(t_params)
  t_head = teacher.head(t_params)

  def dense(params):
    s = student.apply(params, batch, outputs=("logits",)).logits[..., :vocab]
    kl = losses.generalized_jsd(s, t_dense, beta=0.2, temperature=2.0, where=where)
    ce = losses.cross_entropy(s, batch["labels"], where=where)
    return losses.masked_mean(kl, where), losses.masked_mean(ce, where)

  def chunked(params):
    h = student.apply(params, batch, outputs=("final_hidden",)).final_hidden
    head = student.head(params)
    kl = losses.chunked_generalized_jsd(h, head.kernel, t_out.final_hidden, t_head.kernel, beta=0.2, temperature=2.0,
                                        where=where, student_softcap=head.softcap, teacher_softcap=t_head.softcap,
                                        vocab=vocab, chunk_size=3)
    ce = losses.chunked_cross_entropy(h, head.kernel, batch["labels"], where=where, softcap=head.softcap,
                                      vocab=vocab, chunk_size=3)
    return losses.masked_mean(kl, where), losses.masked_mean(ce, where)

  # Each term alone (one jacobian row per term): values and gradients wrt every student param,
  # to 2e-5 of the largest gradient entry of the term.
  run = lambda fn: jax.jit(lambda p: (fn(p), jax.jacrev(fn)(p)))  # noqa: E731
  (v_got, g_got), (v_want, g_want) = run(chunked)(s_params), run(dense)(s_params)
  for k in range(2):
    assert float(v_want[k]) > 1e-3, (pair, k, float(v_want[k]))
    _close(v_got[k], v_want[k])
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g_want[k]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * scale), g_got[k], g_want[k])
