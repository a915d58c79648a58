"""Fault tests through the real `distill-jax` CLI in subprocesses: exact resume after
SIGTERM and SIGKILL (also mid-save), non-finite steps, a full disk at save time, corrupted
checkpoints with fallback, and run-to-run determinism.

Every run here is the same tiny distillation (a 1-layer GPT-2 student of a 2-layer tiny
GPT-2 teacher, 8 steps of batch 8 x 16 tokens on 2 forced CPU devices); one uninterrupted
run is the reference that interrupted-and-resumed runs must equal bit for bit.  Compiled
programs are shared between the subprocesses through a persistent JAX cache to keep the
suite short on a small CPU machine.

The helpers (`cli_env`, `train_args`, `run_cli`, ...) are shared with the other
``test_reliability_*`` and ``test_e2e`` modules.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

STEPS = 8
SAVE_EVERY = 2
DEVICES = 2
TIMEOUT = 300

# --------------------------------------------------------------------------- helpers


def cli_env(cache_dir: os.PathLike | str, devices: int = DEVICES) -> dict[str, str]:
  """The environment of a CLI subprocess: forced CPU devices, offline, shared compile cache."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  return env


def cli_command(*args: str) -> list[str]:
  """`distill-jax ARGS` with this interpreter (the console script of the editable install)."""
  return [sys.executable, "-m", "distill_jax.cli", *args]


def train_args(teacher: os.PathLike | str, run_dir: os.PathLike | str, *extra: str) -> list[str]:
  """`train` overrides of the tiny reference run; ``extra`` overrides come last."""
  return [
      "train",
      f"teachers.teacher.path={teacher}", "teachers.teacher.task=causal_lm",
      "student.init=from_teacher", "student.num_layers=1",
      "objective.terms=[{loss: forward_kl, temperature: 2.0}]",
      "data.max_length=16", "data.global_batch_size=8", "data.max_examples=96",
      "optimizer.learning_rate=0.01", "optimizer.warmup_steps=0",
      f"train.steps={STEPS}", "train.log_every=1", "train.eval_batches=1",
      f"train.run_dir={run_dir}", f"checkpoint.every={SAVE_EVERY}", "checkpoint.keep_last=3",
      "logging.progress_bar=false", "eval.throughput_batches=0",
      *extra,
  ]


def with_faults(env: dict[str, str], **faults) -> dict[str, str]:
  """`env` with test-only faults (`distill_jax.training.faults`: nonfinite_step, nonfinite_count, step_delay)."""
  from distill_jax.training import faults as faults_lib

  return dict(env, **{faults_lib.ENV: json.dumps(faults)})


def run_cli(args: list[str], env: dict[str, str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
  return subprocess.run(cli_command(*args), env=env, capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen:
  out = open(log, "w")  # pylint: disable=consider-using-with
  return subprocess.Popen(cli_command(*args), env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
  """The one-line error of a failed CLI run (asserts: non-zero exit, one line, no traceback)."""
  assert proc.returncode != 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("distill-jax: error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0]


def rows(run_dir: os.PathLike | str) -> list[dict]:
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_history(run_dir: os.PathLike | str) -> list[tuple[int, float, float, float]]:
  """(step, loss, grad_norm, nonfinite) of every training row: everything but the timing."""
  return [(r["step"], r["train/loss"], r["train/grad_norm"], r["train/nonfinite"])
          for r in rows(run_dir) if "train/loss" in r]


def last_train_step(run_dir: os.PathLike | str) -> int:
  try:
    hist = loss_history(run_dir)
  except (FileNotFoundError, json.JSONDecodeError, KeyError):
    return 0
  return hist[-1][0] if hist else 0


def exported_params(student_dir: os.PathLike | str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(str(pathlib.Path(student_dir) / "model.safetensors"))


def checkpoint_state(run_dir: os.PathLike | str, step: int) -> dict[str, np.ndarray]:
  """The saved TrainState of ``step`` (params, optimizer state, step, rng) as flat numpy arrays."""
  import orbax.checkpoint as ocp

  path = pathlib.Path(run_dir, "checkpoints", str(step), "state").absolute()
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    import jax

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
    state = ckptr.restore(path, abstract)
  import jax

  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def assert_same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = TIMEOUT, interval: float = 0.02) -> bool:
  """Polls ``predicate`` until true; False if ``proc`` exits first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return bool(predicate())
    time.sleep(interval)
  raise TimeoutError("condition not reached")


def finish(proc: subprocess.Popen, log: pathlib.Path, timeout: float = TIMEOUT) -> str:
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return log.read_text()


# --------------------------------------------------------------------------- fixtures
# Other modules import these fixtures; `_once` makes each session-scoped value exist once
# even though pytest registers an imported fixture once per module.

_ONCE: dict[str, object] = {}


def _once(key: str, make):
  if key not in _ONCE:
    _ONCE[key] = make()
  return _ONCE[key]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> pathlib.Path:
  return _once("jax_cache", lambda: tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> pathlib.Path:
  import tiny

  return _once("gpt2", lambda: tiny.make_checkpoint(tmp_path_factory.mktemp("models") / "gpt2", "gpt2",
                                                    "causal_lm"))


def _reference_run(tmp_path_factory, teacher: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
  run_dir = tmp_path_factory.mktemp("reference") / "run"
  ok(run_cli(train_args(teacher, run_dir), cli_env(cache)))
  return run_dir


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_gpt2, jax_cache) -> pathlib.Path:
  """One uninterrupted run of the tiny config (before/after eval, export): the run directory."""
  return _once("reference", lambda: _reference_run(tmp_path_factory, tiny_gpt2, jax_cache))


@pytest.fixture()
def env(jax_cache) -> dict[str, str]:
  return cli_env(jax_cache)


def assert_equals_reference(run_dir: pathlib.Path, reference: pathlib.Path) -> None:
  assert loss_history(run_dir) == loss_history(reference)
  assert_same_params(exported_params(run_dir / "student"), exported_params(reference / "student"))
  assert_same_params(checkpoint_state(run_dir, STEPS), checkpoint_state(reference, STEPS))


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_exact(tmp_path, tiny_gpt2, reference, env):
  """Stop half-way with SIGTERM (exit 0, checkpoint of that step), rerun the same command."""
  run_dir = tmp_path / "run"
  args = train_args(tiny_gpt2, run_dir)
  log = tmp_path / "log1"
  proc = start_cli(args, with_faults(env, step_delay=0.5), log)
  assert wait_for(lambda: last_train_step(run_dir) >= STEPS // 2 - 1, proc)
  proc.send_signal(signal.SIGTERM)
  out = finish(proc, log)
  assert proc.returncode == 0, out[-3000:]
  stopped = last_train_step(run_dir)
  assert 0 < stopped < STEPS, out[-3000:]
  assert f"preempted: saved the checkpoint of step {stopped}" in out
  assert (run_dir / "checkpoints" / str(stopped)).is_dir()
  assert not (run_dir / "student").exists()  # no export of a preempted run

  second = ok(run_cli(args, env))
  assert f"resumed from the checkpoint of step {stopped}" in second.stderr
  assert_equals_reference(run_dir, reference)


def _kill(args: list[str], env: dict[str, str], log: pathlib.Path, ready, delay: float) -> bool:
  """Starts a run, waits for ``ready(log)``, sleeps ``delay`` and SIGKILLs it; False if it finished first."""
  proc = start_cli(args, env, log)
  try:
    reached = wait_for(lambda: ready(log), proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
  finally:
    out = finish(proc, log)
  assert reached and proc.returncode in (-signal.SIGKILL, 0), out[-3000:]
  return proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_save_and_at_random_moments_then_resume_is_exact(tmp_path, tiny_gpt2, reference, env):
  """Three SIGKILLs of the same command (one while an async save is in flight, two after
  seeded random delays), then the same command completes: it equals the uninterrupted run."""
  run_dir = tmp_path / "run"
  delay = 0.25
  args = train_args(tiny_gpt2, run_dir)
  slow = with_faults(env, step_delay=delay)
  ckpts = run_dir / "checkpoints"
  unfinished = lambda: [p.name for p in ckpts.iterdir() if "tmp" in p.name] if ckpts.is_dir() else []  # noqa: E731
  for attempt in range(3):  # until a kill lands before the save's commit (a save may finish first)
    assert _kill(args, slow, tmp_path / f"kill0_{attempt}.log", lambda log: bool(unfinished()), 0.0)
    left = unfinished()
    if left:
      break
  # The kill landed mid-save: the step's temporary directory is there and that step is not finished.
  assert left, "no SIGKILL landed while a save was in flight"
  step_of = lambda name: int(name.split(".")[0])  # noqa: E731
  assert not {step_of(n) for n in left} & {int(p.name) for p in ckpts.iterdir() if p.name.isdigit()}, left
  rng = random.Random(0)
  for i in (1, 2):  # once the resumed loop logs a new step, kill it at a random moment of the rest
    resume = max((int(p.name) for p in ckpts.iterdir() if p.name.isdigit()), default=0)
    t0 = time.time()
    metrics = run_dir / "metrics.jsonl"
    looping = lambda log: (metrics.exists() and metrics.stat().st_mtime > t0  # noqa: E731
                           and last_train_step(run_dir) > resume)
    assert resume < STEPS - 2
    assert _kill(args, slow, tmp_path / f"kill{i}.log", looping, rng.uniform(0.0, (STEPS - resume - 2) * delay))
  ok(run_cli(args, env))
  assert_equals_reference(run_dir, reference)


@pytest.mark.slow
def test_same_seed_is_bit_identical_and_another_seed_differs(tmp_path, tiny_gpt2, reference, env):
  same, other = tmp_path / "same", tmp_path / "other"
  ok(run_cli(train_args(tiny_gpt2, same), env))
  assert_equals_reference(same, reference)
  ok(run_cli(train_args(tiny_gpt2, other, "train.seed=1"), env))
  assert loss_history(other) != loss_history(reference)
  a, b = exported_params(other / "student"), exported_params(reference / "student")
  assert any(not np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nonfinite_step_is_skipped_counted_and_reported(tmp_path, tiny_gpt2, env):
  run_dir = tmp_path / "run"
  proc = ok(run_cli(train_args(tiny_gpt2, run_dir), with_faults(env, nonfinite_step=3)))
  assert "step 3: non-finite loss or gradient; the update was skipped" in proc.stderr
  flags = {step: nonfinite for step, _, _, nonfinite in loss_history(run_dir)}
  assert flags == {s: float(s == 3) for s in range(1, STEPS + 1)}
  report = json.loads((run_dir / "report.json").read_text())
  assert report["nonfinite_steps"] == [3]
  assert "non-finite steps (updates skipped): 3" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run_naming_the_step(tmp_path, tiny_gpt2, reference, env):
  run_dir = tmp_path / "run"
  nan = with_faults(env, nonfinite_step=5, nonfinite_count=3)
  line = error_line(run_cli(train_args(tiny_gpt2, run_dir, "train.max_nonfinite_steps=2"), nan))
  assert "train.max_nonfinite_steps=2" in line and "steps 5..6" in line and "checkpoint is step 4" in line, line
  assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [2, 4]
  assert [s for s, _, _, bad in loss_history(run_dir) if bad] == [5, 6]
  # The last good checkpoint is intact: bit-identical to the uninterrupted run's step 4.
  assert_same_params(checkpoint_state(run_dir, 4), checkpoint_state(reference, 4))


_DISK_FULL = """
import errno, sys
import orbax.checkpoint as ocp
from distill_jax import cli

real_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step == {step}:
    raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
  return real_save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_disk_full_at_save_time_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, tiny_gpt2,
                                                                                   reference, env):
  run_dir = tmp_path / "run"
  args = train_args(tiny_gpt2, run_dir)
  proc = subprocess.run([sys.executable, "-c", _DISK_FULL.format(step=4), *args], env=env, capture_output=True,
                        text=True, timeout=TIMEOUT)
  line = error_line(proc)
  assert "cannot write checkpoint step 4" in line and "No space left on device" in line, line
  assert "earlier checkpoints" in line and "intact" in line
  assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [2]
  resumed = ok(run_cli(args, env))
  assert "resumed from the checkpoint of step 2" in resumed.stderr
  assert_equals_reference(run_dir, reference)


def _garble_latest(run_dir: pathlib.Path, step: int) -> pathlib.Path:
  """Flips bytes all through the largest array file of ``step``; returns the step directory.

  Damage at 16 places hits compressed chunks, so Orbax's concurrent array reads
  fail (and abandon each other), whatever the file's layout in this run.
  """
  step_dir = run_dir / "checkpoints" / str(step)
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  for offset in range(64, len(data) - 64, max(1, len(data) // 16)):
    data[offset:offset + 16] = bytes(b ^ 0xFF for b in data[offset:offset + 16])
  target.write_bytes(bytes(data))
  return step_dir


@pytest.mark.slow
def test_corrupted_checkpoint_is_named_and_fallback_resumes_from_the_previous_step(tmp_path, tiny_gpt2, reference,
                                                                                    env):
  run_dir = tmp_path / "run"
  shutil.copytree(reference, run_dir)
  shutil.rmtree(run_dir / "student")
  step_dir = _garble_latest(run_dir, STEPS)
  line = error_line(run_cli(train_args(tiny_gpt2, run_dir), env))
  assert f"checkpoint {step_dir.absolute()} is corrupted" in line or f"checkpoint {step_dir} is corrupted" in line, line

  proc = ok(run_cli(train_args(tiny_gpt2, run_dir, "checkpoint.fallback=true"), env))
  assert f"resumed from the checkpoint of step {STEPS - SAVE_EVERY}" in proc.stderr
  assert list((run_dir / "checkpoints_corrupted").iterdir())  # set aside, not deleted
  assert_equals_reference(run_dir, reference)


def _nbytes(tree) -> int:
  import jax

  return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _constant_bytes(stablehlo: str) -> int:
  """Bytes of the dense (hex-printed) array constants of a lowered program."""
  return sum(len(h) // 2 for h in re.findall(r'dense<"0x([0-9A-Fa-f]+)">', stablehlo))


def test_the_teacher_stays_out_of_gradients_optimizer_state_checkpoints_and_compiled_constants(tmp_path):
  """A teacher 30x the student's size: none of its bytes reach the state, the checkpoint or the
  compiled program's constants; the gradient is the student's alone; its params are not donated."""
  import functools

  import jax
  import optax

  import distill_jax as dj
  import tiny
  from distill_jax.checkpoint import manager as ckpt
  from distill_jax.objective import objective as objective_lib
  from distill_jax.training import sharding
  from distill_jax.training import state as state_lib
  from distill_jax.training import step as step_lib

  teacher = dj.load_model(tiny.make_checkpoint(tmp_path / "t", "gpt2", "causal_lm", num_hidden_layers=4,
                                               hidden_size=64, intermediate_size=128, resid_pdrop=0.0,
                                               embd_pdrop=0.0, attn_pdrop=0.0), "causal_lm")
  student = dj.init_student(teacher, num_layers=1, hidden_size=16, n_inner=32)
  teacher_bytes, student_bytes = _nbytes(teacher.params), _nbytes(student.params)
  assert teacher_bytes > 10 * student_bytes
  objective = objective_lib.build_objective([{"loss": "forward_kl", "temperature": 2.0}], student=student,
                                            teachers={"teacher": teacher})
  optimizer = state_lib.make_optimizer("adamw", 1e-3, schedule="constant")
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  state = step_lib.init_sharded_state(student.params, optimizer, mesh)
  t_params = step_lib.shard_teacher_params({"teacher": teacher.params}, mesh)
  kw = dict(student_apply=student.apply, teacher_applies={"teacher": teacher.apply}, objective=objective,
            optimizer=optimizer)
  jit = step_lib.make_jit_step(mesh=mesh, state=state, teacher_params=t_params, **kw)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(5, tiny.VOCAB_SIZE, (2, 8)).astype(np.int32),
           "attention_mask": np.ones((2, 8), np.int32)}

  # The optimizer state: Adam's two moments of the student's params (+ scalar counts), nothing else.
  assert set(state.params) == {"student", "projections"} and _nbytes(state.params) == student_bytes
  assert 2 * student_bytes <= _nbytes(state.opt_state) < 2 * student_bytes + 1024

  # The compiled program takes the teacher as an argument; its constants hold none of it.
  lowered = jit.train.jitted.lower(state, t_params, batch)
  compiled = lowered.compile()
  assert compiled.memory_analysis().argument_size_in_bytes >= teacher_bytes + _nbytes(state)
  assert _constant_bytes(lowered.as_text()) < teacher_bytes / 100
  closed = jax.jit(functools.partial(step_lib.train_step, teacher_params=t_params, **kw))  # the bug, for contrast
  assert _constant_bytes(closed.lower(state, batch=batch).as_text()) > teacher_bytes / 2  # (splats print short)

  # The gradient is the student's alone: the step's grad_norm is that of d loss / d student.
  def loss(params):
    s = student.apply(params, batch, outputs=("logits",))
    t = teacher.apply(teacher.params, batch, outputs=("logits",))
    return objective(s, {"teacher": t}, batch, {}, 0)[0]

  want_norm = float(jax.jit(lambda p: optax.global_norm(jax.grad(loss)(p)))(student.params))  # one compile
  before = jax.tree.map(np.asarray, t_params)
  state2, metrics = jit.train(state, t_params, batch)
  np.testing.assert_allclose(float(metrics["grad_norm"]), want_norm, rtol=1e-4)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), t_params, before))  # not donated

  # The checkpoint: the state's arrays, no more.
  with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as checkpointer:
    checkpointer.save(1, state2, data_state={}, config={})
  saved = checkpoint_state(tmp_path, 1)
  names = lambda keys: sorted(tuple(re.findall(r"\w+", k)) for k in keys)  # noqa: E731  (dict vs struct keys)
  assert names(saved) == names(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state2))
  assert sum(a.nbytes for a in saved.values()) == _nbytes(state2) < teacher_bytes / 4
  on_disk = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "1").rglob("*") if f.is_file())
  assert on_disk < teacher_bytes / 2
