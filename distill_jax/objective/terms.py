"""The objective's sections: loss terms, their schedules, on-policy distillation.

:class:`TermConfig` is the one term schema (``distill_jax.objective.objective.Term``); which options a
loss takes comes from the registry ``distill_jax.objective.objective.LOSSES`` (imported lazily, so
that reading a config imports no jax).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

from pydantic import BeforeValidator, Field, StrictFloat, model_validator

from distill_jax.schema import (RESERVED_METRICS, Bool, Float, NonNegFloat, NonNegInt, PosFloat, PosInt,
                                       Section, Unit, UnitOpen, describe, fail, invalid, section)

@section("objective.terms[<i>].<schedule>")
class ScheduleConfig(Section):
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
    raise invalid(f"must be one of {', '.join(_LAYER_MAPS)}, a non-empty list of teacher layers or of "
                   f"[student_layer, teacher_layer] pairs, got {describe(value)}")
  if all(map(is_int, value)):
    items, flat = tuple(value), tuple(value)
  elif all(isinstance(x, (list, tuple)) and len(x) == 2 and all(map(is_int, x)) for x in value):
    items = tuple((x[0], x[1]) for x in value)
    flat = tuple(v for x in items for v in x)
  else:
    raise invalid(f"must be a list of ints (teacher layers) or of [student_layer, teacher_layer] int pairs, "
                   f"got {describe(value)}")
  if any(v < 0 for v in flat):
    raise invalid(f"layer indices must be >= 0 (1-based, 0 = embeddings), got {describe(value)}")
  return items


def _teacher_names(value: Any) -> Any:
  if value is None or (isinstance(value, str) and value):
    return value
  if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
    return tuple(value)
  raise invalid(f"must be a teacher name or a non-empty list of names, got {describe(value)}")


# What an unset option of a term means to the losses that take it.
_TERM_DEFAULTS = {"layers": "last", "projection": "none", "temperature": 1.0, "positions": "all", "beta": 0.5,
                  "normalized": False, "skew": 0.1, "label_smoothing": 0.0, "kind": "cosine", "pooling": "mean",
                  "include_embeddings": False}


def losses_registry() -> Mapping[str, Any]:
  """The loss registry: name -> spec with ``options`` (the term fields it takes), ``multi_teacher``."""
  return importlib.import_module("distill_jax.objective.objective").LOSSES


@section("objective.terms[<i>]")
class TermConfig(Section):
  """One weighted loss term (`objective.terms[i]`; ``distill_jax.objective.objective.Term``).

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
  top_k: Optional[PosInt] = None  # sparse_* terms: teacher entries kept [a cache's own; 128 of a live teacher]
  weight_schedule: Optional[ScheduleConfig] = None  # replaces weight over steps
  temperature_schedule: Optional[ScheduleConfig] = None  # replaces temperature over steps

  @model_validator(mode="after")
  def _rules(self):
    losses = losses_registry()
    spec = losses.get(self.loss)
    if spec is None:
      raise invalid(f"@loss: unknown loss {self.loss!r}; allowed: {', '.join(sorted(losses))}", "loss")
    for f in dataclasses.fields(self):
      if getattr(self, f.name) is not None and f.name not in spec.options:
        raise invalid(f"@{f.name}: not an option of {self.loss}; allowed: {', '.join(sorted(spec.options))}", f.name)
    if self.name is not None and not self.name.strip():
      raise invalid("@name must be a non-empty metric name", "name")
    if isinstance(self.teacher, tuple) and not spec.multi_teacher:
      raise invalid(f"@teacher: {self.loss} takes one teacher name; average several with ensemble_kl", "teacher")
    for key, low in (("weight_schedule", ">="), ("temperature_schedule", ">")):
      for end in ("start", "end"):
        value = getattr(getattr(self, key), end, None)
        if value is not None and (value < 0 or (low == ">" and value == 0)):
          raise invalid(f"@{key}.{end} must be {low} 0, got {value:g}", f"{key}.{end}")
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


@section("objective.on_policy")
class OnPolicyConfig(Section):
  """On-policy distillation (`objective.on_policy`, GKD, Agarwal et al. 2024; causal LM):
  with probability `lmbda` per step the student continues the first `prompt_length` tokens
  of each row by `max_new_tokens` sampled tokens and the logit terms score those tokens only
  (``distill_jax.training.on_policy``)."""

  lmbda: Unit = 0.5  # probability of an on-policy step (0: supervised only, 1: always)
  prompt_length: PosInt = 32  # tokens of each row that prompt the student (<= data.max_length)
  max_new_tokens: PosInt = 16
  temperature: NonNegFloat = 1.0  # of the student's sampling (0: greedy)
  top_k: NonNegInt = 0  # (0: off)
  top_p: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0  # nucleus (1: off)


@section("objective")
class ObjectiveConfig(Section):
  """The distillation objective (`objective`): a weighted sum of loss terms, optionally on
  the student's own samples (`on_policy`)."""

  terms: tuple[TermConfig, ...] = ()  # at least one, with some non-zero weight
  on_policy: Optional[OnPolicyConfig] = None  # [off: every step on the data]

  @model_validator(mode="after")
  def _rules(self):
    if self.terms and not any(t.can_contribute() for t in self.terms):
      raise invalid("@terms: all weights are zero; give some term a weight > 0", "terms")
    for i, t in enumerate(self.terms):
      if t.name and t.name in [u.name for u in self.terms[:i]]:
        raise invalid(f"@terms[{i}].name: {t.name!r} is used by an earlier term", f"terms[{i}].name")
    return self

  def metric_names(self) -> list[str]:
    """The terms' metric keys: ``name``, else the loss name; repeats get ``_2``, ``_3``..."""
    out: list[str] = []
    for t in self.terms:
      name, k = t.name or t.loss, 2
      while name in out or name in RESERVED_METRICS:
        name, k = f"{t.name or t.loss}_{k}", k + 1
      out.append(name)
    return out

  def resolve(self, teachers: Optional[Sequence[str]] = None, steps: int = 1) -> tuple[TermConfig, ...]:
    """The terms with every default filled in: metric name, teacher (the first of `teachers`,
    ``"teacher"`` without; all of them for ensemble_kl), the loss's options, schedules
    (``start``: the weight/temperature, ``end``: ``start``, ``steps``: `steps`)."""
    losses, out = losses_registry(), []
    for i, (t, name) in enumerate(zip(self.terms, self.metric_names())):
      spec, teacher = losses[t.loss], t.teacher
      if teacher is None and "teacher" in spec.options:
        if spec.multi_teacher and not teachers:
          fail(f"objective.terms[{i}].teacher: {t.loss} needs a list of teacher names")
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
