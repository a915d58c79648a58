"""The distillation objective: resolved loss terms bound to the models, computed in the step.

A term is a `TermConfig` (the one term schema, :mod:`distill_jax.objective.terms`, with the
registry `LOSSES`) or a mapping of its fields, such as ``{"loss": "forward_kl", "weight":
0.5, "temperature": 2.0}``. `build_objective` checks terms against the student and teachers
(outputs available, vocabularies, layer ranges, widths) and returns an `Objective`, a static
callable bound into the jitted step, which computes each term by the handler of its input
kind (`LossSpec.inputs`: ``logits``, ``labels``, ``sparse``, ``layer_pairs``, ``cls``,
``pooled``, ``batch``).

A teacher known only by its cached top-k rows is a `CachedTeacher` (the data layer's
teacher cache is one): it carries its own batch key and decoder, so the objective needs
neither the config nor the cache's code.

Logit and label terms of a causal LM never form `[B, T, V]` logits by default: when every
term that reads ``logits`` can be chunked (`CHUNKED`), the models are asked for their
``final_hidden`` states and ``head`` instead, and the terms run the ``losses.chunked_*`` forms
over ``chunk_size`` sequence positions at a time (``chunk_size=None``: the logits path).

Metrics are ``{name: (sum, count)}`` with padding excluded; the loss is
``Σ weight · sum / count``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from distill_jax import losses, models
from distill_jax.models import vocab_map
from distill_jax.models.outputs import LM_TASKS
from distill_jax.objective.terms import (DEFAULT_TOP_K, LABEL_FAMILY, LOGIT_FAMILY, LOSSES, LossSpec, TermConfig,
                                         temperature_at, term_error, validate_terms, weight_at)

Term = TermConfig


class CachedTeacher(abc.ABC):
  """A teacher read from its cached top-k rows instead of run: what the objective needs of it.

  Attributes:
    name: the teacher's name in the config.
    batch_key: the batch entry that holds its packed rows.
    top_k: entries kept per token.
    vocab_size: the vocabulary the ids index.
  """

  name: str
  task: str = "causal_lm"
  family: str = "cached"
  capabilities: tuple[str, ...] = ("logits",)
  hidden_size: int = 0

  @property
  @abc.abstractmethod
  def batch_key(self) -> str:
    """The batch entry holding the packed rows."""

  @property
  @abc.abstractmethod
  def top_k(self) -> int:
    """Entries kept per token."""

  @abc.abstractmethod
  def decode(self, rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ids, logprobs, log_tail)`` of packed rows, inside the jitted step."""

  @abc.abstractmethod
  def student_vocab(self, student: Any, field: str) -> int:
    """The vocabulary its ids index; one-line ValueError naming `field` unless `student` covers it."""


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
  shared: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # hybrid_uld: (student ids, teacher ids)
  cross_vocabs: tuple[Optional[int], Optional[int]] = (None, None)  # uld/hybrid_uld: (student, teacher) vocabularies


def _pairs(i: int, term: Term, student, teacher, *, attention: bool) -> tuple[tuple[int, int], ...]:
  ls, lt = student.num_layers, teacher.num_layers
  strategy = "uniform" if term.layers == "all" else term.layers
  try:
    pairs = tuple((int(s), int(t)) for s, t in models.layer_map(lt, ls, strategy))
  except ValueError as e:
    raise term_error(i, "layers", str(e).removeprefix("layers: ")) from None
  if (term.include_embeddings or term.layers == "all") and (0, 0) not in pairs:
    pairs = ((0, 0),) + pairs
  low = 1 if attention else 0
  for s, t in pairs:
    if not (low <= s <= ls and low <= t <= lt):
      raise term_error(i, "layers", f"pair [{s}, {t}] is out of range: student layers {low}..{ls}, "
                               f"teacher layers {low}..{lt}" + (" (attention maps start at layer 1)"
                                                                  if attention else " (0 = embeddings)"))
  return pairs


def _bind(i: int, term: Term, student, teachers: Mapping[str, Any]) -> _Bound:
  spec = LOSSES[term.loss]
  for name in term.teachers:
    if name not in teachers:
      raise term_error(i, "teacher", f"unknown teacher {name!r}; defined: {', '.join(sorted(teachers)) or 'none'}")
  for role, model in [("student", student)] + [(f"teacher {n!r}", teachers[n]) for n in term.teachers]:
    missing = [o for o in spec.outputs if o not in frozenset(model.capabilities)]
    if missing:
      raise term_error(i, "loss", f"{term.loss} needs {', '.join(missing)} but the {role} ({model.family}) "
                             f"cannot provide it")
  kw: dict[str, Any] = {"task": student.task}
  if spec.family in (LOGIT_FAMILY, LABEL_FAMILY) and student.task not in LM_TASKS + ("sequence_classification",):
    raise term_error(i, "loss", f"{term.loss} needs logits; the student's task {student.task!r} has none")
  if spec.family == LOGIT_FAMILY:
    vocabs = []
    for name in term.teachers:
      teacher = teachers[name]
      if spec.inputs == "sparse" and student.task != "causal_lm":
        raise term_error(i, "loss", f"{term.loss} compares next-token distributions; the student's task is "
                               f"{student.task!r}, not causal_lm")
      if isinstance(teacher, CachedTeacher):
        if spec.inputs == "cross_tokenizer":
          kw.update(_bind_cached_cross_tokenizer(i, term, student, teacher, name))
          vocabs.append(student.vocab_size)  # the student's own logits, against the teacher's cached top-k
          continue
        if spec.inputs != "sparse":
          allowed = ", ".join(n for n, s in LOSSES.items() if s.inputs in ("sparse", "cross_tokenizer"))
          raise term_error(i, "loss", f"teacher {name!r} is a cache (top-k log-probabilities only); {term.loss} needs its "
                                 f"logits; allowed: {allowed}")
        if term.top_k is not None and term.top_k != teacher.top_k:
          raise term_error(i, "top_k", f"{term.top_k} differs from the {teacher.top_k} entries teacher {name!r}'s cache "
                                  f"keeps (leave it unset)")
        vocabs.append(teacher.student_vocab(student, f"objective.terms[{i}].teacher"))
        kw["top_k"] = teacher.top_k
        continue
      if teacher.task != student.task:
        raise term_error(i, "teacher", f"teacher {name!r} task {teacher.task!r} differs from the student's "
                                  f"{student.task!r}: their logits are not comparable")
      if spec.inputs == "cross_tokenizer":
        kw.update(_bind_cross_tokenizer(i, term, student, teacher, name))
        continue
      if student.task in LM_TASKS:
        try:
          vocabs.append(models.check_vocab(teacher, student))
        except ValueError as e:
          raise term_error(i, "teacher", str(e)) from None
    kw["vocab"] = min(vocabs) if vocabs else None
    if spec.inputs == "sparse" and not kw.get("top_k"):
      kw["top_k"] = min(term.top_k or DEFAULT_TOP_K, kw["vocab"] or student.vocab_size)
  if spec.inputs == "layer_pairs":
    kw["pairs"] = _pairs(i, term, student, teachers[term.teachers[0]], attention=spec.attention)
  if "projection" in spec.options:
    teacher = teachers[term.teachers[0]]
    if student.hidden_size != teacher.hidden_size and term.projection == "none":
      raise term_error(i, "projection", f"student hidden size {student.hidden_size} != teacher "
                                   f"{teacher.hidden_size}; set projection: linear")
    kw["project"] = term.projection == "linear"
    if spec.inputs in ("cls", "pooled"):
      kw["pairs"] = ((student.num_layers, teacher.num_layers),)
  if spec.attention:
    teacher = teachers[term.teachers[0]]
    if student.num_heads != teacher.num_heads:
      raise term_error(i, "loss", f"{term.loss} needs equal head counts; student has {student.num_heads}, "
                             f"teacher {teacher.num_heads}")
    kw["num_heads"] = student.num_heads
  return _Bound(term, **kw)


def _bind_cross_tokenizer(i: int, term: Term, student, teacher, name: str) -> dict[str, Any]:
  """A uld/hybrid_uld term: a causal LM pair with fast tokenizers; the shared-token map of hybrid_uld."""
  if student.task != "causal_lm":
    raise term_error(i, "loss", f"{term.loss} compares next-token distributions; the student's task is "
                           f"{student.task!r}, not causal_lm")
  for role, model in (("student", student), (f"teacher {name!r}", teacher)):
    if model.tokenizer is None:
      raise term_error(i, "loss", f"{term.loss} aligns tokenizers; the {role} has none")
    vocab_map.check_fast(model.tokenizer, "student.path" if role == "student" else f"teachers.{name}.path")
  vocabs = {"cross_vocabs": (student.vocab_size, teacher.vocab_size)}
  if term.loss != "hybrid_uld":
    return vocabs
  s_ids, t_ids = vocab_map.shared_vocab(student.tokenizer, teacher.tokenizer)
  keep = (s_ids < student.vocab_size) & (t_ids < teacher.vocab_size)
  return {**vocabs, "shared": (tuple(int(v) for v in s_ids[keep]), tuple(int(v) for v in t_ids[keep]))}


def _bind_cached_cross_tokenizer(i: int, term: Term, student, teacher, name: str) -> dict[str, Any]:
  """A uld/hybrid_uld term against a cache of the teacher's top-k on its own tokens: as live
  (`_bind_cross_tokenizer`, the cache's tokenizer), the cache's k entries + tail compared."""
  if term.top_k is not None:
    raise term_error(i, "top_k", f"{term.loss} against teacher {name!r}'s cache compares its {teacher.top_k} cached "
                            f"entries + tail; leave it unset")
  return {**_bind_cross_tokenizer(i, term, student, teacher, name), "top_k": teacher.top_k}


# The chunked form of each loss that a causal LM's final hidden states + head can feed.
CHUNKED: dict[str, Callable[..., jax.Array]] = {
    "forward_kl": losses.chunked_forward_kl, "reverse_kl": losses.chunked_reverse_kl,
    "generalized_jsd": losses.chunked_generalized_jsd, "skew_kl": losses.chunked_skew_kl,
    "skew_reverse_kl": losses.chunked_skew_reverse_kl, "total_variation": losses.chunked_total_variation,
    "ensemble_kl": losses.chunked_ensemble_kl, "cross_entropy": losses.chunked_cross_entropy,
    "sparse_forward_kl": losses.chunked_sparse_forward_kl, "sparse_reverse_kl": losses.chunked_sparse_reverse_kl,
    "sparse_generalized_jsd": losses.chunked_sparse_generalized_jsd,
    "uld": losses.chunked_uld, "hybrid_uld": losses.chunked_hybrid_uld,
}


def _chunkable(terms: Sequence[Term], student, teachers: Mapping[str, Any]) -> bool:
  """Whether every consumer of ``logits`` has a chunked form and every live model it reads is a causal LM head."""
  readers = [t for t in terms if "logits" in LOSSES[t.loss].outputs]
  if not readers or any(t.loss not in CHUNKED for t in readers):
    return False
  live = {n for t in readers for n in t.teachers if not isinstance(teachers[n], CachedTeacher)}
  return all("head" in frozenset(m.capabilities) for m in [student] + [teachers[n] for n in live])


def build_objective(terms: Sequence[Mapping[str, Any] | Term], *, student, teachers: Mapping[str, Any],
                    chunk_size: Optional[int] = losses.DEFAULT_CHUNK_SIZE) -> Objective:
  """Validates ``terms`` against the models and returns the `Objective`.

  Args:
    terms: `Term`s (e.g. ``Config.resolved_terms()``) or term mappings.
    student: the student `Model`.
    teachers: ``{name: Model}``; terms refer to these names (default ``"teacher"``).
    chunk_size: sequence positions per chunk of the logit terms of causal LMs, computed from
      final hidden states and heads (never `[B, T, V]`); None: from the models' logits.

  Raises:
    ValueError: one line naming ``objective.terms[i].<field>``, before any compilation.
  """
  validated = validate_terms(terms)
  bound = tuple(_bind(i, term, student, teachers) for i, term in enumerate(validated))
  cached = {n: m for n, m in teachers.items() if isinstance(m, CachedTeacher)}
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"objective.chunk_size: {chunk_size!r} must be a positive integer or null (the logits path)")
  chunked = chunk_size is not None and _chunkable(validated, student, teachers)
  return Objective(bound, student.hidden_size, {n: m.hidden_size for n, m in teachers.items()}, cached,
                   chunk_size=chunk_size if chunked else None)


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
    cached: ``{teacher_name: CachedTeacher}``: teachers whose packed top-k rows the batch
      carries (under ``cached[name].batch_key``).
    chunk_size: set when the logit terms run chunked from ``final_hidden`` + ``head``.
  """

  def __init__(self, bound: Sequence[_Bound], student_hidden: int, teacher_hidden: Mapping[str, int],
               cached: Optional[Mapping[str, Any]] = None, *, chunk_size: Optional[int] = None):
    self.bound = tuple(bound)
    self.chunk_size = chunk_size
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
    if self.chunk_size is not None and "logits" in needed:
      needed = (needed - {"logits"}) | {"final_hidden", "head"}
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
    # Outputs computed with `logits` (not `outputs_for`'s final_hidden + head) take the logits path.
    chunk_size = self.chunk_size if getattr(student_out, "head", None) is not None else None
    for b in self.bound:
      ctx = _Inputs(b, LOSSES[b.term.loss], student_out, teacher_outs, batch, mask_BxT,
                    projection_params.get(b.term.name), step, axis_name, logit_where, self.cached, chunk_size)
      total, count = _HANDLERS[ctx.spec.inputs](ctx)
      metrics[b.term.name] = (total, count)
      global_count = count if axis_name is None else lax.psum(count, axis_name)
      loss = loss + weight_at(b.term, step) * total / jnp.maximum(global_count, 1.0)
    return loss, metrics

  def loss_from_sums(self, sums: Mapping[str, tuple[float, float]], step: int) -> float:
    """``Σ weight · sum / count`` from ``(sum, count)`` totals accumulated over many batches.

    The exact loss of a whole evaluation set (each term a token mean over all of it),
    unlike an average of per-batch losses, which batches of different lengths would bias.
    """
    total = 0.0
    for b in self.bound:
      s, c = sums[b.term.name]
      total += float(weight_at(b.term, jnp.asarray(step))) * float(s) / max(float(c), 1.0)
    return total


# --------------------------------------------------------------------------- term handlers


@dataclasses.dataclass(frozen=True)
class _Inputs:
  """What a handler reads to compute one term at one step."""

  b: _Bound
  spec: LossSpec
  s_out: Any
  t_outs: Mapping[str, Any]
  batch: Mapping[str, jax.Array]
  mask_BxT: jax.Array
  proj: Optional[Mapping[str, Any]]
  step: jax.Array
  axis_name: Optional[str]
  logit_where: Optional[jax.Array]
  cached: Mapping[str, CachedTeacher]
  chunk_size: Optional[int] = None  # set: logit terms from final_hidden + head, chunked

  @property
  def term(self) -> Term:
    return self.b.term

  @property
  def t_out(self) -> Any:
    """The term's (first) live teacher's outputs; None for a cached teacher."""
    return self.t_outs.get(self.term.teachers[0]) if self.term.teachers else None

  @property
  def example_mask_B(self) -> jax.Array:
    return self.mask_BxT.any(-1)


def _logit_positions(x: _Inputs) -> jax.Array:
  """Where a token-level logit/label term counts: the on-policy tokens, the loss mask
  (``positions: labels``) or every real token; per example for sequence classification."""
  classify = x.chunk_size is None and x.s_out.logits.ndim == 2
  if x.logit_where is not None and not classify:
    return x.logit_where
  if x.term.positions == "labels" and not classify:
    return x.batch["loss_mask"].astype(bool) if "loss_mask" in x.batch else x.mask_BxT
  return x.example_mask_B if classify else x.mask_BxT


def _student_logits(x: _Inputs) -> jax.Array:
  return x.s_out.logits if x.b.vocab is None else x.s_out.logits[..., :x.b.vocab]


def _head_kwargs(role: str, out: Any) -> dict[str, Any]:
  """A chunked loss's head keyword arguments of ``out`` (``role``: ``student`` or ``teacher``)."""
  return {f"{role}_bias": out.head.bias, f"{role}_softcap": out.head.softcap}


def _labels_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  where = _logit_positions(x)
  if x.chunk_size is not None:
    head = x.s_out.head
    values = CHUNKED[x.term.loss](x.s_out.final_hidden, head.kernel, x.batch["labels"], where=where, bias=head.bias,
                                  softcap=head.softcap, vocab=x.b.vocab, chunk_size=x.chunk_size,
                                  **_kwargs(x.spec, x.term))
    return losses.masked_sum_and_count(values, where)
  values = x.spec.fn(_student_logits(x), x.batch["labels"], where=where, **_kwargs(x.spec, x.term))
  return losses.masked_sum_and_count(values, where)


def _chunked_logits_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  where, s = _logit_positions(x), x.s_out
  kw = dict(_kwargs(x.spec, x.term, temperature=temperature_at(x.term, x.step)), where=where,
            chunk_size=x.chunk_size, vocab=x.b.vocab, **_head_kwargs("student", s))
  fn = CHUNKED[x.term.loss]
  if x.spec.multi_teacher:
    outs = [x.t_outs[n] for n in x.term.teachers]
    values = fn(s.final_hidden, s.head.kernel, [o.final_hidden for o in outs], [o.head.kernel for o in outs],
                teacher_biases=[o.head.bias for o in outs], teacher_softcaps=[o.head.softcap for o in outs], **kw)
  else:
    values = fn(s.final_hidden, s.head.kernel, x.t_out.final_hidden, x.t_out.head.kernel,
                **_head_kwargs("teacher", x.t_out), **kw)
  return losses.masked_sum_and_count(values, where)


def _logits_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  if x.chunk_size is not None:
    return _chunked_logits_term(x)
  where, s_logits = _logit_positions(x), _student_logits(x)
  temperature = temperature_at(x.term, x.step)
  if x.spec.multi_teacher:
    logp = [jax.nn.log_softmax(x.t_outs[n].logits[..., :s_logits.shape[-1]].astype(jnp.float32) / temperature)
            for n in x.term.teachers]
    # T·log(mean p_T): its softmax at temperature T is the teachers' mean distribution.
    t_logits = temperature * (jax.scipy.special.logsumexp(jnp.stack(logp), axis=0) - math.log(len(logp)))
  else:
    t_logits = x.t_out.logits[..., :s_logits.shape[-1]]
  values = x.spec.fn(s_logits, t_logits, where=where, **_kwargs(x.spec, x.term, temperature=temperature))
  return losses.masked_sum_and_count(values, where)


def _sparse_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  """Against the teacher's top-k + tail: decoded from the batch's cached rows, or the exact
  top-k of the live teacher's logits."""
  where = _logit_positions(x)
  name = x.term.teachers[0]
  kw = _kwargs(x.spec, x.term, temperature=temperature_at(x.term, x.step))
  if x.chunk_size is not None:
    if name in x.cached:
      ids, logprobs, log_tail = x.cached[name].decode(x.batch[x.cached[name].batch_key])
    else:
      t = x.t_outs[name]
      ids, logprobs, log_tail = losses.chunked_top_k_teacher(
          t.final_hidden, t.head.kernel, top_k=x.b.top_k, bias=t.head.bias, softcap=t.head.softcap, vocab=x.b.vocab,
          chunk_size=x.chunk_size)
    s = x.s_out
    values = CHUNKED[x.term.loss](s.final_hidden, s.head.kernel, ids, logprobs, log_tail, where=where,
                                  chunk_size=x.chunk_size, student_bias=s.head.bias, student_softcap=s.head.softcap,
                                  vocab=x.b.vocab, **kw)
    return losses.masked_sum_and_count(values, where)
  s_logits = _student_logits(x)
  if name in x.cached:
    teacher = x.cached[name]
    ids, logprobs, log_tail = teacher.decode(x.batch[teacher.batch_key])
  else:
    t_logits = x.t_outs[name].logits if x.b.vocab is None else x.t_outs[name].logits[..., :x.b.vocab]
    ids, logprobs, log_tail = losses.teacher_top_k(t_logits, x.b.top_k)
  values = x.spec.fn(s_logits, ids, logprobs, log_tail, where=where,
                     **_kwargs(x.spec, x.term, temperature=temperature_at(x.term, x.step)))
  return losses.masked_sum_and_count(values, where)


def _cross_tokenizer_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  """uld / hybrid_uld: each student span-final token against the teacher's logits at the same
  span's last token (``batch["teacher_index"]``); the teacher ran on ``teacher_input_ids``."""
  if x.term.teachers[0] in x.cached:
    return _cached_cross_tokenizer_term(x)
  where = _logit_positions(x) & (x.batch["student_span_end"] == 1)
  kw = _kwargs(x.spec, x.term, temperature=temperature_at(x.term, x.step))
  if x.term.loss == "hybrid_uld":
    kw.update(student_shared_ids=jnp.asarray(x.b.shared[0], jnp.int32),
              teacher_shared_ids=jnp.asarray(x.b.shared[1], jnp.int32))
  s_vocab, t_vocab = x.b.cross_vocabs
  if x.chunk_size is not None:  # the teacher's final hidden states [B, T, Dt] are gathered, never its logits
    s, t = x.s_out, x.t_out
    t_hidden = losses.span_gather(t.final_hidden, x.batch["teacher_index"])
    values = CHUNKED[x.term.loss](s.final_hidden, s.head.kernel, t_hidden, t.head.kernel, where=where,
                                  chunk_size=x.chunk_size, student_vocab=s_vocab, teacher_vocab=t_vocab,
                                  **_head_kwargs("student", s), **_head_kwargs("teacher", t), **kw)
    return losses.masked_sum_and_count(values, where)
  t_logits = losses.span_gather(x.t_out.logits[..., :t_vocab], x.batch["teacher_index"])
  values = x.spec.fn(x.s_out.logits[..., :s_vocab], t_logits, where=where, **kw)
  return losses.masked_sum_and_count(values, where)


def _cached_cross_tokenizer_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  """uld / hybrid_uld against a cached teacher: its packed top-k + tail per teacher token,
  gathered at the student's span-final positions (``batch["teacher_index"]``) and decoded, against
  the student's logits (`losses.sparse_uld` / `losses.sparse_hybrid_uld`), or its final hidden
  states + head in chunks (`losses.chunked_sparse_uld` / `losses.chunked_sparse_hybrid_uld`)."""
  where = _logit_positions(x) & (x.batch["student_span_end"] == 1)
  teacher = x.cached[x.term.teachers[0]]
  ids, logprobs, log_tail = teacher.decode(losses.span_gather(x.batch[teacher.batch_key], x.batch["teacher_index"]))
  kw = dict(temperature=temperature_at(x.term, x.step), where=where)
  if x.term.loss == "hybrid_uld":
    kw.update(teacher_vocab=teacher.vocab_size, student_shared_ids=jnp.asarray(x.b.shared[0], jnp.int32),
              teacher_shared_ids=jnp.asarray(x.b.shared[1], jnp.int32))
  if x.chunk_size is not None:
    s = x.s_out
    fn = losses.chunked_sparse_hybrid_uld if x.term.loss == "hybrid_uld" else losses.chunked_sparse_uld
    values = fn(s.final_hidden, s.head.kernel, ids, logprobs, log_tail, chunk_size=x.chunk_size, vocab=x.b.vocab,
                **_head_kwargs("student", s), **kw)
  else:
    fn = losses.sparse_hybrid_uld if x.term.loss == "hybrid_uld" else losses.sparse_uld
    values = fn(_student_logits(x), ids, logprobs, log_tail, **kw)
  return losses.masked_sum_and_count(values, where)


def _layer_pairs_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  total = count = jnp.zeros((), jnp.float32)
  for s, t in x.b.pairs:
    values, where = _layer_pair_values(x.b, x.s_out, x.t_out, s, t, x.mask_BxT, x.proj)
    pair_sum, pair_count = losses.masked_sum_and_count(values, where)
    total, count = total + pair_sum, count + pair_count
  return total, count


def _cls_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  f_s = _project(x.proj[_pair_key(*x.b.pairs[0])] if x.proj else None, x.s_out.hidden_states[-1][:, 0])
  values = x.spec.fn(f_s, x.t_out.hidden_states[-1][:, 0], where=x.example_mask_B)
  return losses.masked_sum_and_count(values, x.example_mask_B)


def _pooled_features(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  pool = lambda out: models.pool(out.hidden_states[-1], x.mask_BxT, x.term.pooling)  # noqa: E731
  return pool(x.s_out), pool(x.t_out)


def _pooled_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  f_s, f_t = _pooled_features(x)
  f_s = _project(x.proj[_pair_key(*x.b.pairs[0])] if x.proj else None, f_s)
  values = x.spec.fn(f_s, f_t, where=x.example_mask_B)
  return losses.masked_sum_and_count(values, x.example_mask_B)


def _batch_term(x: _Inputs) -> tuple[jax.Array, jax.Array]:
  """Batch relations couple examples: under pmap they see the gathered global batch and
  each device keeps the values of its own rows."""
  f_s, f_t = _pooled_features(x)
  rows = f_s.shape[0]
  all_mask = _gather_rows(x.example_mask_B, x.axis_name)
  values = x.spec.fn(_gather_rows(f_s, x.axis_name), _gather_rows(f_t, x.axis_name), where=all_mask)
  return losses.masked_sum_and_count(_local_rows(values, rows, x.axis_name), x.example_mask_B)


# One handler per `LossSpec.inputs` kind: ``(inputs) -> (sum, count)``.
_HANDLERS: dict[str, Callable[[_Inputs], tuple[jax.Array, jax.Array]]] = {
    "logits": _logits_term, "labels": _labels_term, "sparse": _sparse_term, "layer_pairs": _layer_pairs_term,
    "cls": _cls_term, "pooled": _pooled_term, "batch": _batch_term, "cross_tokenizer": _cross_tokenizer_term,
}
