"""The distillation objective: a weighted sum of loss terms built from plain dicts.

A term is a mapping such as ``{"loss": "forward_kl", "weight": 0.5, "temperature": 2.0}``
or ``{"loss": "hidden_mse", "layers": "uniform", "projection": "linear", "teacher": "big"}``.
`validate_terms` checks the terms alone (no models); `build_objective` checks them
against the student and teachers (outputs available, vocabularies, layer ranges, widths)
and returns an `Objective`, a static callable bound into the jitted step.

Term schema (every field but ``loss`` optional; a loss accepts only the fields listed in
its `LossSpec.options`):

* ``loss``: a name of `LOSSES`.  ``name``: metric key (default: the loss name, suffixed
  ``_2``, ``_3``... on repeats).  ``weight`` (>= 0, default 1).
* ``teacher``: teacher name (default ``"teacher"``); a list for ``ensemble_kl``.
* logits: ``temperature`` (> 0), ``positions`` (``"all"`` real tokens | ``"labels"``:
  ``loss_mask``), ``beta`` in [0, 1] and ``normalized`` (generalized_jsd), ``skew`` in
  [0, 1] (skew KLs), ``label_smoothing`` in [0, 1) (cross_entropy).
* features: ``layers`` (``"last"`` | ``"uniform"`` | ``"all"`` (= uniform with the
  embeddings) | a list of teacher layers, one per student layer | explicit
  ``[[student_layer, teacher_layer], ...]``; 1-based, 0 = embeddings), ``include_embeddings``, ``projection`` (``"none"`` | ``"linear"``: a
  learned Dense per mapped layer on the student's last axis, needed when widths differ).
* relations: ``pooling`` (``"mean"`` | ``"cls"``, over the last hidden state), ``kind``
  (``"cosine"`` | ``"dot"`` | ``"euclidean"``, token_relation).
* ``weight_schedule`` / ``temperature_schedule``: ``{kind: constant|linear|cosine,
  start, end, steps}``; replaces the static value, evaluated at ``state.step``.

Metrics are ``{name: (sum, count)}`` with padding excluded; the loss is
``Σ weight · sum / count``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from distill_jax import losses

LOGIT_FAMILY, FEATURE_FAMILY, RELATION_FAMILY, LABEL_FAMILY = "logits", "features", "relations", "labels"
SCHEDULE_KINDS = ("constant", "linear", "cosine")
POOLINGS = ("mean", "cls")
RELATION_KINDS = ("cosine", "dot", "euclidean")
PROJECTIONS = ("none", "linear")
POSITIONS = ("all", "labels")
LM_TASKS = ("causal_lm", "masked_lm")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A scalar over steps: ``constant`` (start), ``linear`` or ``cosine`` from start to end."""

  kind: str = "constant"
  start: float = 1.0
  end: float = 1.0
  steps: int = 1

  def __call__(self, step: jax.Array) -> jax.Array:
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.steps, 1), 0.0, 1.0)
    if self.kind == "constant":
      return jnp.asarray(self.start, jnp.float32)
    if self.kind == "linear":
      return self.start + (self.end - self.start) * frac
    return self.end + (self.start - self.end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


@dataclasses.dataclass(frozen=True)
class Term:
  """One validated loss term (see the module docstring for the fields)."""

  loss: str
  name: str = ""
  weight: float = 1.0
  teacher: str | tuple[str, ...] = "teacher"
  layers: str | tuple = "last"
  projection: str = "none"
  temperature: float = 1.0
  beta: float = 0.5
  normalized: bool = False
  skew: float = 0.1
  label_smoothing: float = 0.0
  kind: str = "cosine"
  pooling: str = "mean"
  include_embeddings: bool = False
  positions: str = "all"
  weight_schedule: Optional[Schedule] = None
  temperature_schedule: Optional[Schedule] = None

  @property
  def teachers(self) -> tuple[str, ...]:
    if self.loss == "cross_entropy":
      return ()
    return self.teacher if isinstance(self.teacher, tuple) else (self.teacher,)

  def weight_at(self, step: jax.Array) -> float | jax.Array:
    """The weight at ``step``: ``weight_schedule`` when set, else the static ``weight``."""
    return self.weight if self.weight_schedule is None else self.weight_schedule(step)

  def temperature_at(self, step: jax.Array) -> float | jax.Array:
    """The temperature at ``step``: ``temperature_schedule`` when set, else ``temperature``."""
    return self.temperature if self.temperature_schedule is None else self.temperature_schedule(step)


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Registry entry: what a loss needs from the models and which term fields it takes."""

  family: str
  outputs: tuple[str, ...]
  options: frozenset[str]
  doc: str


_COMMON = {"loss", "name", "weight", "weight_schedule"}
_LOGIT = _COMMON | {"teacher", "temperature", "temperature_schedule", "positions"}
_FEATURE = _COMMON | {"teacher", "layers", "include_embeddings", "projection"}
_ATTENTION = _COMMON | {"teacher", "layers"}
_POOLED = _COMMON | {"teacher", "pooling", "projection"}
_BATCH_RELATION = _COMMON | {"teacher", "pooling"}


def _spec(family, outputs, options, doc):
  return LossSpec(family, tuple(outputs), frozenset(options), doc)


LOSSES: dict[str, LossSpec] = {
    "forward_kl": _spec(LOGIT_FAMILY, ["logits"], _LOGIT, "KL(p_T‖p_S)·T² (Hinton et al. 2015)"),
    "reverse_kl": _spec(LOGIT_FAMILY, ["logits"], _LOGIT, "KL(p_S‖p_T)·T²"),
    "generalized_jsd": _spec(LOGIT_FAMILY, ["logits"], _LOGIT | {"beta", "normalized"},
                             "generalized JSD (GKD, Agarwal et al. 2024)"),
    "skew_kl": _spec(LOGIT_FAMILY, ["logits"], _LOGIT | {"skew"}, "skew KL (DistiLLM)"),
    "skew_reverse_kl": _spec(LOGIT_FAMILY, ["logits"], _LOGIT | {"skew"}, "skew reverse KL (DistiLLM)"),
    "total_variation": _spec(LOGIT_FAMILY, ["logits"], _LOGIT, "total variation distance"),
    "ensemble_kl": _spec(LOGIT_FAMILY, ["logits"], _LOGIT, "forward KL to the teachers' mean distribution"),
    "cross_entropy": _spec(LABEL_FAMILY, ["logits"], (_COMMON | {"label_smoothing", "positions"}),
                           "hard-label cross-entropy of the student"),
    "hidden_mse": _spec(FEATURE_FAMILY, ["hidden_states"], _FEATURE, "MSE of mapped hidden states"),
    "hidden_cosine": _spec(FEATURE_FAMILY, ["hidden_states"], _FEATURE, "cosine distance of mapped hidden states"),
    "cls_mse": _spec(FEATURE_FAMILY, ["hidden_states"], _COMMON | {"teacher", "projection"},
                     "MSE of the first-token (CLS) last hidden state"),
    "pooled_mse": _spec(FEATURE_FAMILY, ["hidden_states"], _POOLED, "MSE of pooled last hidden states"),
    "pooled_cosine": _spec(FEATURE_FAMILY, ["hidden_states"], _POOLED, "cosine distance of pooled states"),
    "attention_mse": _spec(FEATURE_FAMILY, ["attention_scores"], _ATTENTION, "TinyBERT attention-score MSE"),
    "attention_kl": _spec(FEATURE_FAMILY, ["attention_probs"], _ATTENTION, "MiniLM attention KL"),
    "value_relation": _spec(FEATURE_FAMILY, ["values"], _ATTENTION, "MiniLM value-relation KL"),
    "similarity_preserving": _spec(RELATION_FAMILY, ["hidden_states"], _BATCH_RELATION,
                                   "batch Gram matrices of pooled states (Tung & Mori 2019)"),
    "rkd_distance": _spec(RELATION_FAMILY, ["hidden_states"], _BATCH_RELATION, "RKD distance (Park et al. 2019)"),
    "rkd_angle": _spec(RELATION_FAMILY, ["hidden_states"], _BATCH_RELATION, "RKD angle (Park et al. 2019)"),
    "token_relation": _spec(RELATION_FAMILY, ["hidden_states"], _COMMON | {"teacher", "layers", "kind"},
                            "token-token relation matrices of mapped layers"),
}

_BATCH_RELATIONS = {"similarity_preserving": losses.similarity_preserving,
                    "rkd_distance": losses.rkd_distance, "rkd_angle": losses.rkd_angle}
# Terms over mapped layer pairs: hidden states (0 = embeddings) and attention maps (from 1).
_HIDDEN_PAIR_LOSSES = ("hidden_mse", "hidden_cosine", "token_relation")
_ATTENTION_PAIR_LOSSES = ("attention_mse", "attention_kl", "value_relation")
_LAYER_LOSSES = _HIDDEN_PAIR_LOSSES + _ATTENTION_PAIR_LOSSES

# The recipes of the literature, as term lists (the config layer writes the same lists).
RECIPES: dict[str, tuple[dict[str, Any], ...]] = {
    # Sanh et al. 2019: soft targets at T=2, MLM loss, cosine of the last hidden states.
    "distilbert": ({"loss": "forward_kl", "weight": 5.0, "temperature": 2.0},
                   {"loss": "cross_entropy", "weight": 2.0, "positions": "labels"},
                   {"loss": "hidden_cosine", "weight": 1.0, "layers": "last"}),
    # Jiao et al. 2020: embedding + hidden MSE (projected), attention MSE, prediction layer.
    "tinybert": ({"loss": "hidden_mse", "layers": "uniform", "include_embeddings": True, "projection": "linear"},
                 {"loss": "attention_mse", "layers": "uniform"},
                 {"loss": "forward_kl", "temperature": 1.0}),
    # Wang et al. 2020: last-layer attention distributions and value relations.
    "minilm": ({"loss": "attention_kl", "layers": "last"}, {"loss": "value_relation", "layers": "last"}),
    # The reference text's feature example: MSE on the CLS hidden state (BERT -> DistilBERT).
    "reference_cls": ({"loss": "cls_mse", "projection": "linear"},),
    # Plain logit distillation of a causal LM.
    "logit_kd": ({"loss": "forward_kl", "temperature": 1.0},),
    # Agarwal et al. 2024 (GKD): generalized JSD.
    "gkd": ({"loss": "generalized_jsd", "beta": 0.5, "temperature": 1.0},),
}


# --------------------------------------------------------------------------- validation


def _fail(i: int, field: str, message: str) -> ValueError:
  return ValueError(f"objective.terms[{i}].{field}: {message}")


def _number(i, field, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise _fail(i, field, f"{value!r} is not a finite number")
  if low is not None and (value < low or (low_open and value == low)):
    raise _fail(i, field, f"{value} must be {'>' if low_open else '>='} {low}")
  if high is not None and (value > high or (high_open and value == high)):
    raise _fail(i, field, f"{value} must be {'<' if high_open else '<='} {high}")
  return float(value)


def _choice(i, field, value, allowed) -> str:
  if value not in allowed:
    raise _fail(i, field, f"{value!r} is not one of {', '.join(allowed)}")
  return value


def _schedule(i, field, raw, *, positive: bool) -> Schedule:
  if isinstance(raw, Schedule):
    raw = dataclasses.asdict(raw)
  if not isinstance(raw, Mapping):
    raise _fail(i, field, f"expected a mapping {{kind, start, end, steps}}, got {raw!r}")
  unknown = sorted(set(raw) - {"kind", "start", "end", "steps"})
  if unknown:
    raise _fail(i, f"{field}.{unknown[0]}", "unknown key; allowed: kind, start, end, steps")
  kind = _choice(i, f"{field}.kind", raw.get("kind", "constant"), SCHEDULE_KINDS)
  start = _number(i, f"{field}.start", raw.get("start", 1.0), low=0.0, low_open=positive)
  end = _number(i, f"{field}.end", raw.get("end", start), low=0.0, low_open=positive)
  steps = raw.get("steps", 1)
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise _fail(i, f"{field}.steps", f"{steps!r} must be an integer >= 1")
  return Schedule(kind, start, end, steps)


def _layers(i, raw):
  if isinstance(raw, str):
    return _choice(i, "layers", raw, ("last", "uniform", "all"))
  try:
    items = tuple(int(x) if isinstance(x, int) and not isinstance(x, bool) else tuple(int(v) for v in x)
                  for x in raw)
  except (TypeError, ValueError):
    items = None
  ints = items is not None and all(isinstance(x, int) for x in items)
  pairs = items is not None and all(isinstance(x, tuple) and len(x) == 2 for x in items)
  if not items or not (ints or pairs) or any(v < 0 for x in items for v in (x if pairs else (x,))):
    raise _fail(i, "layers", f"{raw!r} is not 'last', 'uniform', 'all', a list of teacher layers (one per "
                             "student layer) or a list of [student, teacher] pairs (1-based, 0 = embeddings)")
  return items


def _validate_one(i: int, raw: Mapping[str, Any]) -> Term:
  if not isinstance(raw, Mapping):
    raise ValueError(f"objective.terms[{i}]: expected a mapping, got {raw!r}")
  name = raw.get("loss")
  if name not in LOSSES:
    raise _fail(i, "loss", f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}")
  spec = LOSSES[name]
  unknown = sorted(set(raw) - spec.options)
  if unknown:
    raise _fail(i, unknown[0], f"not an option of {name}; allowed: {', '.join(sorted(spec.options))}")
  kw: dict[str, Any] = {"loss": name}
  if "name" in raw:
    if not isinstance(raw["name"], str) or not raw["name"]:
      raise _fail(i, "name", f"{raw['name']!r} must be a non-empty string")
    kw["name"] = raw["name"]
  kw["weight"] = _number(i, "weight", raw.get("weight", 1.0), low=0.0)
  if "teacher" in raw:
    teacher = raw["teacher"]
    many = not isinstance(teacher, str)
    teachers = tuple(teacher) if many else (teacher,)
    if not teachers or not all(isinstance(t, str) and t for t in teachers):
      raise _fail(i, "teacher", f"{teacher!r} must be a teacher name" + (" or a list of names" if name ==
                                                                          "ensemble_kl" else ""))
    if many and name != "ensemble_kl":
      raise _fail(i, "teacher", f"{name} takes one teacher name; average several with ensemble_kl")
    kw["teacher"] = teachers if name == "ensemble_kl" else teachers[0]
  elif name == "ensemble_kl":
    raise _fail(i, "teacher", "ensemble_kl needs a list of teacher names")
  if "temperature" in raw:
    kw["temperature"] = _number(i, "temperature", raw["temperature"], low=0.0, low_open=True)
  if "beta" in raw:
    kw["beta"] = _number(i, "beta", raw["beta"], low=0.0, high=1.0)
  if "skew" in raw:
    kw["skew"] = _number(i, "skew", raw["skew"], low=0.0, high=1.0, high_open=True)  # skew=1 makes it 0
  if "label_smoothing" in raw:
    kw["label_smoothing"] = _number(i, "label_smoothing", raw["label_smoothing"], low=0.0, high=1.0,
                                    high_open=True)
  for field in ("normalized", "include_embeddings"):
    if field in raw:
      if not isinstance(raw[field], bool):
        raise _fail(i, field, f"{raw[field]!r} must be true or false")
      kw[field] = raw[field]
  for field, allowed in (("projection", PROJECTIONS), ("kind", RELATION_KINDS), ("pooling", POOLINGS),
                         ("positions", POSITIONS)):
    if field in raw:
      kw[field] = _choice(i, field, raw[field], allowed)
  if "layers" in raw:
    kw["layers"] = _layers(i, raw["layers"])
  if "weight_schedule" in raw:
    kw["weight_schedule"] = _schedule(i, "weight_schedule", raw["weight_schedule"], positive=False)
  if "temperature_schedule" in raw:
    kw["temperature_schedule"] = _schedule(i, "temperature_schedule", raw["temperature_schedule"], positive=True)
  return Term(**kw)


def validate_terms(terms: Sequence[Mapping[str, Any]]) -> tuple[Term, ...]:
  """Checks term mappings without models and returns `Term`s with unique names.

  Raises:
    ValueError: one line naming ``objective.terms[i].<field>``.
  """
  if isinstance(terms, (str, bytes, Mapping)) or not isinstance(terms, Sequence) or not terms:
    raise ValueError(f"objective.terms: expected a non-empty list of terms, got {terms!r}")
  out, seen = [], set()
  for i, raw in enumerate(terms):
    term = _validate_one(i, raw)
    name = term.name or term.loss
    if term.name and name in seen:
      raise _fail(i, "name", f"{name!r} is used by an earlier term")
    k = 2
    while name in seen or name in ("loss", "grad_norm", "nonfinite"):
      name, k = f"{term.name or term.loss}_{k}", k + 1
    seen.add(name)
    out.append(dataclasses.replace(term, name=name))
  static = [t.weight for t in out if t.weight_schedule is None]
  if len(static) == len(out) and sum(static) == 0:
    raise ValueError("objective.terms[*].weight: the weights sum to zero")
  return tuple(out)


# --------------------------------------------------------------------------- binding to models


@dataclasses.dataclass(frozen=True)
class _Bound:
  """A term bound to the models: resolved layer pairs, vocabulary, projections."""

  term: Term
  pairs: tuple[tuple[int, int], ...] = ()
  vocab: Optional[int] = None
  project: bool = False
  num_heads: int = 0
  task: str = ""


def _capabilities(model) -> frozenset[str]:
  return frozenset(model.capabilities)


def _pairs(i: int, term: Term, student, teacher, *, attention: bool) -> tuple[tuple[int, int], ...]:
  from distill_jax import models

  ls, lt = student.num_layers, teacher.num_layers
  strategy = "uniform" if term.layers == "all" else term.layers
  try:
    pairs = tuple((int(s), int(t)) for s, t in models.layer_map(lt, ls, strategy))
  except ValueError as e:
    raise _fail(i, "layers", str(e).removeprefix("layers: ")) from None
  if (term.include_embeddings or term.layers == "all") and (0, 0) not in pairs:
    pairs = ((0, 0),) + pairs
  low = 1 if attention else 0
  for s, t in pairs:
    if not (low <= s <= ls and low <= t <= lt):
      raise _fail(i, "layers", f"pair [{s}, {t}] is out of range: student layers {low}..{ls}, "
                               f"teacher layers {low}..{lt}" + (" (attention maps start at layer 1)"
                                                                  if attention else " (0 = embeddings)"))
  return pairs


def _bind(i: int, term: Term, student, teachers: Mapping[str, Any]) -> _Bound:
  from distill_jax import models

  spec = LOSSES[term.loss]
  for name in term.teachers:
    if name not in teachers:
      raise _fail(i, "teacher", f"unknown teacher {name!r}; defined: {', '.join(sorted(teachers)) or 'none'}")
  for role, model in [("student", student)] + [(f"teacher {n!r}", teachers[n]) for n in term.teachers]:
    missing = [o for o in spec.outputs if o not in _capabilities(model)]
    if missing:
      raise _fail(i, "loss", f"{term.loss} needs {', '.join(missing)} but the {role} ({model.family}) "
                             f"cannot provide it")
  kw: dict[str, Any] = {"task": student.task}
  if spec.family in (LOGIT_FAMILY, LABEL_FAMILY) and student.task not in LM_TASKS + ("sequence_classification",):
    raise _fail(i, "loss", f"{term.loss} needs logits; the student's task {student.task!r} has none")
  if spec.family == LOGIT_FAMILY:
    vocabs = []
    for name in term.teachers:
      teacher = teachers[name]
      if teacher.task != student.task:
        raise _fail(i, "teacher", f"teacher {name!r} task {teacher.task!r} differs from the student's "
                                  f"{student.task!r}: their logits are not comparable")
      if student.task in LM_TASKS:
        try:
          vocabs.append(models.check_vocab(teacher, student))
        except ValueError as e:
          raise _fail(i, "teacher", str(e)) from None
    kw["vocab"] = min(vocabs) if vocabs else None
  if term.loss in _LAYER_LOSSES:
    kw["pairs"] = _pairs(i, term, student, teachers[term.teachers[0]],
                         attention=term.loss in _ATTENTION_PAIR_LOSSES)
  if "projection" in spec.options:
    teacher = teachers[term.teachers[0]]
    if student.hidden_size != teacher.hidden_size and term.projection == "none":
      raise _fail(i, "projection", f"student hidden size {student.hidden_size} != teacher "
                                   f"{teacher.hidden_size}; set projection: linear")
    kw["project"] = term.projection == "linear"
    if term.loss in ("cls_mse", "pooled_mse", "pooled_cosine"):
      kw["pairs"] = ((student.num_layers, teacher.num_layers),)
  if term.loss in _ATTENTION_PAIR_LOSSES:
    teacher = teachers[term.teachers[0]]
    if student.num_heads != teacher.num_heads:
      raise _fail(i, "loss", f"{term.loss} needs equal head counts; student has {student.num_heads}, "
                             f"teacher {teacher.num_heads}")
    kw["num_heads"] = student.num_heads
  return _Bound(term, **kw)


def build_objective(terms: Sequence[Mapping[str, Any] | Term], *, student, teachers: Mapping[str, Any]) -> Objective:
  """Validates ``terms`` against the models and returns the `Objective`.

  Args:
    terms: term mappings (or `Term`s from `validate_terms`).
    student: the student `Model`.
    teachers: ``{name: Model}``; terms refer to these names (default ``"teacher"``).

  Raises:
    ValueError: one line naming ``objective.terms[i].<field>``, before any compilation.
  """
  if terms and all(isinstance(t, Term) for t in terms):
    validated = tuple(terms)
  else:
    validated = validate_terms(terms)
  bound = tuple(_bind(i, term, student, teachers) for i, term in enumerate(validated))
  return Objective(bound, student.hidden_size, {n: m.hidden_size for n, m in teachers.items()})


# --------------------------------------------------------------------------- the objective


def _project(params: Optional[Mapping[str, jax.Array]], x: jax.Array) -> jax.Array:
  if params is None:
    return x
  return jnp.einsum("...h,hk->...k", x, params["kernel"].astype(x.dtype)) + params["bias"].astype(x.dtype)


def _pair_key(s: int, t: int) -> str:
  return f"s{s}_t{t}"


def _gather_rows(x: jax.Array, axis_name: Optional[str]) -> jax.Array:
  return x if axis_name is None else lax.all_gather(x, axis_name, tiled=True)


def _local_rows(values: jax.Array, local_rows: int, axis_name: Optional[str]) -> jax.Array:
  if axis_name is None:
    return values
  return lax.dynamic_slice_in_dim(values, lax.axis_index(axis_name) * local_rows, local_rows)


def _layer_pair_values(b: _Bound, s_out, t_out, s: int, t: int, mask_BxT: jax.Array,
                       proj) -> tuple[jax.Array, jax.Array]:
  """Unreduced values of a layer-mapped term for the layer pair ``(s, t)``, and their mask."""
  name = b.term.loss
  if name in _HIDDEN_PAIR_LOSSES:
    h_s = _project(proj[_pair_key(s, t)] if proj else None, s_out.hidden_states[s])
    h_t = t_out.hidden_states[t]
    if name == "hidden_mse":
      return losses.hidden_mse(h_s, h_t, where=mask_BxT), mask_BxT
    if name == "hidden_cosine":
      return losses.cosine_distance(h_s, h_t, where=mask_BxT), mask_BxT
    return losses.token_relation(h_s, h_t, where=mask_BxT, kind=b.term.kind), mask_BxT
  # Attention maps are indexed from layer 1; values are [B, N, T], one per (head, query).
  where_Bx1xT = mask_BxT[:, None, :]
  if name == "attention_mse":
    values = losses.attention_mse(s_out.attention_scores[s - 1], t_out.attention_scores[t - 1],
                                  where=where_Bx1xT, key_mask=mask_BxT)
  elif name == "attention_kl":
    values = losses.attention_kl(s_out.attention_probs[s - 1], t_out.attention_probs[t - 1],
                                 where=where_Bx1xT)
  else:
    values = losses.value_relation_kl(s_out.values[s - 1], t_out.values[t - 1], num_heads=b.num_heads,
                                      where=where_Bx1xT, key_mask=mask_BxT)
  return values, where_Bx1xT


class Objective:
  """``Σ weight · sum / count`` over bound terms; static, hashable by identity.

  Attributes:
    terms: the bound terms, in order.
    teacher_names: teachers the terms use (the step runs only these).
  """

  def __init__(self, bound: Sequence[_Bound], student_hidden: int, teacher_hidden: Mapping[str, int]):
    self.bound = tuple(bound)
    self.terms = tuple(b.term for b in self.bound)
    self.teacher_names = tuple(sorted({n for t in self.terms for n in t.teachers}))
    self._student_hidden = student_hidden
    self._teacher_hidden = dict(teacher_hidden)

  def outputs_for(self, role: str) -> tuple[str, ...]:
    """Outputs a model must compute: ``"student"`` or a teacher name."""
    needed = set()
    for term in self.terms:
      if role == "student" or role in term.teachers:
        needed.update(LOSSES[term.loss].outputs)
    return tuple(sorted(needed))

  def init_projections(self, rng: jax.Array) -> dict[str, Any]:
    """``{term_name: {"s<i>_t<j>": {"kernel": [Hs, Ht], "bias": [Ht]}}}`` for projected terms."""
    params = {}
    for k, b in enumerate(self.bound):
      if not b.project:
        continue
      hs, ht = self._student_hidden, self._teacher_hidden[b.term.teachers[0]]
      per_pair = {}
      for j, (s, t) in enumerate(b.pairs):
        key = jax.random.fold_in(jax.random.fold_in(rng, k), j)
        per_pair[_pair_key(s, t)] = {
            "kernel": jax.random.normal(key, (hs, ht), jnp.float32) / math.sqrt(hs),
            "bias": jnp.zeros((ht,), jnp.float32)}
      params[b.term.name] = per_pair
    return params

  def __call__(self, student_out, teacher_outs: Mapping[str, Any], batch: Mapping[str, jax.Array],
               projection_params: Mapping[str, Any], step: jax.Array, *,
               axis_name: Optional[str] = None) -> tuple[jax.Array, dict[str, Any]]:
    """The loss and ``{term_name: (sum, count)}`` metrics.

    Args:
      student_out: the student's `ModelOutputs`.
      teacher_outs: ``{teacher_name: ModelOutputs}``.
      batch: the batch (``attention_mask``, ``labels``, ``loss_mask``...).
      projection_params: from `init_projections`.
      step: the training step (for schedules).
      axis_name: under `pmap`: token counts are summed over the axis and batch-relation
        terms see the gathered global batch, so the returned loss is this device's
        share of the global loss and sums add up across devices.

    Returns:
      ``(loss, metrics)``.
    """
    mask_BxT = batch["attention_mask"].astype(bool)
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    for b in self.bound:
      total, count = self._term(b, student_out, teacher_outs, batch, mask_BxT,
                                projection_params.get(b.term.name), step, axis_name)
      metrics[b.term.name] = (total, count)
      global_count = count if axis_name is None else lax.psum(count, axis_name)
      loss = loss + b.term.weight_at(step) * total / jnp.maximum(global_count, 1.0)
    return loss, metrics

  def loss_from_sums(self, sums: Mapping[str, tuple[float, float]], step: int) -> float:
    """``Σ weight · sum / count`` from ``(sum, count)`` totals accumulated over many batches.

    The exact loss of a whole evaluation set (each term a token mean over all of it),
    unlike an average of per-batch losses, which batches of different lengths would bias.
    """
    total = 0.0
    for b in self.bound:
      s, c = sums[b.term.name]
      total += float(b.term.weight_at(jnp.asarray(step))) * float(s) / max(float(c), 1.0)
    return total

  def _term(self, b: _Bound, s_out, t_outs, batch, mask_BxT, proj, step, axis_name):
    term = b.term
    name = term.loss
    t_out = t_outs[term.teachers[0]] if term.teachers else None
    example_mask_B = mask_BxT.any(-1)
    family = LOSSES[name].family

    if family in (LOGIT_FAMILY, LABEL_FAMILY):
      classify = s_out.logits.ndim == 2
      if term.positions == "labels" and not classify:
        where = batch["loss_mask"].astype(bool) if "loss_mask" in batch else mask_BxT
      else:
        where = example_mask_B if classify else mask_BxT
      s_logits = s_out.logits if b.vocab is None else s_out.logits[..., :b.vocab]
      if name == "cross_entropy":
        values = losses.cross_entropy(s_logits, batch["labels"], where=where, label_smoothing=term.label_smoothing)
        return losses.masked_sum_and_count(values, where)
      temperature = term.temperature_at(step)
      if name == "ensemble_kl":
        logp = [jax.nn.log_softmax(t_outs[n].logits[..., :s_logits.shape[-1]].astype(jnp.float32) / temperature)
                for n in term.teachers]
        # T·log(mean p_T): its softmax at temperature T is the teachers' mean distribution.
        t_logits = temperature * (jax.scipy.special.logsumexp(jnp.stack(logp), axis=0) - math.log(len(logp)))
        values = losses.forward_kl(s_logits, t_logits, temperature=temperature, where=where)
        return losses.masked_sum_and_count(values, where)
      t_logits = t_out.logits[..., :s_logits.shape[-1]]
      fn = {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl,
            "total_variation": losses.total_variation}.get(name)
      if fn is not None:
        values = fn(s_logits, t_logits, temperature=temperature, where=where)
      elif name == "generalized_jsd":
        values = losses.generalized_jsd(s_logits, t_logits, beta=term.beta, temperature=temperature,
                                        normalized=term.normalized, where=where)
      else:
        fn = losses.skew_kl if name == "skew_kl" else losses.skew_reverse_kl
        values = fn(s_logits, t_logits, skew=term.skew, temperature=temperature, where=where)
      return losses.masked_sum_and_count(values, where)

    if name in _LAYER_LOSSES:
      total = count = jnp.zeros((), jnp.float32)
      for s, t in b.pairs:
        values, where = _layer_pair_values(b, s_out, t_out, s, t, mask_BxT, proj)
        pair_sum, pair_count = losses.masked_sum_and_count(values, where)
        total, count = total + pair_sum, count + pair_count
      return total, count

    s_last, t_last = s_out.hidden_states[-1], t_out.hidden_states[-1]
    if name == "cls_mse":
      f_s = _project(proj[_pair_key(*b.pairs[0])] if proj else None, s_last[:, 0])
      values = losses.hidden_mse(f_s, t_last[:, 0], where=example_mask_B)
      return losses.masked_sum_and_count(values, example_mask_B)
    from distill_jax import models  # lazy, as above: config validation imports this module

    f_s, f_t = models.pool(s_last, mask_BxT, term.pooling), models.pool(t_last, mask_BxT, term.pooling)
    if name in ("pooled_mse", "pooled_cosine"):
      f_s = _project(proj[_pair_key(*b.pairs[0])] if proj else None, f_s)
      fn = losses.hidden_mse if name == "pooled_mse" else losses.cosine_distance
      values = fn(f_s, f_t, where=example_mask_B)
      return losses.masked_sum_and_count(values, example_mask_B)
    # Batch relations couple examples: under pmap they see the gathered global batch and
    # each device keeps the values of its own rows.
    rows = f_s.shape[0]
    all_mask = _gather_rows(example_mask_B, axis_name)
    values = _BATCH_RELATIONS[name](_gather_rows(f_s, axis_name), _gather_rows(f_t, axis_name), where=all_mask)
    return losses.masked_sum_and_count(_local_rows(values, rows, axis_name), example_mask_B)
