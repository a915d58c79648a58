"""The home of a loss term: its registry entry, its schema, its defaults and its schedules.

* `LOSSES` — the registry: per loss name a `LossSpec` (the `distill_jax.losses` function,
  the model outputs it reads, the kind of inputs it compares, the term fields it takes).
* `TermConfig` / `ScheduleConfig` / `ObjectiveConfig` / `OnPolicyConfig` — the schema of
  ``objective`` in a run config (pydantic sections; one-line errors naming the field).
* `TERM_DEFAULTS` — what an unset option means (the one place defaults live).
* `schedule_value`, `weight_at`, `temperature_at` — pure functions of the step, run inside
  the jitted step; the schema classes are data only.

`distill_jax.objective.objective` binds resolved terms to models and computes them.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from pydantic import BeforeValidator, Field, StrictFloat, model_validator

from distill_jax import losses
from distill_jax.schema import (RESERVED_METRICS, Bool, ConfigError, Float, NonNegFloat, NonNegInt, PosFloat, PosInt,
                                Section, Unit, UnitOpen, describe, fail, invalid, section)

# --------------------------------------------------------------------------- the registry

LOGIT_FAMILY, FEATURE_FAMILY, RELATION_FAMILY, LABEL_FAMILY = "logits", "features", "relations", "labels"
DEFAULT_TOP_K = 128  # entries a sparse_* term keeps of a live teacher



@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Registry entry of a loss: its function, what it needs from the models, the term fields it takes.

  Attributes:
    family: ``logits | labels | features | relations``.
    outputs: model outputs the loss reads (the first is the one compared).
    options: the term fields the loss accepts.
    fn: the loss function of `distill_jax.losses`.
    inputs: what `fn` compares: ``logits`` (student vs teacher), ``sparse`` (student logits
      vs the teacher's top-k ids, log-probabilities and tail: cached or from its logits), ``labels`` (student vs
      ``batch["labels"]``), ``layer_pairs`` (mapped layers of ``outputs[0]``), ``cls`` (the
      first token's last hidden state), ``pooled`` (pooled last hidden states) or ``batch``
      (pooled states of the whole global batch).
    kwargs: keyword arguments of `fn`: term fields, or ``temperature`` (at the step),
      ``key_mask`` (the attention mask) and ``num_heads``.
    multi_teacher: the term compares with several teachers at once (``teacher`` is a list).
    doc: one line.
  """

  family: str
  outputs: tuple[str, ...]
  options: frozenset[str]
  fn: Callable[..., jax.Array]
  inputs: str
  kwargs: tuple[str, ...] = ()
  multi_teacher: bool = False
  doc: str = ""

  @property
  def attention(self) -> bool:
    """Whether the loss maps attention layers (1-based, no embeddings) rather than hidden states."""
    return self.inputs == "layer_pairs" and self.outputs[0] != "hidden_states"


_COMMON = {"loss", "name", "weight", "weight_schedule"}
_LOGIT = _COMMON | {"teacher", "temperature", "temperature_schedule", "positions"}
_SPARSE = _LOGIT | {"top_k"}
_FEATURE = _COMMON | {"teacher", "layers", "include_embeddings", "projection"}
_ATTENTION = _COMMON | {"teacher", "layers"}
_POOLED = _COMMON | {"teacher", "pooling", "projection"}
_BATCH_RELATION = _COMMON | {"teacher", "pooling"}


def _spec(family, outputs, options, fn, inputs, doc, kwargs=(), multi_teacher=False) -> LossSpec:
  return LossSpec(family, (outputs,), frozenset(options), fn, inputs, tuple(kwargs), multi_teacher, doc)


_T = ("temperature",)
LOSSES: dict[str, LossSpec] = {
    "forward_kl": _spec(LOGIT_FAMILY, "logits", _LOGIT, losses.forward_kl, "logits",
                        "KL(p_T‖p_S)·T² (Hinton et al. 2015)", _T),
    "reverse_kl": _spec(LOGIT_FAMILY, "logits", _LOGIT, losses.reverse_kl, "logits", "KL(p_S‖p_T)·T²", _T),
    "generalized_jsd": _spec(LOGIT_FAMILY, "logits", _LOGIT | {"beta", "normalized"}, losses.generalized_jsd,
                             "logits", "generalized JSD (GKD, Agarwal et al. 2024)", _T + ("beta", "normalized")),
    "skew_kl": _spec(LOGIT_FAMILY, "logits", _LOGIT | {"skew"}, losses.skew_kl, "logits", "skew KL (DistiLLM)",
                     _T + ("skew",)),
    "skew_reverse_kl": _spec(LOGIT_FAMILY, "logits", _LOGIT | {"skew"}, losses.skew_reverse_kl, "logits",
                             "skew reverse KL (DistiLLM)", _T + ("skew",)),
    "total_variation": _spec(LOGIT_FAMILY, "logits", _LOGIT, losses.total_variation, "logits",
                             "total variation distance", _T),
    "ensemble_kl": _spec(LOGIT_FAMILY, "logits", _LOGIT, losses.forward_kl, "logits",
                         "forward KL to the teachers' mean distribution", _T, multi_teacher=True),
    # Against a top-k teacher with a tail bucket: the offline cache (teachers.<name>.cache) or a
    # live teacher's exact top-k (`top_k` entries).
    "sparse_forward_kl": _spec(LOGIT_FAMILY, "logits", _SPARSE, losses.sparse_forward_kl, "sparse",
                               "KL(p_T‖p_S)·T² over the teacher's top-k + a tail bucket", _T),
    "sparse_reverse_kl": _spec(LOGIT_FAMILY, "logits", _SPARSE, losses.sparse_reverse_kl, "sparse",
                               "KL(p_S‖p_T)·T² over the teacher's top-k + a tail bucket", _T),
    "sparse_generalized_jsd": _spec(LOGIT_FAMILY, "logits", _SPARSE | {"beta", "normalized"},
                                    losses.sparse_generalized_jsd, "sparse",
                                    "generalized JSD over the teacher's top-k + a tail bucket",
                                    _T + ("beta", "normalized")),
    # Across tokenizers: at the student's span-final tokens against the teacher's same span's last
    # token (batch: teacher_input_ids/teacher_attention_mask/student_span_end/teacher_index).
    "uld": _spec(LOGIT_FAMILY, "logits", _LOGIT | {"top_k"}, losses.uld, "cross_tokenizer",
                 "Universal Logit Distillation across tokenizers (Boizard et al. 2024)", _T + ("top_k",)),
    "hybrid_uld": _spec(LOGIT_FAMILY, "logits", _LOGIT | {"top_k"}, losses.hybrid_uld, "cross_tokenizer",
                        "KL over shared tokens + ULD on the rest, across tokenizers (TRL GOLD)", _T + ("top_k",)),
    "cross_entropy": _spec(LABEL_FAMILY, "logits", _COMMON | {"label_smoothing", "positions"}, losses.cross_entropy,
                           "labels", "hard-label cross-entropy of the student", ("label_smoothing",)),
    "hidden_mse": _spec(FEATURE_FAMILY, "hidden_states", _FEATURE, losses.hidden_mse, "layer_pairs",
                        "MSE of mapped hidden states"),
    "hidden_cosine": _spec(FEATURE_FAMILY, "hidden_states", _FEATURE, losses.cosine_distance, "layer_pairs",
                           "cosine distance of mapped hidden states"),
    "cls_mse": _spec(FEATURE_FAMILY, "hidden_states", _COMMON | {"teacher", "projection"}, losses.hidden_mse, "cls",
                     "MSE of the first-token (CLS) last hidden state"),
    "pooled_mse": _spec(FEATURE_FAMILY, "hidden_states", _POOLED, losses.hidden_mse, "pooled",
                        "MSE of pooled last hidden states"),
    "pooled_cosine": _spec(FEATURE_FAMILY, "hidden_states", _POOLED, losses.cosine_distance, "pooled",
                           "cosine distance of pooled states"),
    "attention_mse": _spec(FEATURE_FAMILY, "attention_scores", _ATTENTION, losses.attention_mse, "layer_pairs",
                           "TinyBERT attention-score MSE", ("key_mask",)),
    "attention_kl": _spec(FEATURE_FAMILY, "attention_probs", _ATTENTION, losses.attention_kl, "layer_pairs",
                          "MiniLM attention KL"),
    "value_relation": _spec(FEATURE_FAMILY, "values", _ATTENTION, losses.value_relation_kl, "layer_pairs",
                            "MiniLM value-relation KL", ("num_heads", "key_mask")),
    "similarity_preserving": _spec(RELATION_FAMILY, "hidden_states", _BATCH_RELATION, losses.similarity_preserving,
                                   "batch", "batch Gram matrices of pooled states (Tung & Mori 2019)"),
    "rkd_distance": _spec(RELATION_FAMILY, "hidden_states", _BATCH_RELATION, losses.rkd_distance, "batch",
                          "RKD distance (Park et al. 2019)"),
    "rkd_angle": _spec(RELATION_FAMILY, "hidden_states", _BATCH_RELATION, losses.rkd_angle, "batch",
                       "RKD angle (Park et al. 2019)"),
    "token_relation": _spec(RELATION_FAMILY, "hidden_states", _COMMON | {"teacher", "layers", "kind"},
                            losses.token_relation, "layer_pairs", "token-token relation matrices of mapped layers",
                            ("kind",)),
}


# --------------------------------------------------------------------------- the schema


@section("objective.terms[<i>].<schedule>")
class ScheduleConfig(Section):
  """A value over steps: ``start + (end - start) * f(min(step / steps, 1))``, ``f(x) = x``
  (``linear``), ``(1 - cos(pi x)) / 2`` (``cosine``) or ``0`` (``constant``)."""

  kind: Literal["constant", "linear", "cosine"] = "constant"
  start: Optional[Float] = None  # [the term's weight / temperature]
  end: Optional[Float] = None  # [start]
  steps: Optional[PosInt] = None  # length of the ramp [train.steps; 1 without a config]


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


# The term fields that shape a checkpoint (projection params, metric names): changing one
# makes a run's checkpoint incompatible (`config.root.SHAPE_KEYS`).
TERM_SHAPE_FIELDS = ("loss", "name", "teacher", "layers", "projection", "include_embeddings")

# What an unset option of a term means to the losses that take it (the one place defaults live).
TERM_DEFAULTS = {"layers": "last", "projection": "none", "temperature": 1.0, "positions": "all", "beta": 0.5,
                  "normalized": False, "skew": 0.1, "label_smoothing": 0.0, "kind": "cosine", "pooling": "mean",
                  "include_embeddings": False}


@section("objective.terms[<i>]")
class TermConfig(Section):
  """One weighted loss term (`objective.terms[i]`).

  A loss takes only its own options (``LOSSES[loss].options``): setting e.g.
  ``beta`` on ``hidden_mse`` is an error. Unset (null) options take the default in brackets.
  """

  loss: str  # a name of LOSSES
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
    spec = LOSSES.get(self.loss)
    if spec is None:
      raise invalid(f"@loss: unknown loss {self.loss!r}; allowed: {', '.join(sorted(LOSSES))}", "loss")
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
  # causal LM logit/label terms from final hidden states + heads, this many sequence positions at a time
  # (never [B, T, V] logits); null: from the models' logits
  chunk_size: Optional[PosInt] = losses.DEFAULT_CHUNK_SIZE

  @model_validator(mode="after")
  def _rules(self):
    if self.terms and not any(t.can_contribute() for t in self.terms):
      raise invalid("@terms: all weights are zero; give some term a weight > 0", "terms")
    for i, t in enumerate(self.terms):
      if t.name and t.name in [u.name for u in self.terms[:i]]:
        raise invalid(f"@terms[{i}].name: {t.name!r} is used by an earlier term", f"terms[{i}].name")
      if self.on_policy is not None and LOSSES[t.loss].inputs == "cross_tokenizer":
        raise invalid(f"@on_policy: terms[{i}] ({t.loss}) aligns the teacher's tokenizer to the student's on the "
                      "host; on-policy samples would need host re-tokenization, which is not supported", "on_policy")
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
    out = []
    for i, (t, name) in enumerate(zip(self.terms, self.metric_names())):
      spec, teacher = LOSSES[t.loss], t.teacher
      if teacher is None and "teacher" in spec.options:
        if spec.multi_teacher and not teachers:
          fail(f"objective.terms[{i}].teacher: {t.loss} needs a list of teacher names")
        teacher = tuple(teachers) if spec.multi_teacher else (teachers[0] if teachers else "teacher")
      elif spec.multi_teacher and isinstance(teacher, str):
        teacher = (teacher,)
      fill = {k: v for k, v in TERM_DEFAULTS.items() if k in spec.options and getattr(t, k) is None}
      t = dataclasses.replace(t, name=name, teacher=teacher, **fill)
      for key, base in (("weight_schedule", t.weight), ("temperature_schedule", t.temperature or 1.0)):
        s = getattr(t, key)
        if s is not None:
          start = base if s.start is None else s.start
          s = ScheduleConfig(s.kind, start, start if s.end is None else s.end, s.steps or steps)
          t = dataclasses.replace(t, **{key: s})
      out.append(t)
    return tuple(out)


# --------------------------------------------------------------------------- schedules (in the step)


def schedule_value(schedule: ScheduleConfig, step: Any) -> jax.Array:
  """``start + (end - start) * f(min(step / steps, 1))`` as float32 (jittable in `step`)."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(schedule.steps or 1, 1), 0.0, 1.0)
  if schedule.kind == "constant":
    return jnp.asarray(schedule.start, jnp.float32)
  if schedule.kind == "linear":
    return schedule.start + (schedule.end - schedule.start) * frac
  return schedule.end + (schedule.start - schedule.end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def weight_at(term: TermConfig, step: Any):
  """The term's weight at `step`: its ``weight_schedule`` when set, else the static ``weight``."""
  return term.weight if term.weight_schedule is None else schedule_value(term.weight_schedule, step)


def temperature_at(term: TermConfig, step: Any):
  """The term's temperature at `step`: ``temperature_schedule`` when set, else ``temperature``."""
  return term.temperature if term.temperature_schedule is None else schedule_value(term.temperature_schedule, step)


# --------------------------------------------------------------------------- validation (no models)


def term_error(i: int, field: str, message: str) -> ValueError:
  """The one-line error of term `i`'s `field`."""
  return ValueError(f"objective.terms[{i}].{field}: {message}")


def validate_terms(terms: Sequence[Mapping[str, Any] | TermConfig]) -> tuple[TermConfig, ...]:
  """Checks terms without models and returns them with their defaults filled in.

  The schema is `TermConfig`'s and the list's `ObjectiveConfig`;
  see ``ObjectiveConfig.resolve`` for the defaults (a term without ``teacher`` reads
  ``"teacher"``; schedules without ``steps`` ramp over 1 step).

  Raises:
    ValueError: a one-line `ConfigError` naming ``objective.terms[i].<field>``.
  """
  if isinstance(terms, (str, bytes, Mapping)) or not isinstance(terms, Sequence) or not terms:
    raise ConfigError(f"config: objective.terms must list at least one term, e.g. "
                                 f"'- {{loss: forward_kl}}', got {terms!r}")
  return ObjectiveConfig(terms=tuple(terms)).resolve()


