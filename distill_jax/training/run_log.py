"""What a run tells: stderr messages, metrics.jsonl + TensorBoard, the progress bar and
the per-step monitor.

Only process 0 prints and writes; metrics are fetched one step late so the loop never waits on the device.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from distill_jax.config import root as config_lib
from distill_jax.training.distributed import is_main_process


METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. too many non-finite steps); one-line message."""


def echo(message: str) -> None:
  if is_main_process():
    print(message, file=sys.stderr, flush=True)


def scalar(x: Any) -> float:
  return float(np.asarray(x))


def _finalize_metrics(m: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """``{term: (sum, count)}`` and scalars -> ``{prefix+name: value}`` (term means)."""
  out = {}
  for key, value in m.items():
    if isinstance(value, (tuple, list)) and len(value) == 2:
      total, count = scalar(value[0]), scalar(value[1])
      out[prefix + key] = total / count if count > 0 else 0.0
    else:
      out[prefix + key] = scalar(value)
  return out


def batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
  return int(np.asarray(batch["attention_mask"]).sum()) * jax.process_count()


class Logger:
  """metrics.jsonl + TensorBoard (process 0 only)."""

  def __init__(self, run_dir: pathlib.Path, cfg: config_lib.Config, resume_step: int):
    self.enabled = is_main_process()
    self.path = run_dir / METRICS_FILE
    self.rows: list[dict] = []
    self._tb = None
    if not self.enabled:
      return
    if self.path.exists():  # keep the history up to the restored step: a resumed run rewrites the rest
      kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      # (a run restarted from step 0 keeps none: it logs its own step-0 eval again)
      self.rows = [r for r in kept if r.get("step", 0) <= resume_step] if resume_step else []
      self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
    self._jsonl = open(self.path, "a", encoding="utf-8") if cfg.logging.jsonl else None
    if cfg.logging.tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

  def log(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    self.rows.append(row)
    if self._jsonl:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        if math.isfinite(float(v)):
          self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if not self.enabled:
      return
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def progress(cfg: config_lib.Config, start: int) -> Any:
  if not (is_main_process() and cfg.logging.progress_bar):
    return None
  from tqdm.auto import tqdm

  return tqdm(total=cfg.train.steps, initial=start, desc="distill", unit="step", dynamic_ncols=True,
              file=sys.stderr, mininterval=0.5)


class StepMonitor:
  """Each step's metrics, fetched a step late so that the device never waits for the host.

  Every step is checked for a non-finite loss (a run of ``train.max_nonfinite_steps`` in a
  row stops training); the log cadence, the last step and non-finite steps are logged with
  the tokens/s since the previous cadence step.  A cadence step is fetched at once.
  """

  def __init__(self, cfg: config_lib.Config, logger: Logger, bar: Any, ckpt: Any):
    self.cfg, self.logger, self.bar, self.ckpt = cfg, logger, bar, ckpt
    self.log_every = max(cfg.train.log_every, 1)
    self.pending: Optional[tuple[int, Any]] = None  # (step, metrics on device) of the previous step
    self.nonfinite_run: list[int] = []
    self.tokens, self.t_window = 0, time.perf_counter()

  def _on_cadence(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.cfg.train.steps

  def push(self, step: int, metrics: Any, tokens: int) -> None:
    """Takes the step just dispatched; handles the previous one (and this one on the cadence)."""
    self.flush()
    self.tokens += tokens
    self.pending = (step, metrics)
    if self._on_cadence(step):
      self.flush()
      self.tokens, self.t_window = 0, time.perf_counter()

  def flush(self) -> None:
    """Fetches, checks and logs the pending step, if any."""
    if self.pending is None:
      return
    (step, metrics), self.pending = self.pending, None
    cfg, bar = self.cfg, self.bar
    values = _finalize_metrics(jax.device_get(metrics), prefix="train/")
    nonfinite = values.get("train/nonfinite", 0.0) > 0
    if nonfinite:
      self.nonfinite_run.append(step)
      echo(f"step {step}: non-finite loss or gradient; the update was skipped "
            f"({len(self.nonfinite_run)} in a row)")
    else:
      self.nonfinite_run.clear()
    if self._on_cadence(step) or nonfinite:
      elapsed = max(time.perf_counter() - self.t_window, 1e-9)
      values["train/tokens_per_s"] = self.tokens / elapsed
      self.logger.log(step, values)
      if bar is not None:
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['train/tokens_per_s']:.0f}",
                        refresh=False)
    streak = self.nonfinite_run
    if len(streak) >= cfg.train.max_nonfinite_steps:
      steps = f"step {step}" if len(streak) == 1 else f"steps {streak[0]}..{step}"
      raise TrainingError(f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}: the loss was non-finite at "
                          f"{steps} ({len(streak)} consecutive, updates skipped); stopped, the last "
                          f"checkpoint is step {self.ckpt.latest_step()} in {self.ckpt.directory}")
    if bar is not None:
      bar.update(step - bar.n)
