"""`distill-jax eval RUN_DIR [KEY=VALUE ...]`: re-evaluate a run's latest checkpoint and rewrite its report."""

from __future__ import annotations

import os
from typing import Sequence

from distill_jax.evaluation import report as report_lib
from distill_jax.training.run_log import METRICS_FILE, echo
from distill_jax.training.run_report import final_report, undistilled_eval
from distill_jax.training.run_setup import student_params
from distill_jax.training.saved_run import load_saved_run, restore_latest


def evaluate_run(run_dir: str, overrides: Sequence[str] = ()) -> dict:
  """Re-evaluates the latest checkpoint of a run and rewrites its report."""
  cfg, path = load_saved_run(run_dir, overrides)
  run, state, at = restore_latest(cfg, path)
  echo(f"evaluating the checkpoint of step {at}")
  before = undistilled_eval(run, path) if cfg.eval.before_and_after else None
  export_dir = cfg.export.dir or str(path / "student")
  history = report_lib.read_history(str(path / METRICS_FILE))
  return final_report(run, student_params(run, state), path, before, history,
                      export_dir if os.path.isdir(export_dir) else None)


def main(run_dir: str, overrides: Sequence[str]) -> int:
  report = evaluate_run(run_dir, overrides=overrides)
  print(f"report: {os.path.join(run_dir, 'report.md')}")
  return 0 if report else 1
