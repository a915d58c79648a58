"""Two processes (gloo CPU collectives, 2 devices each) equal one process on the global batch.

The test launches this file as a worker twice; each worker joins the run with
`distributed.initialize`, feeds its half of the global batch through `shard_batch`
(`make_array_from_process_local_data`) and trains a few steps on a 2x2 ``(data, fsdp)``
mesh spanning both processes.  Process 0 writes the losses and the gathered params.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from multihost_util import free_port, run_workers

NUM_PROCESSES, LOCAL_DEVICES, STEPS = 2, 2, 3


def _flat(tree):
  import jax

  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def worker(coordinator: str, process_id: int, checkpoint: str, out: str) -> None:
  from distill_jax.training import distributed

  distributed.initialize(coordinator, NUM_PROCESSES, process_id)
  import jax
  from jax.experimental import multihost_utils

  import distill_jax as dj
  from distill_jax.training import sharding as sharding_lib
  from distill_jax.training import step as step_lib
  from test_step import make_batch, problem

  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
  teacher = dj.load_model(checkpoint, task="masked_lm")
  student = dj.init_student(teacher, num_layers=1, hidden_size=16)
  _, optimizer, kw, projections = problem(teacher, student)
  mesh = sharding_lib.make_mesh(2, 2)
  state = step_lib.init_sharded_state(student.params, optimizer, mesh, projection_params=projections,
                                      min_shard_size=256)
  teacher_params = step_lib.shard_teacher_params({"teacher": teacher.params}, mesh, min_shard_size=256)
  jstep = step_lib.make_jit_step(mesh=mesh, state=state, teacher_params=teacher_params, min_shard_size=256, **kw)
  losses = []
  for seed in range(STEPS):
    batch = make_batch(seed)
    rows = batch["input_ids"].shape[0] // NUM_PROCESSES
    local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
    state, metrics = jstep.train(state, teacher_params, sharding_lib.shard_batch(local, mesh))
    losses.append(float(metrics["loss"]))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if distributed.is_main_process():
    np.savez(out, losses=np.asarray(losses), **_flat(params))
  multihost_utils.sync_global_devices("done")


@pytest.mark.multihost
def test_two_processes_match_one(tmp_path):
  from test_step import make_batch, make_pair, run_single

  teacher, student = make_pair(tmp_path / "bert")
  out = tmp_path / "result.npz"
  coordinator = f"127.0.0.1:{free_port()}"
  run_workers(__file__, [(coordinator, i, tmp_path / "bert", out) for i in range(NUM_PROCESSES)],
              local_devices=LOCAL_DEVICES, timeout=300)
  got = dict(np.load(out))
  ref_state, ref_losses = run_single(teacher, student, [make_batch(s) for s in range(STEPS)])
  np.testing.assert_allclose(got.pop("losses"), ref_losses, rtol=1e-5)
  ref = _flat(ref_state.params)
  assert sorted(got) == sorted(ref)
  for key in ref:
    np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
