"""The distillation objective: a weighted sum of loss terms.

A term is a :class:`Term` (``distill_jax.config.root.TermConfig``, the one term schema of the
config and the objective) or a mapping of its fields, such as ``{"loss": "forward_kl",
"weight": 0.5, "temperature": 2.0}`` or ``{"loss": "hidden_mse", "layers": "uniform",
"projection": "linear", "teacher": "big"}``; a loss takes only the fields of its
`LossSpec.options`. `validate_terms` checks terms alone (no models) and fills in their
defaults; `build_objective` checks them against the student and teachers (outputs
available, vocabularies, layer ranges, widths) and returns an `Objective`, a static
callable bound into the jitted step.

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

from distill_jax.config import root as config_lib
from distill_jax import losses

LOGIT_FAMILY, FEATURE_FAMILY, RELATION_FAMILY, LABEL_FAMILY = "logits", "features", "relations", "labels"
DEFAULT_TOP_K = 128  # entries a sparse_* term keeps of a live teacher
LM_TASKS = ("causal_lm", "masked_lm")

Term = config_lib.TermConfig
Schedule = config_lib.ScheduleConfig


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


def validate_terms(terms: Sequence[Mapping[str, Any] | Term]) -> tuple[Term, ...]:
  """Checks terms without models and returns them with their defaults filled in.

  The schema is `Term`'s (``config.TermConfig``) and the list's ``config.ObjectiveConfig``;
  see ``ObjectiveConfig.resolve`` for the defaults (a term without ``teacher`` reads
  ``"teacher"``; schedules without ``steps`` ramp over 1 step).

  Raises:
    ValueError: a one-line ``config.ConfigError`` naming ``objective.terms[i].<field>``.
  """
  if isinstance(terms, (str, bytes, Mapping)) or not isinstance(terms, Sequence) or not terms:
    raise config_lib.ConfigError(f"config: objective.terms must list at least one term, e.g. "
                                 f"'- {{loss: forward_kl}}', got {terms!r}")
  return config_lib.ObjectiveConfig(terms=tuple(terms)).resolve()


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
  top_k: int = 0


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
      if spec.inputs == "sparse" and student.task != "causal_lm":
        raise _fail(i, "loss", f"{term.loss} compares next-token distributions; the student's task is "
                               f"{student.task!r}, not causal_lm")
      if _is_cache(teacher):
        if spec.inputs != "sparse":
          raise _fail(i, "loss", f"teacher {name!r} is a cache (top-k log-probabilities only); {term.loss} needs its "
                                 f"logits; allowed: {', '.join(n for n, s in LOSSES.items() if s.inputs == 'sparse')}")
        if term.top_k is not None and term.top_k != teacher.top_k:
          raise _fail(i, "top_k", f"{term.top_k} differs from the {teacher.top_k} entries teacher {name!r}'s cache "
                                  f"keeps (leave it unset)")
        vocabs.append(teacher.student_vocab(student, f"objective.terms[{i}].teacher"))
        kw["top_k"] = teacher.top_k
        continue
      if teacher.task != student.task:
        raise _fail(i, "teacher", f"teacher {name!r} task {teacher.task!r} differs from the student's "
                                  f"{student.task!r}: their logits are not comparable")
      if student.task in LM_TASKS:
        try:
          vocabs.append(models.check_vocab(teacher, student))
        except ValueError as e:
          raise _fail(i, "teacher", str(e)) from None
    kw["vocab"] = min(vocabs) if vocabs else None
    if spec.inputs == "sparse" and not kw.get("top_k"):
      kw["top_k"] = min(term.top_k or DEFAULT_TOP_K, kw["vocab"] or student.vocab_size)
  if spec.inputs == "layer_pairs":
    kw["pairs"] = _pairs(i, term, student, teachers[term.teachers[0]], attention=spec.attention)
  if "projection" in spec.options:
    teacher = teachers[term.teachers[0]]
    if student.hidden_size != teacher.hidden_size and term.projection == "none":
      raise _fail(i, "projection", f"student hidden size {student.hidden_size} != teacher "
                                   f"{teacher.hidden_size}; set projection: linear")
    kw["project"] = term.projection == "linear"
    if spec.inputs in ("cls", "pooled"):
      kw["pairs"] = ((student.num_layers, teacher.num_layers),)
  if spec.attention:
    teacher = teachers[term.teachers[0]]
    if student.num_heads != teacher.num_heads:
      raise _fail(i, "loss", f"{term.loss} needs equal head counts; student has {student.num_heads}, "
                             f"teacher {teacher.num_heads}")
    kw["num_heads"] = student.num_heads
  return _Bound(term, **kw)


def _is_cache(teacher) -> bool:
  return getattr(teacher, "family", None) == "teacher cache"


def build_objective(terms: Sequence[Mapping[str, Any] | Term], *, student, teachers: Mapping[str, Any]) -> Objective:
  """Validates ``terms`` against the models and returns the `Objective`.

  Args:
    terms: `Term`s (e.g. ``Config.resolved_terms()``) or term mappings.
    student: the student `Model`.
    teachers: ``{name: Model}``; terms refer to these names (default ``"teacher"``).

  Raises:
    ValueError: one line naming ``objective.terms[i].<field>``, before any compilation.
  """
  validated = validate_terms(terms)
  bound = tuple(_bind(i, term, student, teachers) for i, term in enumerate(validated))
  cached = {n: m.format for n, m in teachers.items() if _is_cache(m)}
  return Objective(bound, student.hidden_size, {n: m.hidden_size for n, m in teachers.items()}, cached)


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


def _kwargs(spec: LossSpec, term: Term, **runtime) -> dict[str, Any]:
  """The keyword arguments of ``spec.fn``: values of this step (`runtime`) or the term's options."""
  return {k: runtime[k] if k in runtime else getattr(term, k) for k in spec.kwargs}


def _layer_pair_values(b: _Bound, s_out, t_out, s: int, t: int, mask_BxT: jax.Array,
                       proj) -> tuple[jax.Array, jax.Array]:
  """Unreduced values of a layer-mapped term for the layer pair ``(s, t)``, and their mask."""
  spec = LOSSES[b.term.loss]
  output = spec.outputs[0]
  if not spec.attention:  # hidden states, 0 = embeddings
    x_s = _project(proj[_pair_key(s, t)] if proj else None, getattr(s_out, output)[s])
    x_t, where = getattr(t_out, output)[t], mask_BxT
  else:  # attention maps are indexed from layer 1; values are [B, N, T], one per (head, query)
    x_s, x_t, where = getattr(s_out, output)[s - 1], getattr(t_out, output)[t - 1], mask_BxT[:, None, :]
  kw = _kwargs(spec, b.term, key_mask=mask_BxT, num_heads=b.num_heads)
  return spec.fn(x_s, x_t, where=where, **kw), where


class Objective:
  """``Σ weight · sum / count`` over bound terms; static, hashable by identity.

  Attributes:
    terms: the bound terms, in order.
    teacher_names: live teachers the terms use (the step runs only these).
    cached: ``{teacher_name: cache_codec.CacheFormat}`` of the cached teachers, whose packed
      rows the batch carries (``teacher_cache.batch_key(name)``).
  """

  def __init__(self, bound: Sequence[_Bound], student_hidden: int, teacher_hidden: Mapping[str, int],
               cached: Optional[Mapping[str, Any]] = None):
    self.bound = tuple(bound)
    self.terms = tuple(b.term for b in self.bound)
    self.cached = dict(cached or {})
    self.teacher_names = tuple(sorted({n for t in self.terms for n in t.teachers} - set(self.cached)))
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
               projection_params: Mapping[str, Any], step: jax.Array, *, axis_name: Optional[str] = None,
               logit_where: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, Any]]:
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
      logit_where: ``[B, T]`` bool: when given (on-policy steps: the generated tokens),
        token-level logit and label terms cover these positions whatever their `positions`.

    Returns:
      ``(loss, metrics)``.
    """
    mask_BxT = batch["attention_mask"].astype(bool)
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    for b in self.bound:
      total, count = self._term(b, student_out, teacher_outs, batch, mask_BxT,
                                projection_params.get(b.term.name), step, axis_name, logit_where)
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

  def _sparse_teacher(self, b: _Bound, t_outs, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The term's teacher as ``(ids, logprobs, log_tail)``: decoded from the batch's cache rows,
    or the exact top-k of the live teacher's logits."""
    from distill_jax.data import cache_codec
    from distill_jax.data import teacher_cache

    name = b.term.teachers[0]
    if name in self.cached:
      return cache_codec.decode(self.cached[name], batch[teacher_cache.batch_key(name)])
    logits = t_outs[name].logits if b.vocab is None else t_outs[name].logits[..., :b.vocab]
    return cache_codec.top_k_teacher(logits, b.top_k)

  def _term(self, b: _Bound, s_out, t_outs, batch, mask_BxT, proj, step, axis_name, logit_where):
    term = b.term
    spec = LOSSES[term.loss]
    t_out = t_outs.get(term.teachers[0]) if term.teachers else None  # None: a cached teacher
    example_mask_B = mask_BxT.any(-1)

    if spec.inputs in ("logits", "labels", "sparse"):
      classify = s_out.logits.ndim == 2
      if logit_where is not None and not classify:
        where = logit_where
      elif term.positions == "labels" and not classify:
        where = batch["loss_mask"].astype(bool) if "loss_mask" in batch else mask_BxT
      else:
        where = example_mask_B if classify else mask_BxT
      s_logits = s_out.logits if b.vocab is None else s_out.logits[..., :b.vocab]
      if spec.inputs == "labels":
        values = spec.fn(s_logits, batch["labels"], where=where, **_kwargs(spec, term))
        return losses.masked_sum_and_count(values, where)
      temperature = term.temperature_at(step)
      if spec.inputs == "sparse":
        ids, logprobs, log_tail = self._sparse_teacher(b, t_outs, batch)
        values = spec.fn(s_logits, ids, logprobs, log_tail, where=where,
                         **_kwargs(spec, term, temperature=temperature))
        return losses.masked_sum_and_count(values, where)
      if spec.multi_teacher:
        logp = [jax.nn.log_softmax(t_outs[n].logits[..., :s_logits.shape[-1]].astype(jnp.float32) / temperature)
                for n in term.teachers]
        # T·log(mean p_T): its softmax at temperature T is the teachers' mean distribution.
        t_logits = temperature * (jax.scipy.special.logsumexp(jnp.stack(logp), axis=0) - math.log(len(logp)))
      else:
        t_logits = t_out.logits[..., :s_logits.shape[-1]]
      values = spec.fn(s_logits, t_logits, where=where, **_kwargs(spec, term, temperature=temperature))
      return losses.masked_sum_and_count(values, where)

    if spec.inputs == "layer_pairs":
      total = count = jnp.zeros((), jnp.float32)
      for s, t in b.pairs:
        values, where = _layer_pair_values(b, s_out, t_out, s, t, mask_BxT, proj)
        pair_sum, pair_count = losses.masked_sum_and_count(values, where)
        total, count = total + pair_sum, count + pair_count
      return total, count

    s_last, t_last = s_out.hidden_states[-1], t_out.hidden_states[-1]
    if spec.inputs == "cls":
      f_s = _project(proj[_pair_key(*b.pairs[0])] if proj else None, s_last[:, 0])
      values = spec.fn(f_s, t_last[:, 0], where=example_mask_B)
      return losses.masked_sum_and_count(values, example_mask_B)
    from distill_jax import models  # lazy, as above: config validation imports this module

    f_s, f_t = models.pool(s_last, mask_BxT, term.pooling), models.pool(t_last, mask_BxT, term.pooling)
    if spec.inputs == "pooled":
      f_s = _project(proj[_pair_key(*b.pairs[0])] if proj else None, f_s)
      values = spec.fn(f_s, f_t, where=example_mask_B)
      return losses.masked_sum_and_count(values, example_mask_B)
    # Batch relations couple examples: under pmap they see the gathered global batch and
    # each device keeps the values of its own rows.
    rows = f_s.shape[0]
    all_mask = _gather_rows(example_mask_B, axis_name)
    values = spec.fn(_gather_rows(f_s, axis_name), _gather_rows(f_t, axis_name), where=all_mask)
    return losses.masked_sum_and_count(_local_rows(values, rows, axis_name), example_mask_B)
