"""`eval.throughput_batches=0` skips the timing: neither model runs, the rates are None."""

from __future__ import annotations

import numpy as np
import pytest

from distill_jax.evaluation import efficiency as eff
from distill_jax.evaluation import report as report_lib


class _NeverRun:
  """A model whose forward pass fails the test if anything runs it."""

  task = "causal_lm"

  def apply(self, *args, **kwargs):
    raise AssertionError("the model ran although throughput_batches=0")


def test_zero_throughput_batches_times_nothing():
  params = {"w": np.zeros((3, 4), np.float32), "b": np.zeros((4,), np.float32)}
  batch = {"input_ids": np.ones((2, 5), np.int32), "attention_mask": np.ones((2, 5), np.int32)}
  got = eff.measure_efficiency(_NeverRun(), params, _NeverRun(), {"w": np.zeros((6, 4), np.float32)}, batch,
                               iters=0)
  assert got["student_params"] == 16 and got["teacher_params"] == 24 and got["student_param_bytes"] == 64
  for role in ("student", "teacher"):
    assert got[f"{role}_examples_per_s"] is None and got[f"{role}_tokens_per_s"] is None
  rep = report_lib.build_report({}, {}, got, teacher_name="t", student_name="s")
  assert rep["efficiency"]["speedup"] is None and "—" in report_lib.format_table(rep)
  with pytest.raises(ValueError, match=r"^iters: 0 must be >= 1"):
    eff.measure_throughput(_NeverRun(), params, batch, iters=0)
