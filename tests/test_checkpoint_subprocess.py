"""Checkpoints across processes: resharded restore 8 → 4 → 1 devices, SIGKILL mid-save.

The device count is fixed when jax starts, so each count runs in its own process:
this file is also the worker (``python tests/test_checkpoint_subprocess.py MODE ...``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 120


def _dump(state, path: Path) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from test_checkpoint import plain  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(plain(state))[0]
  np.savez(path, **{jax.tree_util.keystr(p): _bits(x) for p, x in leaves})


def _bits(x) -> np.ndarray:
  """Raw bytes plus dtype name (npz cannot hold bfloat16): compares bit for bit."""
  x = np.asarray(x)
  return np.array([str(x.dtype), str(x.shape), np.ascontiguousarray(x).tobytes().hex()])


def _check(state, path: Path) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from test_checkpoint import plain  # pylint: disable=g-import-not-at-top
  expected = np.load(path)
  leaves = jax.tree_util.tree_flatten_with_path(plain(state))[0]
  assert sorted(expected.files) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
  for p, x in leaves:
    assert np.array_equal(_bits(x), expected[jax.tree_util.keystr(p)]), jax.tree_util.keystr(p)


def _next(state):
  import jax  # pylint: disable=g-import-not-at-top
  return state.replace(step=state.step + 1, rng=jax.random.fold_in(state.rng, 7),
                       params=jax.tree.map(lambda x: x * 2, state.params))


def _worker(mode: str, run_dir: Path) -> None:
  """Runs in a fresh process whose device count was set through XLA_FLAGS."""
  import jax  # pylint: disable=g-import-not-at-top
  from distill_jax.checkpoint import manager as ckpt  # pylint: disable=g-import-not-at-top
  from test_checkpoint import make_state  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
  template = make_state(mesh, seed=99)  # other values: only shapes and shardings count
  if mode == "restore-and-save":
    with ckpt.Checkpointer(run_dir, save_every=1) as checkpointer:
      state, data_state, _, step = checkpointer.restore(ckpt.abstract_like(template))
      _check(state, run_dir / f"expected_{step}.npz")
      w = state.params["student"]["w"]
      assert len(w.sharding.device_set) == jax.device_count()
      assert len(w.addressable_shards) == jax.device_count()
      assert data_state == {"step": step}
      state = _next(state)
      checkpointer.save(step + 1, state, data_state={"step": step + 1}, config={})
      _dump(state, run_dir / f"expected_{step + 1}.npz")
  elif mode == "restore-all":
    with ckpt.Checkpointer(run_dir, save_every=1) as checkpointer:
      for step in checkpointer.all_steps():
        state, _, _, _ = checkpointer.restore(ckpt.abstract_like(template), step=step)
        _check(state, run_dir / f"expected_{step}.npz")
  elif mode == "killed-mid-save":
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
    state = make_state(mesh)
    checkpointer = ckpt.Checkpointer(run_dir, save_every=1, async_save=True)
    checkpointer.save(1, state, data_state={"step": 1}, config={})
    checkpointer.wait()

    async def hang_before_commit(self, *args, **kwargs):
      del self, args, kwargs
      print("FINALIZING", flush=True)
      time.sleep(TIMEOUT_S)

    # Every array is written; the step only lacks its commit (the rename).
    atomicity.AtomicRenameTemporaryPath.finalize = hang_before_commit
    checkpointer.save(2, _next(state), data_state={"step": 2}, config={})
    checkpointer.wait()
  else:
    raise SystemExit(f"unknown mode {mode!r}")
  print("WORKER OK", flush=True)


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run_worker(mode: str, run_dir: Path, devices: int) -> None:
  result = subprocess.run(
      [sys.executable, __file__, mode, str(run_dir)], env=_env(devices), cwd=HERE,
      capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert result.returncode == 0 and "WORKER OK" in result.stdout, (
      f"{mode} on {devices} devices failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@pytest.mark.slow
def test_resharded_restore_8_to_4_to_1(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from distill_jax.checkpoint import manager as ckpt  # pylint: disable=g-import-not-at-top
  from test_checkpoint import make_state  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  state = make_state(jax.make_mesh((8,), ("fsdp",)))
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    checkpointer.save(1, state, data_state={"step": 1}, config={})
  _dump(state, tmp_path / "expected_1.npz")
  _run_worker("restore-and-save", tmp_path, devices=4)  # 8 → 4, then saves step 2 on 4
  _run_worker("restore-all", tmp_path, devices=1)       # 8 → 1 and 4 → 1


@pytest.mark.slow
def test_sigkill_mid_save_never_becomes_latest(tmp_path):
  proc = subprocess.Popen(
      [sys.executable, __file__, "killed-mid-save", str(tmp_path)], env=_env(2), cwd=HERE,
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    line = ""
    while time.monotonic() < deadline and "FINALIZING" not in line:
      line = proc.stdout.readline()
      if not line and proc.poll() is not None:
        break
    assert "FINALIZING" in line, "worker never reached the commit of step 2"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    proc.stdout.close()
  directory = tmp_path / "checkpoints"
  leftovers = [p.name for p in directory.iterdir() if "tmp" in p.name]
  assert leftovers, f"expected an unfinished step 2 in {sorted(os.listdir(directory))}"

  import jax  # pylint: disable=g-import-not-at-top
  from distill_jax.checkpoint import manager as ckpt  # pylint: disable=g-import-not-at-top
  from test_checkpoint import assert_same_state, make_state  # pylint: disable=g-import-not-at-top
  state = make_state(jax.make_mesh((8,), ("fsdp",)))
  with ckpt.Checkpointer(tmp_path, save_every=1) as checkpointer:
    assert checkpointer.latest_step() == 1
    assert not [p for p in directory.iterdir() if "tmp" in p.name]
    restored, data_state, _, step = checkpointer.restore(ckpt.abstract_like(state))
    assert (step, data_state) == (1, {"step": 1})
    assert_same_state(restored, state)
    # The run goes on: step 2 can be saved again.
    checkpointer.save(2, state, data_state={"step": 2}, config={})
    checkpointer.wait()
    assert checkpointer.all_steps() == [1, 2]


if __name__ == "__main__":
  sys.path.insert(0, str(HERE))
  _worker(sys.argv[1], Path(sys.argv[2]))
