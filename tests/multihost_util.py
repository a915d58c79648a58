"""Launching several local processes in tests: a free coordinator port, a pool of workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def kill_all(procs: Sequence[subprocess.Popen]) -> None:
  """Kills and reaps the processes still running: a dead peer must not hang the test."""
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.communicate()


def run_workers(script: str, args: Sequence[Sequence[str]], *, local_devices: int, timeout: float) -> list[str]:
  """Runs ``python script *args[i]`` for every ``i`` at once on forced CPU devices; returns their logs.

  Each process sees ``local_devices`` CPU devices and ``tests/`` on its path.  Asserts that
  every process exited with 0 (the message holds the tails of the logs).
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
  procs = [subprocess.Popen([sys.executable, script, *map(str, a)], env=env, cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for a in args]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    kill_all(procs)
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  return logs
