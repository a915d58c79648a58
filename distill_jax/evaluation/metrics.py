"""Task metrics and teacher-student agreement (efficiency measurements: `efficiency.py`).

Every per-batch metric is a pure, jittable function returning ``(sum, count)`` (or an
additive count matrix), so batches, devices and hosts aggregate by plain addition and
padded examples (all-zero ``attention_mask`` rows) contribute nothing.  Ratios
(accuracy, perplexity, ...) are formed once, on the host, by the ``finalize_*``
functions.

Label convention for language modelling: ``labels[b, t]`` is the target of
``logits[b, t]`` (already shifted for causal LM); a position counts where
``loss_mask`` (if present) and ``attention_mask`` are set and ``labels >= 0``.

A causal LM with a head (``Model.head``) is scored from its final hidden states and
unembedding in chunks of the sequence (``chunk_size``), never forming `[B, T, V]` logits;
``chunk_size=None`` (or a model without ``head``) scores its logits.

Metric names returned by :func:`evaluate`, per task:

* ``causal_lm`` / ``masked_lm``: ``nll``, ``perplexity``, ``teacher_nll``,
  ``teacher_perplexity`` (when the batches carry ``labels``), ``top1_agreement``,
  ``kl_teacher_student``, ``num_tokens``, ``num_examples``.
* ``sequence_classification``: ``accuracy``, ``macro_f1``, ``teacher_accuracy``,
  ``teacher_macro_f1`` (when the batches carry ``labels``), ``top1_agreement``,
  ``kl_teacher_student``, ``num_examples``.
* ``encoder``: ``embedding_cosine`` (only when student and teacher widths match),
  ``similarity_spearman``, ``num_examples``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from distill_jax import losses
from distill_jax.models.outputs import TASKS

# Spearman over N examples ranks N(N-1)/2 pairs; beyond this many examples, use the first.
MAX_SPEARMAN_EXAMPLES = 2048

# ----------------------------------------------------------------------------- masks


def example_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Real (non-padding) examples: ``attention_mask.any(-1)``.

  Args:
    batch: a batch with ``attention_mask`` ``[B, T]``.

  Returns:
    ``[B]`` bool.
  """
  return jnp.asarray(batch["attention_mask"]).astype(bool).any(-1)


def token_mask(batch: Mapping[str, jax.Array], *, require_labels: bool = False) -> jax.Array:
  """Positions that count for token-level metrics.

  Args:
    batch: a batch with ``attention_mask`` ``[B, T]`` and optionally ``loss_mask`` and
      ``labels`` ``[B, T]``.
    require_labels: also require ``labels >= 0`` (ignore-index positions drop out).

  Returns:
    ``[B, T]`` bool: ``attention_mask & loss_mask [& labels >= 0]``.
  """
  mask_BxT = jnp.asarray(batch["attention_mask"]).astype(bool)
  if "loss_mask" in batch:
    mask_BxT &= jnp.asarray(batch["loss_mask"]).astype(bool)
  if require_labels:
    mask_BxT &= jnp.asarray(batch["labels"]) >= 0
  return mask_BxT


# ----------------------------------------------------------------- per-batch metrics


def _shared(student_logits: jax.Array, teacher_logits: jax.Array,
            shared_vocab: Optional[int]) -> tuple[jax.Array, jax.Array]:
  if shared_vocab is not None:
    student_logits = student_logits[..., :shared_vocab]
    teacher_logits = teacher_logits[..., :shared_vocab]
  if student_logits.shape[-1] != teacher_logits.shape[-1]:
    raise ValueError(
        f"shared_vocab: student has {student_logits.shape[-1]} output classes, teacher "
        f"{teacher_logits.shape[-1]}; pass shared_vocab=<size of the common vocabulary>")
  return student_logits, teacher_logits


def nll_sum_and_count(logits: jax.Array, labels: jax.Array,
                      where: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood of ``labels`` and the number of counted positions.

  Args:
    logits: ``[..., V]``.
    labels: ``[...]`` int; entries outside ``where`` may be anything (e.g. ``-100``).
    where: ``[...]`` bool.

  Returns:
    ``(sum, count)`` float32 scalars; ``exp(sum / count)`` is the perplexity.
  """
  return losses.masked_sum_and_count(losses.cross_entropy(logits, labels, where=where), where)


def top1_agreement_sum_and_count(student_logits: jax.Array, teacher_logits: jax.Array,
                                 where: jax.Array, *, shared_vocab: Optional[int] = None
                                 ) -> tuple[jax.Array, jax.Array]:
  """Number of positions where student and teacher argmax agree, and the count.

  Args:
    student_logits: ``[..., V_s]``.
    teacher_logits: ``[..., V_t]``.
    where: ``[...]`` bool.
    shared_vocab: compare only the first ``shared_vocab`` entries of both.

  Returns:
    ``(sum, count)`` float32 scalars.
  """
  student_logits, teacher_logits = _shared(student_logits, teacher_logits, shared_vocab)
  agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
  return losses.masked_sum_and_count(agree, where)


def kl_sum_and_count(student_logits: jax.Array, teacher_logits: jax.Array,
                     where: jax.Array, *, shared_vocab: Optional[int] = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Summed ``KL(p_teacher || p_student)`` at temperature 1, and the count.

  .. math:: \\sum_v p_T(v) (\\log p_T(v) - \\log p_S(v))

  Args:
    student_logits: ``[..., V_s]``.
    teacher_logits: ``[..., V_t]``.
    where: ``[...]`` bool.
    shared_vocab: renormalize both over their first ``shared_vocab`` entries.

  Returns:
    ``(sum, count)`` float32 scalars.
  """
  student_logits, teacher_logits = _shared(student_logits, teacher_logits, shared_vocab)
  values = losses.forward_kl(student_logits, teacher_logits, where=where)
  return losses.masked_sum_and_count(values, where)


def confusion_matrix(logits_BxC: jax.Array, labels_B: jax.Array, where_B: jax.Array
                     ) -> jax.Array:
  """Confusion counts of ``argmax(logits)`` against ``labels`` over ``where``.

  Args:
    logits_BxC: ``[B, C]``.
    labels_B: ``[B]`` int in ``[0, C)`` where ``where_B`` is set.
    where_B: ``[B]`` bool.

  Returns:
    ``[C, C]`` float32, ``[true, predicted]``; additive across batches.
  """
  num_classes = logits_BxC.shape[-1]
  weight_B = where_B.astype(jnp.float32)
  true_BxC = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.float32) * weight_B[:, None]
  pred_BxC = jax.nn.one_hot(jnp.argmax(logits_BxC, -1), num_classes, dtype=jnp.float32)
  return true_BxC.T @ pred_BxC


def cosine_sum_and_count(student_BxH: jax.Array, teacher_BxH: jax.Array, where_B: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Summed cosine similarity between paired student and teacher embeddings.

  The similarity is ``1 - losses.cosine_distance`` (each norm floored at 1e-8).

  Args:
    student_BxH: ``[B, H]``.
    teacher_BxH: ``[B, H]``.
    where_B: ``[B]`` bool.

  Returns:
    ``(sum, count)`` float32 scalars.
  """
  distance_B = losses.cosine_distance(student_BxH, teacher_BxH, where=where_B)
  return losses.masked_sum_and_count(1.0 - distance_B, where_B)


# ------------------------------------------------------------------ host finalizers


def finalize_mean(total: float, count: float) -> float:
  """``total / count``, NaN when nothing was counted."""
  return float(total) / float(count) if count else float("nan")


def finalize_perplexity(nll_sum: float, count: float) -> float:
  """``exp(nll_sum / count)``."""
  return float(np.exp(finalize_mean(nll_sum, count)))


def finalize_classification(confusion_CxC: np.ndarray) -> dict[str, float]:
  """Accuracy and macro-F1 from confusion counts ``[true, predicted]``.

  Macro-F1 averages per-class ``2 TP / (2 TP + FP + FN)`` over the classes that occur
  as a label or as a prediction (sklearn's ``f1_score(average="macro")``).

  Args:
    confusion_CxC: ``[C, C]`` counts.

  Returns:
    ``{"accuracy", "macro_f1"}``.
  """
  confusion_CxC = np.asarray(confusion_CxC, np.float64)
  tp_C = np.diag(confusion_CxC)
  total = confusion_CxC.sum()
  denom_C = confusion_CxC.sum(0) + confusion_CxC.sum(1)  # 2 TP + FP + FN
  present_C = denom_C > 0
  f1_C = 2 * tp_C[present_C] / denom_C[present_C]
  return {
      "accuracy": float(tp_C.sum() / total) if total else float("nan"),
      "macro_f1": float(f1_C.mean()) if f1_C.size else float("nan"),
  }


def similarity_spearman(student_NxH: np.ndarray, teacher_NxM: np.ndarray) -> float:
  """Spearman correlation of student and teacher pairwise cosine similarities.

  Compares the strict upper triangles of the two ``[N, N]`` cosine matrices; the widths
  ``H`` and ``M`` may differ.

  Args:
    student_NxH: ``[N, H]`` embeddings (padding already dropped).
    teacher_NxM: ``[N, M]`` embeddings of the same examples.

  Returns:
    Spearman's rho; NaN for fewer than 3 examples.
  """
  if len(student_NxH) != len(teacher_NxM):
    raise ValueError(f"{len(student_NxH)} student vs {len(teacher_NxM)} teacher embeddings")
  if len(student_NxH) < 3:
    return float("nan")

  def cosine_matrix(x_NxH):
    x_NxH = np.asarray(x_NxH, np.float64)
    x_NxH = x_NxH / np.maximum(np.linalg.norm(x_NxH, axis=-1, keepdims=True), 1e-12)
    return x_NxH @ x_NxH.T

  rows, cols = np.triu_indices(len(student_NxH), k=1)
  rho = scipy.stats.spearmanr(cosine_matrix(student_NxH)[rows, cols],
                              cosine_matrix(teacher_NxM)[rows, cols]).statistic
  return float(rho)


# ---------------------------------------------------------------------- evaluation


def outputs_for_task(task: str, *, chunked: bool = False) -> tuple[str, ...]:
  """The model outputs that evaluation needs for ``task`` (``chunked``: a causal LM's trunk only)."""
  if task not in TASKS:
    raise ValueError(f"task: {task!r} is not one of {', '.join(TASKS)}")
  if task == "encoder":
    return ("pooled",)
  return ("final_hidden",) if chunked and task == "causal_lm" else ("logits",)


def _has_head(model: Any) -> bool:
  """Whether ``model`` gives its unembedding (`Model.head`); a bare ``apply`` is scored by its logits."""
  return callable(getattr(model, "head", None))


def _chunked_lm_stats(student_out: Any, teacher_out: Any, heads: tuple[Any, Any], where: jax.Array,
                      labels_BxT: Optional[jax.Array], label_mask_BxT: Optional[jax.Array],
                      shared_vocab: Optional[int], chunk_size: int) -> dict[str, Any]:
  """The causal-LM statistics of `batch_stats` from final hidden states and heads, chunked."""
  (s_h, s_head), (t_h, t_head) = (student_out.final_hidden, heads[0]), (teacher_out.final_hidden, heads[1])
  stats: dict[str, Any] = {}
  if labels_BxT is not None:
    for name, h, head in (("nll", s_h, s_head), ("teacher_nll", t_h, t_head)):
      values = losses.chunked_cross_entropy(h, head.kernel, labels_BxT, where=label_mask_BxT, bias=head.bias,
                                            softcap=head.softcap, chunk_size=chunk_size)
      stats[name] = losses.masked_sum_and_count(values, label_mask_BxT)
  widths = (s_head.kernel.shape[-1], t_head.kernel.shape[-1])
  kept = [w if shared_vocab is None else min(w, shared_vocab) for w in widths]  # as `_shared` slices logits
  if kept[0] != kept[1]:
    raise ValueError(f"shared_vocab: student has {kept[0]} output classes, teacher {kept[1]}; "
                     f"pass shared_vocab=<size of the common vocabulary>")
  cut = kept[0] if kept[0] < max(widths) else None
  argmax = [losses.chunked_argmax(h, head.kernel, bias=head.bias, softcap=head.softcap, vocab=cut,
                                  chunk_size=chunk_size) for h, head in ((s_h, s_head), (t_h, t_head))]
  stats["top1_agreement"] = losses.masked_sum_and_count(argmax[0] == argmax[1], where)
  values = losses.chunked_forward_kl(s_h, s_head.kernel, t_h, t_head.kernel, where=where, student_bias=s_head.bias,
                                     teacher_bias=t_head.bias, student_softcap=s_head.softcap,
                                     teacher_softcap=t_head.softcap, vocab=cut, chunk_size=chunk_size)
  stats["kl_teacher_student"] = losses.masked_sum_and_count(values, where)
  return stats


def batch_stats(student_out: Any, teacher_out: Any, batch: Mapping[str, jax.Array], *,
                task: str, shared_vocab: Optional[int] = None, heads: Optional[tuple[Any, Any]] = None,
                chunk_size: int = losses.DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
  """Additive per-batch statistics for ``task`` (pure, jittable).

  Args:
    student_out: student ``ModelOutputs`` (``logits``, ``pooled``, or with `heads` ``final_hidden`` set).
    teacher_out: teacher ``ModelOutputs``.
    batch: the batch both were computed on.
    task: one of :data:`TASKS`.
    shared_vocab: compare logits over the first ``shared_vocab`` entries only.
    heads: ``(student, teacher)`` `Model.head`s: causal-LM statistics from ``final_hidden``,
      chunked (``chunk_size`` sequence positions at a time), never forming logits.
    chunk_size: see `heads`.

  Returns:
    A dict of ``(sum, count)`` pairs and, for classification, ``[C, C]`` confusion
    matrices; :func:`finalize_stats` turns the summed dict into metrics.
  """
  ex_mask_B = example_mask(batch)
  stats: dict[str, Any] = {"num_examples": (ex_mask_B.sum().astype(jnp.float32), 1.0)}
  if task == "encoder":
    s_BxH, t_BxM = student_out.pooled, teacher_out.pooled
    if s_BxH.shape[-1] == t_BxM.shape[-1]:
      stats["embedding_cosine"] = cosine_sum_and_count(s_BxH, t_BxM, ex_mask_B)
    return stats
  if heads is not None:
    where = token_mask(batch)
    stats["num_tokens"] = (where.sum().astype(jnp.float32), 1.0)
    labels = label_mask = None
    if "labels" in batch:
      labels, label_mask = jnp.asarray(batch["labels"]), token_mask(batch, require_labels=True)
    stats.update(_chunked_lm_stats(student_out, teacher_out, heads, where, labels, label_mask, shared_vocab,
                                   chunk_size))
    return stats
  s_logits, t_logits = student_out.logits, teacher_out.logits
  has_labels = "labels" in batch
  if task == "sequence_classification":
    where = ex_mask_B
    if has_labels:
      labels_B = jnp.asarray(batch["labels"]).astype(jnp.int32)
      stats["confusion"] = confusion_matrix(s_logits, labels_B, ex_mask_B)
      stats["teacher_confusion"] = confusion_matrix(t_logits, labels_B, ex_mask_B)
  else:
    where = token_mask(batch)  # attention_mask-based, so padded examples are already out
    if has_labels:
      labels_BxT = jnp.asarray(batch["labels"])
      label_mask_BxT = token_mask(batch, require_labels=True)
      stats["nll"] = nll_sum_and_count(s_logits, labels_BxT, label_mask_BxT)
      stats["teacher_nll"] = nll_sum_and_count(t_logits, labels_BxT, label_mask_BxT)
    stats["num_tokens"] = (where.sum().astype(jnp.float32), 1.0)
  stats["top1_agreement"] = top1_agreement_sum_and_count(
      s_logits, t_logits, where, shared_vocab=shared_vocab)
  stats["kl_teacher_student"] = kl_sum_and_count(
      s_logits, t_logits, where, shared_vocab=shared_vocab)
  return stats


def finalize_stats(stats: Mapping[str, Any]) -> dict[str, float]:
  """Metrics from summed :func:`batch_stats` (host side).

  Args:
    stats: the statistics of all batches, summed (confusion matrices included).

  Returns:
    A flat ``{name: float}`` dict (see the module docstring for the names).
  """
  metrics: dict[str, float] = {}
  for name, value in stats.items():
    if name.endswith("confusion"):
      prefix = name[:-len("confusion")]
      for key, metric in finalize_classification(np.asarray(value)).items():
        metrics[prefix + key] = metric
    elif name.startswith("num_"):
      metrics[name] = float(value[0])
    else:
      metrics[name] = finalize_mean(*value)
      if name.endswith("nll"):
        metrics[name[:-len("nll")] + "perplexity"] = finalize_perplexity(*value)
  return metrics


def apply_kwargs(outputs: tuple[str, ...], pooling: Optional[str]) -> dict[str, Any]:
  """`Model.apply` keyword arguments for `outputs` (and `pooling` when given)."""
  kwargs: dict[str, Any] = {"outputs": outputs}
  if pooling is not None:
    kwargs["pooling"] = pooling
  return kwargs


def _eval_step(student_apply: Callable, teacher_apply: Callable, task: str,
               shared_vocab: Optional[int], apply_kwargs: dict[str, Any],
               student_params: Any, teacher_params: Any, batch: Mapping[str, jax.Array], *,
               head_fns: Optional[tuple[Callable, Callable]] = None, chunk_size: int = losses.DEFAULT_CHUNK_SIZE):
  student_out = student_apply(student_params, batch, **apply_kwargs)
  teacher_out = teacher_apply(teacher_params, batch, **apply_kwargs)
  heads = None if head_fns is None else (head_fns[0](student_params), head_fns[1](teacher_params))
  stats = batch_stats(student_out, teacher_out, batch, task=task, shared_vocab=shared_vocab, heads=heads,
                      chunk_size=chunk_size)
  if task == "encoder":
    return stats, (student_out.pooled, teacher_out.pooled)
  return stats, None


# (student, teacher, shared_vocab, pooling) -> jitted step.  The models are kept alive in
# the value so that their ids cannot be reused; small FIFO bound.
_STEP_CACHE: dict[tuple, tuple[Any, Any, Callable]] = {}
_STEP_CACHE_SIZE = 8


def make_eval_step(student: Any, teacher: Any, *, shared_vocab: Optional[int] = None,
                   pooling: Optional[str] = None,
                   chunk_size: Optional[int] = losses.DEFAULT_CHUNK_SIZE) -> Callable:
  """The jitted ``(student_params, teacher_params, batch) -> (stats, pooled)`` step.

  Cached per (student, teacher, shared_vocab, pooling), so repeated evaluations during
  training compile once per batch shape.  Params are arguments, never closed over.

  Args:
    student: a model with ``.task`` and ``.apply``.
    teacher: a model with the same ``.task``.
    shared_vocab: see :func:`batch_stats`.
    pooling: forwarded to ``apply`` when not ``None``.
    chunk_size: causal LMs with a ``head`` are scored from final hidden states in chunks of
      this many sequence positions; ``None``: from their logits.

  Returns:
    The jitted step; ``pooled`` is ``(student [B, H], teacher [B, M])`` for encoders.
  """
  task = student.task
  if teacher.task != task:
    raise ValueError(f"task: student is {task!r} but teacher is {teacher.task!r}")
  chunked = chunk_size is not None and task == "causal_lm" and _has_head(student) and _has_head(teacher)
  if chunked:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
      raise ValueError(f"chunk_size: {chunk_size!r} must be a positive integer or None (logits)")
  key = (id(student), id(teacher), shared_vocab, pooling, chunk_size if chunked else None)
  if key not in _STEP_CACHE:
    if len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
      del _STEP_CACHE[next(iter(_STEP_CACHE))]
    extra = dict(head_fns=(student.head, teacher.head), chunk_size=chunk_size) if chunked else {}
    step = jax.jit(functools.partial(
        _eval_step, student.apply, teacher.apply, task, shared_vocab,
        apply_kwargs(outputs_for_task(task, chunked=chunked), pooling), **extra))
    _STEP_CACHE[key] = (student, teacher, step)
  return _STEP_CACHE[key][2]


def evaluate(student: Any, student_params: Any, teacher: Any, teacher_params: Any,
             batches: Iterable[Mapping[str, Any]], *, max_batches: Optional[int] = None,
             shared_vocab: Optional[int] = None, pooling: Optional[str] = None,
             chunk_size: Optional[int] = losses.DEFAULT_CHUNK_SIZE) -> dict[str, float]:
  """Task metrics and teacher agreement of ``student`` over ``batches``.

  Args:
    student: a model with ``.task`` and ``.apply(params, batch, *, outputs=...)``.
    student_params: its params (pass the initialization for the undistilled student).
    teacher: a model with the same ``.task``.
    teacher_params: its params.
    batches: an iterable of batch dicts (padded examples have all-zero
      ``attention_mask`` rows and are ignored).
    max_batches: stop after this many batches.
    shared_vocab: compare logits over the first ``shared_vocab`` entries only.
    pooling: forwarded to ``apply`` when not ``None``.
    chunk_size: causal LMs with a ``head``: sequence positions per chunk of the vocabulary-wide
      statistics (never forming `[B, T, V]` logits); ``None``: from their logits.

  Returns:
    ``{metric name: value}``; the names per task are listed in the module docstring.
  """
  step = make_eval_step(student, teacher, shared_vocab=shared_vocab, pooling=pooling, chunk_size=chunk_size)
  per_batch, pooled, masks = [], [], []
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    stats, embeddings = step(student_params, teacher_params, batch)
    per_batch.append(stats)  # fetched at the end: the loop never waits on the device
    if embeddings is not None:
      pooled.append(embeddings)
      masks.append(example_mask(batch))
  if not per_batch:
    raise ValueError("evaluate: no batches (empty eval set or max_batches=0)")
  per_batch = jax.device_get(per_batch)
  summed = jax.tree.map(lambda *xs: np.sum(np.asarray(xs, np.float64), axis=0), *per_batch)
  metrics = finalize_stats(summed)
  if pooled:
    pooled, masks = jax.device_get((pooled, masks))
    keep_N = np.concatenate(masks)
    student_NxH = np.concatenate([s for s, _ in pooled])[keep_N][:MAX_SPEARMAN_EXAMPLES]
    teacher_NxM = np.concatenate([t for _, t in pooled])[keep_N][:MAX_SPEARMAN_EXAMPLES]
    metrics["similarity_spearman"] = similarity_spearman(student_NxH, teacher_NxM)
  return metrics
