"""Teacher/student model adapter: one output contract for every Hugging Face family.

Contract (relied on by `objective.py`, `step.py`, `evaluate.py`):

* ``batch`` is a dict of arrays with at least ``input_ids`` ``[B, T]`` int32 and
  ``attention_mask`` ``[B, T]`` (1 = real token, 0 = padding).  Optional keys:
  ``token_type_ids`` ``[B, T]``, ``position_ids`` ``[B, T]``, ``labels``
  (``[B, T]`` for language modelling, ``[B]`` for classification) and ``loss_mask``
  ``[B, T]`` (1 where a token-level label counts).  A padded *example* (eval padding) has
  an all-zero ``attention_mask`` row; per-example weights are ``attention_mask.any(-1)``.
* ``Model.apply(params, batch, *, outputs=("logits",), train=False, rng=None, pooling="mean")``
  is a pure function usable inside ``jax.jit`` and returns :class:`ModelOutputs` holding only
  the requested fields (the others are ``None``).  ``Model.capabilities`` names what a
  family/task can give (an ``encoder`` has no ``logits``); asking for more is a ValueError.

Builders: :func:`load_model` (verified HF checkpoint), :func:`model_from_config`,
:func:`init_student`; helpers :func:`layer_map` and :func:`check_vocab`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

logger = logging.getLogger(__name__)


class _LazyHF:
  """`distill_jax.compat.hf`, imported on first use so `import distill_jax.models` stays cheap."""

  def __getattr__(self, name: str) -> Any:
    from distill_jax.compat import hf as module

    return getattr(module, name)


hf = _LazyHF()

OUTPUT_NAMES = ("logits", "hidden_states", "attention_scores", "attention_probs", "values", "pooled")


@flax.struct.dataclass
class ModelOutputs:
  """What a model returns; only the fields the caller asked for are set.

  Attributes:
    logits: ``[B, T, V]`` for LM tasks, ``[B, C]`` for sequence classification.
    hidden_states: tuple of ``[B, T, H]``: the embedding output first, then every layer.
    attention_scores: tuple (one per layer) of pre-softmax scores ``[B, N, T, T]``.
    attention_probs: tuple (one per layer) of probabilities ``[B, N, T, T]``.
    values: tuple (one per layer) of value projections ``[B, T, H]`` (heads not split).
    pooled: ``[B, H]`` mean-pooled (over ``attention_mask``) or CLS embedding.
  """

  logits: Optional[jax.Array] = None
  hidden_states: Optional[tuple[jax.Array, ...]] = None
  attention_scores: Optional[tuple[jax.Array, ...]] = None
  attention_probs: Optional[tuple[jax.Array, ...]] = None
  values: Optional[tuple[jax.Array, ...]] = None
  pooled: Optional[jax.Array] = None


# ----------------------------------------------------------------------------- the adapter

TASKS = ("causal_lm", "masked_lm", "sequence_classification", "encoder")
POOLINGS = ("mean", "cls")
_BASE_OUTPUTS = frozenset({"logits", "hidden_states", "attention_probs", "pooled"})
_MASKED_SCORE = -1e4  # finite score of masked (padded or future) keys in `attention_scores`


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A Hugging Face Flax model behind one output contract.

  Not a pytree: params travel separately (`apply(params, batch)`), so the teacher's params
  can be a jit argument rather than a constant.

  Attributes:
    module: the transformers Flax `nn.Module` (e.g. `FlaxBertForMaskedLMModule`).
    params: the verified params pytree (nested dicts of arrays).
    hf_config: the HF `PretrainedConfig`.
    tokenizer: the checkpoint's tokenizer, or None.
    task: one of `TASKS`.
    family: the HF `model_type` (`"bert"`, `"llama"`, ...).
    dtype: the computation dtype given to the module.
  """

  module: Any
  params: Any
  hf_config: Any
  tokenizer: Any
  task: str
  family: str
  dtype: Any = jnp.float32

  @property
  def num_layers(self) -> int:
    return int(self.hf_config.num_hidden_layers)

  @property
  def hidden_size(self) -> int:
    return int(self.hf_config.hidden_size)

  @property
  def num_heads(self) -> int:
    return int(self.hf_config.num_attention_heads)

  @property
  def vocab_size(self) -> int:
    """The usable vocabulary: the tokenizer's size when smaller than a padded embedding."""
    rows = int(self.hf_config.vocab_size)
    return min(rows, len(self.tokenizer)) if self.tokenizer is not None else rows

  @property
  def capabilities(self) -> frozenset[str]:
    """The output names `apply` can give for this family and task (an encoder has no logits)."""
    names = set(_BASE_OUTPUTS)
    if self.family in hf.ATTENTION_PROJECTIONS:
      names |= {"attention_scores", "values"}
    if self.task == "encoder":
      names.discard("logits")
    return frozenset(names)

  def check_outputs(self, outputs: Sequence[str]) -> tuple[str, ...]:
    """Validates `outputs` (one-line ValueError naming the output and family)."""
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    for name in outputs:
      if name not in OUTPUT_NAMES:
        raise ValueError(f"outputs: unknown {name!r}; allowed: {', '.join(OUTPUT_NAMES)}")
      if name not in self.capabilities:
        raise ValueError(f"outputs: {name!r} is not available for family {self.family!r} (task {self.task!r}); "
                         f"it gives {', '.join(sorted(self.capabilities))}")
    return outputs

  def apply(self, params, batch: Mapping[str, jax.Array], *, outputs: Sequence[str] = ("logits",),
            train: bool = False, rng: Optional[jax.Array] = None, pooling: str = "mean") -> ModelOutputs:
    """Runs the model on `batch`, computing only the requested `outputs`.

    Args:
      params: params pytree (e.g. `self.params` or a trained copy).
      batch: `input_ids` `[B, T]`, `attention_mask` `[B, T]`, optional `token_type_ids`,
        `position_ids` (see the module docstring).
      outputs: names from `OUTPUT_NAMES`.
      train: dropout is on when `train` and `rng` is given.
      rng: PRNG key for dropout.
      pooling: `"mean"` (mean over `attention_mask`) or `"cls"` (first position) for `pooled`.

    Returns:
      `ModelOutputs` with the requested fields set.  `attention_scores` are
      `q·kᵀ/√d_head` recomputed from the captured projections, with masked keys (padding,
      and future positions for causal models) set to -1e4 (finite, identical for teacher and
      student so score losses see zero there).
    """
    outputs = self.check_outputs(outputs)
    if pooling not in POOLINGS:
      raise ValueError(f"pooling: unknown {pooling!r}; allowed: {', '.join(POOLINGS)}")
    want = set(outputs)
    input_ids = jnp.asarray(batch["input_ids"])
    attention_mask = jnp.asarray(batch.get("attention_mask", jnp.ones_like(input_ids)))
    capture = hf.ATTENTION_PROJECTIONS[self.family] if want & {"attention_scores", "values"} else ()
    dropout = train and rng is not None
    hf_out, captured = hf.call_module(
        self.module, self.family, params, input_ids, attention_mask,
        token_type_ids=batch.get("token_type_ids"), position_ids=batch.get("position_ids"),
        output_attentions="attention_probs" in want,
        output_hidden_states="hidden_states" in want or ("pooled" in want and self.task != "encoder"),
        deterministic=not dropout, rngs={"dropout": rng} if dropout else None, capture=capture)
    result = {}
    if "logits" in want:
      result["logits"] = hf_out.logits
    if "hidden_states" in want:
      result["hidden_states"] = tuple(hf_out.hidden_states)
    if "attention_probs" in want:
      result["attention_probs"] = tuple(hf_out.attentions)
    if "pooled" in want:
      last_BxTxH = hf_out.last_hidden_state if self.task == "encoder" else hf_out.hidden_states[-1]
      result["pooled"] = pool(last_BxTxH, attention_mask, pooling)
    if capture:
      queries, keys, values = _split_projections(captured, capture)
      if "values" in want:
        result["values"] = values
      if "attention_scores" in want:
        causal = self.family in hf.CAUSAL_FAMILIES
        result["attention_scores"] = tuple(
            _scores(q, k, attention_mask, self.num_heads, causal) for q, k in zip(queries, keys))
    return ModelOutputs(**result)

  def save_pretrained(self, params, out_dir: str | os.PathLike) -> pathlib.Path:
    """Writes `params` as an HF checkpoint (Flax msgpack, PyTorch-named safetensors, config, tokenizer)."""
    return hf.save_checkpoint(out_dir, params, self.hf_config, self.tokenizer, self.task)


def pool(hidden_BxTxH: jax.Array, mask_BxT: jax.Array, pooling: str) -> jax.Array:
  """``[B, H]`` embedding of ``[B, T, H]`` states: the mean over real tokens or the first (CLS)."""
  if pooling == "cls":
    return hidden_BxTxH[:, 0]
  mask_BxTx1 = mask_BxT[..., None].astype(hidden_BxTxH.dtype)
  total_BxH = jnp.sum(hidden_BxTxH * mask_BxTx1, axis=1)
  return total_BxH / jnp.maximum(jnp.sum(mask_BxTx1, axis=1), 1)


def _layer_position(key: tuple[str, ...]) -> Optional[int]:
  """Where in a param key its transformer layer index stands (`.../layer/3/...`), or None."""
  return next((i for i, part in enumerate(key[:-1])
               if part.isdigit() and i > 0 and key[i - 1] in ("layer", "layers", "h")), None)


def _layer_index(key: tuple[str, ...]) -> int:
  """The transformer layer a param or captured-intermediate key belongs to."""
  return int(key[_layer_position(key)])


def _split_projections(captured: dict, names: tuple[str, ...]):
  """Per-layer (queries, keys, values) `[B, T, H]` from captured projection outputs."""
  per_name = {name: {} for name in names}
  for key, value in captured.items():
    per_name[key[-2]][_layer_index(key)] = value[0]
  by_layer = [[per_name[n][i] for n in names] for i in sorted(per_name[names[0]])]
  if len(names) == 1:  # GPT-2's fused c_attn: [B, T, 3H]
    by_layer = [jnp.split(fused[0], 3, axis=-1) for fused in by_layer]
  queries, keys, values = (tuple(layer[j] for layer in by_layer) for j in range(3))
  return queries, keys, values


def _scores(q_BxTxH, k_BxTxH, mask_BxT, num_heads: int, causal: bool) -> jax.Array:
  b, t, h = q_BxTxH.shape
  d = h // num_heads
  q_BxTxNxD = q_BxTxH.reshape(b, t, num_heads, d)
  k_BxTxNxD = k_BxTxH.reshape(b, t, num_heads, d)
  scores_BxNxTxT = jnp.einsum("btnd,bsnd->bnts", q_BxTxNxD, k_BxTxNxD) / jnp.sqrt(d).astype(q_BxTxH.dtype)
  valid_BxNxTxT = mask_BxT[:, None, None, :].astype(bool)
  if causal:
    valid_BxNxTxT = valid_BxNxTxT & jnp.tril(jnp.ones((t, t), bool))[None, None]
  return jnp.where(valid_BxNxTxT, scores_BxNxTxT, jnp.asarray(_MASKED_SCORE, scores_BxNxTxT.dtype))


# ----------------------------------------------------------------------------- constructors


def _make(module, params, config, tokenizer, task, dtype) -> Model:
  return Model(module=module, params=params, hf_config=config, tokenizer=tokenizer, task=task,
               family=config.model_type, dtype=jnp.dtype(dtype))


def _check_dtypes(dtype, param_dtype) -> None:
  for field, value in (("dtype", dtype), ("param_dtype", param_dtype)):
    try:
      ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f"{field}: {value!r} is not a floating dtype (e.g. 'float32', 'bfloat16')")


def load_model(name_or_path: str | os.PathLike, task: str = "causal_lm", *, dtype: Any = "float32",
               param_dtype: Any = "float32", num_labels: Optional[int] = None,
               revision: Optional[str] = None) -> Model:
  """Loads and verifies an HF checkpoint (local directory or hub id in the HF cache).

  Args:
    name_or_path: a directory with `config.json` and `flax_model.msgpack`,
      `model.safetensors` or `pytorch_model.bin` (sharded too), or a hub id.
    task: one of `TASKS`.
    dtype: computation dtype of the module.
    param_dtype: dtype the floating params are cast to (e.g. bf16 for a teacher).
    num_labels: classes for `sequence_classification` (default: the config's).
    revision: hub revision.

  Returns:
    A `Model` whose every parameter came from the checkpoint (tied heads from the embedding).

  Raises:
    ValueError: bad task/family/path, missing weights (listed), no network and no cache.
  """
  hf.check_task(task)
  _check_dtypes(dtype, param_dtype)
  path = hf.resolve_checkpoint(name_or_path, revision)
  overrides = {} if num_labels is None else {"num_labels": int(num_labels)}
  config = hf.load_config(path, **overrides)
  module, params = hf.load_checkpoint(path, config, task, dtype=dtype, param_dtype=param_dtype)
  return _make(module, params, config, hf.load_tokenizer(path), task, dtype)


def model_from_config(config: Any, task: str = "causal_lm", *, tokenizer: Any = None, seed: int = 0,
                      dtype: Any = "float32", **config_overrides) -> Model:
  """A freshly initialized (f32 params) model from an HF config, config dict or checkpoint dir."""
  hf.check_task(task)
  _check_dtypes(dtype, "float32")
  config = hf.load_config(config, **config_overrides)
  module, _, _ = hf.build_module(config, task, dtype)
  return _make(module, hf.init_params(config, task, seed), config, tokenizer, task, dtype)


def _layer_container(params_flat: dict) -> dict[int, list[tuple[str, ...]]]:
  """0-based transformer layer index -> param keys of that layer."""
  layers: dict[int, list] = {}
  for key in params_flat:
    if _layer_position(key) is not None:
      layers.setdefault(_layer_index(key), []).append(key)
  return layers


def init_student(teacher: Model, num_layers: Optional[int] = None, *, layers: Optional[Sequence[int]] = None,
                 hidden_size: Optional[int] = None, seed: int = 0, dtype: Any = "float32",
                 **config_overrides) -> Model:
  """A smaller student of the teacher's family and task (DistilBERT-style when widths match).

  Args:
    teacher: the teacher `Model`.
    num_layers: student depth; layers `0, k, 2k, ...` (k = teacher_layers // num_layers) are copied.
    layers: explicit 0-based teacher layers to copy, e.g. `[0, 2, 4, 7, 9, 11]`.
    hidden_size: a different width: fresh init with the modified config (nothing copied).
    seed: PRNG seed of the fresh init.
    dtype: the student's computation dtype (its params are float32 master weights whatever
      the teacher's dtypes).
    **config_overrides: more HF config fields for the student.

  Returns:
    A student `Model` with f32 params: embeddings, chosen layers and the head copied from the
    teacher when the widths match; fresh HF-initialized params otherwise.
  """
  t_layers = teacher.num_layers
  if layers is None:
    n = t_layers if num_layers is None else int(num_layers)
    if not 1 <= n <= t_layers:
      raise ValueError(f"num_layers: {n} is out of range 1..{t_layers} (the teacher's layers)")
    k = t_layers // n
    layers = tuple(i * k for i in range(n))
  else:
    layers = tuple(int(i) for i in layers)
    if not layers or any(not 0 <= i < t_layers for i in layers):
      raise ValueError(f"layers: {list(layers)} must be non-empty 0-based teacher layers in 0..{t_layers - 1}")
    if num_layers is not None and num_layers != len(layers):
      raise ValueError(f"num_layers: {num_layers} disagrees with layers={list(layers)}")
  if hidden_size is not None:
    config_overrides["hidden_size"] = int(hidden_size)
  config = hf.student_config(teacher.hf_config, layers, **config_overrides)
  student = model_from_config(config, teacher.task, tokenizer=teacher.tokenizer, seed=seed, dtype=dtype)
  if hidden_size is not None and int(hidden_size) != teacher.hidden_size:
    return student
  t_flat = flatten_dict(teacher.params)
  s_flat = flatten_dict(student.params)
  t_by_layer = _layer_container(t_flat)
  s_layer_keys = {k for keys in _layer_container(s_flat).values() for k in keys}
  copied = {}
  for s_index, t_index in enumerate(layers):
    for t_key in t_by_layer.get(t_index, []):
      pos = _layer_position(t_key)
      copied[t_key[:pos] + (str(s_index),) + t_key[pos + 1:]] = t_flat[t_key]
  t_layer_keys = {k for keys in t_by_layer.values() for k in keys}
  for key, value in t_flat.items():
    if key not in t_layer_keys and key in s_flat and key not in s_layer_keys:
      copied[key] = value
  params = {}
  for key, fresh in s_flat.items():
    value = copied.get(key)
    # A copy, never a view of the teacher's buffer: the student's state is donated to the step.
    params[key] = jnp.array(value, jnp.float32, copy=True) if value is not None and value.shape == fresh.shape else fresh
  return dataclasses.replace(student, params=unflatten_dict(params))


# ----------------------------------------------------------------------------- layer maps and vocab

LAYER_STRATEGIES = ("uniform", "last")


def layer_map(teacher_layers: int, student_layers: int,
              strategy: str | Sequence[int] | Sequence[tuple[int, int]] = "uniform") -> tuple[tuple[int, int], ...]:
  """Pairs `(student_layer, teacher_layer)` of 1-based layer numbers (hidden_states indices).

  Args:
    teacher_layers: teacher depth `Lt`.
    student_layers: student depth `Ls`.
    strategy: `"uniform"` (student i ↔ teacher i·k, k = Lt // Ls, TinyBERT), `"last"`
      (`((Ls, Lt),)`), a list of `Ls` teacher layers for student layers 1..Ls, or a list of
      `(student, teacher)` pairs.

  Returns:
    Tuple of `(student_layer, teacher_layer)` pairs; 0 would be the embeddings.
  """
  lt, ls = int(teacher_layers), int(student_layers)
  if ls < 1 or lt < 1:
    raise ValueError(f"layers: teacher_layers={lt} and student_layers={ls} must be >= 1")
  if isinstance(strategy, str):
    if strategy == "uniform":
      k = lt // ls
      if k < 1:
        raise ValueError(f"layers: uniform map needs teacher_layers >= student_layers, got {lt} < {ls}")
      pairs = tuple((i, i * k) for i in range(1, ls + 1))
    elif strategy == "last":
      pairs = ((ls, lt),)
    else:
      raise ValueError(f"layers: unknown strategy {strategy!r}; allowed: {', '.join(LAYER_STRATEGIES)} or a list")
  else:
    items = list(strategy)
    if all(isinstance(x, (tuple, list)) for x in items) and items:
      pairs = tuple((int(s), int(t)) for s, t in items)
    elif all(isinstance(x, (int, np.integer)) for x in items):
      if len(items) != ls:
        raise ValueError(f"layers: {items} must list one teacher layer for each of the {ls} student layers")
      pairs = tuple((i + 1, int(t)) for i, t in enumerate(items))
    else:
      raise ValueError(f"layers: {strategy!r} is neither a strategy name, a list of ints nor of pairs")
  for s, t in pairs:
    if not (0 <= s <= ls and 0 <= t <= lt):
      raise ValueError(f"layers: pair (student {s}, teacher {t}) out of range (student 0..{ls}, teacher 0..{lt})")
  return pairs


def check_vocab(teacher: Model, student: Model) -> int:
  """The vocabulary size logit losses may use; one-line ValueError naming `vocab` on mismatch.

  Same tokenizer content is required when both models have tokenizers; a padded embedding
  (more rows than tokens) is handled by slicing logits to the tokenizer's size.
  """
  t_vocab, s_vocab = hf.vocab_of(teacher.tokenizer), hf.vocab_of(student.tokenizer)
  if t_vocab is not None and s_vocab is not None and t_vocab != s_vocab:
    diff = len(set(t_vocab.items()) ^ set(s_vocab.items()))
    raise ValueError(f"vocab: teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens, "
                     f"{diff} differing entries); logit losses need the same tokenizer")
  usable = min(teacher.vocab_size, student.vocab_size)
  rows = (int(teacher.hf_config.vocab_size), int(student.hf_config.vocab_size))
  if t_vocab is None or s_vocab is None:
    if teacher.vocab_size != student.vocab_size:
      raise ValueError(f"vocab: teacher has {teacher.vocab_size} tokens, student {student.vocab_size}")
  if max(rows) > usable:
    logger.info("vocab: embeddings have %s rows (teacher, student) for %d tokens; logits are sliced to %d",
                rows, usable, usable)
  return usable
