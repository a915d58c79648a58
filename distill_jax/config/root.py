"""The run configuration: one pydantic schema; YAML files and dotted overrides through OmegaConf.

The frozen pydantic dataclasses *are* the schema (the root :class:`Config` here, its sections
in :mod:`distill_jax.config.sections` and :mod:`distill_jax.objective.terms`, the one-line
error machinery in :mod:`distill_jax.schema`, all re-exported here); a YAML file (``configs/``; the default
is package data, ``distill_jax/configs/default.yaml``) is an instance, and ``key.sub=value``
strings override fields: ``load_config("configs/minilm.yaml", ["objective.terms[0].temperature=4"])``.
Pydantic checks every value (field constraints; validators for cross-field rules) and each
problem is one :class:`ConfigError` line naming the dotted field, e.g.
``config: objective.terms[1].temperature: Input should be greater than 0, got -1.0``.
:class:`TermConfig` and the loss registry ``LOSSES`` (which options each loss takes) live in
:mod:`distill_jax.objective.terms`, the one home of a loss term.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigIndexError, OmegaConfBaseException
from pydantic import ValidationError, model_validator
from pydantic_core import ArgsKwargs

from distill_jax.objective.terms import LOSSES, TERM_SHAPE_FIELDS, ObjectiveConfig, OnPolicyConfig, ScheduleConfig, TermConfig
from distill_jax.schema import (PKG_PREFIX, SELF_TEACHER, ConfigError, Section, adapter, describe, error_line,
                                       fail, field_of, invalid, section)
from distill_jax.config.sections import (CacheConfig, CheckpointConfig, DataConfig, DistributedConfig, EvalConfig, ExportConfig,
                                         GenerateConfig, LoggingConfig, MeshConfig, OptimizerConfig, StudentConfig,
                                         TeacherConfig, TrainConfig)
from distill_jax.errors import first_line
from distill_jax.models import checkpoints

__all__ = [
    "CacheConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig", "EvalConfig", "ExportConfig",
    "GenerateConfig", "LoggingConfig", "MeshConfig", "ObjectiveConfig", "OnPolicyConfig", "OptimizerConfig",
    "PKG_PREFIX", "SELF_TEACHER", "SHAPE_KEYS", "ScheduleConfig", "StudentConfig", "TeacherConfig", "TermConfig",
    "TrainConfig", "config_from_dict", "default_config", "dump_yaml", "load_config", "resolve_model_path",
    "shape_diff", "short_summary", "to_yaml",
]


@section("")
class Config(Section):
  """The whole run configuration, the root of the schema. ``teacher: {...}`` is shorthand
  for ``teachers: {teacher: {...}}``."""

  teachers: dict[str, TeacherConfig] = field_of(dict)  # at least one
  student: StudentConfig = field_of(StudentConfig)
  objective: ObjectiveConfig = field_of(ObjectiveConfig)  # at least one term
  data: DataConfig = field_of(DataConfig)
  optimizer: OptimizerConfig = field_of(OptimizerConfig)
  train: TrainConfig = field_of(TrainConfig)
  mesh: MeshConfig = field_of(MeshConfig)
  distributed: DistributedConfig = field_of(DistributedConfig)
  checkpoint: CheckpointConfig = field_of(CheckpointConfig)
  eval: EvalConfig = field_of(EvalConfig)
  export: ExportConfig = field_of(ExportConfig)
  logging: LoggingConfig = field_of(LoggingConfig)
  generate: GenerateConfig = field_of(GenerateConfig)  # `distill-jax generate` only
  cache: CacheConfig = field_of(CacheConfig)  # `distill-jax cache-teacher` only

  @model_validator(mode="before")
  @classmethod
  def _shorthand(cls, data: Any) -> Any:
    raw = data.kwargs if isinstance(data, ArgsKwargs) else data
    if isinstance(raw, Mapping) and "teacher" in raw:
      if "teachers" in raw:
        raise invalid("give either 'teacher' (one teacher) or 'teachers' (name -> teacher), not both")
      raw = {("teachers" if k == "teacher" else k): ({"teacher": v} if k == "teacher" else v) for k, v in raw.items()}
      return ArgsKwargs(data.args, raw) if isinstance(data, ArgsKwargs) else raw
    return data

  @model_validator(mode="after")
  def _rules(self):
    names = list(self.teachers)
    if not names:
      raise invalid("teachers must name at least one teacher, e.g. 'teacher: {path: gpt2}'")
    for name in names:
      if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise invalid(f"teachers: name {name!r} must be an identifier (letters, digits, _ and -)")
    allowed = ", ".join(names)

    def known(name: Optional[str], path: str) -> None:
      if name is not None and name not in self.teachers:
        raise invalid(f"{path} must name a teacher ({allowed}), got {name!r}")

    known(self.student.teacher, "student.teacher")
    source = self.student.teacher or names[0]
    if self.student.init == "from_teacher" and self.teachers[source].path == SELF_TEACHER:
      raise invalid(f"student.init must be 'path' or 'config' when teacher {source!r} is the student itself "
                     f"(teachers.{source}.path: {SELF_TEACHER})")
    # A student derived from a cached teacher reads its weights once (`run_setup`); the teacher never runs.
    known(self.cache.teacher, "cache.teacher")
    if not self.objective.terms:
      raise invalid("objective.terms must list at least one term, e.g. '- {loss: forward_kl}'")
    sparse = ", ".join(n for n, spec in LOSSES.items() if spec.inputs in ("sparse", "cross_tokenizer"))
    for i, term in enumerate(self.objective.terms):
      path = f"objective.terms[{i}].teacher"
      for j, name in enumerate(term.teachers):
        known(name, f"{path}[{j}]" if isinstance(term.teacher, tuple) else path)
      spec = LOSSES[term.loss]
      if term.teacher is None and len(names) > 1 and "teacher" in spec.options and not spec.multi_teacher:
        raise invalid(f"{path} is required when there are several teachers ({allowed})")
      read = term.teachers or ((names[0],) if "teacher" in spec.options else ())
      cached = [n for n in read if self.teachers[n].cache is not None]
      if cached and spec.inputs not in ("sparse", "cross_tokenizer"):
        raise invalid(f"objective.terms[{i}].loss: teacher {cached[0]!r} is read from its cache (top-k "
                      f"log-probabilities only), which {term.loss} cannot use; allowed: {sparse}")
      if cached and self.objective.on_policy is not None:
        raise invalid(f"objective.on_policy: teacher {cached[0]!r} is read from its cache, which cannot score the "
                      f"student's own samples; give it a path instead of a cache")
    on_policy = self.objective.on_policy
    if on_policy is not None and on_policy.prompt_length > self.data.max_length:
      raise invalid(f"objective.on_policy.prompt_length ({on_policy.prompt_length}) must be <= data.max_length "
                     f"({self.data.max_length})")
    ckpt = self.checkpoint
    logged = ["eval/loss"] + [f"eval/{n}" for n in self.objective.metric_names()]
    if ckpt.keep_best and ckpt.best_metric not in logged:
      raise invalid(f"checkpoint.best_metric {ckpt.best_metric!r} is not an eval metric the trainer logs; "
                     f"allowed: {', '.join(logged)}")
    procs = self.distributed.num_processes
    if procs and self.data.global_batch_size % procs:
      raise invalid(f"data.global_batch_size ({self.data.global_batch_size}) must be divisible by "
                     f"distributed.num_processes ({procs})")
    return self

  def resolved_terms(self) -> tuple[TermConfig, ...]:
    """The terms with every default filled in (see :meth:`ObjectiveConfig.resolve`), as
    ``distill_jax.objective.objective.build_objective`` takes them."""
    return self.objective.resolve(list(self.teachers), self.train.steps)

  def objective_terms(self) -> list[dict[str, Any]]:
    """:meth:`resolved_terms` as plain mappings (options that do not apply left out)."""
    return [{k: v for k, v in t.to_dict().items() if v is not None} for t in self.resolved_terms()]


# ----------------------------------------------------------------------------------------
# Loading, overrides, dumping.

# The default run, `distill-jax train` with no config: package data (configs/default.yaml
# at the repository root is the same file, see tests/test_config.py).
_DEFAULT = ("configs", "default.yaml")


def default_config() -> Config:
  """The packaged default: what ``distill-jax train`` runs with no arguments."""
  return load_config(None)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
  """Builds and validates a :class:`Config` from a plain (YAML/JSON) mapping.

  Raises:
    ConfigError: one line naming the dotted field.
  """
  if not isinstance(raw, Mapping):
    fail(f"the top level must be a mapping of sections, got {describe(raw)}")
  try:
    return adapter(Config).validate_python(raw)
  except ValidationError as e:
    raise ConfigError(error_line(e)) from None


# key.sub[0].x: what an override may address (OmegaConf takes more, e.g. `a..b`).
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][\w\-]*(\[\d+\])*(\.[A-Za-z_][\w\-]*(\[\d+\])*)*")


def _override(node: DictConfig, item: str) -> None:
  """Applies one ``key.sub[i]=value`` override (the value parsed as YAML by OmegaConf)."""
  key, sep, text = item.partition("=")
  key = key.strip()
  if not sep or not _OVERRIDE_KEY.fullmatch(key):
    fail(f"malformed override {item!r}; expected key.sub=value or key.list[0].sub=value (e.g. train.steps=10)")
  if key == "teacher" or key.startswith(("teacher.", "teacher[")):
    key = f"teachers.{key}"  # the `teacher:` shorthand
  try:
    value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
  except yaml.YAMLError:
    fail(f"malformed override {item!r}: the value is not valid YAML")
  while True:
    try:
      return OmegaConf.update(node, key, value, merge=False)
    except ConfigIndexError as e:  # an index one past the end of a list appends an item
      items, at = e.parent_node, e.key
      if not isinstance(items, ListConfig) or at != len(items):
        where = str(e.full_key).rpartition("[")[0]
        fail(f"override {item!r}: {e.full_key} is out of range ({where} has {len(items or ())} items)")
      items.append({})
    except (OmegaConfBaseException, ValueError) as e:
      fail(f"override {item!r}: {first_line(e)}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
  """Reads a YAML config (``None``: the packaged default) and applies dotted overrides.

  Args:
    path: a YAML file, or ``None`` for ``distill_jax/configs/default.yaml``.
    overrides: ``key.sub=value`` strings applied in order, values parsed as YAML
      (``train.steps=10``, ``objective.terms[0].temperature=4``, ``data.text_columns=[a,b]``,
      ``student.seed=null``); an index one past the end of a list appends an item. Files and
      values may use OmegaConf interpolation (``export.dir=${train.run_dir}/hf``).

  Raises:
    ConfigError: one line naming the file or dotted field.
  """
  if path is None:
    text = importlib.resources.files("distill_jax").joinpath(*_DEFAULT).read_text("utf-8")
    where = "the packaged default distill_jax/" + "/".join(_DEFAULT)
  else:
    where = path = os.fspath(path)
    if not os.path.isfile(path):
      fail(f"file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
      text = f.read()
  try:
    node = OmegaConf.create(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}" if mark is not None else ""
    fail(f"cannot parse {where}{at}: {getattr(e, 'problem', None) or first_line(e)}")
  except (AssertionError, OmegaConfBaseException):  # a scalar document
    node = None
  if not isinstance(node, DictConfig):
    fail(f"{where}: the top level must be a mapping of sections")
  if "teacher" in node and "teachers" not in node:  # so that teachers.teacher.x=... overrides it
    node["teachers"] = {"teacher": node.pop("teacher")}
  for item in overrides:
    _override(node, item)
  try:
    raw = OmegaConf.to_container(node, resolve=True)
  except OmegaConfBaseException as e:
    fail(f"{getattr(e, 'full_key', None) or where}: {first_line(e)}")
  return config_from_dict(raw)


def to_yaml(config: Config) -> str:
  """The config as YAML text: every field in schema order (unset term options omitted)."""
  d = config.to_dict()
  d["objective"]["terms"] = [{k: v for k, v in t.items() if v is not None} for t in d["objective"]["terms"]]
  return yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=100)


def dump_yaml(config: Config, path: Optional[str] = None) -> str:
  """Writes the config as YAML (loadable by :func:`load_config`) to `path` if given; returns it."""
  text = to_yaml(config)
  if path is not None:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  return text


def resolve_model_path(path: str, field: str = "teachers.teacher.path") -> str:
  """Resolves a ``pkg:<module>`` model path to the package's model directory
  (`models.checkpoints.resolve_package_path`); other values (local paths, hub ids, ``student``)
  are returned unchanged.

  Raises:
    ConfigError: naming `field` when the package is not installed.
  """
  try:
    return os.fspath(checkpoints.resolve_package_path(path, field))
  except ValueError as e:
    fail(first_line(e))


# ----------------------------------------------------------------------------------------
# Checkpoint compatibility and the start-up summary.

# Dotted paths (``*``: any name or index) whose change makes a checkpoint of the run
# incompatible: model identities and shapes, projection/term structure, optimizer state
# structure. Everything else (steps, logging, data, learning rate...) may change on resume.
SHAPE_KEYS: tuple[str, ...] = (
    "teachers.*.path", "teachers.*.task", "teachers.*.num_labels",
    "student.init", "student.teacher", "student.path", "student.task", "student.num_layers",
    "student.layers", "student.hidden_size", "student.config", "student.num_labels", "student.param_dtype",
    *(f"objective.terms[*].{field}" for field in TERM_SHAPE_FIELDS),
    "optimizer.name", "optimizer.grad_accum_steps",
)
_SHAPE_PATTERNS = tuple(re.compile(re.escape(k).replace(r"\*", r"[^.\[\]]+") + r"(?:$|[.\[])") for k in SHAPE_KEYS)


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
  if isinstance(value, Mapping):
    out: dict[str, Any] = {}
    for k, v in value.items():
      out.update(_flatten(v, f"{path}.{k}" if path else str(k)))
    return out or {path: {}}
  if isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
    out = {}
    for i, v in enumerate(value):
      out.update(_flatten(v, f"{path}[{i}]"))
    return out or {path: []}
  return {path: list(value) if isinstance(value, tuple) else value}


def shape_diff(old: Union[Config, Mapping[str, Any]],
               new: Union[Config, Mapping[str, Any]]) -> list[tuple[str, Any, Any]]:
  """The :data:`SHAPE_KEYS` fields that differ between two configs (a :class:`Config` or its
  ``to_dict()``, e.g. the one saved with a checkpoint and the one that wants to resume).

  Returns:
    ``(dotted_path, old_value, new_value)`` per difference, sorted by path (``None`` where
    one side lacks it); empty when the checkpoint is compatible.
  """
  flat_old = _flatten(old.to_dict() if isinstance(old, Config) else old)
  flat_new = _flatten(new.to_dict() if isinstance(new, Config) else new)
  out = []
  for path in sorted(set(flat_old) | set(flat_new)):
    if any(p.match(path) for p in _SHAPE_PATTERNS):
      a, b = flat_old.get(path), flat_new.get(path)
      if a != b:
        out.append((path, a, b))
  return out


def short_summary(config: Config) -> str:
  """A few lines describing the run, printed when training starts."""
  several = len(config.teachers) > 1
  teachers = "; ".join(f"{name} = {t.path if t.cache is None else 'the cache ' + t.cache} ({t.task}, {t.dtype})"
                       for name, t in config.teachers.items())
  s = config.student
  source = s.teacher or next(iter(config.teachers))
  layers = f"{s.num_layers or len(s.layers) or 'all teacher'} layers"
  student = {"from_teacher": f"{layers} copied from teacher {source!r}", "path": f"{s.path}",
             "config": f"random init, {layers}, from teacher {source!r}'s config"}[s.init]

  def term(t: TermConfig) -> str:
    extra = [f"T={t.temperature:g}"] if t.temperature not in (None, 1) else []
    if t.teacher and several:
      extra.append("@" + "+".join(t.teachers))
    return f"{t.weight:g}*{t.loss}" + (f"({', '.join(extra)})" if extra else "")

  d, o, tr, m = config.data, config.optimizer, config.train, config.mesh
  data = f"{d.source}" + (f"/{d.name}" if d.name else "") + f" [{d.split}]"
  return "\n".join([
      f"teachers:  {teachers}",
      f"student:   {student} ({s.dtype})",
      f"objective: {' + '.join(term(t) for t in config.objective.terms)}",
      f"data:      {data}, max_length {d.max_length}, global batch {d.global_batch_size}",
      f"train:     {tr.steps} steps, {o.name} lr {o.learning_rate:g} ({o.schedule}, warmup "
      f"{o.warmup_steps}), seed {tr.seed}, run_dir {tr.run_dir}",
      f"mesh:      {m.mode} data={m.data} fsdp={m.fsdp} tensor={m.tensor}"
      + (f", {config.distributed.num_processes or 'auto'} processes" if config.distributed.enabled else ""),
  ])

