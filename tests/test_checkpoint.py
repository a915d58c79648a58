"""Checkpointer: exact round trip, retention, async saves, corruption, write errors, export.

The state is a small TrainState-like ``flax.struct`` pytree (step, student and
projection params, optax adamw state, a typed PRNG key) sharded over the 8 forced
host devices; it does not depend on ``distill_jax.training.state``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax.checkpoint import manager as ckpt

P = jax.sharding.PartitionSpec


@flax.struct.dataclass
class TinyState:
  step: jax.Array
  params: dict[str, Any]
  opt_state: Any
  rng: jax.Array


def make_state(mesh: jax.sharding.Mesh, seed: int = 0, width: int = 8) -> TinyState:
  """A state with non-trivial optimizer moments, sharded over ``mesh``'s "fsdp" axis."""
  rows = jax.sharding.NamedSharding(mesh, P("fsdp"))
  replicated = jax.sharding.NamedSharding(mesh, P())
  w = (jnp.arange(16 * width, dtype=jnp.float32).reshape(16, width) + seed) / 7.0
  params = {
      "student": {"w": jax.device_put(w, rows),
                  # Big enough that array chunks dominate the files (see _largest_array_file).
                  "emb": jax.device_put(jnp.sin(jnp.arange(512 * 16.0) + seed).reshape(512, 16), rows),
                  "b": jax.device_put(jnp.full((width,), 0.5, jnp.bfloat16), replicated)},
      "projections": {"p": jax.device_put(jnp.eye(8, dtype=jnp.float32) * (seed + 1), rows)},
  }
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params)
  for _ in range(2):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  state = TinyState(step=jnp.asarray(2, jnp.int32), params=params, opt_state=opt_state,
                    rng=jax.random.fold_in(jax.random.key(seed), 3))
  return jax.tree.map(lambda x: _replicate_if_local(x, replicated), state)


def _replicate_if_local(x: jax.Array, replicated: jax.sharding.NamedSharding) -> jax.Array:
  """Single-device leaves (step, count, key) → replicated over the mesh, as a jitted
  init would make them; needed for multi-process saves (no host-local arrays)."""
  if isinstance(x.sharding, jax.sharding.NamedSharding):
    return x
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    return jax.random.wrap_key_data(
        jax.device_put(np.asarray(jax.random.key_data(x)), replicated), impl=impl)
  return jax.device_put(np.asarray(x), replicated)


def plain(tree: Any) -> Any:
  """Typed keys → key data, so trees compare with chex / numpy."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def assert_same_state(actual: Any, expected: Any) -> None:
  chex.assert_trees_all_equal(plain(actual), plain(expected))
  chex.assert_trees_all_equal_dtypes(plain(actual), plain(expected))


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ("fsdp",))


@pytest.fixture(scope="module")
def state(mesh) -> TinyState:
  return make_state(mesh)


CONFIG = {"model": {"student": {"num_layers": 2, "hidden": 8}}, "train": {"steps": 10}}


def test_round_trip_bit_identical(tmp_path, state):
  data_state = {"next_index": 17, "epoch": 1, "nested": {"seed": [1, 2]}}
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    checkpointer.save(2, state, data_state=data_state, config=CONFIG)
  with ckpt.Checkpointer(tmp_path, save_every=1) as checkpointer:
    restored, restored_data, restored_config, step = checkpointer.restore(
        ckpt.abstract_like(state))
  assert step == 2
  assert_same_state(restored, state)
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert restored.params["student"]["w"].sharding == state.params["student"]["w"].sharding
  assert restored_data == data_state
  assert restored_config == CONFIG
  # The restored key draws the same numbers.
  np.testing.assert_array_equal(jax.random.uniform(restored.rng, (3,)),
                                jax.random.uniform(state.rng, (3,)))
  assert sorted(os.listdir(tmp_path / "checkpoints" / "2")) == [
      "_CHECKPOINT_METADATA", "commit_success.txt", "config", "data", "integrity", "state"]


def test_legacy_uint32_key_round_trip(tmp_path, state):
  legacy = state.replace(rng=jax.random.PRNGKey(5))
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    checkpointer.save(1, legacy, data_state={}, config={})
    restored, _, _, _ = checkpointer.restore(ckpt.abstract_like(legacy))
  assert restored.rng.dtype == jnp.uint32
  assert_same_state(restored, legacy)


def test_cadence_and_keep_last(tmp_path, state):
  with ckpt.Checkpointer(tmp_path, save_every=2, keep_last=2) as checkpointer:
    saved = [checkpointer.maybe_save(s, state, data_state={"i": s}, config=CONFIG)
             for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert checkpointer.maybe_save(7, state, data_state={"i": 7}, config=CONFIG, force=True)
    # Never twice for a step (the final save often lands on the cadence).
    assert not checkpointer.maybe_save(7, state, data_state={}, config=CONFIG, force=True)
    checkpointer.wait()
    assert checkpointer.all_steps() == [6, 7]
    assert checkpointer.latest_step() == 7


@pytest.mark.parametrize("mode, losses, kept", [
    ("min", [5.0, 1.0, 4.0, 3.0, 6.0, 7.0], [2, 5, 6]),
    ("max", [5.0, 1.0, 9.0, 3.0, 6.0, 7.0], [3, 5, 6]),
])
def test_keep_best_by_metric(tmp_path, state, mode, losses, kept):
  with ckpt.Checkpointer(tmp_path, save_every=1, keep_last=2, keep_best=1,
                         best_metric="eval_loss", best_mode=mode) as checkpointer:
    for step, loss in enumerate(losses, start=1):
      checkpointer.save(step, state, data_state={}, config=CONFIG,
                        metrics={"eval_loss": loss})
    checkpointer.wait()
    assert checkpointer.all_steps() == kept
    assert checkpointer.best_step() == kept[0]
    assert checkpointer.metrics(kept[0]) == {"eval_loss": losses[kept[0] - 1]}
  # A new Checkpointer reads the metrics back and keeps honoring them.
  with ckpt.Checkpointer(tmp_path, save_every=1, keep_last=2, keep_best=1,
                         best_metric="eval_loss", best_mode=mode) as checkpointer:
    checkpointer.save(7, state, data_state={}, config=CONFIG, metrics={"other": 0.0})
    checkpointer.wait()
    assert checkpointer.all_steps() == [kept[0], 6, 7]


def test_async_save_then_wait(tmp_path, state):
  checkpointer = ckpt.Checkpointer(tmp_path, save_every=1, async_save=True)
  checkpointer.save(1, state, data_state={"i": 1}, config=CONFIG)
  new_state = state.replace(step=state.step + 1)  # training goes on meanwhile
  checkpointer.save(2, new_state, data_state={"i": 2}, config=CONFIG)
  checkpointer.close()
  with ckpt.Checkpointer(tmp_path, save_every=1) as reopened:
    assert reopened.all_steps() == [1, 2]
    restored, data_state, _, _ = reopened.restore(ckpt.abstract_like(state))
  assert_same_state(restored, new_state)
  assert data_state == {"i": 2}


def test_restore_explicit_step_and_missing(tmp_path, state):
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no finished checkpoint"):
      checkpointer.restore(ckpt.abstract_like(state))
    checkpointer.save(1, state, data_state={"i": 1}, config=CONFIG)
    checkpointer.save(2, state.replace(step=state.step + 1), data_state={"i": 2}, config=CONFIG)
    _, data_state, _, step = checkpointer.restore(ckpt.abstract_like(state), step=1)
    assert (data_state, step) == ({"i": 1}, 1)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="step 5"):
      checkpointer.restore(ckpt.abstract_like(state), step=5)


def test_shape_mismatch_names_leaf(tmp_path, state, mesh):
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    checkpointer.save(1, state, data_state={}, config=CONFIG)
    wider = make_state(mesh, width=16)
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"leaf .*student.* with shape \(8,\), the current state wants \(16,\)"):
      checkpointer.restore(ckpt.abstract_like(wider), fallback=True)
    extra = ckpt.abstract_like(state.replace(params={**state.params, "new": state.step}))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"no state leaf .*new.*structure changed"):
      checkpointer.restore(extra)


# ------------------------------------------------------------------ atomicity


def test_unfinished_tmp_dir_is_never_latest_and_is_cleaned(tmp_path, state):
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    checkpointer.save(1, state, data_state={"i": 1}, config=CONFIG)
  # What a process killed mid-save leaves behind: a partial step 2 in Orbax's tmp dir.
  leftover = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "_METADATA").write_text("{partial")
  with ckpt.Checkpointer(tmp_path, save_every=1) as checkpointer:
    assert checkpointer.latest_step() == 1
    assert not leftover.exists()
    _, data_state, _, step = checkpointer.restore(ckpt.abstract_like(state))
  assert (data_state, step) == ({"i": 1}, 1)


def _largest_array_file(step_dir: Path) -> Path:
  files = [p for p in (step_dir / "state").rglob("*")
           if p.is_file() and "/d/" in p.as_posix()]
  return max(files, key=lambda p: p.stat().st_size)


def _two_steps(tmp_path: Path, state: TinyState) -> TinyState:
  second = state.replace(step=state.step + 1, rng=jax.random.fold_in(state.rng, 1))
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    checkpointer.save(1, state, data_state={"i": 1}, config=CONFIG)
    checkpointer.save(2, second, data_state={"i": 2}, config=CONFIG)
  return second


def _garble(path: Path) -> None:
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 32] = bytes(b ^ 0xFF for b in data[middle:middle + 32])
  path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
  os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_garble, _truncate], ids=["garbled", "truncated"])
def test_corrupted_step_is_a_clear_error_and_fallback_restores_previous(
    tmp_path, state, damage, caplog):
  _two_steps(tmp_path, state)
  step_dir = tmp_path / "checkpoints" / "2"
  damage(_largest_array_file(step_dir))
  with ckpt.Checkpointer(tmp_path, save_every=1) as checkpointer:
    assert checkpointer.latest_step() == 2
    with pytest.raises(ckpt.CheckpointCorruptedError) as info:
      checkpointer.restore(ckpt.abstract_like(state))
    message = str(info.value)
    assert str(step_dir) in message and "\n" not in message
    assert info.value.step_dir == step_dir
    with caplog.at_level(logging.WARNING, logger="distill_jax.checkpoint.manager"):
      restored, data_state, _, step = checkpointer.restore(
          ckpt.abstract_like(state), fallback=True)
  assert (step, data_state) == (1, {"i": 1})
  assert_same_state(restored, state)
  assert "falling back to step 1" in caplog.text


def test_abandoned_array_reads_of_a_corrupted_step_print_no_traceback(tmp_path, state, monkeypatch, caplog):
  # Orbax abandons the other array reads when one fails; Python reports each as an
  # unraisable exception with a traceback (the coroutine's read error, or "Event loop
  # is closed" from a TensorStore callback), which must not follow the CLI's one-line
  # error. Other unraisables still reach the previous hook.
  _two_steps(tmp_path, state)
  target = _largest_array_file(tmp_path / "checkpoints" / "2")
  data = bytearray(target.read_bytes())  # damage every chunk, so the reads themselves fail
  for offset in range(16, len(data) - 16, max(1, len(data) // 16)):
    data[offset:offset + 8] = bytes(b ^ 0xFF for b in data[offset:offset + 8])
  target.write_bytes(bytes(data))
  gc.collect()  # earlier tests' abandoned reads reach pytest's hook, not this one
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  with ckpt.Checkpointer(tmp_path, save_every=1) as checkpointer:
    with pytest.raises(ckpt.CheckpointCorruptedError, match="reading array index"):
      checkpointer.restore(ckpt.abstract_like(state))
  gc.collect()
  # The CLI sees most of them at interpreter exit, so the installed hook is also
  # checked directly.
  abandoned = types.SimpleNamespace(
      exc_value=Exception("Encountered error while reading array index: (slice(0, 1, 1),)"))
  other = types.SimpleNamespace(exc_value=ValueError("something else"))
  closed_loop = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  with caplog.at_level(logging.DEBUG, logger="distill_jax.checkpoint.manager"):
    sys.unraisablehook(abandoned)
    sys.unraisablehook(closed_loop)
  sys.unraisablehook(other)
  ckpt.quiet_abandoned_reads()  # installing twice does not stack
  sys.unraisablehook(other)
  repeats = ("reading array index", "Event loop is closed")
  assert [u for u in seen if any(r in str(u.exc_value) for r in repeats)] == []
  assert [u.exc_value for u in seen if u.exc_value is not None][-2:] == [other.exc_value] * 2
  assert "an abandoned checkpoint read failed too" in caplog.text


def test_corrupted_json_item_is_a_clear_error(tmp_path, state):
  _two_steps(tmp_path, state)
  step_dir = tmp_path / "checkpoints" / "2"
  (step_dir / "data" / "metadata").write_text("{not json")
  with ckpt.Checkpointer(tmp_path, save_every=1) as checkpointer:
    with pytest.raises(ckpt.CheckpointCorruptedError, match=str(step_dir)):
      checkpointer.restore(ckpt.abstract_like(state))
    assert checkpointer.restore(ckpt.abstract_like(state), fallback=True)[3] == 1


def test_fallback_with_nothing_good_left_raises(tmp_path, state):
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    checkpointer.save(1, state, data_state={}, config=CONFIG)
  _truncate(_largest_array_file(tmp_path / "checkpoints" / "1"))
  with ckpt.Checkpointer(tmp_path, save_every=1) as checkpointer:
    with pytest.raises(ckpt.CheckpointCorruptedError, match="checkpoints/1"):
      checkpointer.restore(ckpt.abstract_like(state), fallback=True)


# ------------------------------------------------------------------ write errors


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EROFS, "Read-only file system")])
def test_disk_full_or_read_only_at_save_is_a_clear_error_and_previous_intact(tmp_path, state, monkeypatch, code,
                                                                             reason):
  """The OS error is injected where Orbax creates the step directory (tests run as root,
  where chmod cannot make a directory read-only)."""
  checkpointer = ckpt.Checkpointer(tmp_path, save_every=1, async_save=True)
  checkpointer.save(1, state, data_state={"i": 1}, config=CONFIG)
  checkpointer.wait()
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top

  async def failing(path, *args, **kwargs):
    raise OSError(code, reason, str(path))

  monkeypatch.setattr(async_path, "mkdir", failing)
  with pytest.raises(ckpt.CheckpointWriteError) as info:
    checkpointer.save(2, state, data_state={"i": 2}, config=CONFIG)
  message = str(info.value)
  assert reason in message and str(tmp_path / "checkpoints") in message
  assert "\n" not in message and info.value.errno == code
  monkeypatch.undo()
  checkpointer.close()
  with ckpt.Checkpointer(tmp_path, save_every=1) as reopened:
    assert reopened.all_steps() == [1]
    restored, data_state, _, _ = reopened.restore(ckpt.abstract_like(state))
  assert_same_state(restored, state)
  assert data_state == {"i": 1}


def test_disk_full_after_some_bytes_were_written_keeps_the_previous_step(tmp_path, state, monkeypatch):
  """ENOSPC mid-write: the step's array files are on disk, then the metadata write fails half-way."""
  checkpointer = ckpt.Checkpointer(tmp_path, save_every=1, async_save=True)
  checkpointer.save(1, state, data_state={"i": 1}, config=CONFIG)
  checkpointer.wait()
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top

  real_write_text = async_path.write_text
  written_before = []

  async def write_half_then_fail(path, text):
    step_dir = next((p for p in Path(path).parents if p.name.startswith("2.")), None)
    if step_dir is None or Path(path).name != "_METADATA" or not Path(path).parent.name.startswith("state"):
      return await real_write_text(path, text)
    # The array chunks (files under a "d" directory) already written to the unfinished step.
    written_before.append(sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file() and f.parent.name == "d"))
    Path(path).write_text(text[:len(text) // 2])  # a partial file, as a full disk leaves it
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(async_path, "write_text", write_half_then_fail)
  with pytest.raises(ckpt.CheckpointWriteError) as info:
    checkpointer.save(2, state, data_state={"i": 2}, config=CONFIG)
    checkpointer.wait()
  assert written_before and written_before[0] > params_nbytes(state.params["student"]["w"]), written_before
  message = str(info.value)
  assert "No space left on device" in message and "earlier checkpoints" in message and "\n" not in message
  assert info.value.errno == errno.ENOSPC
  monkeypatch.undo()
  with contextlib.suppress(Exception):
    checkpointer.close()
  with ckpt.Checkpointer(tmp_path, save_every=1) as reopened:
    assert reopened.all_steps() == [1] and reopened.latest_step() == 1
    restored, data_state, _, _ = reopened.restore(ckpt.abstract_like(state))
  assert_same_state(restored, state)
  assert data_state == {"i": 1}


def params_nbytes(tree: Any) -> int:
  return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def test_checkpoint_path_is_a_file(tmp_path):
  (tmp_path / "checkpoints").write_text("oops")
  with pytest.raises(ckpt.CheckpointWriteError, match="is not a directory"):
    ckpt.Checkpointer(tmp_path, save_every=1)


def test_invalid_options():
  with pytest.raises(ValueError, match="best_mode"):
    ckpt.Checkpointer("/nonexistent", save_every=1, best_mode="lowest")
  with pytest.raises(ValueError, match="save_every"):
    ckpt.Checkpointer("/nonexistent", save_every=0)


# ------------------------------------------------------------------ export


class FakeModel:
  """Stands in for ``distill_jax.models.Model``: writes two files, maybe fails."""

  def __init__(self, fail: bool = False):
    self.fail = fail
    self.seen_dirs: list[Path] = []

  def save_pretrained(self, params, out_dir):
    out_dir = Path(out_dir)
    self.seen_dirs.append(out_dir)
    (out_dir / "config.json").write_text(json.dumps({"n": len(params)}))
    if self.fail:
      raise RuntimeError("writer crashed half-way")
    (out_dir / "model.safetensors").write_bytes(b"weights")


def test_export_writes_via_temp_dir(tmp_path):
  out = tmp_path / "export" / "student"
  model = FakeModel()
  assert ckpt.export_student(model, {"w": 1}, out) == out
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert model.seen_dirs[0] != out and model.seen_dirs[0].parent == out.parent
  assert os.listdir(out.parent) == ["student"]


def test_export_into_empty_dir(tmp_path):
  out = tmp_path / "student"
  out.mkdir()
  ckpt.export_student(FakeModel(), {"w": 1}, out)
  assert (out / "model.safetensors").exists()


def test_export_refuses_non_empty_dir_unless_overwrite(tmp_path):
  out = tmp_path / "student"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  with pytest.raises(FileExistsError, match=f"{out} is not empty.*overwrite=True"):
    ckpt.export_student(FakeModel(), {"w": 1}, out)
  assert os.listdir(out) == ["keep.txt"]
  ckpt.export_student(FakeModel(), {"w": 1}, out, overwrite=True)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert os.listdir(tmp_path) == ["student"]


def test_failed_export_leaves_nothing_behind(tmp_path):
  out = tmp_path / "student"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  with pytest.raises(RuntimeError, match="half-way"):
    ckpt.export_student(FakeModel(fail=True), {"w": 1}, out, overwrite=True)
  assert os.listdir(out) == ["keep.txt"]
  assert os.listdir(tmp_path) == ["student"]
