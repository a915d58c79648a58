"""The test-only fault hooks come from the environment, never from the user's config."""

from __future__ import annotations

import dataclasses
import inspect
import re
import time

import numpy as np
import pytest

from distill_jax.config import root as config_lib
from distill_jax.training import faults, loop


def test_faults_from_env(monkeypatch):
  monkeypatch.delenv(faults.ENV, raising=False)
  assert faults.from_env() == faults.Faults()
  monkeypatch.setenv(faults.ENV, '{"nonfinite_step": 5, "nonfinite_count": 3, "step_delay": 0.25}')
  got = faults.from_env()
  assert got.step_delay == 0.25
  assert [s for s in range(1, 10) if got.nonfinite_at(s)] == [5, 6, 7]


@pytest.mark.parametrize("raw, match", [("{nope", "not a JSON object"), ('{"delay": 1}', r"unknown \['delay'\]"),
                                        ("[1]", "unknown"), ('{"nonfinite_step": "5"}', "must be an integer"),
                                        ('{"step_delay": true}', "must be a number")])
def test_bad_faults_are_one_line_errors(monkeypatch, raw, match):
  monkeypatch.setenv(faults.ENV, raw)
  with pytest.raises(ValueError, match=match) as info:
    faults.from_env()
  assert "\n" not in str(info.value) and faults.ENV in str(info.value)


def test_the_user_schema_has_no_test_hooks():
  with pytest.raises(ValueError, match="train.debug_step_delay"):
    config_lib.load_config(None, ["train.debug_step_delay=0.5"])


def test_loop_hooks_inject_the_faults_and_production_has_none(monkeypatch):
  monkeypatch.delenv(faults.ENV, raising=False)
  none = faults.loop_hooks()
  assert none == faults.LoopHooks() and not none.teacher_params and not none.after_step
  params = {"w": np.ones((2, 3), np.float32)}
  assert none.teachers_for(1, params) is params

  hooks = faults.loop_hooks(faults.Faults(nonfinite_step=2, nonfinite_count=2, step_delay=0.05))
  nan_steps = [s for s in range(1, 6) if np.isnan(np.asarray(hooks.teachers_for(s, params)["w"])).all()]
  assert nan_steps == [2, 3]
  assert hooks.teachers_for(1, params) is params and hooks.teachers_for(4, params) is params
  t0 = time.perf_counter()
  hooks.stepped(1)
  assert time.perf_counter() - t0 >= 0.05


def test_the_loop_has_no_fault_branches():
  """The loop calls hook points; which fault exists is faults.py's business alone."""
  source = inspect.getsource(loop)
  assert "hooks.teachers_for(" in source and "hooks.stepped(" in source
  for name in [f.name for f in dataclasses.fields(faults.Faults)] + ["nonfinite_at"]:
    assert not re.search(rf"\b{name}\b", source), name
