"""The run configuration: one pydantic schema; YAML files and dotted overrides through OmegaConf.

The frozen pydantic dataclasses below *are* the schema; a YAML file (``configs/``; the default
is package data, ``distill_jax/configs/default.yaml``) is an instance, and ``key.sub=value``
strings override fields: ``load_config("configs/minilm.yaml", ["objective.terms[0].temperature=4"])``.
Pydantic checks every value (field constraints; validators for cross-field rules) and each
problem is one :class:`ConfigError` line naming the dotted field, e.g.
``config: objective.terms[1].temperature: Input should be greater than 0, got -1.0``.
:class:`TermConfig` is also ``distill_jax.objective.Term``, whose registry ``LOSSES`` says which
options each loss takes. Importing this module imports no jax (checking loss names does).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.resources
import os
import re
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigIndexError, OmegaConfBaseException
from pydantic import (BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      TypeAdapter, ValidationError, model_validator)
from pydantic.dataclasses import dataclass as _pydantic_dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

from distill_jax.errors import UserError, first_line

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig", "EvalConfig", "ExportConfig",
    "GenerateConfig", "LoggingConfig", "MeshConfig", "ObjectiveConfig", "OnPolicyConfig", "OptimizerConfig",
    "PKG_PREFIX", "SELF_TEACHER", "SHAPE_KEYS", "ScheduleConfig", "StudentConfig", "TeacherConfig", "TermConfig",
    "TrainConfig", "config_from_dict", "default_config", "dump_yaml", "load_config", "resolve_model_path",
    "shape_diff", "short_summary", "to_yaml",
]

# `teachers.<name>.path: student`: the teacher is a frozen copy of the student's initial weights.
SELF_TEACHER = "student"
# `pkg:<module>`: a model directory shipped in an installed package, `<module>.get_model_path()`.
PKG_PREFIX = "pkg:"
# Metric keys the train step logs besides the terms (a term named so gets a suffix).
_RESERVED_METRICS = ("loss", "grad_norm", "nonfinite", "on_policy")

Task = Literal["causal_lm", "masked_lm", "sequence_classification", "encoder"]
DType = Literal["float32", "bfloat16", "float16"]
Int, Float, Bool = StrictInt, StrictFloat, StrictBool  # no "10" -> 10, no true -> 1 (a float takes ints)
PosInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
PosFloat = Annotated[StrictFloat, Field(gt=0)]
NonNegFloat = Annotated[StrictFloat, Field(ge=0)]
Unit = Annotated[StrictFloat, Field(ge=0, le=1)]  # [0, 1]
UnitOpen = Annotated[StrictFloat, Field(ge=0, lt=1)]  # [0, 1)
Fraction = Annotated[StrictFloat, Field(gt=0, lt=1)]  # (0, 1)


class ConfigError(UserError):
  """A problem with the user's configuration; its message is one line."""


def _fail(message: str):
  raise ConfigError(f"config: {message}")


def _invalid(message: str, *fields: str) -> PydanticCustomError:
  """A failed rule of a section: ``@name`` in `message` is the dotted path of its field `name`
  (pydantic knows where the section is; the section does not)."""
  return PydanticCustomError("config", message, {"message": message, "fields": fields})


def _dotted(loc: Sequence[Union[str, int]]) -> str:
  out = ""
  for part in loc:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out


def _describe(value: Any) -> str:
  text = repr(value).replace("\n", " ")
  return text if len(text) <= 60 else text[:57] + "..."


def _error_line(error: ValidationError, prefix: tuple = ()) -> str:
  """The first error of a pydantic ``ValidationError`` as one line naming the dotted field."""
  e = error.errors(include_url=False)[0]
  loc = prefix + tuple(e["loc"])
  where = _dotted(loc)
  if e["type"] == "config":
    text = e["ctx"]["message"]
    for name in sorted(e["ctx"]["fields"], key=len, reverse=True):
      text = text.replace("@" + name, _dotted(loc + (name,)))
    return f"config: {text}" if e["ctx"]["fields"] or not where else f"config: {where} {text}"
  if e["type"] in ("missing", "missing_argument"):
    return f"config: {where} is required"
  return f"config: {where or 'the config'}: {e['msg']}, got {_describe(e['input'])}"


class _Section:
  """Base of the schema's sections: unknown keys name the allowed ones; ``to_dict``."""

  @model_validator(mode="before")
  @classmethod
  def _known_keys(cls, data: Any) -> Any:
    raw = data.kwargs if isinstance(data, ArgsKwargs) else data
    if isinstance(raw, Mapping):
      allowed = list(cls.__dataclass_fields__)
      for key in raw:
        if key not in allowed:
          close = difflib.get_close_matches(str(key), allowed, n=1)
          hint = f" (did you mean {close[0]!r}?)" if close else ""
          raise _invalid(f"unknown key '@{key}'{hint}; allowed: {', '.join(allowed)}", str(key))
    return data

  def to_dict(self) -> dict[str, Any]:
    """Plain YAML/JSON-able dict (tuples become lists); :func:`config_from_dict` inverts it."""
    return _adapter(type(self)).dump_python(self, mode="json")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
  return TypeAdapter(cls)


def _section(prefix: str):
  """Makes a frozen pydantic dataclass whose direct construction raises one-line ConfigErrors."""
  def wrap(cls):
    cls = _pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
      try:
        init(self, *args, **kwargs)
      except ValidationError as e:
        raise ConfigError(_error_line(e, tuple(prefix.split(".")) if prefix else ())) from None

    cls.__init__ = __init__
    return cls
  return wrap


def _field(default_factory):
  return dataclasses.field(default_factory=default_factory)


# ----------------------------------------------------------------------------------------
# Schema. `[x]` in a comment: the value an unset (null) option takes.


@_section("teachers.<name>")
class TeacherConfig(_Section):
  """One frozen teacher (`teachers.<name>`)."""

  path: str  # checkpoint dir or hub id; `pkg:<module>` (see resolve_model_path); `student` (self-distillation)
  task: Task = "causal_lm"
  dtype: DType = "float32"  # compute dtype
  param_dtype: DType = "float32"  # dtype of the weights on device
  num_labels: Optional[PosInt] = None  # classes of a sequence_classification head [from the checkpoint]

  @model_validator(mode="after")
  def _rules(self):
    if not self.path.strip():
      raise _invalid(f"@path must be a non-empty path, hub id, 'pkg:<module>' or '{SELF_TEACHER}'", "path")
    if self.num_labels is not None and self.task != "sequence_classification":
      raise _invalid(f"@num_labels is only used when @task is sequence_classification, got task {self.task}",
                     "num_labels", "task")
    return self


@_section("student")
class StudentConfig(_Section):
  """The trainable student (`student`).

  ``init``: ``from_teacher`` (DistilBERT-style: the teacher's embeddings and a subset of its
  layers: ``layers``, strictly increasing 0-based indices, or every k-th), ``path`` (the
  checkpoint at ``path``) or ``config`` (random weights, the teacher's HF config with
  ``num_layers``/``hidden_size``/``config`` overrides).
  """

  init: Literal["from_teacher", "path", "config"] = "from_teacher"
  teacher: Optional[str] = None  # the teacher to derive from [the first]
  path: Optional[str] = None  # for init: path
  task: Optional[Task] = None  # [the teacher's]
  num_layers: Optional[PosInt] = None  # [len(layers), else the teacher's]
  layers: tuple[Int, ...] = ()
  hidden_size: Optional[PosInt] = None  # width of an init: config student [the teacher's]
  config: dict[str, Any] = _field(dict)  # further HF config overrides, e.g. {intermediate_size: 512}
  num_labels: Optional[PosInt] = None  # [the teacher's]
  dtype: DType = "float32"
  param_dtype: DType = "float32"  # of the trained weights (keep float32 for mixed precision)
  seed: Optional[Int] = None  # of random initialization [train.seed]
  remat: Literal["none", "full", "dots"] = "none"  # what the layer scan keeps for backward: all, nothing, matmuls

  @model_validator(mode="after")
  def _rules(self):
    if self.init == "path" and not self.path:
      raise _invalid("@path is required when @init is 'path'", "path", "init")
    if self.init != "path" and self.path is not None:
      raise _invalid(f"@path is only used when @init is 'path', got init {self.init}", "path", "init")
    if self.init == "from_teacher" and self.hidden_size is not None:
      raise _invalid("@hidden_size cannot change when @init is 'from_teacher' (weights are copied); use init: config",
                     "hidden_size", "init")
    if self.init != "from_teacher" and self.layers:
      raise _invalid(f"@layers is only used when @init is 'from_teacher', got init {self.init}", "layers", "init")
    if any(i < 0 for i in self.layers) or list(self.layers) != sorted(set(self.layers)):
      raise _invalid(f"@layers must be strictly increasing indices >= 0, got {list(self.layers)}", "layers")
    if self.layers and self.num_layers is not None and self.num_layers != len(self.layers):
      raise _invalid(f"@num_layers must equal len(@layers) = {len(self.layers)}, got {self.num_layers}",
                     "num_layers", "layers")
    return self


@_section("objective.terms[<i>].<schedule>")
class ScheduleConfig(_Section):
  """A value over steps: ``start + (end - start) * f(min(step / steps, 1))``, ``f(x) = x``
  (``linear``), ``(1 - cos(pi x)) / 2`` (``cosine``) or ``0`` (``constant``)."""

  kind: Literal["constant", "linear", "cosine"] = "constant"
  start: Optional[Float] = None  # [the term's weight / temperature]
  end: Optional[Float] = None  # [start]
  steps: Optional[PosInt] = None  # length of the ramp [train.steps; 1 without a config]

  def __call__(self, step):
    import jax.numpy as jnp  # the objective calls this in the jitted step

    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.steps or 1, 1), 0.0, 1.0)
    if self.kind == "constant":
      return jnp.asarray(self.start, jnp.float32)
    if self.kind == "linear":
      return self.start + (self.end - self.start) * frac
    return self.end + (self.start - self.end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


_LAYER_MAPS = ("last", "uniform", "all")


def _layer_map(value: Any) -> Any:
  """A term's `layers`: a name, teacher layers (one per student layer) or [student, teacher] pairs."""
  if value is None or value in _LAYER_MAPS:
    return value
  if isinstance(value, Mapping):
    value = [list(item) for item in value.items()]
  is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
  if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
    raise _invalid(f"must be one of {', '.join(_LAYER_MAPS)}, a non-empty list of teacher layers or of "
                   f"[student_layer, teacher_layer] pairs, got {_describe(value)}")
  if all(map(is_int, value)):
    items, flat = tuple(value), tuple(value)
  elif all(isinstance(x, (list, tuple)) and len(x) == 2 and all(map(is_int, x)) for x in value):
    items = tuple((x[0], x[1]) for x in value)
    flat = tuple(v for x in items for v in x)
  else:
    raise _invalid(f"must be a list of ints (teacher layers) or of [student_layer, teacher_layer] int pairs, "
                   f"got {_describe(value)}")
  if any(v < 0 for v in flat):
    raise _invalid(f"layer indices must be >= 0 (1-based, 0 = embeddings), got {_describe(value)}")
  return items


def _teacher_names(value: Any) -> Any:
  if value is None or (isinstance(value, str) and value):
    return value
  if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
    return tuple(value)
  raise _invalid(f"must be a teacher name or a non-empty list of names, got {_describe(value)}")


# What an unset option of a term means to the losses that take it.
_TERM_DEFAULTS = {"layers": "last", "projection": "none", "temperature": 1.0, "positions": "all", "beta": 0.5,
                  "normalized": False, "skew": 0.1, "label_smoothing": 0.0, "kind": "cosine", "pooling": "mean",
                  "include_embeddings": False}


def _losses() -> Mapping[str, Any]:
  """The loss registry: name -> spec with ``options`` (the term fields it takes), ``multi_teacher``."""
  return importlib.import_module("distill_jax.objective").LOSSES


@_section("objective.terms[<i>]")
class TermConfig(_Section):
  """One weighted loss term (`objective.terms[i]`; ``distill_jax.objective.Term``).

  A loss takes only its own options (``objective.LOSSES[loss].options``): setting e.g.
  ``beta`` on ``hidden_mse`` is an error. Unset (null) options take the default in brackets.
  """

  loss: str  # a name of objective.LOSSES
  weight: NonNegFloat = 1.0
  name: Optional[str] = None  # metric key [the loss name, suffixed _2, _3 on repeats]
  # teacher name [the only one; required with several, except cross_entropy]; a list for ensemble_kl [all]
  teacher: Annotated[Union[str, tuple[str, ...], None], BeforeValidator(_teacher_names)] = None
  # feature terms: last | uniform (student layer i <- teacher i*Lt/Ls) | all (uniform + embeddings) | a list
  # of teacher layers, one per student layer | [[student, teacher], ...]; 1-based, 0 = embeddings [last]
  layers: Annotated[Union[str, tuple[int, ...], tuple[tuple[int, int], ...], None], BeforeValidator(_layer_map)] = None
  projection: Optional[Literal["none", "linear"]] = None  # learned map student -> teacher width [none]
  temperature: Optional[PosFloat] = None  # of logit terms; KL scaled by T² [1]
  positions: Optional[Literal["all", "labels"]] = None  # logit terms: real tokens | the loss mask [all]
  beta: Optional[Unit] = None  # generalized JSD: 0 = forward KL, 1 = reverse [0.5]
  normalized: Optional[Bool] = None  # generalized JSD normalization [false]
  skew: Optional[UnitOpen] = None  # skew-KL mixing coefficient [0.1]
  label_smoothing: Optional[UnitOpen] = None  # cross_entropy [0]
  kind: Optional[Literal["cosine", "dot", "euclidean"]] = None  # token_relation matrix [cosine]
  pooling: Optional[Literal["mean", "cls"]] = None  # sentence embedding of pooled/batch terms [mean]
  include_embeddings: Optional[Bool] = None  # also match the embedding outputs (TinyBERT) [false]
  weight_schedule: Optional[ScheduleConfig] = None  # replaces weight over steps
  temperature_schedule: Optional[ScheduleConfig] = None  # replaces temperature over steps

  @model_validator(mode="after")
  def _rules(self):
    losses = _losses()
    spec = losses.get(self.loss)
    if spec is None:
      raise _invalid(f"@loss: unknown loss {self.loss!r}; allowed: {', '.join(sorted(losses))}", "loss")
    for f in dataclasses.fields(self):
      if getattr(self, f.name) is not None and f.name not in spec.options:
        raise _invalid(f"@{f.name}: not an option of {self.loss}; allowed: {', '.join(sorted(spec.options))}", f.name)
    if self.name is not None and not self.name.strip():
      raise _invalid("@name must be a non-empty metric name", "name")
    if isinstance(self.teacher, tuple) and not spec.multi_teacher:
      raise _invalid(f"@teacher: {self.loss} takes one teacher name; average several with ensemble_kl", "teacher")
    for key, low in (("weight_schedule", ">="), ("temperature_schedule", ">")):
      for end in ("start", "end"):
        value = getattr(getattr(self, key), end, None)
        if value is not None and (value < 0 or (low == ">" and value == 0)):
          raise _invalid(f"@{key}.{end} must be {low} 0, got {value:g}", f"{key}.{end}")
    return self

  @property
  def teachers(self) -> tuple[str, ...]:
    """The teachers the term reads (none for cross_entropy)."""
    return () if self.teacher is None else self.teacher if isinstance(self.teacher, tuple) else (self.teacher,)

  def can_contribute(self) -> bool:
    """Whether the term's weight is non-zero at some step."""
    ws = self.weight_schedule
    if ws is None:
      return self.weight != 0
    start = self.weight if ws.start is None else ws.start
    return start != 0 or (ws.kind != "constant" and ws.end is not None and ws.end != 0)

  def weight_at(self, step):
    """The weight at ``step``: ``weight_schedule`` when set, else the static ``weight``."""
    return self.weight if self.weight_schedule is None else self.weight_schedule(step)

  def temperature_at(self, step):
    """The temperature at ``step``: ``temperature_schedule`` when set, else ``temperature``."""
    return self.temperature if self.temperature_schedule is None else self.temperature_schedule(step)


@_section("objective.on_policy")
class OnPolicyConfig(_Section):
  """On-policy distillation (`objective.on_policy`, GKD, Agarwal et al. 2024; causal LM):
  with probability `lmbda` per step the student continues the first `prompt_length` tokens
  of each row by `max_new_tokens` sampled tokens and the logit terms score those tokens only
  (``distill_jax.on_policy``)."""

  lmbda: Unit = 0.5  # probability of an on-policy step (0: supervised only, 1: always)
  prompt_length: PosInt = 32  # tokens of each row that prompt the student (<= data.max_length)
  max_new_tokens: PosInt = 16
  temperature: NonNegFloat = 1.0  # of the student's sampling (0: greedy)
  top_k: NonNegInt = 0  # (0: off)
  top_p: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0  # nucleus (1: off)


@_section("objective")
class ObjectiveConfig(_Section):
  """The distillation objective (`objective`): a weighted sum of loss terms, optionally on
  the student's own samples (`on_policy`)."""

  terms: tuple[TermConfig, ...] = ()  # at least one, with some non-zero weight
  on_policy: Optional[OnPolicyConfig] = None  # [off: every step on the data]

  @model_validator(mode="after")
  def _rules(self):
    if self.terms and not any(t.can_contribute() for t in self.terms):
      raise _invalid("@terms: all weights are zero; give some term a weight > 0", "terms")
    for i, t in enumerate(self.terms):
      if t.name and t.name in [u.name for u in self.terms[:i]]:
        raise _invalid(f"@terms[{i}].name: {t.name!r} is used by an earlier term", f"terms[{i}].name")
    return self

  def metric_names(self) -> list[str]:
    """The terms' metric keys: ``name``, else the loss name; repeats get ``_2``, ``_3``..."""
    out: list[str] = []
    for t in self.terms:
      name, k = t.name or t.loss, 2
      while name in out or name in _RESERVED_METRICS:
        name, k = f"{t.name or t.loss}_{k}", k + 1
      out.append(name)
    return out

  def resolve(self, teachers: Optional[Sequence[str]] = None, steps: int = 1) -> tuple[TermConfig, ...]:
    """The terms with every default filled in: metric name, teacher (the first of `teachers`,
    ``"teacher"`` without; all of them for ensemble_kl), the loss's options, schedules
    (``start``: the weight/temperature, ``end``: ``start``, ``steps``: `steps`)."""
    losses, out = _losses(), []
    for i, (t, name) in enumerate(zip(self.terms, self.metric_names())):
      spec, teacher = losses[t.loss], t.teacher
      if teacher is None and "teacher" in spec.options:
        if spec.multi_teacher and not teachers:
          _fail(f"objective.terms[{i}].teacher: {t.loss} needs a list of teacher names")
        teacher = tuple(teachers) if spec.multi_teacher else (teachers[0] if teachers else "teacher")
      elif spec.multi_teacher and isinstance(teacher, str):
        teacher = (teacher,)
      fill = {k: v for k, v in _TERM_DEFAULTS.items() if k in spec.options and getattr(t, k) is None}
      t = dataclasses.replace(t, name=name, teacher=teacher, **fill)
      for key, base in (("weight_schedule", t.weight), ("temperature_schedule", t.temperature or 1.0)):
        s = getattr(t, key)
        if s is not None:
          start = base if s.start is None else s.start
          s = ScheduleConfig(s.kind, start, start if s.end is None else s.end, s.steps or steps)
          t = dataclasses.replace(t, **{key: s})
      out.append(t)
    return tuple(out)


@_section("data")
class DataConfig(_Section):
  """Training and validation text (`data`)."""

  source: str = "pydoc"  # pydoc (built-in offline Python docs), a hub dataset id, or a local file/dir
  name: Optional[str] = None  # hub dataset config name (e.g. sst2 of glue)
  split: str = "train"
  validation_split: Optional[str] = None  # [carve validation_fraction of split; pydoc has its own]
  validation_fraction: Fraction = 0.05
  # one text column, or two for text pairs (a single name may be given as a string)
  text_columns: Annotated[tuple[str, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v),
                          Field(min_length=1, max_length=2)] = ("text",)
  label_column: Optional[str] = None  # class labels (sequence classification / hard-label CE)
  # causal LM: completions of the prompts in text_columns[0]; the loss mask covers them only
  completion_column: Optional[str] = None
  format: Literal["auto", "json", "jsonl", "csv", "tsv", "parquet", "text"] = "auto"  # of local files
  max_length: PosInt = 128  # tokens per example (causal LM: packed row length)
  global_batch_size: PosInt = 32  # examples per micro-step over all hosts/devices
  eval_batch_size: Optional[PosInt] = None  # [global_batch_size]
  mlm_probability: Fraction = 0.15
  packing: Bool = True  # causal LM: pack documents into full rows (EOS-separated)
  buckets: Bool = True  # pad to a few power-of-two lengths instead of always max_length
  shuffle_seed: Optional[Int] = None  # [train.seed]
  max_examples: Optional[PosInt] = None  # [all]
  num_workers: NonNegInt = 0  # tokenization processes (0: in-process)
  prefetch: NonNegInt = 2  # batches prepared ahead
  cache_dir: Optional[str] = None  # datasets cache [the HF default]

  @model_validator(mode="after")
  def _rules(self):
    if not self.source.strip():
      raise _invalid("@source must be 'pydoc', a hub dataset id or a local path", "source")
    if self.completion_column is not None and len(self.text_columns) != 1:
      raise _invalid(f"@completion_column needs exactly one prompt column in @text_columns, got "
                     f"{list(self.text_columns)}", "completion_column", "text_columns")
    return self


@_section("generate")
class GenerateConfig(_Section):
  """Sequence-level KD (`generate`, ``distill-jax generate``): the main teacher continues the
  prompts of a data set and writes ``{"prompt", "completion"}`` JSON lines to `output`, which
  training reads with ``data.text_columns: [prompt]`` and ``data.completion_column: completion``."""

  source: str = "pydoc"  # the prompts: as data.source
  split: str = "train"
  prompt_column: str = "text"
  output: str = "teacher_completions.jsonl"
  prompt_length: PosInt = 64  # prompt tokens kept (the first ones)
  max_new_tokens: PosInt = 64
  temperature: NonNegFloat = 0.0  # 0: greedy
  top_k: NonNegInt = 0  # (0: off)
  top_p: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0  # nucleus (1: off)
  batch_size: PosInt = 16  # prompts per generate call
  max_prompts: Optional[PosInt] = None  # [all]
  seed: Int = 0  # of the sampling (temperature > 0)

  @model_validator(mode="after")
  def _rules(self):
    if not self.output.strip():
      raise _invalid("@output must be a non-empty path", "output")
    return self


@_section("optimizer")
class OptimizerConfig(_Section):
  """The student's optax optimizer (`optimizer`)."""

  name: Literal["adamw", "adafactor", "sgd"] = "adamw"
  learning_rate: PosFloat = 1e-4  # peak
  schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
  warmup_steps: NonNegInt = 0  # linear from 0 (clamped to train.steps)
  final_lr_fraction: Unit = 0.0  # learning rate at the last step / peak
  weight_decay: NonNegFloat = 0.01  # decoupled; never on norms and biases
  b1: UnitOpen = 0.9  # Adam β1; SGD momentum
  b2: UnitOpen = 0.999
  eps: PosFloat = 1e-8
  clip_norm: Optional[PosFloat] = 1.0  # global gradient-norm clipping (null: off)
  grad_accum_steps: PosInt = 1  # micro-batches per update (optax.MultiSteps)


@_section("train")
class TrainConfig(_Section):
  """The training loop (`train`)."""

  steps: PosInt = 1000  # optimizer updates
  seed: Int = 0  # of everything random (init, dropout, data order unless overridden)
  run_dir: str = "runs/default"  # config, metrics, checkpoints, report, exported student
  log_every: PosInt = 10
  eval_every: NonNegInt = 0  # (0: only before and after training)
  eval_batches: NonNegInt = 0  # validation batches per evaluation (0: all)
  max_nonfinite_steps: PosInt = 10  # consecutive skipped non-finite steps before stopping with an error
  precision: Literal["default", "high", "highest"] = "default"  # jax_default_matmul_precision

  @model_validator(mode="after")
  def _rules(self):
    if not self.run_dir.strip():
      raise _invalid("@run_dir must be a non-empty path", "run_dir")
    return self


@_section("mesh")
class MeshConfig(_Section):
  """Device parallelism (`mesh`): ``jit`` (NamedSharding over ``(data, fsdp, tensor)``) or
  ``pmap`` (replicated state; ``fsdp`` and ``tensor`` must be 1)."""

  mode: Literal["jit", "pmap"] = "jit"
  data: Int = -1  # size of the data axis (-1: the devices left over)
  fsdp: Int = 1  # params sharded over it (-1: the devices left over)
  tensor: PosInt = 1  # heads, MLP width and vocabulary split over it

  @model_validator(mode="after")
  def _rules(self):
    for name in ("data", "fsdp"):
      value = getattr(self, name)
      if value != -1 and value < 1:
        raise _invalid(f"@{name} must be -1 (all remaining devices) or >= 1, got {value}", name)
    if self.data == -1 and self.fsdp == -1:
      raise _invalid("@data and @fsdp cannot both be -1", "data", "fsdp")
    for name in ("fsdp", "tensor"):
      if self.mode == "pmap" and getattr(self, name) != 1:
        raise _invalid(f"@{name} must be 1 when @mode is pmap, got {getattr(self, name)}", name, "mode")
    return self


@_section("distributed")
class DistributedConfig(_Section):
  """Multi-host start-up with ``jax.distributed.initialize`` (`distributed`): on when
  ``coordinator`` is set or ``initialize`` is true."""

  coordinator: Optional[str] = None  # host:port of process 0
  num_processes: Optional[PosInt] = None  # required with coordinator
  process_id: Optional[NonNegInt] = None  # in [0, num_processes); required with coordinator
  initialize: Bool = False  # initialize without a coordinator (JAX detects TPU pods, SLURM)
  heartbeat_timeout_s: PosInt = 100  # a process silent that long counts as dead
  initialization_timeout_s: PosInt = 300  # to wait for every process to join

  @property
  def enabled(self) -> bool:
    """Whether this run calls ``jax.distributed.initialize``."""
    return self.initialize or self.coordinator is not None

  @model_validator(mode="after")
  def _rules(self):
    if self.coordinator is not None:
      if not re.fullmatch(r"[^\s:]+:\d{1,5}", self.coordinator):
        raise _invalid(f"@coordinator must be 'host:port', got {self.coordinator!r}", "coordinator")
      for name in ("num_processes", "process_id"):
        if getattr(self, name) is None:
          raise _invalid(f"@{name} is required when @coordinator is set", name, "coordinator")
    n = self.num_processes
    if self.process_id is not None and n is not None and self.process_id >= n:
      raise _invalid(f"@process_id must be in [0, {n}), got {self.process_id}", "process_id")
    return self


@_section("checkpoint")
class CheckpointConfig(_Section):
  """Orbax checkpoints of the student (`checkpoint`), in ``<train.run_dir>/checkpoints``."""

  every: NonNegInt = 100  # steps between saves (0: at the end and on preemption only)
  keep_last: PosInt = 2
  keep_best: NonNegInt = 0  # best by best_metric, kept in addition (0: off)
  best_metric: str = "eval/loss"
  best_mode: Literal["min", "max"] = "min"
  async_save: Bool = True  # write in the background
  fallback: Bool = False  # resume from the previous good checkpoint when the latest is corrupt
  resume: Bool = True  # from the latest checkpoint in the run directory

  @model_validator(mode="after")
  def _rules(self):
    if self.keep_best and not self.best_metric.strip():
      raise _invalid("@best_metric must name an eval metric when @keep_best > 0", "best_metric", "keep_best")
    return self


@_section("eval")
class EvalConfig(_Section):
  """The evaluation report (`eval`)."""

  before_and_after: Bool = True  # also evaluate the undistilled student
  throughput_batches: NonNegInt = 5  # timed inference batches of teacher and student (0: skip)


@_section("export")
class ExportConfig(_Section):
  """Export of the student as a Hugging Face checkpoint at the end (`export`)."""

  enabled: Bool = True
  dir: Optional[str] = None  # [<train.run_dir>/student]
  overwrite: Bool = False  # replace a non-empty directory


@_section("logging")
class LoggingConfig(_Section):
  """Where metrics go (`logging`); written once on multi-host."""

  tensorboard: Bool = True
  jsonl: Bool = True  # metrics.jsonl in the run directory
  progress_bar: Bool = True


@_section("")
class Config(_Section):
  """The whole run configuration, the root of the schema. ``teacher: {...}`` is shorthand
  for ``teachers: {teacher: {...}}``."""

  teachers: dict[str, TeacherConfig] = _field(dict)  # at least one
  student: StudentConfig = _field(StudentConfig)
  objective: ObjectiveConfig = _field(ObjectiveConfig)  # at least one term
  data: DataConfig = _field(DataConfig)
  optimizer: OptimizerConfig = _field(OptimizerConfig)
  train: TrainConfig = _field(TrainConfig)
  mesh: MeshConfig = _field(MeshConfig)
  distributed: DistributedConfig = _field(DistributedConfig)
  checkpoint: CheckpointConfig = _field(CheckpointConfig)
  eval: EvalConfig = _field(EvalConfig)
  export: ExportConfig = _field(ExportConfig)
  logging: LoggingConfig = _field(LoggingConfig)
  generate: GenerateConfig = _field(GenerateConfig)  # `distill-jax generate` only

  @model_validator(mode="before")
  @classmethod
  def _shorthand(cls, data: Any) -> Any:
    raw = data.kwargs if isinstance(data, ArgsKwargs) else data
    if isinstance(raw, Mapping) and "teacher" in raw:
      if "teachers" in raw:
        raise _invalid("give either 'teacher' (one teacher) or 'teachers' (name -> teacher), not both")
      raw = {("teachers" if k == "teacher" else k): ({"teacher": v} if k == "teacher" else v) for k, v in raw.items()}
      return ArgsKwargs(data.args, raw) if isinstance(data, ArgsKwargs) else raw
    return data

  @model_validator(mode="after")
  def _rules(self):
    names = list(self.teachers)
    if not names:
      raise _invalid("teachers must name at least one teacher, e.g. 'teacher: {path: gpt2}'")
    for name in names:
      if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise _invalid(f"teachers: name {name!r} must be an identifier (letters, digits, _ and -)")
    allowed = ", ".join(names)

    def known(name: Optional[str], path: str) -> None:
      if name is not None and name not in self.teachers:
        raise _invalid(f"{path} must name a teacher ({allowed}), got {name!r}")

    known(self.student.teacher, "student.teacher")
    source = self.student.teacher or names[0]
    if self.student.init == "from_teacher" and self.teachers[source].path == SELF_TEACHER:
      raise _invalid(f"student.init must be 'path' or 'config' when teacher {source!r} is the student itself "
                     f"(teachers.{source}.path: {SELF_TEACHER})")
    if not self.objective.terms:
      raise _invalid("objective.terms must list at least one term, e.g. '- {loss: forward_kl}'")
    losses = _losses()
    for i, term in enumerate(self.objective.terms):
      path = f"objective.terms[{i}].teacher"
      for j, name in enumerate(term.teachers):
        known(name, f"{path}[{j}]" if isinstance(term.teacher, tuple) else path)
      spec = losses[term.loss]
      if term.teacher is None and len(names) > 1 and "teacher" in spec.options and not spec.multi_teacher:
        raise _invalid(f"{path} is required when there are several teachers ({allowed})")
    on_policy = self.objective.on_policy
    if on_policy is not None and on_policy.prompt_length > self.data.max_length:
      raise _invalid(f"objective.on_policy.prompt_length ({on_policy.prompt_length}) must be <= data.max_length "
                     f"({self.data.max_length})")
    ckpt = self.checkpoint
    logged = ["eval/loss"] + [f"eval/{n}" for n in self.objective.metric_names()]
    if ckpt.keep_best and ckpt.best_metric not in logged:
      raise _invalid(f"checkpoint.best_metric {ckpt.best_metric!r} is not an eval metric the trainer logs; "
                     f"allowed: {', '.join(logged)}")
    procs = self.distributed.num_processes
    if procs and self.data.global_batch_size % procs:
      raise _invalid(f"data.global_batch_size ({self.data.global_batch_size}) must be divisible by "
                     f"distributed.num_processes ({procs})")
    return self

  def resolved_terms(self) -> tuple[TermConfig, ...]:
    """The terms with every default filled in (see :meth:`ObjectiveConfig.resolve`), as
    ``distill_jax.objective.build_objective`` takes them."""
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
    _fail(f"the top level must be a mapping of sections, got {_describe(raw)}")
  try:
    return _adapter(Config).validate_python(raw)
  except ValidationError as e:
    raise ConfigError(_error_line(e)) from None


# key.sub[0].x: what an override may address (OmegaConf takes more, e.g. `a..b`).
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][\w\-]*(\[\d+\])*(\.[A-Za-z_][\w\-]*(\[\d+\])*)*")


def _override(node: DictConfig, item: str) -> None:
  """Applies one ``key.sub[i]=value`` override (the value parsed as YAML by OmegaConf)."""
  key, sep, text = item.partition("=")
  key = key.strip()
  if not sep or not _OVERRIDE_KEY.fullmatch(key):
    _fail(f"malformed override {item!r}; expected key.sub=value or key.list[0].sub=value (e.g. train.steps=10)")
  if key == "teacher" or key.startswith(("teacher.", "teacher[")):
    key = f"teachers.{key}"  # the `teacher:` shorthand
  try:
    value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
  except yaml.YAMLError:
    _fail(f"malformed override {item!r}: the value is not valid YAML")
  while True:
    try:
      return OmegaConf.update(node, key, value, merge=False)
    except ConfigIndexError as e:  # an index one past the end of a list appends an item
      items, at = e.parent_node, e.key
      if not isinstance(items, ListConfig) or at != len(items):
        where = str(e.full_key).rpartition("[")[0]
        _fail(f"override {item!r}: {e.full_key} is out of range ({where} has {len(items or ())} items)")
      items.append({})
    except (OmegaConfBaseException, ValueError) as e:
      _fail(f"override {item!r}: {first_line(e)}")


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
      _fail(f"file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
      text = f.read()
  try:
    node = OmegaConf.create(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}" if mark is not None else ""
    _fail(f"cannot parse {where}{at}: {getattr(e, 'problem', None) or first_line(e)}")
  except (AssertionError, OmegaConfBaseException):  # a scalar document
    node = None
  if not isinstance(node, DictConfig):
    _fail(f"{where}: the top level must be a mapping of sections")
  if "teacher" in node and "teachers" not in node:  # so that teachers.teacher.x=... overrides it
    node["teachers"] = {"teacher": node.pop("teacher")}
  for item in overrides:
    _override(node, item)
  try:
    raw = OmegaConf.to_container(node, resolve=True)
  except OmegaConfBaseException as e:
    _fail(f"{getattr(e, 'full_key', None) or where}: {first_line(e)}")
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
  """Resolves a ``pkg:<module>`` model path to the package's model directory; other values
  (local paths, hub ids, ``student``) are returned unchanged.

  Raises:
    ConfigError: naming `field` when the package is not installed.
  """
  if not path.startswith(PKG_PREFIX):
    return path
  module_name = path[len(PKG_PREFIX):]
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    _fail(f"{field}: package module {module_name!r} is not installed (pip install {module_name.replace('_', '-')})")
  getter = getattr(module, "get_model_path", None)
  if getter is None:
    _fail(f"{field}: package {module_name!r} has no get_model_path()")
  return os.fspath(getter())


# ----------------------------------------------------------------------------------------
# Checkpoint compatibility and the start-up summary.

# Dotted paths (``*``: any name or index) whose change makes a checkpoint of the run
# incompatible: model identities and shapes, projection/term structure, optimizer state
# structure. Everything else (steps, logging, data, learning rate...) may change on resume.
SHAPE_KEYS: tuple[str, ...] = (
    "teachers.*.path", "teachers.*.task", "teachers.*.num_labels",
    "student.init", "student.teacher", "student.path", "student.task", "student.num_layers",
    "student.layers", "student.hidden_size", "student.config", "student.num_labels", "student.param_dtype",
    "objective.terms[*].loss", "objective.terms[*].name", "objective.terms[*].teacher",
    "objective.terms[*].layers", "objective.terms[*].projection", "objective.terms[*].include_embeddings",
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
  teachers = "; ".join(f"{name} = {t.path} ({t.task}, {t.dtype})" for name, t in config.teachers.items())
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
