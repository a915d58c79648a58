"""Test-only fault injection: a NaN teacher for chosen steps, slow steps, a killed cache run.

The reliability tests need a run that fails at a known step, and steps slow enough for a
signal to land mid-loop.  Those hooks are not the user's business, so they are read from
the environment (``DISTILL_JAX_FAULTS``, a JSON object), never from the config::

  DISTILL_JAX_FAULTS='{"nonfinite_step": 5, "nonfinite_count": 3, "step_delay": 0.5}'

The training loop knows no fault: it calls the named points of a `LoopHooks` (empty in
production), and `loop_hooks` fills them with the faults asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

ENV = "DISTILL_JAX_FAULTS"


@dataclasses.dataclass(frozen=True)
class Faults:
  """What to inject.

  Attributes:
    nonfinite_step: the 1-based step whose teacher is all NaN (-1: none).
    nonfinite_count: that many consecutive steps from `nonfinite_step`.
    step_delay: seconds of sleep after every step.
    cache_exit_after_shards: ``cache-teacher`` exits (``os._exit``, like a kill) after writing
      this many shards (0: never).
    cache_exit_code: its exit status.
  """

  nonfinite_step: int = -1
  nonfinite_count: int = 1
  step_delay: float = 0.0
  cache_exit_after_shards: int = 0
  cache_exit_code: int = 137

  def nonfinite_at(self, step: int) -> bool:
    """Whether the (1-based) `step` gets a NaN teacher."""
    return 0 < self.nonfinite_step <= step < self.nonfinite_step + self.nonfinite_count


def from_env() -> Faults:
  """The faults `ENV` asks for (none when it is unset); one-line ValueError for a bad value."""
  raw = os.environ.get(ENV, "").strip()
  if not raw:
    return Faults()
  try:
    values = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(f"{ENV}: not a JSON object ({e.msg})") from None
  allowed = [f.name for f in dataclasses.fields(Faults)]
  unknown = sorted(set(values) - set(allowed)) if isinstance(values, dict) else None
  if unknown is None or unknown:
    raise ValueError(f"{ENV}: unknown {unknown if unknown else raw!r}; allowed keys: {', '.join(allowed)}")
  for field in dataclasses.fields(Faults):
    value = values.get(field.name, field.default)
    kinds = (int,) if field.type == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
      kind = "an integer" if field.type == "int" else "a number"
      raise ValueError(f"{ENV}: {field.name} must be {kind}, got {value!r}")
  return Faults(**values)


@dataclasses.dataclass
class LoopHooks:
  """The named points of the training loop where tests act; a production run has none.

  Attributes:
    teacher_params: ``(step, teacher_params) -> teacher_params``, run in order before the
      1-based `step`; what the last returns is what the step reads.
    after_step: ``(step) -> None``, run after the 1-based `step` returned (before its metrics
      are logged or a checkpoint is saved).
  """

  teacher_params: list[Callable[[int, Any], Any]] = dataclasses.field(default_factory=list)
  after_step: list[Callable[[int], None]] = dataclasses.field(default_factory=list)

  def teachers_for(self, step: int, params: Any) -> Any:
    """The teacher params step `step` reads."""
    for hook in self.teacher_params:
      params = hook(step, params)
    return params

  def stepped(self, step: int) -> None:
    """Runs the `after_step` hooks of `step`."""
    for hook in self.after_step:
      hook(step)


def _nan_teacher(faults: Faults) -> Callable[[int, Any], Any]:
  nan: list[Any] = []  # the all-NaN copy, made once

  def hook(step: int, params: Any) -> Any:
    if not faults.nonfinite_at(step):
      return params
    if not nan:
      nan.append(jax.tree.map(lambda x: x * np.nan, params))
    return nan[0]

  return hook


def loop_hooks(faults: Optional[Faults] = None) -> LoopHooks:
  """The loop hooks that inject `faults` (those `from_env` asks for when None)."""
  faults = from_env() if faults is None else faults
  hooks = LoopHooks()
  if faults.nonfinite_step > 0:
    hooks.teacher_params.append(_nan_teacher(faults))
  if faults.step_delay > 0:
    hooks.after_step.append(lambda step: time.sleep(faults.step_delay))
  return hooks
