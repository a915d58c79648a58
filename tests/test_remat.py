"""Remat by name (`layers.REMAT_POLICIES`) and the layers' activation sharding constraints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import tiny
from distill_jax import models
from distill_jax.config import sections
from distill_jax.models import layers
from distill_jax.training import sharding

CASES = {"llama": "causal_lm", "bert": "masked_lm"}


@functools.lru_cache(maxsize=None)
def _model(family):
  return models.model_from_config(tiny.config_for(family), CASES[family])


def _batch(b=8, t=16):
  ids = jax.random.randint(jax.random.key(1), (b, t), 4, tiny.VOCAB_SIZE)
  return ids, jnp.ones((b, t), jnp.int32).at[1, 11:].set(0)


def _loss(module, params, ids, mask):
  logits = module.apply({"params": params}, ids, mask)["logits"]
  return jnp.sum(jax.nn.log_softmax(logits)[..., 7] * mask) / jnp.sum(mask), logits


@functools.lru_cache(maxsize=None)
def _reference(family):
  model = _model(family)
  return jax.jit(jax.value_and_grad(functools.partial(_loss, model.module), has_aux=True))(model.params, *_batch())


@pytest.mark.parametrize("family,remat", [("llama", r) for r in layers.REMAT_POLICIES if r != "none"]
                         + [("bert", "save_qkv_block_outputs")])
def test_every_remat_policy_gives_the_same_outputs_and_gradients(family, remat):
  model = _model(family)
  (loss, logits), grads = jax.jit(jax.value_and_grad(
      functools.partial(_loss, model.module.clone(remat=remat)), has_aux=True))(model.params, *_batch())
  (ref_loss, ref_logits), ref_grads = _reference(family)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), grads, ref_grads)


def _scan_residuals(module, params, capsys):
  """Shapes of what the layer scan keeps for the backward pass (stacked over layers)."""
  ids = jnp.ones((3, 8), jnp.int32)
  capsys.readouterr()
  print_saved_residuals(lambda p: jnp.sum(module.apply({"params": p}, ids, ids)["logits"]), params)
  return sorted(line.split(" output")[0] for line in capsys.readouterr().out.splitlines() if "output of scan" in line)


@pytest.mark.parametrize("remat,kept", [
    ("full", ["f32[2,3,8,32]"]),                                    # the layer input only
    ("save_block_outputs", ["f32[2,3,8,32]"] * 2),                  # + attn_out (mlp_out: no backward needs it)
    ("save_qkv_block_outputs", ["f32[2,3,8,2,8]"] * 2 + ["f32[2,3,8,32]"] * 2 + ["f32[2,3,8,4,8]"]),  # + k, v, q
    ("offload_block_outputs", ["f32<host>[2,3,8,32]", "f32[2,3,8,32]"]),  # attn_out in pinned host memory
])
def test_named_policies_keep_their_names(remat, kept, capsys):
  """Llama tiny (2 layers, batch 3 × 8 tokens, width 32, 4 query and 2 KV heads of 8)."""
  model = _model("llama")
  residuals = _scan_residuals(model.module.clone(remat=remat), model.params, capsys)
  assert [r for r in residuals if r.startswith(("f32[2,3,", "f32<host>[2,3,"))] == kept, residuals


def test_remat_names_are_defined_once():
  """The config's Literal and the model's check read `layers.REMAT_POLICIES`."""
  assert [sections.StudentConfig(remat=r).remat for r in layers.REMAT_POLICIES] == list(layers.REMAT_POLICIES)
  with pytest.raises(ValueError, match=r"^remat: unknown 'some'; allowed: none, full, dots, save_block_outputs"):
    layers.check_remat("some")
  with pytest.raises(ValueError, match="student.remat"):
    sections.StudentConfig(remat="some")


@pytest.mark.parametrize("family", sorted(CASES))
def test_activation_constraints_keep_results_equal_on_an_8_device_mesh(family):
  """Batch over data × fsdp, heads and MLP over tensor: the same numbers as one device."""
  model = _model(family)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = model.module.clone(mesh=mesh)
  ids, mask = _batch()
  step = jax.jit(jax.value_and_grad(functools.partial(_loss, sharded), has_aux=True))
  hlo = step.lower(model.params, ids, mask).as_text()
  assert hlo.count("sdy.sharding_constraint") + hlo.count("@Sharding") >= 4  # the constraints are in the program
  assert '{"data", "fsdp"}' in hlo or "devices=[4," in hlo  # the batch split over data × fsdp
  (loss, logits), grads = step(model.params, ids, mask)
  (ref_loss, ref_logits), ref_grads = _reference(family)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads, ref_grads)
  assert len(logits.sharding.device_set) == 8


def test_activation_spec_rules():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  P = jax.sharding.PartitionSpec
  assert layers.activation_spec(("batch", "length", "heads", "head_dim"), (8, 16, 4, 8), mesh) == P(
      ("data", "fsdp"), None, "tensor", None)
  assert layers.activation_spec(("batch", "length", "mlp"), (6, 16, 3), mesh) == P(None, None, None)  # 4∤6, 2∤3
  one = sharding.make_mesh(data=8)
  assert layers.activation_spec(("batch", "length", "embed"), (8, 16, 32), one) == P("data", None, None)
  x = jnp.ones((8, 4))
  assert layers.constrain(x, ("batch", "embed"), None) is x  # no mesh: the identity (one device, pmap)


def _dropout_loss(module, params, ids, mask):
  """`_loss` in train mode: dropout on, so the per-layer rng split is compared too."""
  out = module.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(3)})
  return jnp.sum(jax.nn.log_softmax(out["logits"])[..., 7] * mask) / jnp.sum(mask), out["logits"]


@pytest.mark.parametrize("family", sorted(CASES))
def test_unrolled_layers_equal_the_scan(family):
  """`train.layer_loop: unroll` runs the same params and rng streams as the scan: same numbers."""
  model = _model(family)
  run = lambda module: jax.jit(jax.value_and_grad(  # noqa: E731
      functools.partial(_dropout_loss, module), has_aux=True))(model.params, *_batch())
  (loss, logits), grads = run(model.module.clone(unroll_layers=True))
  (ref_loss, ref_logits), ref_grads = run(model.module)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), grads, ref_grads)
  # Unrolled, the forward has no loop over the layers; the scan has one.
  forward = lambda module: jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask)["logits"]).lower(  # noqa: E731
      model.params, *_batch()).as_text()
  assert "stablehlo.while" not in forward(model.module.clone(unroll_layers=True))
  assert "stablehlo.while" in forward(model.module)


def test_resolve_layer_loop_by_platform_and_refusals():
  assert [layers.resolve_layer_loop("auto", p) for p in ("cpu", "tpu", "gpu", "cuda")] == [True, False, False, False]
  assert [layers.resolve_layer_loop(n, "cpu") for n in ("scan", "unroll")] == [False, True]
  assert [layers.resolve_layer_loop(n, "tpu") for n in ("scan", "unroll")] == [False, True]
  with pytest.raises(ValueError, match=r"^train.layer_loop: unknown 'loop'; allowed: auto, scan, unroll$"):
    layers.resolve_layer_loop("loop", "cpu")
  assert [sections.TrainConfig(layer_loop=n).layer_loop for n in layers.LAYER_LOOPS] == list(layers.LAYER_LOOPS)
  with pytest.raises(ValueError, match="train.layer_loop"):
    sections.TrainConfig(layer_loop="loop")
