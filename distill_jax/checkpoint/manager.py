"""Orbax checkpoints of the training state, exact resume, and export of the student.

On-disk layout (one Orbax ``CheckpointManager`` under ``<run_dir>/checkpoints``)::

  <run_dir>/checkpoints/
    <step>/                      one finished step (Orbax renames it from
                                 <step>.orbax-checkpoint-tmp once complete)
      _CHECKPOINT_METADATA       Orbax step metadata (commit timestamp)
      commit_success.txt         Orbax commit marker (also inside each item)
      state/                     TrainState pytree (OCDBT + zarr, sharding-aware)
      data/metadata              data iterator state (JSON)
      config/metadata            resolved run config (JSON)
      integrity/metadata         per-leaf fingerprints of ``state`` (JSON)
      metrics/metrics            eval metrics of the step, if given (JSON)

The teacher is never saved. PRNG keys may be typed (``jax.random.key``) or legacy
``uint32[2]`` keys: Orbax 0.12 stores typed keys as their key data and rewraps
them on restore when the abstract state has a key dtype.

Atomicity comes from Orbax: a step is written into a temporary directory and
renamed when every item is complete, so a process killed mid-save never leaves a
step that ``latest_step()`` returns; temporary leftovers are removed when the
next ``Checkpointer`` is created. Orbax does not detect flipped bytes inside an
array file (it restores wrong values silently), so every save also stores a
fingerprint of each leaf, checked after restore
(:mod:`distill_jax.checkpoint.integrity`). Export of the student lives in
:mod:`distill_jax.checkpoint.export` and is re-exported here.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as ocp_policy

from distill_jax.checkpoint import preemption
from distill_jax.checkpoint.integrity import (integrity_mismatch, integrity_record,
                                              structure_mismatch)
from distill_jax.errors import first_line
from distill_jax.checkpoint.export import export_student

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """Base class of checkpoint errors; messages are one line."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No finished checkpoint (or not the requested step) in the run directory."""


class CheckpointCorruptedError(CheckpointError):
  """A step directory exists but cannot be restored faithfully."""

  def __init__(self, step_dir: os.PathLike[str] | str, reason: str):
    self.step_dir = Path(step_dir)
    self.reason = reason
    super().__init__(f"checkpoint {self.step_dir} is corrupted or truncated: {reason}")


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (read-only directory, disk full, ...).

  Attributes:
    errno: the ``errno`` of the underlying ``OSError`` (None if unknown).
  """

  def __init__(self, err: int | None, message: str):
    super().__init__(message)
    self.errno = err


class CheckpointMismatchError(ValueError):
  """The saved state's structure or shapes differ from the state to restore into."""


def _find_os_error(exc: BaseException) -> OSError | None:
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


# Orbax reads the arrays of a step concurrently; when one read fails, the others
# are abandoned. Python then reports, as unraisable exceptions with tracebacks and
# often after our one-line error, each abandoned coroutine's read error and each
# TensorStore callback that lands on Orbax's closed event loop. They repeat the
# failure already raised as CheckpointCorruptedError, so they are logged at debug
# level instead; every other unraisable exception goes to the previous hook.
_ABANDONED_READ_ERROR = "Encountered error while reading array index"


def _is_abandoned_read(exc: BaseException | None) -> bool:
  if exc is None:
    return False
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  return str(exc).startswith(_ABANDONED_READ_ERROR)


def _drop_abandoned_reads(previous_hook: Any, unraisable: Any) -> None:
  exc = getattr(unraisable, "exc_value", None)
  if _is_abandoned_read(exc):
    log.debug("an abandoned checkpoint read failed too: %s", first_line(exc, 200))
    return
  previous_hook(unraisable)


def quiet_abandoned_reads() -> None:
  """Installs (once) an unraisable hook that drops Orbax's abandoned-read errors."""
  hook = sys.unraisablehook
  if getattr(hook, "func", None) is _drop_abandoned_reads:
    return
  sys.unraisablehook = functools.partial(_drop_abandoned_reads, hook)


# ------------------------------------------------------------------ config


def _normalize(value: Any) -> Any:
  """Makes tuples/lists and dataclass-like values comparable with their JSON form."""
  if isinstance(value, Mapping):
    return {str(k): _normalize(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_normalize(v) for v in value]
  if hasattr(value, "__dataclass_fields__"):
    return {k: _normalize(getattr(value, k)) for k in value.__dataclass_fields__}
  return value


# ------------------------------------------------------------------ checkpointer


class Checkpointer:
  """Saves and restores ``(state, data iterator state, config)`` per step.

  Args:
    run_dir: the run directory; checkpoints go to ``<run_dir>/checkpoints``.
    save_every: ``maybe_save`` writes when ``step % save_every == 0``.
    keep_last: how many most recent steps to keep (``None``: all).
    keep_best: how many best steps by ``best_metric`` to keep besides (0: off).
    best_metric: the key of the ``metrics`` mapping that ranks steps.
    best_mode: ``"min"`` or ``"max"``: which end of ``best_metric`` is best.
    async_save: write arrays in a background thread; ``wait()`` blocks until done.
    guard: a :class:`~distill_jax.checkpoint.preemption.PreemptionGuard` whose flag
      ``should_stop`` reads when it is not told ``requested`` explicitly.

  Raises:
    ValueError: for an invalid option.
    CheckpointWriteError: when the checkpoint directory cannot be created.
  """

  def __init__(self, run_dir: os.PathLike[str] | str, *, save_every: int,
               keep_last: int | None = 3, keep_best: int = 0,
               best_metric: str = "eval_loss", best_mode: str = "min",
               async_save: bool = True,
               guard: preemption.PreemptionGuard | None = None):
    if save_every < 1:
      raise ValueError(f"checkpoint save_every must be >= 1, got {save_every}")
    if keep_last is not None and keep_last < 1:
      raise ValueError(f"checkpoint keep_last must be >= 1 or None, got {keep_last}")
    if keep_best < 0:
      raise ValueError(f"checkpoint keep_best must be >= 0, got {keep_best}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"checkpoint best_mode must be 'min' or 'max', got {best_mode!r}")
    self.run_dir = Path(run_dir)
    self.directory = self.run_dir / CHECKPOINT_DIR
    self.save_every = save_every
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.guard = guard
    if self.directory.exists() and not self.directory.is_dir():
      raise CheckpointWriteError(
          errno.ENOTDIR, f"checkpoint path {self.directory} exists and is not a directory")

    policies: list[Any] = [ocp_policy.LatestN(n=keep_last)]
    if keep_best:
      policies.append(ocp_policy.BestN(
          get_metric_fn=self._metric_value, reverse=(best_mode == "min"), n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # Saving cadence is decided here (maybe_save); Orbax is always forced.
        best_fn=self._metric_value if keep_best else None,
        best_mode=best_mode,
        preservation_policy=ocp_policy.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        # Synchronous directory creation: a read-only or full disk fails in save()
        # instead of stalling the background threads until their signal timeout.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        cleanup_tmp_directories=True,
        create=True)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory.absolute(), options=options,
          item_handlers={
              "state": ocp.StandardCheckpointHandler(),
              "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(),
              "integrity": ocp.JsonCheckpointHandler(),
          })
      # Orbax removes leftover tmp dirs in the background and only awaits that
      # in the first save(); finish it now so a reader sees a clean directory.
      await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
      if await_cleanup is not None:
        await_cleanup()
    except OSError as e:
      raise CheckpointWriteError(
          e.errno, f"cannot create checkpoint directory {self.directory}: {e.strerror or e}"
      ) from e

  # -- queries

  def _metric_value(self, metrics: Mapping[str, Any]) -> float:
    worst = math.inf if self.best_mode == "min" else -math.inf
    value = metrics.get(self.best_metric) if isinstance(metrics, Mapping) else None
    if value is None:
      return worst
    value = float(value)
    return worst if math.isnan(value) else value

  def step_dir(self, step: int) -> Path:
    """The directory of a finished step."""
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """Finished steps, ascending, plus one whose async save this process started.

    Temporary directories of interrupted saves are never listed.
    """
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The latest finished step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The best step by ``best_metric`` (None when ``keep_best`` is off or no metrics)."""
    if not self._manager._track_best:  # pylint: disable=protected-access
      return None
    return self._manager.best_step()

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The metrics saved with ``step`` (only written when ``keep_best`` > 0)."""
    return self._manager.metrics(step)

  # -- saving

  def should_save(self, step: int) -> bool:
    """True when ``step`` falls on the ``save_every`` cadence."""
    return step % self.save_every == 0

  def maybe_save(self, step: int, state: Any, *, data_state: Any, config: Any,
                 metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
    """Saves when ``step`` is on the cadence or ``force``; never twice for one step.

    Args:
      step: the training step the state is at.
      state: the TrainState pytree (sharded ``jax.Array`` leaves are fine).
      data_state: JSON-able data iterator state (``iterator.get_state()``).
      config: the resolved run config as a JSON-able mapping.
      metrics: eval metrics of this step (ranking for ``keep_best``).
      force: save even off the cadence (end of training, preemption).

    Returns:
      Whether a save was started.

    Raises:
      CheckpointWriteError: naming the path when the step cannot be written.
    """
    if not (force or self.should_save(step)):
      return False
    if step in self._manager.all_steps():
      return False
    self.save(step, state, data_state=data_state, config=config, metrics=metrics)
    return True

  def save(self, step: int, state: Any, *, data_state: Any, config: Any,
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts saving ``step`` (in the background with ``async_save``); see ``maybe_save``."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        config=ocp.args.JsonSave(_normalize(config)),
        integrity=ocp.args.JsonSave(integrity_record(state)),
    )
    if metrics is not None:
      metrics = {str(k): float(v) for k, v in metrics.items()}
    try:
      self._manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e

  def _write_error(self, step: int | None, exc: BaseException) -> BaseException:
    os_error = _find_os_error(exc)
    if os_error is None:
      return exc
    path = os_error.filename or self.directory
    what = f"step {step}" if step is not None else "a checkpoint"
    reason = os_error.strerror or str(os_error)
    return CheckpointWriteError(
        os_error.errno,
        f"cannot write checkpoint {what} to {path}: {reason}; earlier checkpoints in"
        f" {self.directory} are intact")

  def wait(self) -> None:
    """Blocks until a background save has finished; raises its error if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(None, e) from e

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  # -- preemption

  def should_stop(self, step: int, requested: bool | None = None) -> bool:
    """Whether every process should save and stop after ``step``.

    Combines the local stop request (``requested``, or the guard's flag) with
    JAX's preemption sync point (Orbax ``reached_preemption``, active under
    ``jax.distributed``), then ORs the result across processes so all stop at the
    same step. A collective on several processes: call it on all of them at the
    same steps.

    Args:
      step: the step just finished.
      requested: this process's stop flag; defaults to ``guard.requested``.

    Returns:
      True on every process when any process asked to stop.
    """
    if requested is None:
      requested = self.guard.requested if self.guard is not None else False
    local = bool(requested) or bool(ocp.multihost.reached_preemption(step))
    return preemption.any_process(local)

  # -- restoring

  def restore(self, abstract_state: Any, *, step: int | None = None,
              fallback: bool = False) -> tuple[Any, Any, Any, int]:
    """Restores a finished step onto ``abstract_state``'s shardings.

    Args:
      abstract_state: the state pytree as ``jax.ShapeDtypeStruct`` leaves with
        ``.sharding`` for the current mesh (e.g. ``jax.eval_shape`` of the init
        with shardings attached); the device count may differ from the saving run.
      step: the step to restore; the latest finished one when None.
      fallback: when the chosen step is corrupted, try the earlier steps in
        turn (each skip is logged) instead of raising.

    Returns:
      ``(state, data_state, config, step)``.

    Raises:
      CheckpointNotFoundError: no finished step, or ``step`` is not on disk.
      CheckpointCorruptedError: naming the step directory (with ``fallback``,
        only when no earlier step restores either).
      CheckpointMismatchError: the saved state has other leaves or shapes
        (a ``ValueError``; never a reason to fall back).
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFoundError(f"no finished checkpoint in {self.directory}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointNotFoundError(
          f"no finished checkpoint for step {step} in {self.directory} (have {steps})")
    candidates = [s for s in reversed(steps) if s <= step]
    if not fallback:
      candidates = candidates[:1]
    first_error: CheckpointCorruptedError | None = None
    for i, candidate in enumerate(candidates):
      try:
        state, data_state, config = self._restore_step(candidate, abstract_state)
      except CheckpointCorruptedError as e:
        first_error = first_error or e
        if i + 1 < len(candidates):
          log.warning("%s; falling back to step %d", e, candidates[i + 1])
        continue
      if candidate != step:
        log.warning("restored step %d instead of corrupted step %d", candidate, step)
      return state, data_state, config, candidate
    assert first_error is not None
    if len(candidates) > 1:
      raise CheckpointCorruptedError(
          first_error.step_dir, f"{first_error.reason} (and no earlier step restores)")
    raise first_error

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, Any, Any]:
    step_dir = self.step_dir(step)
    try:
      metadata = self._manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptedError(step_dir, first_line(e, 300, with_type=True)) from e
    if metadata.get("state") is None:
      raise CheckpointCorruptedError(step_dir, "no readable state item")
    mismatch = structure_mismatch(step_dir, metadata["state"], abstract_state)
    if mismatch is not None:
      raise CheckpointMismatchError(mismatch)
    names = set(metadata.keys())
    args = dict(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore())
    if "integrity" in names:
      args["integrity"] = ocp.args.JsonRestore()
    quiet_abandoned_reads()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptedError(step_dir, first_line(e, 300, with_type=True)) from e
    integrity = restored.get("integrity") if "integrity" in names else None
    if integrity is not None:
      reason = integrity_mismatch(integrity, restored["state"])
      if reason is not None:
        raise CheckpointCorruptedError(step_dir, reason)
    return restored["state"], restored["data"], restored["config"]


def abstract_like(state: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves with the shardings of ``state`` (for restore)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


__all__ = [
    "CHECKPOINT_DIR", "Checkpointer", "CheckpointError", "CheckpointNotFoundError",
    "CheckpointCorruptedError", "CheckpointWriteError", "CheckpointMismatchError",
    "export_student", "abstract_like",
]
