"""Mesh construction, logical-axis and size rules, and batch placement."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distill_jax.training import sharding as sharding_lib
from distill_jax.training import state as state_lib


@pytest.mark.parametrize("shape, fsdp, min_size, spec", [
    ((512, 1024), 2, 1, P(None, "fsdp")),    # the largest axis
    ((1024, 512), 4, 1, P("fsdp", None)),
    ((1023, 512), 2, 1, P(None, "fsdp")),    # largest axis not divisible: the next one
    ((1023, 511), 2, 1, P()),                # nothing divisible: replicated
    ((1024,), 2, 1, P()),                    # vectors replicated
    ((64, 64), 2, 2**18, P()),               # small matrices replicated
    ((512, 1024), 1, 1, P()),                # no fsdp axis
])
def test_param_spec(shape, fsdp, min_size, spec):
  assert sharding_lib.param_spec(shape, fsdp, min_size=min_size) == spec


def test_make_mesh_shapes():
  assert dict(sharding_lib.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sharding_lib.make_mesh(-1, 2).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert dict(sharding_lib.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding_lib.make_mesh(2, 2, devices=jax.devices()[:4]).shape) == {"data": 2, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match=r"mesh\.fsdp × mesh\.tensor = 3×1 does not divide the 8 devices"):
    sharding_lib.make_mesh(-1, 3)
  with pytest.raises(ValueError, match=r"mesh\.data × mesh\.fsdp × mesh\.tensor = 2×2×4"):
    sharding_lib.make_mesh(2, 2, 4)


@pytest.mark.parametrize("names, shape, spec", [
    (("layers", "embed", "mlp"), (3, 64, 128), P(None, "fsdp", "tensor")),
    (("vocab", "embed"), (384, 64), P("tensor", "fsdp")),
    (("layers", "embed", "kv_heads", "head_dim"), (3, 64, 1, 16), P(None, "fsdp", None, None)),  # 1 head: kept
    (("embed", "mlp"), (63, 128), P(None, "tensor")),       # not divisible by fsdp: replicated there
    (("mlp", "embed"), (128, 64), P("tensor", "fsdp")),
    (("embed",), (64,), P("fsdp")),
])
def test_logical_spec(names, shape, spec):
  mesh = sharding_lib.make_mesh(2, 2, 2)
  assert sharding_lib.logical_spec(names, shape, mesh) == spec


def test_shard_batch_splits_rows_over_both_axes():
  mesh = sharding_lib.make_mesh(4, 2)
  batch = {"input_ids": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
  placed = sharding_lib.shard_batch(batch, mesh)["input_ids"]
  np.testing.assert_array_equal(np.asarray(placed), batch["input_ids"])
  assert {s.data.shape for s in placed.addressable_shards} == {(2, 3)}


def test_state_shardings_follow_params():
  mesh = sharding_lib.make_mesh(4, 2)
  params = {"dense": {"kernel": np.zeros((64, 32), np.float32), "bias": np.zeros((32,), np.float32)}}
  state = state_lib.create_train_state(params, state_lib.make_optimizer("adamw", 1e-3, schedule="constant"))
  shardings = sharding_lib.param_shardings(jax.eval_shape(lambda: state), mesh, min_size=1)
  assert shardings.params["student"]["dense"]["kernel"].spec == P("fsdp", None)
  assert shardings.params["student"]["dense"]["bias"].spec == P()
  # Adam's mu/nu follow their params by shape.
  shapes = jax.tree.leaves(jax.eval_shape(lambda: state.opt_state))
  specs = [s.spec for s, x in zip(jax.tree.leaves(shardings.opt_state), shapes) if x.shape == (64, 32)]
  assert len(specs) == 2 and all(spec == P("fsdp", None) for spec in specs)


def test_logical_names_place_params_and_their_adam_moments():
  mesh = sharding_lib.make_mesh(2, 2, 2)
  params = {"layers": {"up": {"kernel": np.zeros((2, 64, 128), np.float32)}}, "w": np.zeros((64, 32), np.float32)}
  state = state_lib.create_train_state(params, state_lib.make_optimizer("adamw", 1e-3, schedule="constant"))
  logical = {("student", "layers", "up", "kernel"): ("layers", "embed", "mlp")}
  shardings = sharding_lib.param_shardings(jax.eval_shape(lambda: state), mesh, min_size=1, logical=logical)
  assert shardings.params["student"]["layers"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert shardings.params["student"]["w"].spec == P("fsdp", None)  # no names: the size rule
  shapes = jax.tree.leaves(jax.eval_shape(lambda: state.opt_state))
  specs = [s.spec for s, x in zip(jax.tree.leaves(shardings.opt_state), shapes) if x.shape == (2, 64, 128)]
  assert len(specs) == 2 and all(spec == P(None, "fsdp", "tensor") for spec in specs)


def test_decay_mask_and_optimizer_errors():
  params = {"LayerNorm": {"scale": np.ones(4)}, "dense": {"kernel": np.ones((4, 4)), "bias": np.ones(4)}}
  assert state_lib.decay_mask(params) == {"LayerNorm": {"scale": False}, "dense": {"kernel": True, "bias": False}}
  with pytest.raises(ValueError, match=r"optimizer\.name='lion'"):
    state_lib.make_optimizer("lion")
  with pytest.raises(ValueError, match=r"optimizer\.total_steps=None"):
    state_lib.make_optimizer("adamw", 1e-3, schedule="cosine")
  with pytest.raises(ValueError, match=r"optimizer\.learning_rate"):
    state_lib.make_optimizer("sgd", 0.0, schedule="constant")
