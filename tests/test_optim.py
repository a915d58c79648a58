"""`OptimizerConfig.build`: the config section builds the optimizer; its names are defined once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import optim
from distill_jax.config import root as config_lib
from distill_jax.config import sections
from distill_jax.training import state as state_lib


def _updates(tx, steps=6):
  """The updates `tx` makes over `steps` steps of a fixed gradient."""
  params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}}
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  opt_state, out = tx.init(params), []
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    out.append(np.asarray(updates["dense"]["kernel"]))
  return np.stack(out)


@pytest.mark.parametrize("overrides, steps, want", [
    (["optimizer.name=sgd", "optimizer.warmup_steps=2", "optimizer.schedule=linear", "optimizer.b1=0.5"], 6,
     dict(name="sgd", warmup_steps=2, total_steps=6, schedule="linear", b1=0.5)),
    # A warm-up longer than the run is cut to one update less than the run.
    (["optimizer.warmup_steps=100", "optimizer.final_lr_fraction=0.1", "optimizer.weight_decay=0.1"], 6,
     dict(name="adamw", warmup_steps=5, total_steps=6, weight_decay=0.1, final_lr_fraction=0.1)),
    # The schedule counts updates: 12 micro-steps of 2 are 6 updates.
    (["optimizer.grad_accum_steps=2", "optimizer.warmup_steps=4", "optimizer.clip_norm=null"], 12,
     dict(name="adamw", warmup_steps=2, total_steps=6, grad_accum_steps=2, clip_norm=None)),
])
def test_build_is_make_optimizer_of_the_section(overrides, steps, want):
  cfg = config_lib.load_config(None, overrides + ["optimizer.learning_rate=0.1"])
  o = cfg.optimizer
  defaults = dict(weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm,
                  schedule=o.schedule, final_lr_fraction=o.final_lr_fraction)
  want = {**defaults, **want}
  name = want.pop("name")
  ref = optim.make_optimizer(name, 0.1, **want)
  micro = steps // want.get("grad_accum_steps", 1) * want.get("grad_accum_steps", 1)
  np.testing.assert_allclose(_updates(o.build(steps), micro), _updates(ref, micro), rtol=1e-6, atol=1e-9)


def test_optimizer_names_are_defined_once():
  fields = sections.OptimizerConfig.__annotations__  # the config's Literals are derived from optim's names
  assert fields["name"] == "Literal[optim.OPTIMIZERS]" and fields["schedule"] == "Literal[optim.LR_SCHEDULES]"
  assert state_lib.OPTIMIZERS is optim.OPTIMIZERS and state_lib.make_lr_schedule is optim.make_lr_schedule
  for name in optim.OPTIMIZERS:  # every name the config allows builds
    config_lib.load_config(None, [f"optimizer.name={name}"]).optimizer.build(10)
  with pytest.raises(ValueError, match=r"optimizer\.name: Input should be 'adamw', 'adafactor' or 'sgd'"):
    config_lib.load_config(None, ["optimizer.name=lion"])
