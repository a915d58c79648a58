"""PreemptionGuard: signals become a stop flag, handlers are restored, a loop saves and exits 0.

This file is also the worker of the end-to-end test
(``python tests/test_preemption.py RUN_DIR``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distill_jax.checkpoint import preemption

HERE = Path(__file__).resolve().parent


def test_sigterm_sets_flag_and_handlers_are_restored():
  calls = []

  def previous(signum, frame):
    del frame
    calls.append(signum)

  old_term = signal.signal(signal.SIGTERM, previous)
  try:
    old_int = signal.getsignal(signal.SIGINT)
    with preemption.PreemptionGuard() as guard:
      assert not guard.requested and guard.signal_name is None
      signal.raise_signal(signal.SIGTERM)
      assert guard.requested and guard.signal_name == "SIGTERM"
      signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM is harmless
      assert guard.requested
    assert signal.getsignal(signal.SIGTERM) is previous
    assert signal.getsignal(signal.SIGINT) is old_int
    assert calls == []
    signal.raise_signal(signal.SIGTERM)
    assert calls == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, old_term)


def test_first_ctrl_c_requests_stop_second_raises():
  old_int = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
    with preemption.PreemptionGuard() as guard:
      signal.raise_signal(signal.SIGINT)
      assert guard.requested and guard.signal_name == "SIGINT"
      # The handlers are restored as the KeyboardInterrupt leaves the handler.
      signal.raise_signal(signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is old_int


def test_request_and_non_main_thread():
  results = {}

  def run():
    with preemption.PreemptionGuard() as guard:
      results["installed"] = signal.getsignal(signal.SIGTERM)
      guard.request()
      results["requested"] = guard.requested
      results["name"] = guard.signal_name

  before = signal.getsignal(signal.SIGTERM)
  thread = threading.Thread(target=run)
  thread.start()
  thread.join()
  assert results == {"installed": before, "requested": True, "name": "request"}


def test_any_process_single_process():
  assert preemption.any_process(True) is True
  assert preemption.any_process(False) is False


def test_should_stop_reads_guard(tmp_path):
  from distill_jax.checkpoint import manager as ckpt  # pylint: disable=g-import-not-at-top
  with preemption.PreemptionGuard() as guard:
    with ckpt.Checkpointer(tmp_path, save_every=10, guard=guard) as checkpointer:
      assert not checkpointer.should_stop(1)
      signal.raise_signal(signal.SIGTERM)
      assert checkpointer.should_stop(2)
      assert not checkpointer.should_stop(2, requested=False)


def _worker(run_dir: Path) -> int:
  """A miniature training loop: SIGTERM → finish the step, save, exit 0."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from distill_jax.checkpoint import manager as ckpt  # pylint: disable=g-import-not-at-top
  state = {"w": jnp.zeros((4,)), "step": jnp.asarray(0)}
  with preemption.PreemptionGuard() as guard, \
      ckpt.Checkpointer(run_dir, save_every=1000, guard=guard) as checkpointer:
    for step in range(1, 10_000):
      state = {"w": state["w"] + 1.0, "step": jnp.asarray(step)}
      print(f"STEP {step}", flush=True)
      if checkpointer.should_stop(step):
        checkpointer.save(step, state, data_state={"next": step + 1}, config={})
        print(f"stopped by {guard.signal_name} at step {step}; checkpoint saved", flush=True)
        return 0
      time.sleep(0.05)
  return 1


@pytest.mark.slow
def test_sigterm_mid_loop_saves_and_exits_zero(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env, cwd=HERE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    while True:
      line = proc.stdout.readline()
      assert line, f"worker ended early: {proc.stderr.read()[-2000:]}"
      if line.startswith("STEP 3"):
        break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, err[-2000:]
  stopped = [l for l in out.splitlines() if l.startswith("stopped by SIGTERM at step")]
  assert stopped, out
  step = int(stopped[0].split("at step ")[1].split(";")[0])
  assert (tmp_path / "checkpoints" / str(step)).is_dir()
  assert "received SIGTERM" in err


if __name__ == "__main__":
  sys.path.insert(0, str(HERE))
  sys.exit(_worker(Path(sys.argv[1])))
