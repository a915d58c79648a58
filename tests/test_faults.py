"""The test-only fault hooks come from the environment, never from the user's config."""

from __future__ import annotations

import pytest

from distill_jax.config import root as config_lib
from distill_jax.training import faults


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
