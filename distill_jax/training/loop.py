"""The training loop: config in, distilled + evaluated + exported student out.

`train(config)` is the product's main entry point (`distill-jax train`).  It validates
everything it can before loading a model, builds the models, objective, data pipeline,
mesh and optimizer from the config (only scalars reach the jitted step), resumes from
the latest checkpoint in the run directory, and runs the loop with a progress bar,
JSONL + TensorBoard metrics, periodic evaluation, Orbax checkpoints and preemption
saves.  At the end it evaluates the undistilled and the distilled student against the
teacher, writes the report and exports the student as a Hugging Face checkpoint.

Only process 0 prints, logs and writes files other than checkpoints (Orbax coordinates
those across processes).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from typing import Any, Optional

import jax

from distill_jax.config import root as config_lib
from distill_jax.training import faults as faults_lib
from distill_jax.training.distributed import is_main_process
from distill_jax.errors import first_line
from distill_jax.training.run_dir import (CONFIG_FILE, RunResult, checkpointer, finished_run, prepare_run_dir,
                                  set_aside_later_steps)
from distill_jax.training.run_log import Logger, StepMonitor, TrainingError, batch_tokens, echo, progress
from distill_jax.training.run_report import eval_loss, eval_on_bar, export, final_report, undistilled_eval
from distill_jax.training.run_setup import (abstract_state, build_run, device_state, host_state, place_batch, state_step,
                                   student_params)
from distill_jax.data import pipeline as data
from distill_jax.training import distributed
from distill_jax.checkpoint import preemption

__all__ = ["CONFIG_FILE", "RunResult", "TrainingError", "train"]


def train(cfg: config_lib.Config, *, hooks: Optional[faults_lib.LoopHooks] = None) -> RunResult:
  """Runs (or resumes) the distillation described by ``cfg``.

  Args:
    cfg: a validated `Config` (`load_config`).
    hooks: what tests run at the loop's named points (`faults.LoopHooks`) [the faults
      ``DISTILL_JAX_FAULTS`` asks for: none in production].

  Returns:
    A `RunResult`.

  Raises:
    ValueError: one line naming the config field, before any compilation.
    TrainingError: when the loss stays non-finite for ``train.max_nonfinite_steps`` steps.
  """
  distributed.initialize_from(cfg.distributed)
  run_dir = prepare_run_dir(cfg)
  finished = finished_run(cfg, run_dir)
  if finished is not None:
    return finished
  echo(config_lib.short_summary(cfg))
  t0 = time.perf_counter()
  run = build_run(cfg)
  echo(f"models and data ready in {time.perf_counter() - t0:.1f}s: student {run.student.family} "
        f"{run.student.num_layers} layers, {len(run.train_examples.lengths)} train / "
        f"{len(run.eval_examples.lengths)} validation examples, devices: {jax.device_count()} "
        f"({jax.devices()[0].platform})")

  if is_main_process():
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump_yaml(cfg, str(run_dir / CONFIG_FILE))
  ckpt = checkpointer(cfg, run_dir)
  config_json = cfg.to_dict()
  train_it = data.train_batches(run.train_examples, global_batch_size=cfg.data.global_batch_size,
                                seed=cfg.data.shuffle_seed if cfg.data.shuffle_seed is not None else cfg.train.seed,
                                num_devices=jax.device_count(), prefetch=cfg.data.prefetch,
                                extras=run.batch_extras("train"))
  state = run.state
  resumed_from = None
  if cfg.checkpoint.resume and ckpt.latest_step() is not None:
    try:
      restored, data_state, _, resumed_from = ckpt.restore(abstract_state(run), fallback=cfg.checkpoint.fallback)
    except BaseException:
      ckpt.close()
      raise
    state = device_state(run, restored)
    train_it.set_state(data_state)
    echo(f"resumed from the checkpoint of step {resumed_from}")
    if resumed_from < ckpt.latest_step():  # fell back past corrupted steps: set them aside
      ckpt = set_aside_later_steps(cfg, run_dir, ckpt, resumed_from)
  start = state_step(run, state)

  before = undistilled_eval(run, run_dir) if cfg.eval.before_and_after and is_main_process() else None
  logger = Logger(run_dir, cfg, start)
  if cfg.eval.before_and_after and start == 0:  # the undistilled eval loss (every process: a collective)
    logger.log(0, eval_loss(run, state, cfg.train.eval_batches))
  bar = None  # made after the first step returns: its ETA never counts the compilation
  monitor = StepMonitor(cfg, logger, bar, ckpt)
  preempted = False
  step = start
  hooks = faults_lib.loop_hooks() if hooks is None else hooks
  last_eval: dict[str, float] = {}
  failed = True
  watchdog = distributed.PeerWatchdog(max(cfg.distributed.heartbeat_timeout_s / 2, 1.0),
                                      functools.partial(_lost_peer, ckpt)).start()
  try:
    with preemption.PreemptionGuard() as guard:
      while step < cfg.train.steps:
        batch = next(train_it)
        teacher_params = hooks.teachers_for(step + 1, run.teacher_params)
        if step == start:
          echo("compiling the train step ...")
        state, metrics = run.step_fn.train(state, teacher_params, place_batch(run, batch))
        if step == start:
          bar = monitor.bar = progress(cfg, start)
          monitor.t_window = time.perf_counter()  # tokens/s, like the bar's ETA, starts after the compile
        step += 1
        hooks.stepped(step)
        monitor.push(step, metrics, batch_tokens(batch))
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
          last_eval = eval_on_bar(run, state, bar, step)
          logger.log(step, last_eval)
        if ckpt.should_save(step):  # the arguments cost host work: build them on the cadence only
          ckpt.maybe_save(step, host_state(run, state), data_state=train_it.get_state(), config=config_json,
                          metrics=last_eval or None)
        # A collective on several processes: checked at the same steps everywhere, and only
        # every log_every steps there so that single-host runs alone pay it per step.
        check = jax.process_count() == 1 or step % monitor.log_every == 0
        if check and ckpt.should_stop(step, guard.requested):
          monitor.flush()
          ckpt.maybe_save(step, host_state(run, state), data_state=train_it.get_state(), config=config_json,
                          metrics=last_eval or None, force=True)
          ckpt.wait()
          preempted = True
          echo(f"preempted: saved the checkpoint of step {step} in {ckpt.directory}; "
                f"rerun the same command to resume")
          break
      if not preempted:
        last_eval = eval_on_bar(run, state, bar, step)
        logger.log(step, last_eval)
        ckpt.maybe_save(step, host_state(run, state), data_state=train_it.get_state(), config=config_json,
                        metrics=last_eval, force=True)
        ckpt.wait()
    failed = False
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() > 1:  # a collective failed: gloo/NCCL lost a peer (the watchdog may not have noticed yet)
      watchdog.stop()
      detail = first_line(e, 200)
      _lost_peer(ckpt, f"distributed: a collective failed after step {step}, another process probably died "
                       f"({detail})")
    raise
  finally:
    watchdog.stop()
    if bar is not None:
      bar.close()
    logger.close()
    if failed:  # keep the first error: a second one from waiting on a pending save would hide it
      with contextlib.suppress(Exception):
        ckpt.close()
    else:
      ckpt.close()

  report = export_dir = None
  if not preempted:
    params = student_params(run, state)  # a collective on several processes: every process gathers
    export_dir = export(run, params, run_dir) if cfg.export.enabled and is_main_process() else None
    if is_main_process():
      report = final_report(run, params, run_dir, before, logger.rows, export_dir)
  echo(f"done in {time.perf_counter() - t0:.1f}s")
  return RunResult(str(run_dir), step, resumed_from, preempted, tuple(logger.rows), report, export_dir)


def _lost_peer(ckpt: Any, message: str) -> None:
  """Ends this process when a peer died: its main thread is stuck in a collective."""
  try:
    last = ckpt.latest_step()
  except Exception:  # pylint: disable=broad-except
    last = None
  print(f"distill-jax: error: {message}; the last checkpoint is step {last} in {ckpt.directory}: restart every "
        f"process with the same command to resume", file=sys.stderr, flush=True)
  os._exit(3)  # pylint: disable=protected-access
