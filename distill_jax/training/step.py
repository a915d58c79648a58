"""One pure train step, and the wrappers that run it: `jax.jit` with shardings, `pmap`.

`train_step` is a module-level pure function.  Everything static (how to run the models,
the objective, the optimizer) is bound with `functools.partial`; the three array
arguments are the state (donated), the teacher params (an explicit argument, never
closed over, never donated) and the batch.

PRNG: ``key = fold_in(state.rng, state.step)``; ``dropout_rng, transform_rng =
split(key)``.  Under `pmap` the key is further folded with the device index so that
devices draw different dropout/masking noise.  Importing this module makes the CPU lowering
of the threefry hash the unrolled one of GPU/TPU (same bits, 10x faster dropout masks).  A run is therefore a function of
``(seed, step)``: resuming at step ``n`` draws the same keys as an uninterrupted run.
On-policy steps (`distill_jax.training.on_policy`) draw from a stream of their own; their coin is
drawn before the device fold, so every device takes the same branch.

Non-finite handling: when the loss or any gradient is NaN/inf the update is discarded —
params and optimizer state (gradient-accumulation buffers included) are kept as they
were — and ``metrics["nonfinite"]`` is 1.  ``state.step`` still increments, so the data
order and PRNG keys of later steps stay aligned with an uninterrupted run.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from distill_jax.training import on_policy as on_policy_lib
from distill_jax.training import sharding as sharding_lib
from distill_jax.training.state import TrainState, create_train_state

Batch = Mapping[str, jax.Array]
ApplyFn = Callable[..., Any]  # (params, batch, *, outputs, train=False, rng=None) -> ModelOutputs
BatchTransform = Callable[[jax.Array, Batch], Batch]

PMAP_AXIS = "batch"


def _unrolled_threefry_on_cpu() -> bool:
  """Lowers `threefry2x32` on CPU unrolled, as jax does on GPU and TPU: the same bits, 10x faster.

  jax lowers it on CPU as a 5-iteration `fori_loop` (for compile time), and each round
  then materializes its arrays: drawing one BERT-base layer's dropout masks took 45 ms
  instead of 4 ms, about 0.3 s of a 4.8 s step (issue 18).  Uses jax internals, so it is
  skipped (returns False) if a jax version moves them; the bits do not depend on it.
  Hashes of fewer than `UNROLL_MIN_SIZE` words keep the rolled loop: the unrolled rounds
  cost XLA's CPU compiler seconds per call site (a tiny BERT's dropout step took 67 s to
  compile instead of 14 s) and save nothing measurable on arrays that small.
  """
  try:
    from jax._src.interpreters import mlir  # jax internals, not our modules
    from jax._src.random import threefry2x32
    unrolled, rolled = threefry2x32._threefry2x32_lowering_rule, threefry2x32._threefry2x32_cpu_lowering_rule
    primitive = threefry2x32.threefry2x32_p
  except (ImportError, AttributeError):
    return False

  def rule(ctx, *args):
    size = int(np.prod(ctx.avals_out[0].shape))
    return (unrolled if size >= UNROLL_MIN_SIZE else rolled)(ctx, *args)

  mlir.register_lowering(primitive, rule, platform="cpu")
  return True


UNROLL_MIN_SIZE = 1 << 16  # words per threefry output below which the CPU lowering stays rolled


UNROLLED_CPU_THREEFRY = _unrolled_threefry_on_cpu()


def _device_key(key: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return key if axis_name is None else jax.random.fold_in(key, lax.axis_index(axis_name))


def _step_keys(state: TrainState, axis_name: Optional[str]) -> tuple[jax.Array, jax.Array]:
  dropout_rng, transform_rng = jax.random.split(_device_key(jax.random.fold_in(state.rng, state.step), axis_name))
  return dropout_rng, transform_rng


def _teacher_outputs(teacher_params: Mapping[str, Any], batch: Batch, teacher_applies: Mapping[str, ApplyFn],
                     objective) -> dict[str, Any]:
  outs = {}
  for name in objective.teacher_names:
    out = teacher_applies[name](teacher_params[name], batch, outputs=objective.outputs_for(name))
    outs[name] = jax.tree.map(lax.stop_gradient, out)
  return outs


def _update_if(finite: jax.Array, optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
               grads: Any, grad_norm: jax.Array) -> tuple[Any, Any]:
  """The optimizer's new ``(params, opt_state)`` when `finite`, else the old ones, unchanged.

  A `lax.cond`, not a ``where(finite, new, old)`` over every leaf: the select reads the old
  params and moments after their donated buffers were updated in place, so XLA copied all
  of them first, and the update fusions ran twice (issue 18: 2.2x the optimizer's time).
  ``grad_norm`` (of `grads`) goes to the optimizer as ``global_norm=``: the clip of
  `distill_jax.optim` takes it instead of another pass over the gradient; other
  transformations ignore it.
  """
  tx = optax.with_extra_args_support(optimizer)

  def update(operands):
    params, opt_state, grads, grad_norm = operands
    updates, opt_state = tx.update(grads, opt_state, params, global_norm=grad_norm)
    return optax.apply_updates(params, updates), opt_state

  return lax.cond(finite, update, lambda operands: operands[:2], (params, opt_state, grads, grad_norm))


def _reduce_metrics(metrics: dict[str, Any], axis_name: Optional[str]) -> dict[str, Any]:
  if axis_name is None:
    return metrics
  return {k: lax.psum(v, axis_name) for k, v in metrics.items()}


def train_step(state: TrainState, teacher_params: Mapping[str, Any], batch: Batch, *, student_apply: ApplyFn,
               teacher_applies: Mapping[str, ApplyFn], objective, optimizer: optax.GradientTransformation,
               batch_transform: Optional[BatchTransform] = None, on_policy: Optional[on_policy_lib.OnPolicy] = None,
               axis_name: Optional[str] = None) -> tuple[TrainState, dict[str, Any]]:
  """One distillation update.

  Args:
    state: the `TrainState` (params ``{"student", "projections"}``).
    teacher_params: ``{teacher_name: params}``; only read, never differentiated.
    batch: dict of ``[B, ...]`` arrays (``input_ids``, ``attention_mask``, ...).
    student_apply: ``(params, batch, *, outputs, train, rng) -> ModelOutputs``.
    teacher_applies: ``{teacher_name: apply}``; teachers run with ``train=False``.
    objective: an `distill_jax.objective.objective.Objective`.
    optimizer: the optax transformation the state was created with.
    batch_transform: optional pure ``(rng, batch) -> batch`` run first inside the step
      (e.g. MLM dynamic masking), seen by teachers and student alike.
    on_policy: when set, with probability ``on_policy.lmbda`` (drawn from ``(seed, step)``)
      the step trains on the student's samples from the batch's prompts instead of the
      batch (see `distill_jax.training.on_policy`), under a `lax.cond`; metrics then also hold
      ``"on_policy"``: ``(1, 1)`` on such a step, ``(0, 1)`` else.
    axis_name: set by the `pmap` wrapper: the local batch is one shard of the global one;
      token counts are summed over the axis so the loss is the global token mean.

  Returns:
    ``(new_state, metrics)``; metrics hold ``{term: (sum, count)}`` (global),
    ``"loss"``, ``"grad_norm"`` and ``"nonfinite"`` (1 when the update was skipped).
  """
  dropout_rng, transform_rng = _step_keys(state, axis_name)
  if batch_transform is not None:
    batch = batch_transform(transform_rng, batch)
  scale = 1.0 if axis_name is None else lax.psum(1.0, axis_name)

  def grads_on(batch, logit_where=None):
    teacher_outs = _teacher_outputs(teacher_params, batch, teacher_applies, objective)

    def loss_fn(params):
      student_out = student_apply(params["student"], batch, outputs=objective.outputs_for("student"), train=True,
                                  rng=dropout_rng)
      loss, metrics = objective(student_out, teacher_outs, batch, params["projections"], state.step,
                                axis_name=axis_name, logit_where=logit_where)
      # Under pmap `loss` is this device's share of the global loss; scaling by the device
      # count makes the pmean of gradients the gradient of the global loss.
      return loss * scale, (loss, metrics)

    return jax.grad(loss_fn, has_aux=True)(state.params)

  if on_policy is None:
    grads, (loss, metrics) = grads_on(batch)
  else:
    draw_key, sample_key = on_policy_lib.keys(jax.random.fold_in(state.rng, state.step))
    sampled = on_policy_lib.draw(draw_key, on_policy.lmbda)

    def on_samples():
      samples = on_policy_lib.sampled_batch(on_policy, state.params["student"], batch,
                                            _device_key(sample_key, axis_name))
      return grads_on(samples, samples["loss_mask"].astype(bool))

    grads, (loss, metrics) = lax.cond(sampled, on_samples, lambda: grads_on(batch))
    metrics = dict(metrics, on_policy=(sampled.astype(jnp.float32), jnp.ones((), jnp.float32)))
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
    loss = lax.psum(loss, axis_name)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state = _update_if(finite, optimizer, state.params, state.opt_state, grads, grad_norm)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = dict(_reduce_metrics(metrics, axis_name), loss=loss, grad_norm=grad_norm,
                 nonfinite=(~finite).astype(jnp.int32))
  return new_state, metrics


def eval_step(state: TrainState, teacher_params: Mapping[str, Any], batch: Batch, *, student_apply: ApplyFn,
              teacher_applies: Mapping[str, ApplyFn], objective, batch_transform: Optional[BatchTransform] = None,
              axis_name: Optional[str] = None) -> dict[str, Any]:
  """The objective on one batch without an update (student in eval mode); see `train_step`."""
  _, transform_rng = _step_keys(state, axis_name)
  if batch_transform is not None:
    batch = batch_transform(transform_rng, batch)
  teacher_outs = _teacher_outputs(teacher_params, batch, teacher_applies, objective)
  student_out = student_apply(state.params["student"], batch, outputs=objective.outputs_for("student"))
  loss, metrics = objective(student_out, teacher_outs, batch, state.params["projections"], state.step,
                            axis_name=axis_name)
  if axis_name is not None:
    loss = lax.psum(loss, axis_name)
  return dict(_reduce_metrics(metrics, axis_name), loss=loss, nonfinite=(~jnp.isfinite(loss)).astype(jnp.int32))


def _leading_size(batch: Batch) -> int:
  sizes = {int(np.shape(v)[0]) for v in batch.values()}
  if len(sizes) != 1:
    raise ValueError(f"data: batch arrays disagree on the batch size: {sorted(sizes)}")
  return sizes.pop()


# --------------------------------------------------------------------------- jit + shardings


class JitStep(NamedTuple):
  """The jitted step and the shardings its arguments must have.

  ``train(state, teacher_params, batch) -> (state, metrics)`` donates ``state``;
  ``eval(state, teacher_params, batch) -> metrics``.  Both check that the global batch
  divides over the mesh (``data.global_batch_size``) before any compilation.
  """

  train: Callable
  eval: Callable
  state_sharding: Any
  teacher_sharding: Any
  batch_sharding: Any
  mesh: Mesh


def state_shardings(state_shapes: Any, mesh: Mesh, *, min_shard_size: int = sharding_lib.DEFAULT_MIN_SHARD_SIZE,
                    logical: Optional[Mapping] = None):
  """Shardings of a `TrainState` (or its `jax.eval_shape`): logical names, else the fsdp size rule.

  `logical` maps student param paths (under ``"student"``) to logical axis names.
  """
  return sharding_lib.param_shardings(state_shapes, mesh, min_size=min_shard_size, logical=logical)


def init_sharded_state(student_params: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                       projection_params: Any = None, seed: int = 0,
                       min_shard_size: int = sharding_lib.DEFAULT_MIN_SHARD_SIZE,
                       logical: Optional[Mapping] = None) -> TrainState:
  """Creates the `TrainState` directly in its sharded layout.

  Shapes come from `jax.eval_shape`; the params are placed shard by shard (each process
  cuts its shards from its host copy) and the optimizer state is created by
  ``jit(init, out_shardings=...)``, so no device ever holds the whole state.
  """
  projection_params = {} if projection_params is None else projection_params
  init = functools.partial(create_train_state, optimizer=optimizer, seed=seed)

  def init_fn(student, projections):
    return init(student, projection_params=projections)

  shapes = jax.eval_shape(init_fn, student_params, projection_params)
  shardings = state_shardings(shapes, mesh, min_shard_size=min_shard_size, logical=logical)
  student = sharding_lib.put_global(student_params, shardings.params["student"])
  projections = sharding_lib.put_global(projection_params, shardings.params["projections"])
  return jax.jit(init_fn, out_shardings=shardings)(student, projections)


def shard_teacher_params(teacher_params: Mapping[str, Any], mesh: Mesh, *,
                         min_shard_size: int = sharding_lib.DEFAULT_MIN_SHARD_SIZE,
                         logical: Optional[Mapping] = None) -> dict[str, Any]:
  """Places each teacher's params on the mesh by the same rules as the student's.

  `logical` maps teacher param paths (under the teacher's name) to logical axis names.
  """
  shardings = sharding_lib.param_shardings(dict(teacher_params), mesh, min_size=min_shard_size, logical=logical)
  return sharding_lib.put_global(dict(teacher_params), shardings)


def make_jit_step(*, student_apply: ApplyFn, teacher_applies: Mapping[str, ApplyFn], objective,
                  optimizer: optax.GradientTransformation, mesh: Mesh, state: Any, teacher_params: Mapping[str, Any],
                  batch_transform: Optional[BatchTransform] = None,
                  on_policy: Optional[on_policy_lib.OnPolicy] = None,
                  min_shard_size: int = sharding_lib.DEFAULT_MIN_SHARD_SIZE,
                  logical: Optional[Mapping] = None) -> JitStep:
  """Binds `train_step`/`eval_step` and jits them with `NamedSharding`s on ``mesh``.

  Args:
    student_apply, teacher_applies, objective, optimizer, batch_transform, on_policy: as in
      `train_step` (`on_policy` applies to training only; evaluation scores the batch).
    mesh: a ``("data", "fsdp", "tensor")`` mesh from `sharding.make_mesh`.
    state: the state or its `jax.eval_shape` (only shapes are read).
    teacher_params: the teacher params or their shapes (only shapes are read).
    min_shard_size: leaves smaller than this are replicated.
    logical: param paths (``("student", ...)``, ``(teacher_name, ...)``) -> logical axis names.

  Returns:
    A `JitStep`.
  """
  state_sharding = state_shardings(jax.eval_shape(lambda s: s, state), mesh, min_shard_size=min_shard_size,
                                   logical=logical)
  teacher_sharding = sharding_lib.param_shardings(jax.eval_shape(lambda t: t, dict(teacher_params)), mesh,
                                                  min_size=min_shard_size, logical=logical)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  common = dict(student_apply=student_apply, teacher_applies=teacher_applies, objective=objective,
                batch_transform=batch_transform)
  train_jit = jax.jit(functools.partial(train_step, optimizer=optimizer, on_policy=on_policy, **common),
                      in_shardings=(state_sharding, teacher_sharding, batch_sharding),
                      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_jit = jax.jit(functools.partial(eval_step, **common),
                     in_shardings=(state_sharding, teacher_sharding, batch_sharding), out_shardings=replicated)

  def train(state, teacher_params, batch):
    sharding_lib.check_batch_size(_leading_size(batch), mesh)
    return train_jit(state, dict(teacher_params), dict(batch))

  def evaluate(state, teacher_params, batch):
    sharding_lib.check_batch_size(_leading_size(batch), mesh)
    return eval_jit(state, dict(teacher_params), dict(batch))

  train.jitted, evaluate.jitted = train_jit, eval_jit
  return JitStep(train, evaluate, state_sharding, teacher_sharding, batch_sharding, mesh)


# --------------------------------------------------------------------------- pmap


def replicate(tree: Any, devices=None) -> Any:
  """Copies ``tree`` onto every device along a new leading axis (pmap layout)."""
  devices = list(jax.local_devices() if devices is None else devices)
  sharding = jax.sharding.NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), jax.sharding.PartitionSpec(PMAP_AXIS))
  return jax.tree.map(lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def unreplicate(tree: Any) -> Any:
  """The first replica of a pmapped tree."""
  return jax.tree.map(lambda x: x[0], tree)


class PmapStep(NamedTuple):
  """``train(state_r, teacher_params_r, batch) -> (state_r, metrics)`` and ``eval``.

  ``state_r`` / ``teacher_params_r`` are `replicate`d; ``batch`` is the global batch
  ``[B, ...]`` (split into ``[D, B/D, ...]`` here); metrics are returned unreplicated.
  """

  train: Callable
  eval: Callable
  devices: tuple


def make_pmap_step(*, student_apply: ApplyFn, teacher_applies: Mapping[str, ApplyFn], objective,
                   optimizer: optax.GradientTransformation, batch_transform: Optional[BatchTransform] = None,
                   on_policy: Optional[on_policy_lib.OnPolicy] = None, devices=None) -> PmapStep:
  """The same `train_step` under `jax.pmap` (``axis_name="batch"``, pmean of gradients)."""
  devices = tuple(jax.local_devices() if devices is None else devices)
  n = len(devices)
  common = dict(student_apply=student_apply, teacher_applies=teacher_applies, objective=objective,
                batch_transform=batch_transform, axis_name=PMAP_AXIS)
  train_p = jax.pmap(functools.partial(train_step, optimizer=optimizer, on_policy=on_policy, **common),
                     axis_name=PMAP_AXIS, devices=devices, donate_argnums=0)
  eval_p = jax.pmap(functools.partial(eval_step, **common), axis_name=PMAP_AXIS, devices=devices)

  def split(batch):
    size = _leading_size(batch)
    if size % n:
      raise ValueError(f"data.global_batch_size={size} is not divisible by the {n} pmap devices")
    # A host batch stays on the host: pmap then copies each slice straight to its device
    # (jnp.reshape would first copy all of it to the default device).
    return {k: (v if isinstance(v, jax.Array) else np.asarray(v)).reshape((n, size // n) + np.shape(v)[1:])
            for k, v in batch.items()}

  def train(state, teacher_params, batch):
    state, metrics = train_p(state, dict(teacher_params), split(batch))
    return state, unreplicate(metrics)

  def evaluate(state, teacher_params, batch):
    return unreplicate(eval_p(state, dict(teacher_params), split(batch)))

  train.pmapped, evaluate.pmapped = train_p, eval_p
  return PmapStep(train, evaluate, devices)
