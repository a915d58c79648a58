"""Test-only fault injection: a NaN teacher for chosen steps, slow steps, a killed cache run.

The reliability tests need a run that fails at a known step, and steps slow enough for a
signal to land mid-loop.  Those hooks are not the user's business, so they are read from
the environment (``DISTILL_JAX_FAULTS``, a JSON object), never from the config::

  DISTILL_JAX_FAULTS='{"nonfinite_step": 5, "nonfinite_count": 3, "step_delay": 0.5}'
"""

from __future__ import annotations

import dataclasses
import json
import os

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
