"""Students derived from teachers, layer maps and the vocabulary check."""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from distill_jax.models.model import Model, model_from_config

logger = logging.getLogger("distill_jax.models")

# Name of the scanned layer stack in every family's param tree; its leaves are [L, ...].
LAYERS_KEY = "layers"
# Per-layer lists in HF configs (Gemma 2/3 and Qwen `layer_types`, SmolLM3 `no_rope_layers`).
_PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")


def student_config(config: Any, layers: Sequence[int], **overrides) -> Any:
  """The HF `config` with only the (0-based) `layers`, plus HF-named `overrides`."""
  config = copy.deepcopy(config)
  depth = int(config.num_hidden_layers)
  config.num_hidden_layers = len(layers)
  for field in _PER_LAYER_FIELDS:
    value = getattr(config, field, None)
    if isinstance(value, (list, tuple)) and len(value) == depth:
      setattr(config, field, [value[i] for i in layers])
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _chosen_layers(depth: int, num_layers: Optional[int], layers: Optional[Sequence[int]]) -> tuple[int, ...]:
  if layers is None:
    n = depth if num_layers is None else int(num_layers)
    if not 1 <= n <= depth:
      raise ValueError(f"num_layers: {n} is out of range 1..{depth} (the teacher's layers)")
    k = depth // n
    return tuple(i * k for i in range(n))
  layers = tuple(int(i) for i in layers)
  if not layers or any(not 0 <= i < depth for i in layers):
    raise ValueError(f"layers: {list(layers)} must be non-empty 0-based teacher layers in 0..{depth - 1}")
  if num_layers is not None and num_layers != len(layers):
    raise ValueError(f"num_layers: {num_layers} disagrees with layers={list(layers)}")
  return layers


def init_student(teacher: Model, num_layers: Optional[int] = None, *, layers: Optional[Sequence[int]] = None,
                 hidden_size: Optional[int] = None, seed: int = 0, dtype: Any = "float32",
                 remat: str = "none", **config_overrides) -> Model:
  """A smaller student of the teacher's family and task (DistilBERT-style when widths match).

  Args:
    teacher: the teacher `Model`.
    num_layers: student depth; layers `0, k, 2k, ...` (k = teacher_layers // num_layers) are copied.
    layers: explicit 0-based teacher layers to copy, e.g. `[0, 2, 4, 7, 9, 11]`.
    hidden_size: a different width: fresh init with the modified config (nothing copied).
    seed: PRNG seed of the fresh init.
    dtype: the student's computation dtype (its params are float32 master weights whatever
      the teacher's dtypes).
    remat: the student's layer-scan remat policy (`none`, `full`, `dots`).
    **config_overrides: more HF config fields for the student.

  Returns:
    A student `Model` with f32 params: embeddings, chosen layers and the head copied from the
    teacher when the widths match; fresh params otherwise.
  """
  layers = _chosen_layers(teacher.num_layers, num_layers, layers)
  if hidden_size is not None:
    config_overrides["hidden_size"] = int(hidden_size)
  config = student_config(teacher.hf_config, layers, **config_overrides)
  student = model_from_config(config, teacher.task, tokenizer=teacher.tokenizer, seed=seed, dtype=dtype,
                              remat=remat, source=teacher.source)
  if hidden_size is not None and int(hidden_size) != teacher.hidden_size:
    return student
  t_flat = flatten_dict(teacher.params)
  index = np.asarray(layers)
  params = {}
  for key, fresh in flatten_dict(student.params).items():
    value = t_flat.get(key)
    if value is not None and LAYERS_KEY in key:
      value = np.asarray(value)[index]
    # A copy, never a view of the teacher's buffer: the student's state is donated to the step.
    keep = value is not None and tuple(np.shape(value)) == tuple(fresh.shape)
    params[key] = jnp.array(value, jnp.float32, copy=True) if keep else fresh
  return dataclasses.replace(student, params=unflatten_dict(params))


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


def _vocab_of(tokenizer) -> Optional[dict[str, int]]:
  return None if tokenizer is None else tokenizer.get_vocab()


def check_vocab(teacher: Model, student: Model) -> int:
  """The vocabulary size logit losses may use; one-line ValueError naming `vocab` on mismatch.

  Same tokenizer content is required when both models have tokenizers; a padded embedding
  (more rows than tokens) is handled by slicing logits to the tokenizer's size.
  """
  t_vocab, s_vocab = _vocab_of(teacher.tokenizer), _vocab_of(student.tokenizer)
  if t_vocab is not None and s_vocab is not None and t_vocab != s_vocab:
    diff = len(set(t_vocab.items()) ^ set(s_vocab.items()))
    raise ValueError(f"vocab: teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens, "
                     f"{diff} differing entries); logit losses need the same tokenizer")
  usable = min(teacher.vocab_size, student.vocab_size)
  rows = (int(teacher.spec.vocab_size), int(student.spec.vocab_size))
  if (t_vocab is None or s_vocab is None) and teacher.vocab_size != student.vocab_size:
    raise ValueError(f"vocab: teacher has {teacher.vocab_size} tokens, student {student.vocab_size}")
  if max(rows) > usable:
    logger.info("vocab: embeddings have %s rows (teacher, student) for %d tokens; logits are sliced to %d",
                rows, usable, usable)
  return usable
