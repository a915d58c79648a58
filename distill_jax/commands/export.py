"""`distill-jax export RUN_DIR OUT_DIR`: the student of a run as a Hugging Face checkpoint."""

from __future__ import annotations

import os
from typing import Optional

import jax

from distill_jax.checkpoint.export import export_student
from distill_jax.training.run_setup import student_params
from distill_jax.training.saved_run import load_saved_run, restore_latest


def export_run(run_dir: str, out_dir: str, *, overwrite: bool = False, step: Optional[int] = None) -> str:
  """Exports the student of a run's checkpoint (latest, or `step`) to `out_dir`, atomically."""
  cfg, path = load_saved_run(run_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f"out_dir: {out_dir} is not empty (pass --overwrite to replace it)")
  run, state, _ = restore_latest(cfg, path, step)
  params = jax.device_get(student_params(run, state))
  export_student(run.student, params, out_dir, overwrite=overwrite)
  return out_dir


def main(run_dir: str, out_dir: str, *, overwrite: bool, step: Optional[int]) -> int:
  out = export_run(run_dir, out_dir, overwrite=overwrite, step=step)
  print(f"exported student: {out}")
  return 0
