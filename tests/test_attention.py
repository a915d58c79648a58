"""Attention kernels: splash (Pallas, interpret mode on CPU) against XLA's path, the config's
`train.attention` choice, logged fallbacks, and splash lowering for a TPU topology."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tiny
from distill_jax import models
from distill_jax.config import sections
from distill_jax.models import layers

T = 128  # splash's smallest block: the shortest sequence it tiles


def _qkv(b=2, t=T, n=4, kv=2, d=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, d)), jax.random.normal(ks[1], (b, t, kv, d)),
          jax.random.normal(ks[2], (b, t, kv, d)))


def _key_mask(b=2, t=T):
  """Row 0 full, row 1 right-padded after 100 tokens."""
  return jnp.ones((b, t), jnp.int32).at[1, 100:].set(0)


def _loss_and_grads(impl, q, k, v, key_mask, *, causal, window, softcap):
  """Sum of squared outputs at real queries, and its gradient wrt q, k, v (one jit per impl)."""
  t = q.shape[1]
  mask = layers.attention_mask(key_mask, t, causal=causal, window=window)
  splash_mask = layers.SplashMask(key_mask, causal=causal, windows=(window,))

  def loss(q, k, v):
    out, _, _ = layers.attend(q, k, v, mask, scale=q.shape[-1] ** -0.5, softcap=softcap, implementation=impl,
                              splash_mask=splash_mask)
    return jnp.sum(jnp.where(key_mask[:, :, None, None] > 0, out, 0.0) ** 2), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return value, out, grads


@pytest.mark.parametrize("causal,window,softcap,kv", [
    (True, None, None, 2),    # causal, padded, GQA (2 query heads per KV head)
    (True, 40, None, 4),      # sliding window (HF: key kept when q - k < 40), padded
    (False, None, None, 4),   # bidirectional (encoders), padded
    (True, None, 5.0, 1),     # Gemma 2's score soft-capping, multi-query
])
def test_splash_equals_xla_forward_and_gradient(causal, window, softcap, kv):
  q, k, v = _qkv(kv=kv)
  key_mask = _key_mask()
  got = _loss_and_grads("splash_interpret", q, k, v, key_mask, causal=causal, window=window, softcap=softcap)
  want = _loss_and_grads(None, q, k, v, key_mask, causal=causal, window=window, softcap=softcap)
  real = np.asarray(key_mask, bool)
  np.testing.assert_allclose(np.asarray(got[1])[real], np.asarray(want[1])[real], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, w in zip(got[2], want[2]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=5e-5)


def test_splash_under_shard_map_on_an_8_device_mesh_equals_xla():
  """Batch over data × fsdp, heads (and their KV heads) over tensor: each shard runs the kernel."""
  from distill_jax.training import sharding

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  q, k, v = _qkv(b=4, n=4, kv=2)
  key_mask = jnp.ones((4, T), jnp.int32).at[1, 100:].set(0).at[2, 60:].set(0)
  mask = layers.attention_mask(key_mask, T, causal=True)

  def loss(q, k, v, impl, mesh):
    out, _, _ = layers.attend(q, k, v, mask, scale=0.25, implementation=impl, mesh=mesh,
                              splash_mask=layers.SplashMask(key_mask, causal=True))
    return jnp.sum(jnp.where(key_mask[:, :, None, None] > 0, out, 0.0) ** 2)

  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))(
      q, k, v, "splash_interpret", mesh)
  want = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, None, None)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=5e-5)


def _batch(b=2, t=T):
  ids = jax.random.randint(jax.random.key(1), (b, t), 4, tiny.VOCAB_SIZE)
  return {"input_ids": ids, "attention_mask": _key_mask(b, t)}


@pytest.mark.parametrize("family,overrides", [
    ("gemma2", dict(sliding_window=40)),  # local/global layers + soft-capping
    ("bert", {}),  # bidirectional, padded
])
def test_models_with_splash_equal_xla(family, overrides):
  """The models' splash path (forward; the kernel's gradient is tested above) at real tokens."""
  task = "masked_lm" if family == "bert" else "causal_lm"
  model = models.model_from_config(tiny.config_for(family), task, **overrides)
  splash = model.module.clone(attention_impl="splash_interpret")
  batch = _batch()
  real = np.asarray(batch["attention_mask"], bool)
  forward = jax.jit(lambda params, module: module.apply({"params": params}, batch["input_ids"],
                                                         batch["attention_mask"]), static_argnums=1)
  got, want = forward(model.params, splash), forward(model.params, model.module)
  np.testing.assert_allclose(np.asarray(got["logits"])[real], np.asarray(want["logits"])[real], atol=1e-4, rtol=1e-4)


def test_fallbacks_are_logged(caplog):
  """What a kernel can't do runs on XLA's path, with one warning saying why."""
  q, k, v = _qkv(t=64)
  key_mask = _key_mask(t=64)
  mask = layers.attention_mask(key_mask, 64, causal=True)
  layers._FALLBACKS_LOGGED.clear()
  with caplog.at_level(logging.WARNING, logger="distill_jax.models.layers"):
    out, _, _ = layers.attend(q, k, v, mask, scale=0.25, implementation="splash_interpret",
                              splash_mask=layers.SplashMask(key_mask, causal=True))
    ref, _, _ = layers.attend(q, k, v, mask, scale=0.25)
    _, scores, _ = layers.attend(q, k, v, mask, scale=0.25, implementation="splash", explicit=True)
    layers.attend(q, k, v, mask, scale=0.25, implementation="cudnn", softcap=10.0)
    layers.attend(q, k, v, mask, scale=0.25, implementation="splash")  # no SplashMask: KV-cache decoding
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert scores is not None
  messages = [r.getMessage() for r in caplog.records]
  assert any("splash_interpret falls back" in m and "not a multiple of 128" in m for m in messages), messages
  assert any("splash falls back" in m and "attention maps are needed" in m for m in messages), messages
  assert any("cudnn falls back" in m and "soft-capping" in m for m in messages), messages
  assert any("splash falls back" in m and "KV-cache" in m for m in messages), messages
  assert layers.attention_kernel("cudnn", explicit=False, softcap=None, dtype=jnp.float32, q_len=T, kv_len=T,
                                 head_dim=64, splash_mask=None) == "xla"  # cuDNN computes in bf16/fp16 only
  assert layers.attention_kernel("cudnn", explicit=False, softcap=None, dtype=jnp.bfloat16, q_len=T, kv_len=T,
                                 head_dim=64, splash_mask=None) == "cudnn"


def test_resolve_attention_by_platform_and_refusals():
  assert [layers.resolve_attention("auto", p) for p in ("tpu", "gpu", "cuda", "cpu")] == [
      "splash", "cudnn", "cudnn", "xla"]
  assert layers.resolve_attention("xla", "tpu") == "xla"
  assert layers.resolve_attention("splash", "tpu") == "splash"
  assert layers.resolve_attention("cudnn", "gpu") == "cudnn"
  with pytest.raises(ValueError, match=r"^train\.attention: splash needs a TPU \(this platform is cpu\); "
                                       r"allowed here: auto, xla$"):
    layers.resolve_attention("splash", "cpu")
  with pytest.raises(ValueError, match=r"^train\.attention: cudnn needs a GPU"):
    layers.resolve_attention("cudnn", "tpu")
  with pytest.raises(ValueError, match="allowed: auto, xla, cudnn, splash"):
    layers.resolve_attention("flash", "cpu")
  assert sections.TrainConfig().attention == "auto"
  with pytest.raises(ValueError, match="train.attention"):
    sections.TrainConfig(attention="flash")


def test_splash_lowers_and_compiles_for_a_tpu_topology():
  """Deviceless: splash under shard_map (batch over data, heads over tensor) for v5e:2x2, with GQA,
  soft-capping and two windows (a lax.switch), forward and backward, never ``[T, T]`` in f32."""
  from jax.experimental import topologies

  # Deviceless libtpu takes a lockfile per machine unless told that other processes (another
  # test run, `distill-jax plan`) may load it too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                          chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = jax.sharding.Mesh(np.asarray(topology.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
  b, t, n, kv, d = 2, 1024, 4, 2, 128

  def loss(q, k, v, key_mask, window_index):
    splash_mask = layers.SplashMask(key_mask, causal=True, windows=(None, 256), window_index=window_index)
    out, _, _ = layers.attend(q, k, v, None, scale=d ** -0.5, softcap=30.0, implementation="splash",
                              splash_mask=splash_mask, mesh=mesh)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  def spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, sharding))

  batch = P(("data", "fsdp"))
  args = (spec((b, t, n, d), jnp.bfloat16, batch), spec((b, t, kv, d), jnp.bfloat16, batch),
          spec((b, t, kv, d), jnp.bfloat16, batch), spec((b, t), jnp.int32, batch), spec((), jnp.int32, P()))
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert "tpu_custom_call" in compiled.as_text()
  # XLA's path would keep per device 1 row × 2 heads × T² f32 scores (8 MiB) and their probabilities.
  assert compiled.memory_analysis().temp_size_in_bytes < 4 * 2**20
