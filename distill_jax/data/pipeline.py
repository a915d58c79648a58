"""Text in, fixed-shape resumable per-host batches out.

Three stages, each a plain function with explicit arguments:

1. :func:`load_texts` (from :mod:`distill_jax.data.sources`): a ``datasets.Dataset`` split.
2. :func:`tokenize`: the teacher's tokenizer through ``datasets.map(batched=True)`` (cached
   under ``cache_dir``), then in-memory :class:`Examples` (flat token arrays + offsets):

   * ``causal_lm``: documents packed into ``max_length`` rows, each document followed by
     EOS; ``labels`` are the next token of the packed stream (already shifted) and
     ``loss_mask`` is 0 where the label crosses a document boundary and on padding.
     With a ``completion_column`` (sequence-level KD): one (prompt, completion) pair per
     row, ``prompt + completion + EOS`` truncated to ``max_length`` and padded to a length
     bucket; ``loss_mask`` is 1 exactly where the label is a completion token or the EOS.
   * ``masked_lm`` / ``sequence_classification`` / ``encoder``: one example per row,
     truncated to ``max_length`` (counted and logged once), padded to a length bucket
     (powers of two from ``min_bucket`` up to ``max_length``).

3. :func:`train_batches` / :func:`eval_batches`: a Grain pipeline
   (``MapDataset.range(steps).repeat().map_with_index(...)`` → ``to_iter_dataset`` with
   thread prefetch).  A *global* batch is a deterministic function of ``(seed, step)``; each
   process assembles only its rows ``[p * B/P, (p+1) * B/P)`` of it, so every host has the
   same number of steps and the same bucket shape at every step, and the union of the host
   batches is the global batch.  The iterator's ``get_state()`` is JSON (``next_index``);
   ``set_state`` on a freshly built iterator resumes at exactly the next batch.

Batch contract (numpy, see :mod:`distill_jax.models`): ``input_ids``, ``attention_mask``,
``loss_mask`` ``[B, L]`` int32, ``token_type_ids`` ``[B, L]`` int32 when the tokenizer makes
them, ``labels`` ``[B, L]`` int32 (``causal_lm``) or ``[B]`` int32
(``sequence_classification``).  ``masked_lm`` batches are unmasked (``loss_mask`` = real,
non-special tokens): the step masks them with :func:`mask_tokens` from ``(seed, step)``.
A padded example (eval padding) has all-zero ``attention_mask`` and ``loss_mask``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import multiprocessing
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import datasets
import grain
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data.sources import PYDOC, check_columns, load_texts, pydoc_corpus
from distill_jax.models import TASKS

__all__ = ["TASKS", "Examples", "tokenize", "train_batches", "eval_batches", "steps_per_epoch",
           "padding_report", "mask_tokens", "mask_batch", "load_texts", "pydoc_corpus", "PYDOC"]

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
  """Tokenized examples in memory, ready to batch.

  Attributes:
    task: one of :data:`TASKS`.
    max_length: the longest row.
    offsets: ``[N + 1]`` int64; example ``i`` is ``tokens[key][offsets[i]:offsets[i] + lengths[i]]``.
    lengths: ``[N]`` int32 tokens per example (``<= max_length``).
    tokens: flat token-level arrays by batch key (``input_ids``, optional ``token_type_ids``,
      ``labels`` and ``loss_mask`` for ``causal_lm``).
    labels: ``[N]`` int32 class labels (``sequence_classification``) or ``None``.
    buckets: the allowed row lengths, ascending (``(max_length,)`` without bucketing).
    pad_id: the id written at padded positions.
    special_ids: ids of the tokenizer's special tokens (never masked, no MLM loss).
    num_truncated: examples cut to ``max_length``.
    label_names: class names by label id, when the labels were strings or a ``ClassLabel``.
    row_arrays: ``[N, ...]`` int32 arrays copied whole into each batch row (the teacher's
      ids and the span tensors of `distill_jax.data.alignment.aligned_examples`), or ``None``.
  """

  task: str
  max_length: int
  offsets: np.ndarray
  lengths: np.ndarray
  tokens: dict[str, np.ndarray]
  labels: Optional[np.ndarray]
  buckets: tuple[int, ...]
  pad_id: int
  special_ids: tuple[int, ...]
  num_truncated: int = 0
  label_names: Optional[tuple[str, ...]] = None
  row_arrays: Optional[dict[str, np.ndarray]] = None  # [N, ...] per-example fixed-shape arrays (cross-tokenizer)

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def bucket_of(self) -> np.ndarray:
    """``[N]`` the row length of each example: the smallest bucket that holds it."""
    return np.asarray(self.buckets)[np.searchsorted(self.buckets, self.lengths)]


def length_buckets(max_length: int, min_bucket: int = 16) -> tuple[int, ...]:
  """Powers of two from ``min_bucket`` below ``max_length``, then ``max_length`` itself."""
  out, b = [], max(1, min(min_bucket, max_length))
  while b < max_length:
    out.append(b)
    b *= 2
  return tuple(out) + (max_length,)


def tokenize(dataset: datasets.Dataset, tokenizer: Any, *, task: str, max_length: int,
             text_columns: Sequence[str] = ("text",), label_column: Optional[str] = None,
             label_names: Optional[Sequence[str]] = None, completion_column: Optional[str] = None,
             bucket: bool = True, min_bucket: int = 16, num_proc: Optional[int] = None,
             cache_dir: Optional[str] = None) -> Examples:
  """Tokenizes a split with the teacher's tokenizer and lays it out for batching.

  Args:
    dataset: from :func:`load_texts`.
    tokenizer: a Hugging Face (fast) tokenizer object.
    task: one of :data:`TASKS`.
    max_length: row length (``causal_lm``) or the longest bucket.
    text_columns: one text column, or two for text pairs.
    label_column: class labels, required for ``sequence_classification``.
    label_names: class names by id when labels are strings (pass the train split's
      ``Examples.label_names`` when tokenizing validation); default: sorted unique labels.
    completion_column: ``causal_lm`` only: the column of completions of the prompts in
      ``text_columns[0]``; the loss then covers the completion tokens only (no packing).
    bucket: pad rows to :func:`length_buckets` instead of all to ``max_length`` (not for
      ``causal_lm``, whose packed rows are all full).
    min_bucket: the shortest bucket.
    num_proc: processes for ``datasets.map``.
    cache_dir: directory for the cached tokenized arrow file (``None``: the dataset's own
      cache when it is file-backed, else no cache).

  Returns:
    :class:`Examples`.
  """
  if task not in TASKS:
    raise ValueError(f"task: unknown {task!r}; allowed: {', '.join(TASKS)}")
  if max_length < 2:
    raise ValueError(f"data.max_length: must be >= 2, got {max_length}")
  text_columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
  if task == "sequence_classification" and label_column is None:
    raise ValueError("data.label_column: required for task 'sequence_classification'")
  if completion_column is not None and (task != "causal_lm" or len(text_columns) != 1):
    raise ValueError(f"data.completion_column: needs task causal_lm and one prompt column in data.text_columns, "
                     f"got task {task!r} and {list(text_columns)}")
  check_columns(dataset, text_columns + ((completion_column,) if completion_column else ()), label_column)
  special_ids = tuple(sorted(set(tokenizer.all_special_ids)))
  if task == "causal_lm":
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
      raise ValueError("tokenizer: causal_lm packing needs an eos_token (or sep_token) as separator")
    fn, kwargs = _tokenize_docs, dict(tokenizer=tokenizer, columns=text_columns, eos=eos)
    if completion_column is not None:
      fn, kwargs = _tokenize_completions, dict(tokenizer=tokenizer, prompt_column=text_columns[0],
                                               completion_column=completion_column, eos=eos, max_length=max_length)
  else:
    fn, kwargs = _tokenize_rows, dict(tokenizer=tokenizer, columns=text_columns, max_length=max_length)
  cache_file = None
  if cache_dir is not None:
    from datasets.fingerprint import Hasher

    os.makedirs(cache_dir, exist_ok=True)
    key = Hasher.hash([dataset._fingerprint, tokenizer_key(tokenizer), task, max_length, text_columns,
                       completion_column])
    cache_file = os.path.join(cache_dir, f"tokenized-{key}.arrow")
  tokenized = dataset.map(fn, fn_kwargs=kwargs, batched=True, num_proc=num_proc, desc=f"tokenize ({task})",
                          remove_columns=[c for c in dataset.column_names if c != label_column],
                          cache_file_name=cache_file)
  pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
  lists = {k: tokenized.data.column(k).combine_chunks() for k in ("input_ids", "token_type_ids", "loss_mask")
           if k in tokenized.column_names}
  columns = {k: np.asarray(v.values, np.int32) for k, v in lists.items()}
  offsets = np.asarray(lists["input_ids"].offsets, np.int64)
  if task == "causal_lm" and completion_column is None:
    return _pack(columns["input_ids"], offsets, max_length, pad_id, special_ids)
  if completion_column is not None:
    columns["labels"] = np.append(columns["input_ids"][1:], pad_id).astype(np.int32)
    columns["labels"][offsets[1:] - 1] = pad_id  # the last token of a row predicts nothing
  labels, names = None, None
  if label_column is not None:
    labels, names = _class_labels(tokenized, label_column, label_names)
  lengths = np.diff(offsets).astype(np.int32)
  num_truncated = int(np.sum(tokenized["truncated"]))
  if num_truncated:
    _LOG.warning("data: truncated %d of %d examples to max_length=%d", num_truncated, len(lengths), max_length)
  ex = Examples(task=task, max_length=max_length, offsets=offsets[:-1], lengths=lengths, tokens=columns,
                labels=labels, buckets=length_buckets(max_length, min_bucket) if bucket else (max_length,),
                pad_id=pad_id, special_ids=special_ids, num_truncated=num_truncated, label_names=names)
  if bucket:
    rep = padding_report(ex)
    _LOG.info("data: length buckets %s pad %.1f%% of tokens vs %.1f%% padding to max_length=%d",
              list(ex.buckets), 100 * rep["padding_fraction_buckets"], 100 * rep["padding_fraction_max_length"],
              max_length)
  return ex


def tokenize_stream(rows: Iterable[dict], tokenizer: Any, *, text_columns: Sequence[str] = ("text",),
                    num_workers: int = 0, chunk_size: int = 512) -> Iterator[list[int]]:
  """``causal_lm`` documents of a stream of examples, tokenized as :func:`tokenize` does
  (texts joined, no special tokens, EOS appended), in order, `chunk_size` examples at a time.

  Args:
    rows: example dicts (e.g. :func:`distill_jax.data.sources.stream_texts`).
    tokenizer: a Hugging Face tokenizer object.
    text_columns: the columns joined into one document.
    num_workers: tokenizing processes (0: in-process); order is kept.
    chunk_size: examples per tokenizer call.

  Yields:
    The token ids of each document, EOS last.
  """
  eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
  if eos is None:
    raise ValueError("tokenizer: causal_lm packing needs an eos_token (or sep_token) as separator")
  columns = tuple(text_columns)
  rows = iter(rows)
  chunks = iter(lambda: {c: [r[c] for r in chunk] for c in columns} if (chunk := list(itertools.islice(rows, chunk_size)))
                else None, None)
  if num_workers:
    # fork, as datasets.map(num_proc) does: the workers run the tokenizer only, never JAX
    # (whose warning about forking a multithreaded process is therefore moot here).
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
      pool = multiprocessing.get_context("fork").Pool(num_workers, _init_stream_worker, (tokenizer, columns, eos))
    with pool:
      pending: collections.deque = collections.deque()  # a bounded window (Pool.imap reads ahead unbounded)
      for chunk in chunks:
        pending.append(pool.apply_async(_stream_worker, (chunk,)))
        if len(pending) >= 2 * num_workers:
          yield from pending.popleft().get()
      while pending:
        yield from pending.popleft().get()
  else:
    for chunk in chunks:
      yield from _tokenize_docs(chunk, tokenizer=tokenizer, columns=columns, eos=eos)["input_ids"]


_WORKER: dict[str, Any] = {}


def _init_stream_worker(tokenizer: Any, columns: Sequence[str], eos: int) -> None:
  _WORKER.update(tokenizer=tokenizer, columns=columns, eos=eos)


def _stream_worker(chunk: dict) -> list[list[int]]:
  return _tokenize_docs(chunk, **_WORKER)["input_ids"]


def tokenizer_key(tokenizer: Any) -> str:
  """The tokenizer's full definition as text (the fast tokenizer's JSON), for cache keys."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  return backend.to_str() if backend is not None else repr(tokenizer)


def _texts(batch: dict, columns: Sequence[str]) -> list:
  return [[t or "" for t in batch[c]] for c in columns]


def _tokenize_docs(batch: dict, *, tokenizer: Any, columns: Sequence[str], eos: int) -> dict:
  texts = [" ".join(t for t in parts if t) for parts in zip(*_texts(batch, columns))]
  ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
  return {"input_ids": [x + [eos] for x in ids]}


def _tokenize_completions(batch: dict, *, tokenizer: Any, prompt_column: str, completion_column: str, eos: int,
                          max_length: int) -> dict:
  """``prompt + completion + [eos]`` ids per row, cut to `max_length`; ``loss_mask`` 1 where the
  next token (the label) belongs to the completion or is the EOS."""
  prompts, completions = _texts(batch, (prompt_column, completion_column))
  p_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
  c_ids = tokenizer(completions, add_special_tokens=False, verbose=False)["input_ids"]
  ids, masks, truncated = [], [], []
  for p, c in zip(p_ids, c_ids):
    row = p + c + [eos]
    mask = [0] * max(len(p) - 1, 0) + [1] * (len(c) + 1) + [0]
    mask = mask[len(mask) - len(row):]  # an empty prompt: the first token has no predictor
    ids.append(row[:max_length])
    masks.append(mask[:max_length - 1] + [0] if len(row) > max_length else mask)
    truncated.append(len(row) > max_length)
  return {"input_ids": ids, "loss_mask": masks, "truncated": truncated}


def _tokenize_rows(batch: dict, *, tokenizer: Any, columns: Sequence[str], max_length: int) -> dict:
  texts = _texts(batch, columns)
  enc = dict(tokenizer(*texts, verbose=False))
  long = [i for i, x in enumerate(enc["input_ids"]) if len(x) > max_length]
  if long:  # Re-tokenize only the long ones with the tokenizer's own truncation strategy.
    cut = tokenizer(*[[t[i] for i in long] for t in texts], truncation=True, max_length=max_length)
    for key in enc:
      if key in cut:
        for j, i in enumerate(long):
          enc[key][i] = cut[key][j]
  out = {k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}
  cut_rows = set(long)
  out["truncated"] = [i in cut_rows for i in range(len(enc["input_ids"]))]
  return out


def _class_labels(ds: datasets.Dataset, column: str, names: Optional[Sequence[str]]):
  feature = ds.features[column]
  if isinstance(feature, datasets.ClassLabel):
    return np.asarray(ds[column], np.int32), tuple(feature.names)
  values = ds[column]
  if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
    return np.asarray(values, np.int32), tuple(names) if names else None
  names = tuple(names) if names else tuple(sorted({str(v) for v in values}))
  index = {n: i for i, n in enumerate(names)}
  unknown = sorted({str(v) for v in values} - set(index))
  if unknown:
    raise ValueError(f"data.label_column: labels {unknown[:5]} not in label names {list(names)}")
  return np.asarray([index[str(v)] for v in values], np.int32), names


def _pack(stream_ids: np.ndarray, doc_offsets: np.ndarray, length: int, pad_id: int,
          special_ids: tuple[int, ...]) -> Examples:
  """Packs the concatenated documents (each ending in EOS) into rows of ``length``."""
  n = len(stream_ids)
  labels = np.full(n, pad_id, np.int32)
  labels[:-1] = stream_ids[1:]
  loss_mask = np.ones(n, np.int32)
  loss_mask[doc_offsets[1:] - 1] = 0  # The EOS's label is the next document's first token.
  rows = -(-n // length)
  offsets = np.arange(rows, dtype=np.int64) * length
  lengths = np.minimum(length, n - offsets).astype(np.int32)
  return Examples(task="causal_lm", max_length=length, offsets=offsets, lengths=lengths,
                  tokens={"input_ids": stream_ids, "labels": labels, "loss_mask": loss_mask}, labels=None,
                  buckets=(length,), pad_id=pad_id, special_ids=special_ids)


def padding_report(examples: Examples) -> dict[str, float]:
  """Padding with length buckets vs padding every row to ``max_length``.

  Returns:
    ``real_tokens``, ``padding_fraction_buckets`` / ``padding_fraction_max_length`` (padded
    positions over all positions) and ``padded_positions_saved`` (fraction of the
    ``max_length`` layout's positions that buckets do not compute at all).
  """
  real = float(examples.lengths.sum())
  bucketed = float(examples.bucket_of.sum())
  full = float(len(examples) * examples.max_length)
  return {"real_tokens": real, "padding_fraction_buckets": 1.0 - real / bucketed,
          "padding_fraction_max_length": 1.0 - real / full, "padded_positions_saved": 1.0 - bucketed / full}


def assemble(examples: Examples, indices: Sequence[int], length: int) -> dict[str, np.ndarray]:
  """One batch of the contract from example ``indices`` (``-1`` = a padded example); `examples`
  read from disk (`distill_jax.data.prepared.PreparedSplit`) assemble their own rows."""
  if not isinstance(examples, Examples):
    return examples.assemble(indices, length)
  b = len(indices)
  out = {"input_ids": np.full((b, length), examples.pad_id, np.int32),
         "attention_mask": np.zeros((b, length), np.int32)}
  for key in examples.tokens:
    if key != "input_ids":
      out[key] = np.zeros((b, length), np.int32) if key != "labels" else np.full((b, length), examples.pad_id, np.int32)
  for row, i in enumerate(indices):
    if i < 0:
      continue
    start, n = examples.offsets[i], examples.lengths[i]
    out["attention_mask"][row, :n] = 1
    for key, flat in examples.tokens.items():
      out[key][row, :n] = flat[start:start + n]
  if "loss_mask" not in out:
    special = (np.isin(out["input_ids"], examples.special_ids) if examples.task == "masked_lm"
               else np.zeros(out["input_ids"].shape, bool))
    out["loss_mask"] = (out["attention_mask"] * np.logical_not(special)).astype(np.int32)
  if examples.labels is not None:
    idx = np.asarray(indices)
    out["labels"] = np.where(idx >= 0, examples.labels[np.maximum(idx, 0)], 0).astype(np.int32)
  for key, arr in (examples.row_arrays or {}).items():  # the teacher's side of a cross-tokenizer row
    out[key] = np.where((np.asarray(indices) >= 0).reshape((b,) + (1,) * (arr.ndim - 1)),
                        arr[np.maximum(np.asarray(indices), 0)], -1 if key.endswith("_span") else 0).astype(np.int32)
  return out


def _plan_epoch(bucket_of: np.ndarray, batch_size: int, *, seed: Optional[int], epoch: int,
                drop_remainder: bool) -> list[np.ndarray]:
  """Global batches of one epoch: same-bucket example indices, ``-1`` padding when kept."""
  rng = np.random.default_rng([seed, epoch]) if seed is not None else None
  batches = []
  for b in np.unique(bucket_of):
    idx = np.flatnonzero(bucket_of == b)
    if rng is not None:
      idx = rng.permutation(idx)
    full = len(idx) // batch_size * batch_size
    batches += list(idx[:full].reshape(-1, batch_size))
    if full < len(idx) and not drop_remainder:
      batches.append(np.concatenate([idx[full:], np.full(batch_size - (len(idx) - full), -1, idx.dtype)]))
  if rng is not None:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def _host_split(global_batch_size: int, process_index: Optional[int], process_count: Optional[int],
                num_devices: Optional[int]) -> tuple[int, int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1:
    raise ValueError(f"data.global_batch_size: must be positive, got {global_batch_size}")
  if global_batch_size % process_count:
    raise ValueError(f"data.global_batch_size: {global_batch_size} is not divisible by process_count={process_count}")
  if num_devices and global_batch_size % num_devices:
    raise ValueError(f"data.global_batch_size: {global_batch_size} is not divisible by the {num_devices} devices")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index: {process_index} not in [0, {process_count})")
  return process_index, process_count, global_batch_size // process_count


class _Batches:
  """``(step, _) -> host batch``: plans an epoch once (thread-safe) and assembles host rows."""

  def __init__(self, examples: Examples, global_batch_size: int, seed: Optional[int], drop_remainder: bool,
               process_index: int, per_host: int, extras: Optional[dict] = None):
    self._examples, self._bucket_of = examples, examples.bucket_of
    self._extras = dict(extras or {})
    self._kw = dict(batch_size=global_batch_size, seed=seed, drop_remainder=drop_remainder)
    self._rows = slice(process_index * per_host, (process_index + 1) * per_host)
    self._lock, self._plans = threading.Lock(), {}
    self.steps_per_epoch = len(self.plan(0))

  def plan(self, epoch: int) -> list[np.ndarray]:
    with self._lock:
      if epoch not in self._plans:
        if len(self._plans) >= 2:
          self._plans.pop(min(self._plans))
        self._plans[epoch] = _plan_epoch(self._bucket_of, epoch=epoch, **self._kw)
      return self._plans[epoch]

  def __call__(self, step: int, _: Any) -> dict[str, np.ndarray]:
    batch = self.plan(step // self.steps_per_epoch)[step % self.steps_per_epoch]
    length = int(self._bucket_of[batch[batch >= 0][0]])
    out = assemble(self._examples, batch[self._rows], length)
    for key, rows in self._extras.items():
      out[key] = rows(batch[self._rows], length)
    return out


def _pipeline(examples: Examples, *, global_batch_size: int, seed: Optional[int], drop_remainder: bool,
              num_epochs: Optional[int], process_index: Optional[int], process_count: Optional[int],
              num_devices: Optional[int], num_threads: int, prefetch: int,
              extras: Optional[dict]) -> grain.DatasetIterator:
  p, _, per_host = _host_split(global_batch_size, process_index, process_count, num_devices)
  make = _Batches(examples, global_batch_size, seed, drop_remainder, p, per_host, extras)
  if make.steps_per_epoch == 0:
    raise ValueError(f"data.global_batch_size: {len(examples)} examples make no full batch of {global_batch_size}"
                     f" (per length bucket)")
  ds = grain.MapDataset.range(make.steps_per_epoch).repeat(num_epochs).map_with_index(make)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(read))


def train_batches(examples: Examples, *, global_batch_size: int, seed: int = 0, num_epochs: Optional[int] = None,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  num_devices: Optional[int] = None, num_threads: int = 2,
                  prefetch: int = 8, extras: Optional[dict] = None) -> grain.DatasetIterator:
  """This process's training batches: shuffled per epoch, full global batches only.

  Args:
    examples: from :func:`tokenize`.
    global_batch_size: examples per step over all processes.
    seed: shuffle seed; epoch ``e`` is shuffled by ``(seed, e)``.
    num_epochs: ``None`` repeats forever.
    process_index: this process (default ``jax.process_index()``).
    process_count: all processes (default ``jax.process_count()``).
    num_devices: when given, ``global_batch_size`` must divide over this many devices.
    num_threads: background threads assembling batches.
    prefetch: batches buffered ahead.
    extras: ``{key: fn}``: each batch also gets ``batch[key] = fn(example_indices, length)``
      for this host's rows (``-1``: a padded example), e.g. a teacher cache's packed rows.

  Returns:
    A Grain iterator of host batches (``global_batch_size / process_count`` rows); resume
    with ``set_state(get_state())`` on a new iterator built with the same arguments.
  """
  return _pipeline(examples, global_batch_size=global_batch_size, seed=seed, drop_remainder=True,
                   num_epochs=num_epochs, process_index=process_index, process_count=process_count,
                   num_devices=num_devices, num_threads=num_threads, prefetch=prefetch, extras=extras)


def eval_batches(examples: Examples, *, global_batch_size: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, num_devices: Optional[int] = None,
                 num_threads: int = 2, prefetch: int = 8, extras: Optional[dict] = None) -> grain.DatasetIterator:
  """One pass over every example, in order by bucket; the last batch of each bucket is
  filled with padded examples (all-zero ``attention_mask`` and ``loss_mask``); `extras` as in
  :func:`train_batches`."""
  return _pipeline(examples, global_batch_size=global_batch_size, seed=None, drop_remainder=False,
                   num_epochs=1, process_index=process_index, process_count=process_count,
                   num_devices=num_devices, num_threads=num_threads, prefetch=prefetch, extras=extras)


def steps_per_epoch(examples: Examples, global_batch_size: int, *, drop_remainder: bool = True) -> int:
  """Global batches in one epoch (training: ``drop_remainder=True``)."""
  return len(_plan_epoch(examples.bucket_of, global_batch_size, seed=None, epoch=0, drop_remainder=drop_remainder))


def mask_tokens(rng: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *, mask_token_id: int,
                vocab_size: int, special_ids: Sequence[int] = (), prob: float = 0.15
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """BERT dynamic masking: ``prob`` of the real, non-special tokens become targets; of
  those 80% turn into ``mask_token_id``, 10% a uniform random id, 10% stay.

  Pure and jittable (bind the keyword arguments statically); deterministic given ``rng``,
  e.g. ``jax.random.fold_in(jax.random.key(seed), step)``.

  Args:
    rng: a PRNG key.
    input_ids: ``[B, T]`` int.
    attention_mask: ``[B, T]``; 0 positions are never targets.
    mask_token_id: the ``[MASK]`` id.
    vocab_size: random replacements are drawn from ``[0, vocab_size)``.
    special_ids: ids never chosen as targets (CLS, SEP, PAD, ...).
    prob: target probability per eligible token.

  Returns:
    ``(masked_input_ids, labels, loss_mask)``: ``[B, T]`` int32 each; ``labels`` are the
    original ids and ``loss_mask`` is 1 exactly at the targets.

  References:
    Devlin et al., BERT, 2019.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  k_select, k_action, k_random = jax.random.split(rng, 3)
  eligible = jnp.asarray(attention_mask) != 0
  if special_ids:
    eligible &= ~jnp.isin(input_ids, jnp.asarray(special_ids, jnp.int32))
  target = eligible & jax.random.bernoulli(k_select, prob, input_ids.shape)
  action = jax.random.uniform(k_action, input_ids.shape)
  random_ids = jax.random.randint(k_random, input_ids.shape, 0, vocab_size, jnp.int32)
  masked = jnp.where(target & (action < 0.8), mask_token_id, input_ids)
  masked = jnp.where(target & (action >= 0.8) & (action < 0.9), random_ids, masked)
  return masked, input_ids, target.astype(jnp.int32)


def mask_batch(rng: jax.Array, batch: dict, *, mask_token_id: int, vocab_size: int,
               special_ids: Sequence[int] = (), prob: float = 0.15) -> dict:
  """:func:`mask_tokens` applied to a ``masked_lm`` batch: returns it with ``input_ids``,
  ``labels`` and ``loss_mask`` replaced."""
  ids, labels, loss_mask = mask_tokens(rng, batch["input_ids"], batch["attention_mask"], mask_token_id=mask_token_id,
                                       vocab_size=vocab_size, special_ids=special_ids, prob=prob)
  return {**batch, "input_ids": ids, "labels": labels, "loss_mask": loss_mask}

