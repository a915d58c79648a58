"""The run directory: its files, the resume check, finished runs, the checkpointer and setting aside corrupted steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Optional

import jax

from distill_jax.config import root as config_lib
from distill_jax.training.distributed import is_main_process
from distill_jax.training.run_log import METRICS_FILE, echo
from distill_jax.evaluation import report as report_lib
from distill_jax.checkpoint import manager as checkpoint


CONFIG_FILE = "config.yaml"


BEFORE_FILE = "undistilled_eval.json"


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What `train` returns.

  Attributes:
    run_dir: the run directory.
    step: the last step trained (the final checkpoint's step).
    resumed_from: the checkpoint step the run resumed from, or ``None``.
    preempted: the run stopped early on SIGTERM/SIGINT after saving a checkpoint.
    history: the logged metric rows of this process (``metrics.jsonl`` rows).
    report: the final report (``report.json``), or ``None`` when preempted.
    export_dir: where the student was exported, or ``None``.
  """

  run_dir: str
  step: int
  resumed_from: Optional[int]
  preempted: bool
  history: tuple[dict, ...]
  report: Optional[dict]
  export_dir: Optional[str]


def prepare_run_dir(cfg: config_lib.Config) -> pathlib.Path:
  """Checks a resumable run directory's config before anything is loaded or written."""
  run_dir = pathlib.Path(cfg.train.run_dir)
  saved_path = run_dir / CONFIG_FILE
  if saved_path.exists() and cfg.checkpoint.resume:
    saved = config_lib.load_config(str(saved_path)).to_dict()
    diff = config_lib.shape_diff(saved, cfg)
    if diff:
      path, old, new = diff[0]
      more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
      raise ValueError(f"{path}: changed from {old!r} to {new!r}{more}; the checkpoints in {run_dir} were "
                       f"trained with the old value (use a new train.run_dir)")
  ckpt_dir = run_dir / "checkpoints"
  if not cfg.checkpoint.resume and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    # A fresh run would silently keep the old run's steps (a step is never saved twice).
    raise ValueError(f"checkpoint.resume: false, but {ckpt_dir} holds another run's checkpoints; "
                     f"use a new train.run_dir")
  return run_dir


def finished_run(cfg: config_lib.Config, run_dir: pathlib.Path) -> Optional[RunResult]:
  """The result of a run of this very config that already reached its last step, else None.

  Its report records the final step and the export; nothing is loaded, evaluated or
  exported again, so rerunning a finished command returns in seconds.
  """
  report_path, saved = run_dir / report_lib.REPORT_JSON, run_dir / CONFIG_FILE
  if not (cfg.checkpoint.resume and report_path.exists() and saved.exists()):
    return None
  report = json.loads(report_path.read_text())
  export_dir = report.get("export_dir")
  if report.get("steps") != cfg.train.steps or (cfg.export.enabled and not (export_dir and os.path.isdir(export_dir))):
    return None
  if jax.process_count() > 1:  # every process must take the same branch: multi-host reruns resume as before
    return None
  if config_lib.load_config(str(saved)).to_dict() != cfg.to_dict():
    return None
  echo(f"already complete: {run_dir} finished step {cfg.train.steps} (report {report_path}"
        f"{f', student in {export_dir}' if export_dir else ''}); nothing to do. Raise train.steps to train "
        f"further, or use a new train.run_dir")
  history = tuple(report_lib.read_history(str(run_dir / METRICS_FILE)))
  return RunResult(str(run_dir), cfg.train.steps, cfg.train.steps, False, history, report, export_dir)


def checkpointer(cfg: config_lib.Config, run_dir: pathlib.Path) -> Any:
  c = cfg.checkpoint
  return checkpoint.Checkpointer(run_dir, save_every=c.every or cfg.train.steps + 1, keep_last=c.keep_last,
                                 keep_best=c.keep_best, best_metric=c.best_metric, best_mode=c.best_mode,
                                 async_save=c.async_save)


def set_aside_later_steps(cfg: config_lib.Config, run_dir: pathlib.Path, ckpt: Any, good: int) -> Any:
  """Moves the (corrupted) steps after ``good`` to ``<run_dir>/checkpoints_corrupted``.

  The resumed run saves those steps again; Orbax would not overwrite them in place.
  Returns a fresh checkpointer over the cleaned directory.
  """
  import shutil

  later = [s for s in ckpt.all_steps() if s > good]
  ckpt.close()
  if is_main_process():
    aside = run_dir / "checkpoints_corrupted"
    aside.mkdir(exist_ok=True)
    for s in later:
      target = aside / f"{s}-{int(time.time())}"
      shutil.move(str(ckpt.step_dir(s)), str(target))
      echo(f"moved the corrupted checkpoint of step {s} to {target}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("distill_jax: corrupted checkpoints set aside")
  return checkpointer(cfg, run_dir)
