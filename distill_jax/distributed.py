"""Multi-host start-up: one call to `jax.distributed.initialize`, safe to repeat."""

from __future__ import annotations

from typing import Optional, Sequence

import jax

_INITIALIZED: Optional[tuple] = None


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None) -> None:
  """Joins this process to a multi-host run; a no-op when already joined the same way.

  On CPU the collectives go over gloo (``jax_cpu_collectives_implementation``), which is
  how several processes on one machine are tested.  On TPU/GPU clusters all arguments may
  be left ``None`` and JAX discovers them from the environment.

  Must run before any JAX computation.

  Args:
    coordinator: ``"host:port"`` of process 0.
    num_processes: number of processes in the run.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: devices this process drives (default: all visible).

  Raises:
    ValueError: naming ``distributed.process_id`` when out of range, or when called
      again with different arguments.
  """
  global _INITIALIZED
  key = (coordinator, num_processes, process_id, tuple(local_device_ids) if local_device_ids else None)
  if _INITIALIZED is not None:
    if _INITIALIZED != key:
      raise ValueError(f"distributed: already initialized with {_INITIALIZED}, not {key}")
    return
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"distributed.process_id={process_id} is outside [0, {num_processes})")
  platforms = jax.config.jax_platforms or ""
  if not platforms or "cpu" in platforms.split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  _INITIALIZED = key


def is_main_process() -> bool:
  """True on the one process that writes logs and checkpoint metadata."""
  return jax.process_index() == 0
