"""Set-up of a run from its config: devices, tokenizer and data first, then models,
objective, mesh, optimizer, step and state.

Every config section builds its own piece; only scalars reach the jitted step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from distill_jax.config import root as config_lib
from distill_jax.errors import first_line
from distill_jax.data import teacher_cache
from distill_jax import models
from distill_jax.models import checkpoints, layers, vocab_map
from distill_jax.data import pipeline as data
from distill_jax.data import alignment
from distill_jax.data import prepared
from distill_jax.data import sources
from distill_jax.training import on_policy
from distill_jax.models import generate
from distill_jax.objective import objective as objective_lib
from distill_jax.training import sharding
from distill_jax.training import state as state_lib
from distill_jax.training import step as step_lib


Params = Any  # a pytree of arrays


@dataclasses.dataclass
class Run:
  """Everything built from a config that the loop, `evaluate_run` and `export_run` share.

  Attributes:
    config: the run's config.
    student: the student (its params are the initial ones; the trained ones are in `state`).
    teachers: the live teachers by name (their params sharded on `mesh`, else on the host).
    objective: the bound objective.
    train_examples, eval_examples: the rows (in memory, or a prepared split with the same interface).
    batch_transform: MLM masking inside the step, or None.
    mesh: the ``("data", "fsdp", "tensor")`` mesh of ``mesh.mode: jit``; None under pmap.
    optimizer: ``config.optimizer.build(train.steps)``.
    step_fn: the jitted (`JitStep`) or pmapped (`PmapStep`) train and eval steps.
    state: the initial `TrainState` (replicated under pmap, sharded under jit).
    teacher_params: ``{name: params}`` as the step takes them (replicated or sharded).
    initial_student_params: the undistilled student's params on the host.
    shared_vocab: the vocabulary the student's logits are compared over with the main teacher.
    caches: the cached teachers (never loaded).
    cross_tokenizer: the teacher that runs on its own tokens of each row, or None.
  """

  config: config_lib.Config
  student: models.Model
  teachers: dict[str, models.Model]
  objective: objective_lib.Objective
  train_examples: data.Examples
  eval_examples: data.Examples
  batch_transform: Optional[step_lib.BatchTransform]
  mesh: Optional[Mesh]
  optimizer: optax.GradientTransformation
  step_fn: Union[step_lib.JitStep, step_lib.PmapStep]
  state: state_lib.TrainState
  teacher_params: dict[str, Params]
  initial_student_params: Params
  shared_vocab: Optional[int]
  caches: dict[str, teacher_cache.TeacherCache] = dataclasses.field(default_factory=dict)
  cross_tokenizer: Optional[CrossTokenizer] = None

  def batch_extras(self, split: str) -> dict[str, Any]:
    """``{batch key: rows reader}`` of the cached teachers for the data pipeline's `split`."""
    return {teacher_cache.batch_key(n): c.rows(split) for n, c in self.caches.items()}

  @property
  def main_teacher(self) -> str:
    return main_teacher(self.config)

  @property
  def main_model(self) -> Union[models.Model, teacher_cache.TeacherCache]:
    """The main teacher: its model, or its `teacher_cache.TeacherCache`."""
    return self.caches.get(self.main_teacher) or self.teachers[self.main_teacher]


def main_teacher(cfg: config_lib.Config) -> str:
  """The teacher the student is compared with (and whose tokenizer the data uses)."""
  return cfg.student.teacher or next(iter(cfg.teachers))


def load_teacher(name: str, tc: config_lib.TeacherConfig) -> Any:
  field = f"teachers.{name}.path"
  path = config_lib.resolve_model_path(tc.path, field)
  with field_errors(field):
    return models.load_model(path, tc.task, dtype=tc.dtype, param_dtype=tc.param_dtype, num_labels=tc.num_labels)


@contextlib.contextmanager
def field_errors(field: str) -> Iterator[None]:
  """Re-raises a model-loading error (ValueError, OSError) as one line that starts with `field`."""
  try:
    yield
  except (ValueError, OSError) as e:
    msg = first_line(e)
    msg = msg[len("name_or_path: "):] if msg.startswith("name_or_path: ") else msg
    raise ValueError(msg if msg.startswith(field) else f"{field}: {msg}") from e


def _build_student(cfg: config_lib.Config, teachers: Mapping[str, Any]) -> Any:
  s = cfg.student
  seed = cfg.train.seed if s.seed is None else s.seed
  source_name = s.teacher or next((n for n, t in cfg.teachers.items() if t.path != config_lib.SELF_TEACHER), None)
  if s.init == "path":
    path = config_lib.resolve_model_path(s.path, "student.path")
    task = s.task or (cfg.teachers[source_name].task if source_name else "causal_lm")
    with field_errors("student.path"):
      return models.load_model(path, task, dtype=s.dtype, param_dtype=s.param_dtype, num_labels=s.num_labels,
                               remat=s.remat)
  if source_name is None:
    raise ValueError("student.init: self-distillation needs student.init=path (a checkpoint to start from)")
  # A cached teacher is never loaded to run: its weights are read here for the copy and dropped on return.
  teacher = teachers[source_name] if source_name in teachers else _cached_teacher_weights(cfg, source_name)
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
  return _with_param_dtype(student, s.param_dtype)


def _cached_teacher_weights(cfg: config_lib.Config, name: str) -> models.Model:
  """Cached teacher `name`'s model, loaded only to derive the student from (`student.init`):
  from ``teachers.<name>.path``, else the checkpoint the cache was written from (its manifest)."""
  tc = cfg.teachers[name]
  recorded = teacher_cache.open_cache(name, tc.cache).manifest.get("teacher", {}).get("path")
  path, field = (tc.path, f"teachers.{name}.path") if tc.path else (recorded, f"teachers.{name}.cache")
  if not path:
    raise ValueError(f"teachers.{name}.path: student.init={cfg.student.init} derives the student from teacher "
                     f"{name!r}, whose cache records no checkpoint; set the teacher's path")
  with field_errors(field):
    return models.load_model(config_lib.resolve_model_path(path, field), tc.task, num_labels=tc.num_labels)


def _with_param_dtype(model: Any, param_dtype: str) -> Any:
  """`model` with its floating params held in `param_dtype` (integer leaves unchanged)."""
  dtype = jnp.dtype(param_dtype)
  cast = lambda x: np.asarray(x).astype(dtype, copy=False) if np.issubdtype(np.asarray(x).dtype, np.floating) else x  # noqa: E731
  return dataclasses.replace(model, params=jax.tree.map(cast, model.params))


def runtime_model(model: Any, attention_impl: str, mesh: Optional[Any], unroll_layers: Optional[bool] = None) -> Any:
  """`model` whose module runs `attention_impl` (`layers.resolve_attention`), constrains its
  activations on `mesh` (None: no constraints, as on one device or under pmap) and, when
  `unroll_layers` is given, unrolls its layer stack or not (`layers.resolve_layer_loop`)."""
  unroll = {} if unroll_layers is None else {"unroll_layers": unroll_layers}
  return dataclasses.replace(model, module=model.module.clone(attention_impl=attention_impl, mesh=mesh, **unroll))


def _load_models(cfg: config_lib.Config) -> tuple[Any, dict[str, Any]]:
  """The student and the teachers by name (a "student" teacher is its frozen copy)."""
  teachers = {name: load_teacher(name, tc) for name, tc in cfg.teachers.items()
              if tc.path != config_lib.SELF_TEACHER and tc.cache is None}
  student = _build_student(cfg, teachers)
  for name, tc in cfg.teachers.items():
    if tc.path == config_lib.SELF_TEACHER:
      teachers[name] = _with_param_dtype(student, tc.param_dtype)
  return student, teachers


def _student_task(cfg: config_lib.Config) -> str:
  """The student's task as the config implies it (its own, else its source teacher's)."""
  s = cfg.student
  source = s.teacher or next((n for n, t in cfg.teachers.items() if t.path != config_lib.SELF_TEACHER),
                             next(iter(cfg.teachers)))
  return s.task or cfg.teachers[source].task


def data_tokenizer(cfg: config_lib.Config, main: str) -> Any:
  """The tokenizer the data uses (teacher `main`'s, else the student checkpoint's), read alone."""
  tc = cfg.teachers[main]
  if tc.cache is not None:  # the tokenizer the cache was written with

    return teacher_cache.open_cache(main, tc.cache).tokenizer
  sources = [] if tc.path == config_lib.SELF_TEACHER else [(f"teachers.{main}.path", tc.path)]
  if cfg.student.init == "path":
    sources.append(("student.path", cfg.student.path))
  for field, path in sources:
    with field_errors(field):
      tok = checkpoints.load_tokenizer(checkpoints.resolve_checkpoint(config_lib.resolve_model_path(path, field)))
    if tok is not None:
      return tok
  raise ValueError(f"{sources[0][0] if sources else 'student.path'}: the checkpoint has no tokenizer files")


def data_settings(cfg: config_lib.Config) -> dict[str, Any]:
  """The data settings that shape the rows (recorded by, and checked against, prepared data)."""
  d = cfg.data
  return {"max_length": d.max_length, "buckets": d.buckets, "text_columns": list(d.text_columns),
          "label_column": d.label_column, "completion_column": d.completion_column, "max_examples": d.max_examples}


def data_parts(cfg: config_lib.Config) -> list[tuple[str, Optional[str], str, Optional[str], float]]:
  """``(source, hub config name, split, validation split, weight)`` of each source: the
  ``data.mixture`` entries, else ``data.source`` alone."""
  d = cfg.data
  if d.mixture:
    return [(m.source, m.name, m.split or d.split, m.validation_split or d.validation_split, m.weight)
            for m in d.mixture]
  return [(d.source, d.name, d.split, d.validation_split, 1.0)]


def load_data(cfg: config_lib.Config, tokenizer: Any, task: str) -> tuple[Any, Any]:
  """The training and validation rows: tokenized in memory, or a prepared directory's
  (``data.source`` written by ``distill-jax prepare-data``, read from disk per batch)."""
  d = cfg.data
  if prepared.is_prepared(d.source):
    manifest, splits = prepared.open_prepared(d.source)
    prepared.check_compatible(manifest, tokenizer=tokenizer, task=task, settings=data_settings(cfg),
                              source=d.source)
    train_ex, eval_ex = splits["train"], splits["validation"]
    _check_sizes(cfg, train_ex, eval_ex)
    return train_ex, eval_ex
  columns = tuple(d.text_columns) + ((d.completion_column,) if d.completion_column else ())
  texts = {"train": [], "validation": []}
  for source, name, split, validation_split, _ in data_parts(cfg):
    common = dict(name=name, text_columns=columns, label_column=d.label_column,
                  data_format=None if d.format == "auto" else d.format, seed=cfg.train.seed,
                  cache_dir=d.cache_dir)
    fraction = None if validation_split else d.validation_fraction
    texts["train"].append(data.load_texts(source, split=split, validation_fraction=fraction, **common))
    val_split = validation_split or ("validation" if source == data.PYDOC or fraction else split)
    texts["validation"].append(data.load_texts(source, split=val_split, validation_fraction=fraction, **common))
  if d.mixture:
    weights, keep = [m.weight for m in d.mixture], columns + ((d.label_column,) if d.label_column else ())
    train_ds = sources.mix_datasets(texts["train"], weights, cfg.train.seed, keep)
    val_ds = sources.mix_datasets(texts["validation"], weights, cfg.train.seed + 1, keep)
  else:
    train_ds, val_ds = texts["train"][0], texts["validation"][0]
  if d.max_examples:
    train_ds = train_ds.select(range(min(d.max_examples, len(train_ds))))
  tok_kw = dict(task=task, max_length=d.max_length, text_columns=tuple(d.text_columns),
                label_column=d.label_column, completion_column=d.completion_column, bucket=d.buckets,
                cache_dir=d.cache_dir, num_proc=d.num_workers or None)
  train_ex = data.tokenize(train_ds, tokenizer, **tok_kw)
  eval_ex = data.tokenize(val_ds, tokenizer, label_names=train_ex.label_names, **tok_kw)
  _check_sizes(cfg, train_ex, eval_ex)
  return train_ex, eval_ex


def _check_sizes(cfg: config_lib.Config, train_ex: Any, eval_ex: Any) -> None:
  d = cfg.data
  if data.steps_per_epoch(train_ex, d.global_batch_size) == 0:  # before the run directory is written
    raise ValueError(f"data.global_batch_size: {len(train_ex.lengths)} training examples make no full batch of "
                     f"{d.global_batch_size} (per length bucket); use more data or a smaller batch")
  if len(eval_ex.lengths) == 0:
    raise ValueError(f"data.validation_split: the validation split of {d.source!r} holds no examples")


CROSS_TOKENIZER_LOSSES = tuple(n for n, spec in objective_lib.LOSSES.items() if spec.inputs == "cross_tokenizer")


@dataclasses.dataclass(frozen=True)
class CrossTokenizer:
  """A teacher whose tokenizer differs from the student's: the data is the student's rows with
  the teacher's tokens of the same text beside them (`alignment.aligned_examples`).

  Attributes:
    teacher: the teacher's name.
    student_tokenizer, teacher_tokenizer: the two fast tokenizers.
    teacher_field: where the teacher's tokenizer was read: ``teachers.<name>.path``, or
      ``teachers.<name>.cache`` for a cached teacher (its cache directory, never its weights).
  """

  teacher: str
  student_tokenizer: Any
  teacher_tokenizer: Any
  teacher_field: str = ""


def _checkpoint_tokenizer(path: str, field: str) -> Any:
  with field_errors(field):
    tok = checkpoints.load_tokenizer(checkpoints.resolve_checkpoint(config_lib.resolve_model_path(path, field)))
  if tok is None:
    raise ValueError(f"{field}: the checkpoint has no tokenizer files")
  return tok


def cross_tokenizer(cfg: config_lib.Config,
                    teacher_tokenizers: Optional[Mapping[str, Any]] = None) -> Optional[CrossTokenizer]:
  """The teacher that the cross-tokenizer terms (`CROSS_TOKENIZER_LOSSES`) read, with the
  student's and its tokenizers (the same one when the student shares the teacher's: an identity
  alignment, where ``hybrid_uld`` is ``forward_kl``); None without such terms.  Reads tokenizers only:
  a cached teacher's from its cache directory, unless `teacher_tokenizers` (``{name: tokenizer}``,
  what ``cache-teacher`` read from the checkpoint it is caching) holds it.

  Raises:
    ValueError: one line naming the field, before any model loads: a slow tokenizer, another
      term reading that teacher, two such teachers, on-policy across tokenizers.
  """
  terms = cfg.resolved_terms()
  readers = sorted({n for t in terms if t.loss in CROSS_TOKENIZER_LOSSES for n in t.teachers})
  if not readers:
    return None
  if len(readers) > 1:
    raise ValueError(f"objective.terms: cross-tokenizer terms read one teacher; got {', '.join(readers)}")
  name = readers[0]
  tc = cfg.teachers[name]
  given = (teacher_tokenizers or {}).get(name)
  cached = tc.cache is not None and given is None  # the tokenizer the cache was written with
  s_field, t_field = "student.path", f"teachers.{name}.cache" if cached else f"teachers.{name}.path"
  # The teacher's (a self-teacher's: the student checkpoint's; a cached one's: its cache's).
  t_tok = given if given is not None else data_tokenizer(cfg, name)
  where = tc.path if not cached else f"cache {tc.cache}"
  own = cfg.student.init == "path" and tc.path != config_lib.SELF_TEACHER
  s_tok = _checkpoint_tokenizer(cfg.student.path, s_field) if own else t_tok  # else derived: the teacher's
  same = s_tok is t_tok or s_tok.get_vocab() == t_tok.get_vocab()
  s_tok = t_tok if same else s_tok
  vocab_map.check_fast(s_tok, s_field)
  vocab_map.check_fast(t_tok, t_field)
  for i, t in enumerate(terms):
    if name in t.teachers and tc.cache is not None and t.top_k is not None:
      raise ValueError(f"objective.terms[{i}].top_k: {t.loss} against teacher {name!r}'s cache compares the "
                       f"cache.top_k entries it holds + their tail; leave it unset")
    if name in t.teachers and t.loss not in CROSS_TOKENIZER_LOSSES:
      why = ("the cross-tokenizer terms run it on its own rows" if same else
             f"teacher {name!r} ({where}) and the student ({cfg.student.path}) tokenize differently")
      raise ValueError(f"objective.terms[{i}].loss: {t.loss} needs the teacher on the student's rows, but {why}; "
                       f"allowed with teacher {name!r}: {', '.join(CROSS_TOKENIZER_LOSSES)}")
  if cfg.objective.on_policy is not None:
    raise ValueError(f"objective.on_policy: the student's samples would need re-tokenizing for teacher {name!r} "
                     f"({where}; student {cfg.student.path}), which the cross-tokenizer terms read")
  return CrossTokenizer(name, s_tok, t_tok, t_field)


def teacher_length(max_length: int, texts: list[str], cross: CrossTokenizer) -> int:
  """The teacher's row length: ``max_length`` scaled by how many more tokens the teacher needs
  for the same text (measured on up to 256 texts), with a quarter of headroom, a multiple of 8."""
  if cross.teacher_tokenizer is cross.student_tokenizer:  # one tokenizer: the identity alignment
    return max_length
  sample = texts[:256]

  def count(tok: Any) -> int:
    return sum(len(x) for x in tok(sample, add_special_tokens=False, verbose=False)["input_ids"])

  ratio = count(cross.teacher_tokenizer) / max(1, count(cross.student_tokenizer))
  return max(8, -(-int(np.ceil(1.25 * ratio * max_length)) // 8) * 8)


def load_aligned_data(cfg: config_lib.Config, cross: CrossTokenizer) -> tuple[Any, Any]:
  """The training and validation rows of a cross-tokenizer run: the student's packed causal-LM
  rows with the teacher's ids and the span tensors beside them (`alignment.aligned_examples`)."""
  d = cfg.data
  if prepared.is_prepared(d.source):
    raise ValueError(f"data.source: {d.source} holds one tokenizer's rows; a cross-tokenizer run "
                     f"(teacher {cross.teacher!r}) tokenizes raw texts with both tokenizers")
  if d.mixture or d.completion_column:
    field = "data.mixture" if d.mixture else "data.completion_column"
    raise ValueError(f"{field}: not supported across tokenizers (teacher {cross.teacher!r}); use one data.source "
                     f"of plain texts")
  common = dict(name=d.name, text_columns=tuple(d.text_columns), label_column=None,
                data_format=None if d.format == "auto" else d.format, seed=cfg.train.seed, cache_dir=d.cache_dir)
  fraction = None if d.validation_split else d.validation_fraction
  train_ds = data.load_texts(d.source, split=d.split, validation_fraction=fraction, **common)
  val_split = d.validation_split or ("validation" if d.source == data.PYDOC or fraction else d.split)
  val_ds = data.load_texts(d.source, split=val_split, validation_fraction=fraction, **common)
  if d.max_examples:
    train_ds = train_ds.select(range(min(d.max_examples, len(train_ds))))

  def texts(ds) -> list[str]:  # columns joined as the same-tokenizer packing joins them
    return [" ".join(str(t) for t in parts if t) for parts in zip(*(ds[c] for c in d.text_columns))]

  train_texts, val_texts = texts(train_ds), texts(val_ds)
  kw = dict(student_length=d.max_length, teacher_length=teacher_length(d.max_length, train_texts, cross),
            student_field="student.path", teacher_field=cross.teacher_field or f"teachers.{cross.teacher}.path")
  train_ex = alignment.aligned_examples(train_texts, cross.student_tokenizer, cross.teacher_tokenizer, **kw)
  eval_ex = alignment.aligned_examples(val_texts, cross.student_tokenizer, cross.teacher_tokenizer, **kw)
  _check_sizes(cfg, train_ex, eval_ex)
  return train_ex, eval_ex


def _batch_transform(cfg: config_lib.Config, task: str, tokenizer: Any, examples: Any, vocab_size: int,
                     main: str):
  if task != "masked_lm":
    return None

  if tokenizer.mask_token_id is None:
    raise ValueError(f"teachers.{main}.path: a masked_lm run needs a tokenizer with a mask token")
  return functools.partial(data.mask_batch, mask_token_id=int(tokenizer.mask_token_id), vocab_size=int(vocab_size),
                           special_ids=tuple(int(i) for i in examples.special_ids), prob=cfg.data.mlm_probability)


def _on_policy(cfg: config_lib.Config, student: Any, tokenizer: Any) -> Any:
  """The step's `on_policy.OnPolicy` (the student's KV-cache sampler bound), or None."""
  op = cfg.objective.on_policy
  if op is None:
    return None

  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  sample = functools.partial(generate.generate, student.module, max_new_tokens=op.max_new_tokens,
                             temperature=op.temperature, top_k=op.top_k, top_p=op.top_p,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=int(pad or 0))
  return on_policy.OnPolicy(lmbda=op.lmbda, prompt_length=op.prompt_length, sample=sample)


def set_precision(cfg: config_lib.Config) -> None:
  if cfg.train.precision != "default":
    jax.config.update("jax_default_matmul_precision", cfg.train.precision)


def build_run(cfg: config_lib.Config) -> Run:
  """Loads models and data and builds the objective, mesh, optimizer, step and state."""
  set_precision(cfg)
  import datasets

  datasets.disable_progress_bars()
  # Devices, tokenizer and data first: a bad mesh or data file is reported in seconds,
  # before any model weights are read.
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) if cfg.mesh.mode == "jit" else None
  devices = jax.devices() if mesh is None else list(mesh.devices.flat)
  attention_impl = layers.resolve_attention(cfg.train.attention, devices[0].platform)
  unroll_layers = layers.resolve_layer_loop(cfg.train.layer_loop, devices[0].platform)
  if cfg.data.global_batch_size % len(devices):
    raise ValueError(f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by the "
                     f"{len(devices)} devices")
  if cfg.objective.on_policy is not None and _student_task(cfg) != "causal_lm":
    raise ValueError(f"objective.on_policy: on-policy distillation needs a causal_lm student, got task "
                     f"{_student_task(cfg)!r}")
  main = main_teacher(cfg)
  cross = cross_tokenizer(cfg)
  tokenizer = data_tokenizer(cfg, main) if cross is None else cross.student_tokenizer
  caches = {n: teacher_cache.open_cache(n, tc.cache) for n, tc in cfg.teachers.items() if tc.cache is not None}
  if cross is None:
    train_ex, eval_ex = load_data(cfg, tokenizer, _student_task(cfg))
  else:
    train_ex, eval_ex = load_aligned_data(cfg, cross)
  for n, cache in caches.items():  # before any model loads
    if cross is not None and n == cross.teacher:  # its top-k on its own tokens of these rows
      cache.check(cross.teacher_tokenizer, {"train": train_ex, "validation": eval_ex},
                  student_tokenizer=cross.student_tokenizer)
    else:
      cache.check(tokenizer, {"train": train_ex, "validation": eval_ex})
  student, teachers = _load_models(cfg)
  student = runtime_model(student, attention_impl, mesh, unroll_layers)
  teachers = {n: runtime_model(t, attention_impl, mesh, unroll_layers) for n, t in teachers.items()}
  objective = objective_lib.build_objective(cfg.resolved_terms(), student=student, teachers={**teachers, **caches},
                                            chunk_size=cfg.objective.chunk_size)
  shared_vocab = None
  if cross is not None and cross.teacher == main:  # compared span by span, never position by position
    shared_vocab = None
  elif main in caches:
    shared_vocab = caches[main].student_vocab(student, f"teachers.{main}.cache")
  elif student.task in models.LM_TASKS + ("sequence_classification",) and teachers[main].task == student.task:
    shared_vocab = models.check_vocab(teachers[main], student) if student.task != "sequence_classification" else None
  transform = _batch_transform(cfg, student.task, tokenizer, train_ex, shared_vocab or student.vocab_size, main)
  optimizer = cfg.optimizer.build(cfg.train.steps)
  seed = cfg.train.seed
  projections = objective.init_projections(jax.random.PRNGKey(seed + 1))
  initial_student = jax.tree.map(np.asarray, student.params)
  # A cross-tokenizer teacher runs on its own tokens of the batch (`alignment.TEACHER_INPUTS`).
  teacher_applies = {n: functools.partial(alignment.on_teacher_tokens, t.apply)
                     if cross is not None and n == cross.teacher else t.apply for n, t in teachers.items()}
  step_kw = dict(student_apply=student.apply, teacher_applies=teacher_applies, objective=objective,
                 optimizer=optimizer, batch_transform=transform, on_policy=_on_policy(cfg, student, tokenizer))
  if mesh is not None:
    logical = {(name,) + path: names for name, model in {**teachers, "student": student}.items()
               for path, names in models.logical_axes(model).items()}
    state = step_lib.init_sharded_state(student.params, optimizer, mesh, projection_params=projections, seed=seed,
                                        logical=logical)
    t_params = step_lib.shard_teacher_params({n: t.params for n, t in teachers.items()}, mesh, logical=logical)
    # The teachers keep their sharded params only: no host or single-device copy stays alive.
    teachers = {n: dataclasses.replace(t, params=t_params[n]) for n, t in teachers.items()}
    step_fn = step_lib.make_jit_step(mesh=mesh, state=state, teacher_params=t_params, logical=logical, **step_kw)
  else:
    state = step_lib.replicate(state_lib.create_train_state(student.params, optimizer,
                                                            projection_params=projections, seed=seed))
    t_params = step_lib.replicate({n: t.params for n, t in teachers.items()})
    step_fn = step_lib.make_pmap_step(**step_kw)
  return Run(cfg, student, teachers, objective, train_ex, eval_ex, transform, mesh, optimizer, step_fn, state,
             t_params, initial_student, shared_vocab, caches, cross)


def host_state(run: Run, state: Any) -> Any:
  """The state as saved: unreplicated under pmap, global (sharded) arrays under jit."""
  return step_lib.unreplicate(state) if run.mesh is None else state


def abstract_state(run: Run) -> Any:
  """Shapes + shardings of the saved state on the current devices (for resharded restore)."""
  state = host_state(run, run.state)
  if run.mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                      run.step_fn.state_sharding)


def device_state(run: Run, restored: Any) -> Any:
  return step_lib.replicate(jax.device_get(restored)) if run.mesh is None else restored


def place_batch(run: Run, batch: Mapping[str, np.ndarray]) -> dict:
  if run.mesh is None:
    return {k: np.asarray(v) for k, v in batch.items()}
  return sharding.shard_batch(batch, run.mesh)


def state_step(run: Run, state: Any) -> int:
  """The state's step counter, read alone (unreplicating the whole pmap state would copy it)."""
  return int(np.asarray(state.step[0] if run.mesh is None else state.step))


def student_params(run: Run, state: Any) -> Any:
  """The student's params as one host-addressable tree (for evaluation and export)."""
  params = host_state(run, state).params["student"]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)
  return params
