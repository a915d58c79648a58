"""The train step: traced once, identical on 1 device, a jit mesh (8x1, 4x2) and pmap."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_jax as dj
import tiny
from distill_jax.objective import objective as objective_lib
from distill_jax.training import sharding as sharding_lib
from distill_jax.training import state as state_lib
from distill_jax.training import step as step_lib

MIXED_TERMS = (
    {"loss": "forward_kl", "temperature": 2.0},
    {"loss": "hidden_mse", "layers": "uniform", "projection": "linear", "weight": 0.5},
    {"loss": "similarity_preserving", "weight": 0.5},
)


def deterministic(model):
  """`model.apply` without dropout, so layouts that split the batch differently agree."""
  def apply(params, batch, *, outputs, train=False, rng=None):
    del train, rng
    return model.apply(params, batch, outputs=outputs)
  return apply


def make_pair(path, family="bert", task="masked_lm", student_hidden=16):
  teacher = dj.load_model(tiny.make_checkpoint(path, family, task, num_hidden_layers=2), task=task)
  student = dj.init_student(teacher, num_layers=1, hidden_size=student_hidden)
  return teacher, student


def make_batch(seed, rows=8, length=10):
  """Token ids with per-row padding of different lengths (uneven counts across shards)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, tiny.VOCAB_SIZE, (rows, length)).astype(np.int32)
  lengths = length - (np.arange(rows) % 4)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask}


def problem(teacher, student, terms=MIXED_TERMS, optimizer=None):
  """Objective, optimizer and the static step arguments.

  The default is SGD with momentum: its update is linear in the gradient, so equal
  gradients give equal params to float rounding (Adam's ``g/√v`` amplifies the rounding of
  near-zero gradients past any fixed relative tolerance).
  """
  objective = objective_lib.build_objective(terms, student=student, teachers={"teacher": teacher})
  optimizer = optimizer or state_lib.make_optimizer("sgd", 0.5, schedule="constant", b1=0.9, clip_norm=1.0)
  kw = dict(student_apply=deterministic(student), teacher_applies={"teacher": deterministic(teacher)},
            objective=objective, optimizer=optimizer)
  projections = objective.init_projections(jax.random.PRNGKey(1))
  return objective, optimizer, kw, projections


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  return make_pair(tmp_path_factory.mktemp("bert"))


def run_single(teacher, student, batches, **problem_kw):
  _, optimizer, kw, projections = problem(teacher, student, **problem_kw)
  state = state_lib.create_train_state(student.params, optimizer, projection_params=projections)
  step = jax.jit(functools.partial(step_lib.train_step, **kw))
  losses = []
  for batch in batches:
    state, metrics = step(state, {"teacher": teacher.params}, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def run_mesh(teacher, student, batches, data, fsdp, tensor=1, logical=None):
  objective, optimizer, kw, projections = problem(teacher, student)
  mesh = sharding_lib.make_mesh(data, fsdp, tensor)
  state = step_lib.init_sharded_state(student.params, optimizer, mesh, projection_params=projections,
                                      min_shard_size=256, logical=logical)
  teacher_params = step_lib.shard_teacher_params({"teacher": teacher.params}, mesh, min_shard_size=256,
                                                 logical=logical)
  jstep = step_lib.make_jit_step(mesh=mesh, state=state, teacher_params=teacher_params, min_shard_size=256,
                                 logical=logical, **kw)
  losses = []
  for batch in batches:
    state, metrics = jstep.train(state, teacher_params, sharding_lib.shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return state, losses, jstep


def run_pmap(teacher, student, batches):
  _, optimizer, kw, projections = problem(teacher, student)
  state = step_lib.replicate(state_lib.create_train_state(student.params, optimizer, projection_params=projections))
  pstep = step_lib.make_pmap_step(**kw)
  teacher_params = step_lib.replicate({"teacher": teacher.params})
  losses = []
  for batch in batches:
    state, metrics = pstep.train(state, teacher_params, batch)
    losses.append(float(metrics["loss"]))
  return step_lib.unreplicate(state), losses


def assert_close(a, b, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(jax.device_get(a), jax.device_get(b), rtol=rtol, atol=atol)


def test_single_device_jit_mesh_and_pmap_agree(pair):
  teacher, student = pair
  batches = [make_batch(s) for s in range(3)]
  ref_state, ref_losses = run_single(teacher, student, batches)
  assert ref_losses[-1] < ref_losses[0]
  for data, fsdp in ((8, 1), (4, 2)):
    state, losses, jstep = run_mesh(teacher, student, batches, data, fsdp)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_close(state.params, ref_state.params)
    if fsdp == 2:  # the size rule really sharded something over fsdp
      specs = [s.spec for s in jax.tree.leaves(jstep.state_sharding.params)]
      assert any("fsdp" in tuple(spec) for spec in specs)
  state, losses = run_pmap(teacher, student, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_close(state.params, ref_state.params)
  assert int(state.step) == 3


def test_tensor_parallel_mesh_agrees_and_shards_the_teacher(pair):
  """On a 2x2x2 (data, fsdp, tensor) mesh the models' logical axes place params; same numbers."""
  teacher, student = pair
  batches = [make_batch(s) for s in range(2)]
  _, ref_losses = run_single(teacher, student, batches)
  logical = {(name,) + path: names for name, model in (("teacher", teacher), ("student", student))
             for path, names in dj.models.logical_axes(model).items()}
  assert logical[("teacher", "layers", "mlp_in", "kernel")] == ("layers", "embed", "mlp")
  state, losses, jstep = run_mesh(teacher, student, batches, 2, 2, tensor=2, logical=logical)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  kernel = jstep.teacher_sharding["teacher"]["layers"]["mlp_in"]["kernel"]
  assert kernel.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  # Every device holds a quarter of the teacher's MLP kernel, not a replica.
  shape = teacher.params["layers"]["mlp_in"]["kernel"].shape
  assert kernel.shard_shape(shape) == (shape[0], shape[1] // 2, shape[2] // 2)


def test_jit_step_traces_once(pair):
  teacher, student = pair
  traces = []
  counted = deterministic(student)

  def student_apply(*args, **kw):
    traces.append(1)
    return counted(*args, **kw)

  objective, optimizer, kw, projections = problem(teacher, student)
  kw["student_apply"] = student_apply
  mesh = sharding_lib.make_mesh(4, 2)
  state = step_lib.init_sharded_state(student.params, optimizer, mesh, projection_params=projections)
  teacher_params = step_lib.shard_teacher_params({"teacher": teacher.params}, mesh)
  jstep = step_lib.make_jit_step(mesh=mesh, state=state, teacher_params=teacher_params, **kw)
  for seed in range(5):
    state, metrics = jstep.train(state, teacher_params, sharding_lib.shard_batch(make_batch(seed), mesh))
  assert len(traces) == 1
  assert int(state.step) == 5 and int(metrics["nonfinite"]) == 0
  metrics = jstep.eval(state, teacher_params, make_batch(9))
  assert len(traces) == 2 and np.isfinite(float(metrics["loss"]))


def test_grad_accumulation_equals_big_batch(pair):
  teacher, student = pair
  terms = ({"loss": "forward_kl", "temperature": 2.0},
           {"loss": "hidden_mse", "layers": "last", "projection": "linear"})
  rng = np.random.default_rng(3)
  big = {"input_ids": rng.integers(5, tiny.VOCAB_SIZE, (8, 10)).astype(np.int32),
         "attention_mask": np.ones((8, 10), np.int32)}
  micro = [{k: v[i * 4:(i + 1) * 4] for k, v in big.items()} for i in range(2)]
  plain = state_lib.make_optimizer("sgd", 0.5, schedule="constant", weight_decay=0.01)
  accum = state_lib.make_optimizer("sgd", 0.5, schedule="constant", weight_decay=0.01, grad_accum_steps=2)
  ref, _ = run_single(teacher, student, [big], terms=terms, optimizer=plain)
  got, _ = run_single(teacher, student, micro, terms=terms, optimizer=accum)
  assert_close(got.params, ref.params)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got.params["student"], student.params)
  assert max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_sgd_update_follows_the_lr_schedule_to_its_final_fraction(schedule):
  # SGD without momentum: the update of a unit gradient is -lr(step), so the applied
  # learning rates are read back from the updates (optimizer.final_lr_fraction wired in).
  tx = state_lib.make_optimizer("sgd", 0.5, warmup_steps=2, total_steps=10, schedule=schedule, b1=0.0,
                                clip_norm=None, final_lr_fraction=0.1)
  params = {"w": jnp.zeros(())}
  opt_state, lrs = tx.init(params), []
  for _ in range(11):
    updates, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
    lrs.append(-float(updates["w"]))
  ref = state_lib.make_lr_schedule(0.5, warmup_steps=2, total_steps=10, schedule=schedule, end_lr_factor=0.1)
  np.testing.assert_allclose(lrs, [float(ref(i)) for i in range(11)], rtol=1e-6)
  assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[10] == pytest.approx(0.05)


def test_nonfinite_update_is_skipped(pair):
  teacher, student = pair
  _, optimizer, kw, projections = problem(teacher, student)
  state = state_lib.create_train_state(student.params, optimizer, projection_params=projections)
  step = jax.jit(functools.partial(step_lib.train_step, **kw))
  bad_teacher = jax.tree.map(lambda x: x, teacher.params)
  word = bad_teacher["word_embeddings"]["embedding"]
  bad_teacher["word_embeddings"]["embedding"] = jnp.asarray(word).at[7].set(jnp.nan)
  batch = make_batch(0)
  batch["input_ids"][0, 0] = 7
  new_state, metrics = step(state, {"teacher": bad_teacher}, batch)
  assert int(metrics["nonfinite"]) == 1
  assert int(new_state.step) == 1
  chex.assert_trees_all_equal(new_state.params, state.params)
  chex.assert_trees_all_equal(new_state.opt_state, state.opt_state)
  good_state, metrics = step(new_state, {"teacher": teacher.params}, batch)
  assert int(metrics["nonfinite"]) == 0 and int(good_state.step) == 2


def test_batch_transform_runs_inside_step_deterministically(pair):
  teacher, student = pair
  from distill_jax.data import pipeline as data

  tok = teacher.tokenizer
  terms = ({"loss": "cross_entropy", "positions": "labels"}, {"loss": "forward_kl"})

  def mlm(rng, batch):
    ids, labels, loss_mask = data.mask_tokens(rng, batch["input_ids"], batch["attention_mask"],
                                              mask_token_id=tok.mask_token_id, vocab_size=tiny.VOCAB_SIZE,
                                              special_ids=tok.all_special_ids)
    return dict(batch, input_ids=ids, labels=labels, loss_mask=loss_mask)

  _, optimizer, kw, projections = problem(teacher, student, terms=terms)
  step = jax.jit(functools.partial(step_lib.train_step, batch_transform=mlm, **kw))
  runs = []
  for _ in range(2):
    state = state_lib.create_train_state(student.params, optimizer, projection_params=projections, seed=5)
    for seed in range(2):
      state, metrics = step(state, {"teacher": teacher.params}, make_batch(seed))
    runs.append((state.params, metrics))
  assert_close(runs[0], runs[1], rtol=0, atol=0)
  assert float(runs[0][1]["cross_entropy"][1]) > 0


@pytest.mark.parametrize("data, fsdp", [(3, 2), (16, 1), (4, 0)])
def test_bad_mesh(data, fsdp):
  with pytest.raises(ValueError, match=r"mesh\.(data|fsdp)"):
    sharding_lib.make_mesh(data, fsdp)


def test_batch_not_divisible(pair):
  teacher, student = pair
  objective, optimizer, kw, projections = problem(teacher, student)
  mesh = sharding_lib.make_mesh(8, 1)
  with pytest.raises(ValueError, match=r"data\.global_batch_size=6"):
    sharding_lib.shard_batch(make_batch(0, rows=6), mesh)
  state = step_lib.init_sharded_state(student.params, optimizer, mesh, projection_params=projections)
  jstep = step_lib.make_jit_step(mesh=mesh, state=state, teacher_params={"teacher": teacher.params}, **kw)
  with pytest.raises(ValueError, match=r"data\.global_batch_size=12"):
    jstep.train(state, {"teacher": teacher.params}, make_batch(0, rows=12))
  pstep = step_lib.make_pmap_step(**kw)
  with pytest.raises(ValueError, match=r"data\.global_batch_size=4"):
    pstep.train(None, {}, make_batch(0, rows=4))
