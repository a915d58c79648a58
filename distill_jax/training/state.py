"""The training state pytree (the optimizer it is created with comes from `distill_jax.optim`)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from distill_jax import optim

# The optimizer is built in `distill_jax.optim` (below the config, whose section builds it).
OPTIMIZERS, LR_SCHEDULES = optim.OPTIMIZERS, optim.LR_SCHEDULES
decay_mask, make_lr_schedule = optim.decay_mask, optim.make_lr_schedule


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the teacher is never part of it.

  Attributes:
    step: int32 scalar, number of `train_step` calls so far (micro-steps when gradients
      are accumulated); also the index that derives per-step PRNG keys.
    params: ``{"student": ..., "projections": ...}``, the trainable parameters.
    opt_state: the optax state of ``params``.
    rng: base PRNG key (``uint32[2]``); constant, per-step keys are ``fold_in(rng, step)``.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def make_optimizer(name: str = "adamw", learning_rate: float = 1e-4, **kwargs: Any) -> optax.GradientTransformation:
  """An optax optimizer from plain values: `distill_jax.optim.make_optimizer`."""
  return optim.make_optimizer(name, learning_rate, **kwargs)


def create_train_state(student_params: Any, optimizer: optax.GradientTransformation, *,
                       projection_params: Any = None, seed: int | jax.Array = 0) -> TrainState:
  """A fresh `TrainState`; pure, so it can run under ``jax.jit(..., out_shardings=...)``.

  Args:
    student_params: the student's parameters.
    optimizer: from `make_optimizer`.
    projection_params: from `Objective.init_projections` (``{}`` when none).
    seed: int seed or a ``uint32[2]`` key.
  """
  params = {"student": student_params, "projections": {} if projection_params is None else projection_params}
  rng = jax.random.PRNGKey(seed) if isinstance(seed, int) else jnp.asarray(seed, jnp.uint32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)
