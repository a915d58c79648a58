"""Two processes x 2 forced CPU devices through the real CLI (gloo collectives on a free
localhost port): a few steps and a checkpoint, a SIGKILL of one process (the other exits
with a clear error in bounded time), a resume of both, and the result equals a
single-process run of the same global batch on 4 devices.  Only process 0 writes logs,
report and export.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from multihost_util import free_port, kill_all
from test_reliability import (STEPS, cli_env, exported_params, finish, jax_cache, last_train_step,  # noqa: F401
                              loss_history, ok, run_cli, start_cli, tiny_gpt2, train_args, wait_for, with_faults)

HEARTBEAT_S = 10  # distributed.heartbeat_timeout_s of these runs
# README: a survivor exits with code 3 within distributed.heartbeat_timeout_s of a peer's death
# (the watchdog counts a peer lost after half of it); 2 s more for the process to end.
PEER_TIMEOUT = HEARTBEAT_S + 2
LOST_PEER_EXIT = 3


def _host_args(teacher, run_dir, port: int, pid: int, *extra: str) -> list[str]:
  return train_args(teacher, run_dir, f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                    f"distributed.process_id={pid}", f"distributed.heartbeat_timeout_s={HEARTBEAT_S}", *extra)


def _launch(teacher, run_dir, tmp_path, jax_cache, tag: str, *extra: str, **faults):  # noqa: F811
  port = free_port()
  env = with_faults(cli_env(jax_cache, devices=2), **faults)
  logs = [tmp_path / f"{tag}_{pid}.log" for pid in range(2)]
  procs = [start_cli(_host_args(teacher, run_dir, port, pid, *extra), env, logs[pid]) for pid in range(2)]
  return procs, logs


@pytest.mark.slow
@pytest.mark.multihost
def test_two_hosts_survive_a_killed_peer_and_match_one_host(tmp_path, tiny_gpt2, jax_cache):  # noqa: F811
  run_dir = tmp_path / "run"
  procs, logs = _launch(tiny_gpt2, run_dir, tmp_path, jax_cache, "first", step_delay=0.3)
  try:
    assert wait_for(lambda: last_train_step(run_dir) >= 3, procs[0]), logs[0].read_text()[-3000:]
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    out0 = finish(procs[0], logs[0], timeout=PEER_TIMEOUT + 30)
    waited = time.monotonic() - t0
  finally:
    kill_all(procs)
  assert procs[0].returncode == LOST_PEER_EXIT, (procs[0].returncode, out0[-3000:])
  assert waited < PEER_TIMEOUT, (waited, out0[-3000:])
  errors = [line for line in out0.splitlines() if line.startswith("distill-jax: error:")]
  assert len(errors) == 1 and "Traceback" not in out0, out0[-3000:]
  assert "distributed" in errors[0] and "process" in errors[0], errors[0]
  assert (run_dir / "checkpoints" / "2").is_dir()

  procs, logs = _launch(tiny_gpt2, run_dir, tmp_path, jax_cache, "resume")
  outs = [finish(p, log) for p, log in zip(procs, logs)]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
  assert "resumed from the checkpoint of step" in outs[0]
  assert "models and data ready" not in outs[1]  # only process 0 prints
  for name in ("metrics.jsonl", "report.json", "student", "tensorboard"):
    assert (run_dir / name).exists(), name
  assert len(list((run_dir / "tensorboard").iterdir())) == 1 + 1  # one writer per launch (first + resume), process 0

  single = tmp_path / "single"
  ok(run_cli(train_args(tiny_gpt2, single), cli_env(jax_cache, devices=4)))
  got, want = loss_history(run_dir), loss_history(single)
  assert [r[0] for r in got] == [r[0] for r in want] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r[1] for r in got], [r[1] for r in want], rtol=1e-4)  # gloo sums in another order
  a, b = exported_params(run_dir / "student"), exported_params(single / "student")
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.multihost
def test_a_killed_coordinator_ends_the_other_process(tmp_path, tiny_gpt2, jax_cache):  # noqa: F811
  """SIGKILL of process 0 (the host of JAX's coordination service): process 1 does not hang. JAX's
  coordination client aborts it (SIGABRT) as soon as the service is gone, before our watchdog's
  exit 3 can run (README says so); either way it ends within the heartbeat timeout and the
  checkpoints written so far stay."""
  run_dir = tmp_path / "run"
  procs, logs = _launch(tiny_gpt2, run_dir, tmp_path, jax_cache, "first", step_delay=0.3)
  try:
    assert wait_for(lambda: last_train_step(run_dir) >= 3, procs[1]), logs[1].read_text()[-3000:]
    procs[0].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    out1 = finish(procs[1], logs[1], timeout=PEER_TIMEOUT + 30)
    waited = time.monotonic() - t0
  finally:
    kill_all(procs)
  assert procs[1].returncode in (LOST_PEER_EXIT, -signal.SIGABRT), (procs[1].returncode, out1[-3000:])
  assert waited < PEER_TIMEOUT, (waited, out1[-3000:])
  if procs[1].returncode == LOST_PEER_EXIT:
    errors = [line for line in out1.splitlines() if line.startswith("distill-jax: error:")]
    assert len(errors) == 1 and "restart every process" in errors[0], out1[-3000:]
  assert (run_dir / "checkpoints" / "2").is_dir()
