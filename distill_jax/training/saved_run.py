"""Re-opening a finished (or interrupted) run: its saved config and its latest checkpoint."""

from __future__ import annotations

import pathlib
from typing import Any, Optional, Sequence

from distill_jax.config import root as config_lib
from distill_jax.training.run_dir import CONFIG_FILE, checkpointer
from distill_jax.training.run_setup import Run, abstract_state, build_run, device_state


def load_saved_run(run_dir: str, overrides: Sequence[str] = ()) -> tuple[config_lib.Config, pathlib.Path]:
  path = pathlib.Path(run_dir)
  cfg_path = path / CONFIG_FILE
  if not cfg_path.exists():
    raise ValueError(f"run_dir: {run_dir} holds no {CONFIG_FILE} (not a distill-jax run directory)")
  cfg = config_lib.load_config(str(cfg_path), [*overrides, f"train.run_dir={path}"])
  return cfg, path


def restore_latest(cfg: config_lib.Config, run_dir: pathlib.Path, step: Optional[int] = None) -> tuple[Run, Any, int]:
  run = build_run(cfg)
  ckpt = checkpointer(cfg, run_dir)
  try:
    if ckpt.latest_step() is None:
      raise ValueError(f"run_dir: {run_dir} has no finished checkpoint")
    restored, _, _, at = ckpt.restore(abstract_state(run), step=step, fallback=cfg.checkpoint.fallback)
  finally:
    ckpt.close()
  return run, device_state(run, restored), at


