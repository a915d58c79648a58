"""The optax optimizer of the student, built from plain values (`OptimizerConfig.build` reads the
config into it): learning-rate schedules, weight-decay masks, clipping, gradient accumulation.

It sits below the config layer (it imports only jax and optax), so that the config section
that names an optimizer builds it, and the training layer uses what was built.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")
LR_SCHEDULES = ("cosine", "linear", "constant")
# Path fragments of parameters that never get weight decay (besides every rank-<2 leaf).
_NO_DECAY = ("bias", "norm", "ln_", "layer_norm", "layernorm")


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: matrices, not norms, biases or 1-D params."""
  def keep(path, leaf):
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
    return jnp.ndim(leaf) >= 2 and not any(fragment in name for fragment in _NO_DECAY)

  return jax.tree_util.tree_map_with_path(keep, params)


def clip_by_global_norm(max_norm: float, *, reuse_norm: bool = True) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm` as one scalar factor, reusing a norm the caller already has.

  Every leaf is multiplied by ``min(1, max_norm / norm)``: a multiply by a scalar, which XLA
  fuses into each consumer (the Adam moments), where optax's per-element
  ``select(norm < max_norm, t, t / norm * max_norm)`` was materialized as a clipped copy of
  the gradient, read by both moments next to the gradient itself (issue 18).  The numbers
  are optax's up to rounding (one multiply instead of a divide and a multiply).

  With `reuse_norm`, ``update(..., global_norm=n)`` takes ``n`` (the train step's norm of
  these very updates) instead of another pass over every leaf.  It must be False where the
  caller's norm is of other updates: under `optax.MultiSteps` the clip sees the accumulated
  gradient, not the micro-step's.
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.global_norm(updates) if global_norm is None or not reuse_norm else global_norm
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def make_lr_schedule(learning_rate: float, *, warmup_steps: int = 0, total_steps: Optional[int] = None,
                     schedule: str = "cosine", end_lr_factor: float = 0.0) -> optax.Schedule:
  """Linear warm-up to ``learning_rate`` then cosine / linear decay or constant.

  Steps count optimizer updates (after gradient accumulation).
  """
  if schedule not in LR_SCHEDULES:
    raise ValueError(f"optimizer.schedule={schedule!r} is unknown; allowed: {', '.join(LR_SCHEDULES)}")
  if not learning_rate > 0:
    raise ValueError(f"optimizer.learning_rate={learning_rate} must be > 0")
  if warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps={warmup_steps} must be >= 0")
  if schedule == "constant":
    if warmup_steps == 0:
      return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
        [warmup_steps])
  if total_steps is None or total_steps <= warmup_steps:
    raise ValueError(f"optimizer.total_steps={total_steps} must be > optimizer.warmup_steps={warmup_steps} "
                     f"for a {schedule} schedule")
  end = learning_rate * end_lr_factor
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps, end)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps),
       optax.linear_schedule(learning_rate, end, total_steps - warmup_steps)], [warmup_steps])


def make_optimizer(name: str = "adamw", learning_rate: float = 1e-4, *, warmup_steps: int = 0,
                   total_steps: Optional[int] = None, schedule: str = "cosine", weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip_norm: Optional[float] = 1.0,
                   grad_accum_steps: int = 1, final_lr_fraction: float = 0.0) -> optax.GradientTransformation:
  """An optax optimizer from plain values.

  Args:
    name: ``"adamw"``, ``"adafactor"`` or ``"sgd"`` (momentum ``b1``; 0 for none).
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up updates.
    total_steps: total optimizer updates (needed by the cosine and linear schedules).
    schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after warm-up.
    weight_decay: decoupled weight decay, masked by `decay_mask` (no norms, biases, 1-D).
    b1, b2, eps: Adam moments (``b1`` is SGD momentum).
    clip_norm: global-norm clipping of the (accumulated) gradient; ``None`` or 0 for none
      (`clip_by_global_norm`: ``update`` takes the step's ``global_norm=`` when given).
    grad_accum_steps: gradients of this many consecutive steps are averaged before one
      update (`optax.MultiSteps`).
    final_lr_fraction: the cosine/linear schedule ends at ``learning_rate * final_lr_fraction``.

  Returns:
    The `optax.GradientTransformation`.

  Raises:
    ValueError: one line naming ``optimizer.<field>``.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
  if weight_decay < 0:
    raise ValueError(f"optimizer.weight_decay={weight_decay} must be >= 0")
  if grad_accum_steps < 1:
    raise ValueError(f"optimizer.grad_accum_steps={grad_accum_steps} must be >= 1")
  if clip_norm is not None and clip_norm < 0:
    raise ValueError(f"optimizer.clip_norm={clip_norm} must be >= 0 (0 or null: no clipping)")
  lr = make_lr_schedule(learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
                        end_lr_factor=final_lr_fraction)
  if name == "adamw":
    core = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == "adafactor":
    core = optax.adafactor(lr, weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask)
  else:
    core = optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                       optax.sgd(lr, momentum=b1 or None))
  clip = clip_by_global_norm(clip_norm, reuse_norm=grad_accum_steps == 1) if clip_norm else None
  tx = optax.chain(clip, core) if clip else core
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
  return tx
