"""Graceful stop on SIGTERM (preemption) and Ctrl-C.

The training loop runs inside a :class:`PreemptionGuard`; the signal handlers only
set a flag, so the current step finishes, a checkpoint is written and the loop
exits normally. A second Ctrl-C raises ``KeyboardInterrupt`` at once, for a user
who does not want to wait for the save.

On several hosts the local flags are combined with :func:`any_process` so that
every process stops at the same step (see ``Checkpointer.should_stop``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
  """Context manager that turns SIGTERM / SIGINT into a stop request.

  Example::

    with PreemptionGuard() as guard:
      for step in range(start, num_steps):
        state = train_step(state, batch)
        if checkpointer.should_stop(step, requested=guard.requested):
          checkpointer.save(step, state, ...)
          break

  Handlers are installed on ``__enter__`` and the previous handlers restored on
  ``__exit__``. Signal handlers can only be installed from the main thread; from
  any other thread the guard is inert (``requested`` stays False unless
  :meth:`request` is called) and says so in the log.

  Args:
    signals: the signals to catch.
  """

  def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._requested_by: int | None = None
    self._installed = False

  @property
  def requested(self) -> bool:
    """True once a stop was requested by a signal or by :meth:`request`."""
    return self._requested_by is not None

  @property
  def signal_name(self) -> str | None:
    """Name of the signal that requested the stop (``"SIGTERM"``), if any."""
    if self._requested_by is None:
      return None
    if self._requested_by == 0:
      return "request"
    return signal.Signals(self._requested_by).name

  def request(self) -> None:
    """Requests a stop without a signal (tests, callbacks)."""
    if self._requested_by is None:
      self._requested_by = 0

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    name = signal.Signals(signum).name
    if self._requested_by is not None and signum == signal.SIGINT:
      # Second Ctrl-C: the user does not want to wait for the checkpoint.
      self._restore_handlers()
      raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
    if self._requested_by is None:
      self._requested_by = signum
      log.warning(
          "received %s: finishing the current step, saving a checkpoint, then"
          " stopping (Ctrl-C again to abort without saving)", name)

  def _restore_handlers(self) -> None:
    if not self._installed:
      return
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()
    self._installed = False

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionGuard outside the main thread: signals not caught")
      return self
    for signum in self._signals:
      self._previous[signum] = signal.getsignal(signum)
      signal.signal(signum, self._handle)
    self._installed = True
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._restore_handlers()


def any_process(flag: bool) -> bool:
  """True when ``flag`` is True on any JAX process (a collective on several).

  Every process must call this at the same point of the program. With one
  process it is just ``bool(flag)``.

  Args:
    flag: this process's value.

  Returns:
    The logical OR of ``flag`` over all processes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))
  return bool(np.asarray(flags).any())
