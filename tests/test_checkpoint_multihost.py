"""Checkpointer on 2 processes x 2 CPU devices (gloo): one save, agreement on stopping.

Each worker saves a state sharded over the 4 devices of both processes, checks that
the JSON items were written once and that ``should_stop`` is True on both processes
when only process 1 was signalled, then restores it. The parent (8 devices, one
process) restores the same checkpoint afterwards.
"""

from __future__ import annotations

import os
import sys

import pytest

from multihost_util import free_port, run_workers

NUM_PROCESSES, LOCAL_DEVICES = 2, 2


def worker(coordinator: str, process_id: int, run_dir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=NUM_PROCESSES,
                             process_id=process_id)
  from distill_jax.checkpoint import manager as ckpt  # pylint: disable=g-import-not-at-top
  import chex  # pylint: disable=g-import-not-at-top
  from test_checkpoint import make_state, plain  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
  state = make_state(jax.make_mesh((jax.device_count(),), ("fsdp",)))
  assert not state.params["student"]["w"].is_fully_addressable
  with ckpt.Checkpointer(run_dir, save_every=1) as checkpointer:
    # Only process 1 got SIGTERM; both must agree to stop at this step.
    assert checkpointer.should_stop(4, requested=(process_id == 1))
    assert not checkpointer.should_stop(5, requested=False)
    checkpointer.save(4, state, data_state={"step": 4}, config={"seed": 0})
    checkpointer.wait()
    restored, data_state, config, step = checkpointer.restore(ckpt.abstract_like(state))
  assert (data_state, config, step) == ({"step": 4}, {"seed": 0}, 4)
  assert restored.params["student"]["w"].sharding == state.params["student"]["w"].sharding
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gather = lambda tree: multihost_utils.process_allgather(plain(tree), tiled=True)
  chex.assert_trees_all_equal(gather(restored), gather(state))
  print(f"WORKER {process_id} OK", flush=True)


@pytest.mark.multihost
def test_two_processes_save_once_and_agree_on_stop(tmp_path):
  coordinator = f"127.0.0.1:{free_port()}"
  logs = run_workers(__file__, [(coordinator, i, tmp_path) for i in range(NUM_PROCESSES)],
                     local_devices=LOCAL_DEVICES, timeout=180)
  assert all(f"WORKER {i} OK" in log for i, log in enumerate(logs))

  step_dir = tmp_path / "checkpoints" / "4"
  assert sorted(os.listdir(step_dir / "data")) == ["commit_success.txt", "metadata"]
  assert sorted(p.name for p in (step_dir / "state").glob("ocdbt.process_*")) == [
      "ocdbt.process_0", "ocdbt.process_1"]

  import jax  # pylint: disable=g-import-not-at-top
  from distill_jax.checkpoint import manager as ckpt  # pylint: disable=g-import-not-at-top
  from test_checkpoint import assert_same_state, make_state  # pylint: disable=g-import-not-at-top
  state = make_state(jax.make_mesh((jax.device_count(),), ("fsdp",)))
  with ckpt.Checkpointer(tmp_path, save_every=1) as checkpointer:
    restored, _, _, step = checkpointer.restore(ckpt.abstract_like(state))
  assert step == 4
  assert_same_state(restored, state)


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
