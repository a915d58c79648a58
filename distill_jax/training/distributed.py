"""Multi-host start-up: one call to `jax.distributed.initialize`, safe to repeat."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax

from distill_jax.errors import first_line

_INITIALIZED: Optional[tuple] = None


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None, *,
               heartbeat_timeout_s: int = 100, initialization_timeout_s: int = 300) -> None:
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
    heartbeat_timeout_s: a process silent for this long counts as dead; the others
      then fail instead of waiting forever.
    initialization_timeout_s: how long to wait for every process to join.

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
                             process_id=process_id, local_device_ids=local_device_ids,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             initialization_timeout=initialization_timeout_s)
  _INITIALIZED = key


def initialize_from(config: Any) -> None:
  """`initialize` as a run's ``distributed`` config section asks (nothing when it is off)."""
  if config.enabled:
    initialize(config.coordinator, config.num_processes, config.process_id,
               heartbeat_timeout_s=config.heartbeat_timeout_s, initialization_timeout_s=config.initialization_timeout_s)


def is_main_process() -> bool:
  """True on the one process that writes logs and checkpoint metadata."""
  return jax.process_index() == 0


class PeerWatchdog:
  """Notices a dead or hung peer process while this one waits in a collective.

  When a process of a multi-host run dies, the others block in their next collective
  until JAX's heartbeat timeout aborts them with a C++ fatal error.  The watchdog's
  thread publishes a heartbeat of this process in the coordination service's key-value
  store every ``interval_s`` and watches the others'; a peer silent for ``timeout_s``
  (or a coordinator that cannot be reached) calls ``on_lost(message)`` with a one-line
  explanation, which should end the process (the main thread cannot be interrupted).

  A no-op with one process.  Start it once every process runs the training loop, and
  stop it before the processes' work diverges (e.g. only process 0 writes the report).

  Args:
    timeout_s: seconds without a peer's heartbeat before it counts as lost.
    on_lost: called once, from the watchdog thread, with the message.
    interval_s: seconds between heartbeats.
  """

  def __init__(self, timeout_s: float, on_lost, interval_s: float = 1.0):
    self.timeout_s = timeout_s
    self.on_lost = on_lost
    self.interval_s = interval_s
    self._stop = None
    self._thread = None

  def start(self) -> "PeerWatchdog":
    import threading

    if jax.process_count() == 1:
      return self
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
      return self
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(client,), name="distill-jax-peer-watchdog", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __enter__(self) -> "PeerWatchdog":
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def _run(self, client) -> None:
    import time

    me, count = jax.process_index(), jax.process_count()
    now = time.monotonic()
    seen = {p: (None, now) for p in range(count) if p != me}
    beat = 0
    while not self._stop.wait(self.interval_s):
      beat += 1
      try:
        client.key_value_set(f"distill_jax/alive/{me}", str(beat), allow_overwrite=True)
        values = {}
        for p in seen:
          try:
            values[p] = client.key_value_try_get(f"distill_jax/alive/{p}")
          except Exception:  # pylint: disable=broad-except  # not published yet
            values[p] = None
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        detail = first_line(e, 200)
        self.on_lost(f"distributed: process {me} lost contact with the coordinator (process 0): {detail}")
        return
      now = time.monotonic()
      for p, value in values.items():
        last_value, last_time = seen[p]
        if value != last_value:
          seen[p] = (value, now)
        elif value is not None and now - last_time > self.timeout_s:  # counted from its first heartbeat
          if self._stop.is_set():
            return
          self.on_lost(f"distributed: process {p} of {count} sent no heartbeat for {self.timeout_s:g}s "
                       f"(it died or hangs)")
          return
