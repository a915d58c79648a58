"""The training loop: config in, distilled + evaluated + exported student out.

`train(config)` is the product's main entry point (`distill-jax train`).  It validates
everything it can before loading a model, builds the models, objective, data pipeline,
mesh and optimizer from the config (only scalars reach the jitted step), resumes from
the latest checkpoint in the run directory, and runs the loop with a progress bar,
JSONL + TensorBoard metrics, periodic evaluation, Orbax checkpoints and preemption
saves.  At the end it evaluates the undistilled and the distilled student against the
teacher, writes the report and exports the student as a Hugging Face checkpoint.

Only process 0 prints, logs and writes files other than checkpoints (Orbax coordinates
those across processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import config as config_lib
from distill_jax.distributed import is_main_process

_LOG = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
BEFORE_FILE = "undistilled_eval.json"


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. too many non-finite steps); one-line message."""


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What `train` returns.

  Attributes:
    run_dir: the run directory.
    step: the last step trained (the final checkpoint's step).
    resumed_from: the checkpoint step the run resumed from, or ``None``.
    preempted: the run stopped early on SIGTERM/SIGINT after saving a checkpoint.
    history: the logged metric rows of this process (``metrics.jsonl`` rows).
    report: the final report (``report.json``), or ``None`` when preempted.
    export_dir: where the student was exported, or ``None``.
  """

  run_dir: str
  step: int
  resumed_from: Optional[int]
  preempted: bool
  history: tuple[dict, ...]
  report: Optional[dict]
  export_dir: Optional[str]


def _echo(message: str) -> None:
  if is_main_process():
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Run:
  """Everything built from a config that the loop, `evaluate_run` and `export_run` share."""

  config: config_lib.Config
  student: Any
  teachers: dict[str, Any]
  objective: Any
  train_examples: Any
  eval_examples: Any
  batch_transform: Any
  mesh: Any
  optimizer: Any
  step_fn: Any
  state: Any
  teacher_params: dict[str, Any]
  initial_student_params: Any
  shared_vocab: Optional[int]

  @property
  def main_teacher(self) -> str:
    return main_teacher(self.config)


def main_teacher(cfg: config_lib.Config) -> str:
  """The teacher the student is compared with (and whose tokenizer the data uses)."""
  return cfg.student.teacher or next(iter(cfg.teachers))


def load_teacher(name: str, tc: config_lib.TeacherConfig) -> Any:
  from distill_jax import models

  field = f"teachers.{name}.path"
  path = config_lib.resolve_model_path(tc.path, field)
  with _naming(field):
    return models.load_model(path, tc.task, dtype=tc.dtype, param_dtype=tc.param_dtype, num_labels=tc.num_labels)


@contextlib.contextmanager
def _naming(field: str) -> Iterator[None]:
  """Re-raises a model-loading error as one line that starts with the config field."""
  try:
    yield
  except (ValueError, OSError) as e:
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else type(e).__name__
    msg = msg[len("name_or_path: "):] if msg.startswith("name_or_path: ") else msg
    raise ValueError(msg if msg.startswith(field) else f"{field}: {msg}") from e


def _build_student(cfg: config_lib.Config, teachers: Mapping[str, Any]) -> Any:
  from distill_jax import models

  s = cfg.student
  seed = cfg.train.seed if s.seed is None else s.seed
  source_name = s.teacher or next((n for n, t in cfg.teachers.items() if t.path != config_lib.SELF_TEACHER), None)
  if s.init == "path":
    path = config_lib.resolve_model_path(s.path, "student.path")
    task = s.task or (teachers[source_name].task if source_name else "causal_lm")
    with _naming("student.path"):
      return models.load_model(path, task, dtype=s.dtype, param_dtype="float32", num_labels=s.num_labels,
                               remat=s.remat)
  if source_name is None:
    raise ValueError("student.init: self-distillation needs student.init=path (a checkpoint to start from)")
  teacher = teachers[source_name]
  if s.init == "from_teacher":
    overrides = dict(s.config)
    if s.num_labels is not None:
      overrides["num_labels"] = s.num_labels
    student = models.init_student(teacher, s.num_layers, layers=s.layers or None, hidden_size=s.hidden_size,
                                  seed=seed, dtype=s.dtype, remat=s.remat, **overrides)
  else:  # "config": a fresh init of the teacher's config with overrides
    overrides = dict(s.config)
    if s.num_layers is not None:
      overrides.setdefault("num_hidden_layers", s.num_layers)
    if s.hidden_size is not None:
      overrides.setdefault("hidden_size", s.hidden_size)
    student = models.model_from_config(teacher.hf_config.to_dict(), s.task or teacher.task,
                                       tokenizer=teacher.tokenizer, seed=seed, dtype=s.dtype,
                                       remat=s.remat, source=teacher.source, **overrides)
  return student


def _load_models(cfg: config_lib.Config) -> tuple[Any, dict[str, Any]]:
  """The student and the teachers by name (a "student" teacher is its frozen copy)."""
  teachers = {name: load_teacher(name, tc) for name, tc in cfg.teachers.items()
              if tc.path != config_lib.SELF_TEACHER}
  student = _build_student(cfg, teachers)
  for name, tc in cfg.teachers.items():
    if tc.path == config_lib.SELF_TEACHER:
      dtype = jnp.dtype(tc.param_dtype)
      frozen = jax.tree.map(lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
                            else np.asarray(x), student.params)
      teachers[name] = dataclasses.replace(student, params=frozen)
  return student, teachers


def _student_task(cfg: config_lib.Config) -> str:
  """The student's task as the config implies it (its own, else its source teacher's)."""
  s = cfg.student
  source = s.teacher or next((n for n, t in cfg.teachers.items() if t.path != config_lib.SELF_TEACHER),
                             next(iter(cfg.teachers)))
  return s.task or cfg.teachers[source].task


def data_tokenizer(cfg: config_lib.Config, main: str) -> Any:
  """The tokenizer the data uses (teacher `main`'s, else the student checkpoint's), read alone."""
  from distill_jax.models import checkpoints

  tc = cfg.teachers[main]
  sources = [] if tc.path == config_lib.SELF_TEACHER else [(f"teachers.{main}.path", tc.path)]
  if cfg.student.init == "path":
    sources.append(("student.path", cfg.student.path))
  for field, path in sources:
    with _naming(field):
      tok = checkpoints.load_tokenizer(checkpoints.resolve_checkpoint(config_lib.resolve_model_path(path, field)))
    if tok is not None:
      return tok
  raise ValueError(f"{sources[0][0] if sources else 'student.path'}: the checkpoint has no tokenizer files")


def _load_data(cfg: config_lib.Config, tokenizer: Any, task: str, run_dir: pathlib.Path) -> tuple[Any, Any]:
  from distill_jax import data

  d = cfg.data
  columns = tuple(d.text_columns) + ((d.completion_column,) if d.completion_column else ())
  common = dict(name=d.name, text_columns=columns, label_column=d.label_column,
                data_format=None if d.format == "auto" else d.format, seed=cfg.train.seed,
                cache_dir=d.cache_dir)
  fraction = None if d.validation_split else d.validation_fraction
  train_ds = data.load_texts(d.source, split=d.split, validation_fraction=fraction, **common)
  val_split = d.validation_split or ("validation" if d.source == data.PYDOC or fraction else d.split)
  val_ds = data.load_texts(d.source, split=val_split, validation_fraction=fraction, **common)
  if d.max_examples:
    train_ds = train_ds.select(range(min(d.max_examples, len(train_ds))))
  tok_kw = dict(task=task, max_length=d.max_length, text_columns=tuple(d.text_columns),
                label_column=d.label_column, completion_column=d.completion_column, bucket=d.buckets,
                cache_dir=d.cache_dir)
  train_ex = data.tokenize(train_ds, tokenizer, **tok_kw)
  eval_ex = data.tokenize(val_ds, tokenizer, label_names=train_ex.label_names, **tok_kw)
  if data.steps_per_epoch(train_ex, d.global_batch_size) == 0:  # before the run directory is written
    raise ValueError(f"data.global_batch_size: {len(train_ex.lengths)} training examples make no full batch of "
                     f"{d.global_batch_size} (per length bucket); use more data or a smaller batch")
  if len(eval_ex.lengths) == 0:
    raise ValueError(f"data.validation_split: the validation split of {d.source!r} holds no examples")
  return train_ex, eval_ex


def _batch_transform(cfg: config_lib.Config, task: str, tokenizer: Any, examples: Any, vocab_size: int,
                     main: str):
  if task != "masked_lm":
    return None
  from distill_jax import data

  if tokenizer.mask_token_id is None:
    raise ValueError(f"teachers.{main}.path: a masked_lm run needs a tokenizer with a mask token")
  return functools.partial(data.mask_batch, mask_token_id=int(tokenizer.mask_token_id), vocab_size=int(vocab_size),
                           special_ids=tuple(int(i) for i in examples.special_ids), prob=cfg.data.mlm_probability)


def _on_policy(cfg: config_lib.Config, student: Any, tokenizer: Any) -> Any:
  """The step's `on_policy.OnPolicy` (the student's KV-cache sampler bound), or None."""
  op = cfg.objective.on_policy
  if op is None:
    return None
  from distill_jax import on_policy
  from distill_jax.models import generate

  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  sample = functools.partial(generate.generate, student.module, max_new_tokens=op.max_new_tokens,
                             temperature=op.temperature, top_k=op.top_k, top_p=op.top_p,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=int(pad or 0))
  return on_policy.OnPolicy(lmbda=op.lmbda, prompt_length=op.prompt_length, sample=sample)


def _set_precision(cfg: config_lib.Config) -> None:
  if cfg.train.precision != "default":
    jax.config.update("jax_default_matmul_precision", cfg.train.precision)


def build_run(cfg: config_lib.Config, run_dir: pathlib.Path) -> Run:
  """Loads models and data and builds the objective, mesh, optimizer, step and state."""
  from distill_jax import models, objective as objective_lib, sharding, state as state_lib, step as step_lib

  _set_precision(cfg)
  import datasets

  datasets.disable_progress_bars()
  # Devices, tokenizer and data first: a bad mesh or data file is reported in seconds,
  # before any model weights are read.
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) if cfg.mesh.mode == "jit" else None
  devices = jax.devices() if mesh is None else list(mesh.devices.flat)
  if cfg.data.global_batch_size % len(devices):
    raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by the "
                     f"{len(devices)} devices")
  if cfg.objective.on_policy is not None and _student_task(cfg) != "causal_lm":
    raise ValueError(f"objective.on_policy: on-policy distillation needs a causal_lm student, got task "
                     f"{_student_task(cfg)!r}")
  main = main_teacher(cfg)
  tokenizer = data_tokenizer(cfg, main)
  train_ex, eval_ex = _load_data(cfg, tokenizer, _student_task(cfg), run_dir)
  student, teachers = _load_models(cfg)
  objective = objective_lib.build_objective(cfg.resolved_terms(), student=student, teachers=teachers)
  shared_vocab = None
  if student.task in ("causal_lm", "masked_lm", "sequence_classification") and teachers[main].task == student.task:
    shared_vocab = models.check_vocab(teachers[main], student) if student.task != "sequence_classification" else None
  transform = _batch_transform(cfg, student.task, tokenizer, train_ex, shared_vocab or student.vocab_size, main)
  o = cfg.optimizer
  accum = o.grad_accum_steps
  total_updates = max(cfg.train.steps // accum, 1)
  # A short run (e.g. train.steps=10 for a smoke test) keeps a warm-up shorter than itself.
  warmup = min(o.warmup_steps // accum, total_updates - 1)
  optimizer = state_lib.make_optimizer(
      o.name, o.learning_rate, warmup_steps=warmup, total_steps=total_updates,
      schedule=o.schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm,
      grad_accum_steps=accum)
  seed = cfg.train.seed
  projections = objective.init_projections(jax.random.PRNGKey(seed + 1))
  initial_student = jax.tree.map(np.asarray, student.params)
  teacher_applies = {n: t.apply for n, t in teachers.items()}
  step_kw = dict(student_apply=student.apply, teacher_applies=teacher_applies, objective=objective,
                 optimizer=optimizer, batch_transform=transform, on_policy=_on_policy(cfg, student, tokenizer))
  if mesh is not None:
    logical = {(name,) + path: names for name, model in {**teachers, "student": student}.items()
               for path, names in models.logical_axes(model).items()}
    state = step_lib.init_sharded_state(student.params, optimizer, mesh, projection_params=projections, seed=seed,
                                        logical=logical)
    t_params = step_lib.shard_teacher_params({n: t.params for n, t in teachers.items()}, mesh, logical=logical)
    step_fn = step_lib.make_jit_step(mesh=mesh, state=state, teacher_params=t_params, logical=logical, **step_kw)
  else:
    state = step_lib.replicate(state_lib.create_train_state(student.params, optimizer,
                                                            projection_params=projections, seed=seed))
    t_params = step_lib.replicate({n: t.params for n, t in teachers.items()})
    step_fn = step_lib.make_pmap_step(**step_kw)
  return Run(cfg, student, teachers, objective, train_ex, eval_ex, transform, mesh, optimizer, step_fn, state,
             t_params, initial_student, shared_vocab)


# --------------------------------------------------------------------------- helpers


def _host_state(run: Run, state: Any) -> Any:
  """The state as saved: unreplicated under pmap, global (sharded) arrays under jit."""
  from distill_jax import step as step_lib

  return step_lib.unreplicate(state) if run.mesh is None else state


def _abstract_state(run: Run) -> Any:
  """Shapes + shardings of the saved state on the current devices (for resharded restore)."""
  state = _host_state(run, run.state)
  if run.mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      run.step_fn.state_sharding)


def _device_state(run: Run, restored: Any) -> Any:
  from distill_jax import step as step_lib

  return step_lib.replicate(jax.device_get(restored)) if run.mesh is None else restored


def _place_batch(run: Run, batch: Mapping[str, np.ndarray]) -> dict:
  from distill_jax import sharding

  if run.mesh is None:
    return {k: np.asarray(v) for k, v in batch.items()}
  return sharding.shard_batch(batch, run.mesh)


def _state_step(run: Run, state: Any) -> int:
  """The state's step counter, read alone (unreplicating the whole pmap state would copy it)."""
  return int(np.asarray(state.step[0] if run.mesh is None else state.step))


def _student_params(run: Run, state: Any) -> Any:
  """The student's params as one host-addressable tree (for evaluation and export)."""
  params = _host_state(run, state).params["student"]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)
  return params


def _scalar(x: Any) -> float:
  return float(np.asarray(x))


def _finalize_metrics(m: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """``{term: (sum, count)}`` and scalars -> ``{prefix+name: value}`` (term means)."""
  out = {}
  for key, value in m.items():
    if isinstance(value, (tuple, list)) and len(value) == 2:
      total, count = _scalar(value[0]), _scalar(value[1])
      out[prefix + key] = total / count if count > 0 else 0.0
    else:
      out[prefix + key] = _scalar(value)
  return out


def _tokens(batch: Mapping[str, np.ndarray]) -> int:
  return int(np.asarray(batch["attention_mask"]).sum()) * jax.process_count()


class _Logger:
  """metrics.jsonl + TensorBoard (process 0 only)."""

  def __init__(self, run_dir: pathlib.Path, cfg: config_lib.Config, resume_step: int):
    self.enabled = is_main_process()
    self.path = run_dir / METRICS_FILE
    self.rows: list[dict] = []
    self._tb = None
    if not self.enabled:
      return
    if self.path.exists():  # keep the history up to the restored step: a resumed run rewrites the rest
      kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      self.rows = [r for r in kept if r.get("step", 0) <= resume_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
    self._jsonl = open(self.path, "a", encoding="utf-8") if cfg.logging.jsonl else None
    if cfg.logging.tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

  def log(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    self.rows.append(row)
    if self._jsonl:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        if math.isfinite(float(v)):
          self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if not self.enabled:
      return
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _eval_loss(run: Run, state: Any, max_batches: int) -> dict[str, float]:
  """The objective on the validation set (no update): per-term token means and ``eval/loss``.

  Per-term ``(sum, count)`` totals are accumulated over the whole set and the loss is
  formed from them once (`Objective.loss_from_sums`), so batches of different lengths
  weigh by their tokens, exactly as one big batch would.
  """
  from distill_jax import data

  it = data.eval_batches(run.eval_examples, global_batch_size=_eval_batch_size(run.config))
  per_batch = []
  for i, batch in enumerate(it):
    if max_batches and i >= max_batches:
      break
    metrics = run.step_fn.eval(state, run.teacher_params, _place_batch(run, batch))
    per_batch.append({k: v for k, v in metrics.items() if isinstance(v, (tuple, list))})
  totals: dict[str, tuple[float, float]] = {}
  for metrics in jax.device_get(per_batch):  # one transfer at the end: the loop never waits
    for key, (s, c) in metrics.items():
      acc = totals.get(key, (0.0, 0.0))
      totals[key] = (acc[0] + _scalar(s), acc[1] + _scalar(c))
  out = {f"eval/{k}": (s / c if c else 0.0) for k, (s, c) in totals.items()}
  step = _state_step(run, state)
  out["eval/loss"] = run.objective.loss_from_sums(totals, step) if totals else float("nan")
  return out


def _eval_on_bar(run: Run, state: Any, bar: Any, step: int) -> dict[str, float]:
  """`_eval_loss`, announced on the progress bar while it runs and shown there after."""
  if bar is not None:
    bar.set_postfix_str(f"evaluating step {step} ...", refresh=True)
  values = _eval_loss(run, state, run.config.train.eval_batches)
  if bar is not None and "eval/loss" in values:
    bar.set_postfix(eval_loss=f"{values['eval/loss']:.4f}", refresh=True)
  return values


def _eval_batch_size(cfg: config_lib.Config) -> int:
  return cfg.data.eval_batch_size or cfg.data.global_batch_size


def _agreement_batches(run: Run) -> Iterator[dict]:
  """Validation batches for teacher agreement; MLM batches masked with a fixed key."""
  from distill_jax import data

  it = data.eval_batches(run.eval_examples, global_batch_size=_eval_batch_size(run.config), process_index=0,
                         process_count=1)
  key = jax.random.PRNGKey(run.config.train.seed + 12345)
  for i, batch in enumerate(it):
    if run.batch_transform is not None:
      batch = jax.device_get(run.batch_transform(jax.random.fold_in(key, i), dict(batch)))
    yield batch


def _agreement(run: Run, student_params: Any) -> dict[str, float]:
  from distill_jax import evaluate as evaluate_lib

  teacher = run.teachers[run.main_teacher]
  t_params = teacher.params
  max_batches = run.config.train.eval_batches or None
  # Host arrays, as the initial params are: the undistilled and the distilled student then
  # share one compiled eval step instead of one per input sharding.
  student_params = jax.device_get(student_params)
  return evaluate_lib.evaluate(run.student, student_params, teacher, t_params, _agreement_batches(run),
                               max_batches=max_batches, shared_vocab=run.shared_vocab)


def _progress(cfg: config_lib.Config, start: int) -> Any:
  if not (is_main_process() and cfg.logging.progress_bar):
    return None
  from tqdm.auto import tqdm

  return tqdm(total=cfg.train.steps, initial=start, desc="distill", unit="step", dynamic_ncols=True,
              file=sys.stderr, mininterval=0.5)


# --------------------------------------------------------------------------- the loop


def _prepare_run_dir(cfg: config_lib.Config) -> pathlib.Path:
  """Checks a resumable run directory's config before anything is loaded or written."""
  run_dir = pathlib.Path(cfg.train.run_dir)
  saved_path = run_dir / CONFIG_FILE
  if saved_path.exists() and cfg.checkpoint.resume:
    saved = config_lib.load_config(str(saved_path)).to_dict()
    diff = config_lib.shape_diff(saved, cfg)
    if diff:
      path, old, new = diff[0]
      more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
      raise ValueError(f"{path}: changed from {old!r} to {new!r}{more}; the checkpoints in {run_dir} were "
                       f"trained with the old value (use a new train.run_dir)")
  ckpt_dir = run_dir / "checkpoints"
  if not cfg.checkpoint.resume and ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    # A fresh run would silently keep the old run's steps (a step is never saved twice).
    raise ValueError(f"checkpoint.resume: false, but {ckpt_dir} holds another run's checkpoints; "
                     f"use a new train.run_dir")
  return run_dir


def _finished_run(cfg: config_lib.Config, run_dir: pathlib.Path) -> Optional[RunResult]:
  """The result of a run of this very config that already reached its last step, else None.

  Its report records the final step and the export; nothing is loaded, evaluated or
  exported again, so rerunning a finished command returns in seconds.
  """
  from distill_jax import report as report_lib

  report_path, saved = run_dir / report_lib.REPORT_JSON, run_dir / CONFIG_FILE
  if not (cfg.checkpoint.resume and report_path.exists() and saved.exists()):
    return None
  report = json.loads(report_path.read_text())
  export_dir = report.get("export_dir")
  if report.get("steps") != cfg.train.steps or (cfg.export.enabled and not (export_dir and os.path.isdir(export_dir))):
    return None
  if config_lib.load_config(str(saved)).to_dict() != cfg.to_dict():
    return None
  _echo(f"already complete: {run_dir} finished step {cfg.train.steps} (report {report_path}"
        f"{f', student in {export_dir}' if export_dir else ''}); nothing to do. Raise train.steps to train "
        f"further, or use a new train.run_dir")
  history = tuple(report_lib.read_history(str(run_dir / METRICS_FILE)))
  return RunResult(str(run_dir), cfg.train.steps, cfg.train.steps, False, history, report, export_dir)


def _checkpointer(cfg: config_lib.Config, run_dir: pathlib.Path) -> Any:
  from distill_jax import checkpoint

  c = cfg.checkpoint
  return checkpoint.Checkpointer(run_dir, save_every=c.every or cfg.train.steps + 1, keep_last=c.keep_last,
                                 keep_best=c.keep_best, best_metric=c.best_metric, best_mode=c.best_mode,
                                 async_save=c.async_save)


def train(cfg: config_lib.Config) -> RunResult:
  """Runs (or resumes) the distillation described by ``cfg``.

  Args:
    cfg: a validated `Config` (`load_config`).

  Returns:
    A `RunResult`.

  Raises:
    ValueError: one line naming the config field, before any compilation.
    TrainingError: when the loss stays non-finite for ``train.max_nonfinite_steps`` steps.
  """
  from distill_jax import data, distributed, preemption

  if cfg.distributed.enabled:
    d = cfg.distributed
    distributed.initialize(d.coordinator, d.num_processes, d.process_id, heartbeat_timeout_s=d.heartbeat_timeout_s,
                           initialization_timeout_s=d.initialization_timeout_s)
  run_dir = _prepare_run_dir(cfg)
  finished = _finished_run(cfg, run_dir)
  if finished is not None:
    return finished
  _echo(config_lib.short_summary(cfg))
  t0 = time.perf_counter()
  run = build_run(cfg, run_dir)
  _echo(f"models and data ready in {time.perf_counter() - t0:.1f}s: student {run.student.family} "
        f"{run.student.num_layers} layers, {len(run.train_examples.lengths)} train / "
        f"{len(run.eval_examples.lengths)} validation examples, devices: {jax.device_count()} "
        f"({jax.devices()[0].platform})")

  if is_main_process():
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump_yaml(cfg, str(run_dir / CONFIG_FILE))
  ckpt = _checkpointer(cfg, run_dir)
  config_json = cfg.to_dict()
  train_it = data.train_batches(run.train_examples, global_batch_size=cfg.data.global_batch_size,
                                seed=cfg.data.shuffle_seed if cfg.data.shuffle_seed is not None else cfg.train.seed,
                                num_devices=jax.device_count())
  state = run.state
  resumed_from = None
  if cfg.checkpoint.resume and ckpt.latest_step() is not None:
    try:
      restored, data_state, _, resumed_from = ckpt.restore(_abstract_state(run), fallback=cfg.checkpoint.fallback)
    except BaseException:
      ckpt.close()
      raise
    state = _device_state(run, restored)
    train_it.set_state(data_state)
    _echo(f"resumed from the checkpoint of step {resumed_from}")
    if resumed_from < ckpt.latest_step():  # fell back past corrupted steps: set them aside
      ckpt = _set_aside_later_steps(cfg, run_dir, ckpt, resumed_from)
  start = _state_step(run, state)

  before = _undistilled_eval(run, run_dir) if cfg.eval.before_and_after and is_main_process() else None
  logger = _Logger(run_dir, cfg, start)
  if cfg.eval.before_and_after and start == 0:  # the undistilled eval loss (every process: a collective)
    logger.log(0, _eval_loss(run, state, cfg.train.eval_batches))
  bar = None  # made after the first step returns: its ETA never counts the compilation
  monitor = _StepMonitor(cfg, logger, bar, ckpt)
  preempted = False
  step = start
  nan_teacher = None
  nan_first, nan_count = cfg.train.debug_nonfinite_step, cfg.train.debug_nonfinite_count
  last_eval: dict[str, float] = {}
  failed = True
  watchdog = distributed.PeerWatchdog(max(cfg.distributed.heartbeat_timeout_s / 2, 1.0),
                                      functools.partial(_lost_peer, ckpt)).start()
  try:
    with preemption.PreemptionGuard() as guard:
      while step < cfg.train.steps:
        batch = next(train_it)
        teacher_params = run.teacher_params
        if 0 < nan_first <= step + 1 < nan_first + nan_count:  # test hook: a NaN teacher for these steps
          nan_teacher = nan_teacher or jax.tree.map(lambda x: x * jnp.nan, run.teacher_params)
          teacher_params = nan_teacher
        if step == start:
          _echo("compiling the train step ...")
        state, metrics = run.step_fn.train(state, teacher_params, _place_batch(run, batch))
        if step == start:
          bar = monitor.bar = _progress(cfg, start)
        step += 1
        if cfg.train.debug_step_delay:  # test hook: a slow step, for signals in mid-loop
          time.sleep(cfg.train.debug_step_delay)
        monitor.push(step, metrics, _tokens(batch))
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
          last_eval = _eval_on_bar(run, state, bar, step)
          logger.log(step, last_eval)
        if ckpt.should_save(step):  # the arguments cost host work: build them on the cadence only
          ckpt.maybe_save(step, _host_state(run, state), data_state=train_it.get_state(), config=config_json,
                          metrics=last_eval or None)
        # A collective on several processes: checked at the same steps everywhere, and only
        # every log_every steps there so that single-host runs alone pay it per step.
        check = jax.process_count() == 1 or step % monitor.log_every == 0
        if check and ckpt.should_stop(step, guard.requested):
          monitor.flush()
          ckpt.maybe_save(step, _host_state(run, state), data_state=train_it.get_state(), config=config_json,
                          metrics=last_eval or None, force=True)
          ckpt.wait()
          preempted = True
          _echo(f"preempted: saved the checkpoint of step {step} in {ckpt.directory}; "
                f"rerun the same command to resume")
          break
      if not preempted:
        last_eval = _eval_on_bar(run, state, bar, step)
        logger.log(step, last_eval)
        ckpt.maybe_save(step, _host_state(run, state), data_state=train_it.get_state(), config=config_json,
                        metrics=last_eval, force=True)
        ckpt.wait()
    failed = False
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() > 1:  # a collective failed: gloo/NCCL lost a peer (the watchdog may not have noticed yet)
      watchdog.stop()
      detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      _lost_peer(ckpt, f"distributed: a collective failed after step {step}, another process probably died "
                       f"({detail})")
    raise
  finally:
    watchdog.stop()
    if bar is not None:
      bar.close()
    logger.close()
    if failed:  # keep the first error: a second one from waiting on a pending save would hide it
      with contextlib.suppress(Exception):
        ckpt.close()
    else:
      ckpt.close()

  report = export_dir = None
  if not preempted:
    params = _student_params(run, state)  # a collective on several processes: every process gathers
    export_dir = _export(run, params, run_dir) if cfg.export.enabled and is_main_process() else None
    if is_main_process():
      report = _final_report(run, params, run_dir, before, logger.rows, export_dir)
  _echo(f"done in {time.perf_counter() - t0:.1f}s")
  return RunResult(str(run_dir), step, resumed_from, preempted, tuple(logger.rows), report, export_dir)


def _lost_peer(ckpt: Any, message: str) -> None:
  """Ends this process when a peer died: its main thread is stuck in a collective."""
  try:
    last = ckpt.latest_step()
  except Exception:  # pylint: disable=broad-except
    last = None
  print(f"distill-jax: error: {message}; the last checkpoint is step {last} in {ckpt.directory}: restart every "
        f"process with the same command to resume", file=sys.stderr, flush=True)
  os._exit(3)  # pylint: disable=protected-access


class _StepMonitor:
  """Each step's metrics, fetched a step late so that the device never waits for the host.

  Every step is checked for a non-finite loss (a run of ``train.max_nonfinite_steps`` in a
  row stops training); the log cadence, the last step and non-finite steps are logged with
  the tokens/s since the previous cadence step.  A cadence step is fetched at once.
  """

  def __init__(self, cfg: config_lib.Config, logger: _Logger, bar: Any, ckpt: Any):
    self.cfg, self.logger, self.bar, self.ckpt = cfg, logger, bar, ckpt
    self.log_every = max(cfg.train.log_every, 1)
    self.pending: Optional[tuple[int, Any]] = None  # (step, metrics on device) of the previous step
    self.nonfinite_run: list[int] = []
    self.tokens, self.t_window = 0, time.perf_counter()

  def _on_cadence(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.cfg.train.steps

  def push(self, step: int, metrics: Any, tokens: int) -> None:
    """Takes the step just dispatched; handles the previous one (and this one on the cadence)."""
    self.flush()
    self.tokens += tokens
    self.pending = (step, metrics)
    if self._on_cadence(step):
      self.flush()
      self.tokens, self.t_window = 0, time.perf_counter()

  def flush(self) -> None:
    """Fetches, checks and logs the pending step, if any."""
    if self.pending is None:
      return
    (step, metrics), self.pending = self.pending, None
    cfg, bar = self.cfg, self.bar
    values = _finalize_metrics(jax.device_get(metrics), prefix="train/")
    nonfinite = values.get("train/nonfinite", 0.0) > 0
    if nonfinite:
      self.nonfinite_run.append(step)
      _echo(f"step {step}: non-finite loss or gradient; the update was skipped "
            f"({len(self.nonfinite_run)} in a row)")
    else:
      self.nonfinite_run.clear()
    if self._on_cadence(step) or nonfinite:
      elapsed = max(time.perf_counter() - self.t_window, 1e-9)
      values["train/tokens_per_s"] = self.tokens / elapsed
      self.logger.log(step, values)
      if bar is not None:
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['train/tokens_per_s']:.0f}",
                        refresh=False)
    streak = self.nonfinite_run
    if len(streak) >= cfg.train.max_nonfinite_steps:
      steps = f"step {step}" if len(streak) == 1 else f"steps {streak[0]}..{step}"
      raise TrainingError(f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}: the loss was non-finite at "
                          f"{steps} ({len(streak)} consecutive, updates skipped); stopped, the last "
                          f"checkpoint is step {self.ckpt.latest_step()} in {self.ckpt.directory}")
    if bar is not None:
      bar.update(step - bar.n)


def _set_aside_later_steps(cfg: config_lib.Config, run_dir: pathlib.Path, ckpt: Any, good: int) -> Any:
  """Moves the (corrupted) steps after ``good`` to ``<run_dir>/checkpoints_corrupted``.

  The resumed run saves those steps again; Orbax would not overwrite them in place.
  Returns a fresh checkpointer over the cleaned directory.
  """
  import shutil

  later = [s for s in ckpt.all_steps() if s > good]
  ckpt.close()
  if is_main_process():
    aside = run_dir / "checkpoints_corrupted"
    aside.mkdir(exist_ok=True)
    for s in later:
      target = aside / f"{s}-{int(time.time())}"
      shutil.move(str(ckpt.step_dir(s)), str(target))
      _echo(f"moved the corrupted checkpoint of step {s} to {target}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("distill_jax: corrupted checkpoints set aside")
  return _checkpointer(cfg, run_dir)


def _undistilled_eval(run: Run, run_dir: pathlib.Path) -> dict[str, float]:
  """Agreement of the student's initialization, computed once per run and kept on disk."""
  path = run_dir / BEFORE_FILE
  if path.exists():
    return json.loads(path.read_text())
  _echo("evaluating the undistilled student ...")
  before = _agreement(run, run.initial_student_params)
  run_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(before, indent=1))
  return before


def _export(run: Run, params: Any, run_dir: pathlib.Path) -> str:
  from distill_jax import checkpoint

  out = run.config.export.dir or str(run_dir / "student")
  overwrite = run.config.export.overwrite or os.path.abspath(out) == os.path.abspath(run_dir / "student")
  checkpoint.export_student(run.student, jax.device_get(params), out, overwrite=overwrite)
  _echo(f"exported the student to {out}")
  return out


def _final_report(run: Run, params: Any, run_dir: pathlib.Path, before: Optional[dict], history: Sequence[dict],
                  export_dir: Optional[str]) -> dict:
  from distill_jax import efficiency as efficiency_lib, report as report_lib

  after = _agreement(run, params)
  before = before if before is not None else _agreement(run, run.initial_student_params)
  teacher = run.teachers[run.main_teacher]
  sample = next(_agreement_batches(run))
  tc = run.config.teachers.get(run.main_teacher)
  teacher_dir = None
  if tc is not None and tc.path != config_lib.SELF_TEACHER:
    resolved = config_lib.resolve_model_path(tc.path)
    teacher_dir = resolved if os.path.isdir(resolved) else None
  efficiency = efficiency_lib.measure_efficiency(run.student, params, teacher, teacher.params, sample,
                                               student_dir=export_dir, teacher_dir=teacher_dir,
                                               iters=max(run.config.eval.throughput_batches, 1))
  rep = report_lib.build_report(before, after, efficiency, teacher_name=str(tc.path if tc else run.main_teacher),
                                student_name=f"{run.student.family} {run.student.num_layers} layers")
  rep["nonfinite_steps"] = [int(r["step"]) for r in history if r.get("train/nonfinite", 0) > 0]
  rep["steps"], rep["export_dir"] = run.config.train.steps, export_dir  # what a rerun checks (_finished_run)
  report_lib.write_report(run_dir, rep, history)
  _echo(report_lib.format_table(rep))
  return rep


# --------------------------------------------------------------------------- eval / export of a run


def _load_saved_run(run_dir: str, overrides: Sequence[str] = ()) -> tuple[config_lib.Config, pathlib.Path]:
  path = pathlib.Path(run_dir)
  cfg_path = path / CONFIG_FILE
  if not cfg_path.exists():
    raise ValueError(f"run_dir: {run_dir} holds no {CONFIG_FILE} (not a distill-jax run directory)")
  cfg = config_lib.load_config(str(cfg_path), [*overrides, f"train.run_dir={path}"])
  return cfg, path


def _restore_latest(cfg: config_lib.Config, run_dir: pathlib.Path, step: Optional[int] = None) -> tuple[Run, Any, int]:
  run = build_run(cfg, run_dir)
  ckpt = _checkpointer(cfg, run_dir)
  try:
    if ckpt.latest_step() is None:
      raise ValueError(f"run_dir: {run_dir} has no finished checkpoint")
    restored, _, _, at = ckpt.restore(_abstract_state(run), step=step, fallback=cfg.checkpoint.fallback)
  finally:
    ckpt.close()
  return run, _device_state(run, restored), at


def evaluate_run(run_dir: str, overrides: Sequence[str] = ()) -> dict:
  """Re-evaluates the latest checkpoint of a run and rewrites its report."""
  cfg, path = _load_saved_run(run_dir, overrides)
  run, state, at = _restore_latest(cfg, path)
  _echo(f"evaluating the checkpoint of step {at}")
  before = _undistilled_eval(run, path) if cfg.eval.before_and_after else None
  from distill_jax import report as report_lib

  export_dir = cfg.export.dir or str(path / "student")
  history = report_lib.read_history(str(path / METRICS_FILE))
  return _final_report(run, _student_params(run, state), path, before, history,
                       export_dir if os.path.isdir(export_dir) else None)


def export_run(run_dir: str, out_dir: str, *, overwrite: bool = False, step: Optional[int] = None) -> str:
  """Exports the student of a run's checkpoint as a Hugging Face checkpoint."""
  from distill_jax import checkpoint

  cfg, path = _load_saved_run(run_dir)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ValueError(f"out_dir: {out_dir} is not empty (pass --overwrite to replace it)")
  run, state, _ = _restore_latest(cfg, path, step)
  params = jax.device_get(_student_params(run, state))
  checkpoint.export_student(run.student, params, out_dir, overwrite=overwrite)
  return out_dir
