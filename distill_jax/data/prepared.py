"""Prepared data: tokenized fixed-length rows on disk, read with random access per host.

``distill-jax prepare-data CONFIG OUT_DIR`` (:mod:`distill_jax.commands.prepare_data`) writes
the rows `train` would build in memory (same tokenizer, packing, ``max_length``, buckets)
once; training with ``data.source: OUT_DIR`` then reads each host's rows of every global
batch from the shards and holds nothing else of the corpus but the row lengths. Layout::

  manifest.json                written last: format version, tokenizer and data fingerprints,
                               rows, tokens, padding fraction per split (the set is complete)
  progress.json                while unfinished: what is being written (a rerun must match it)
  train/shard-00000.npy ...    int32, 1-D: lengths [n], class labels [n], rows [n, K, max_length]
  validation/shard-00000.npy

A row holds the ``K`` token arrays of the batch contract (``input_ids``, and ``labels`` /
``loss_mask`` / ``token_type_ids`` as the task makes them), padded with the values
:func:`distill_jax.data.pipeline.assemble` pads with, so a row read back *is* the batch row.
Reads use ``os.pread`` on the shard files (no memory map): the process's memory holds the
rows of the batches in flight, never the corpus. A shard is written to a temporary name and
renamed (a killed run leaves whole shards only; a rerun writes exactly the missing ones);
process ``p`` of ``P`` writes the shards ``s % P == p``.

The data fingerprint of a split is :func:`distill_jax.data.teacher_cache.data_fingerprint` of
the equivalent in-memory `Examples`, computed from the shards, so a teacher cache and a
prepared set made from the same config line up.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np

from distill_jax.data import pipeline as data
from distill_jax.data.teacher_cache import data_fingerprint as examples_fingerprint
from distill_jax.data.teacher_cache import tokenizer_fingerprint
from distill_jax.errors import UserError

FORMAT = "distill-jax-prepared"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SPLITS = ("train", "validation")
SHARD_BYTES = 64 << 20  # default shard size (data.shard_rows unset)
_FILL_PAD = ("input_ids", "labels")  # padded with pad_id; every other key with 0


def shard_path(root: pathlib.Path, split: str, shard: int) -> pathlib.Path:
  return root / split / f"shard-{shard:05d}.npy"


def default_shard_rows(num_keys: int, max_length: int) -> int:
  return max(1, SHARD_BYTES // (4 * num_keys * max_length))


def token_keys(examples: Any) -> tuple[str, ...]:
  """The per-token arrays a row stores, in a fixed order."""
  return tuple(sorted(examples.tokens))


# --------------------------------------------------------------------------- rows


def rows_from_examples(examples: data.Examples, start: int, stop: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rows ``[start, stop)`` of in-memory `examples` as ``(lengths [n], labels [n], tokens [n, K, L])``."""
  keys, length = token_keys(examples), examples.max_length
  n = stop - start
  tokens = np.zeros((n, len(keys), length), np.int32)
  for k, key in enumerate(keys):
    if key in _FILL_PAD:
      tokens[:, k] = examples.pad_id
  lengths = examples.lengths[start:stop].astype(np.int32)
  if n:
    flat_len = len(examples.tokens["input_ids"])
    positions = examples.offsets[start:stop, None].astype(np.int64) + np.arange(length)[None, :]
    valid = np.arange(length)[None, :] < lengths[:, None]
    positions = np.minimum(positions, max(flat_len - 1, 0))
    for k, key in enumerate(keys):
      tokens[:, k] = np.where(valid, examples.tokens[key][positions], tokens[:, k])
  labels = (examples.labels[start:stop].astype(np.int32) if examples.labels is not None
            else np.zeros(n, np.int32))
  return lengths, labels, tokens


class Packer:
  """Packs documents (each ending in EOS) into ``causal_lm`` rows, as `pipeline.tokenize` does
  for the whole split at once: ``labels`` are the next token of the stream (across rows),
  ``loss_mask`` is 0 at each document's last token and on padding."""

  KEYS = ("input_ids", "labels", "loss_mask")  # sorted, as `token_keys`

  def __init__(self, max_length: int, pad_id: int):
    self.length, self.pad_id = max_length, pad_id
    self._ids: list[np.ndarray] = []
    self._ends: list[np.ndarray] = []
    self._buffered = 0

  def add(self, doc_ids: Sequence[int]) -> Iterator[tuple[np.ndarray, int]]:
    """Adds one document; yields the rows ``([3, L] tokens, real length)`` now complete."""
    ids = np.asarray(doc_ids, np.int32)
    if not len(ids):
      return
    ends = np.zeros(len(ids), np.int32)
    ends[-1] = 1
    self._ids.append(ids)
    self._ends.append(ends)
    self._buffered += len(ids)
    if self._buffered > self.length:  # a row needs the next token as its last label
      ids, ends = np.concatenate(self._ids), np.concatenate(self._ends)
      rows = (len(ids) - 1) // self.length
      used = rows * self.length
      for r in range(rows):
        s = slice(r * self.length, (r + 1) * self.length)
        yield self._row(ids[s], ids[r * self.length + 1:(r + 1) * self.length + 1], ends[s])
      self._ids, self._ends, self._buffered = [ids[used:]], [ends[used:]], len(ids) - used

  def finish(self) -> Iterator[tuple[np.ndarray, int]]:
    """The last, possibly short, row."""
    if self._buffered:
      ids, ends = np.concatenate(self._ids), np.concatenate(self._ends)
      yield self._row(ids, np.append(ids[1:], self.pad_id), ends)
      self._ids, self._ends, self._buffered = [], [], 0

  def _row(self, ids: np.ndarray, labels: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, int]:
    row = np.zeros((3, self.length), np.int32)
    row[0], row[1] = self.pad_id, self.pad_id
    n = len(ids)
    row[0, :n], row[1, :n], row[2, :n] = ids, labels, 1 - ends
    return row, n


# --------------------------------------------------------------------------- writing


def write_shard(path: pathlib.Path, lengths: np.ndarray, labels: np.ndarray, tokens: np.ndarray,
                tag: str = "0") -> None:
  """One shard, atomically: a temporary file renamed to `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = np.concatenate([np.asarray(lengths, np.int32), np.asarray(labels, np.int32),
                         np.asarray(tokens, np.int32).reshape(-1)])
  tmp = path.with_name(f"{path.stem}.tmp-{tag}.npy")  # a kill mid-write leaves this, never `path`
  with open(tmp, "wb") as f:
    np.save(f, flat)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def check_or_start(root: pathlib.Path, meta: Mapping[str, Any], *, create: bool) -> Optional[dict]:
  """Resuming rules: returns the manifest of a complete set made with the same `meta` (None
  when unfinished or new); a set of another identity, or a non-empty directory that is no
  prepared set, is a one-line `UserError` naming ``OUT_DIR`` before anything is written.
  `create`: write ``progress.json`` into a new directory (process 0)."""
  for name in (MANIFEST, PROGRESS):
    path = root / name
    if path.is_file():
      old = json.loads(path.read_text())
      diff = [k for k in ("version", "tokenizer_fingerprint", "task", "max_length", "keys", "buckets", "pad_id",
                          "data", "shard_rows", "expected", "settings") if old.get(k) != meta.get(k)]
      if diff:
        raise UserError(f"OUT_DIR: {str(root)!r} holds data prepared with another {', '.join(diff)}; choose "
                        f"another directory or delete it")
      return old if name == MANIFEST else None
  if root.exists() and (not root.is_dir() or any(root.iterdir())):
    raise UserError(f"OUT_DIR: {str(root)!r} is not empty and holds no prepared data")
  if create:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, root / PROGRESS)
  return None


def write_examples(root: pathlib.Path, split: str, examples: data.Examples, shard_rows: int, *,
                   process_index: int = 0, process_count: int = 1, on_shard=None) -> int:
  """Writes this process's missing shards of in-memory `examples`; returns how many it wrote.

  Args:
    on_shard: called with the real tokens of each written shard (progress).
  """
  written = 0
  for s in range(-(-len(examples) // shard_rows)):
    path = shard_path(root, split, s)
    if s % process_count != process_index or path.is_file():
      continue
    lengths, labels, tokens = rows_from_examples(examples, s * shard_rows, min((s + 1) * shard_rows, len(examples)))
    write_shard(path, lengths, labels, tokens, tag=str(process_index))
    written += 1
    if on_shard is not None:
      on_shard(int(lengths.sum()))
  return written


def write_packed_stream(root: pathlib.Path, split: str, docs: Iterable[Sequence[int]], *, max_length: int,
                        pad_id: int, shard_rows: int, process_index: int = 0, process_count: int = 1,
                        on_shard=None) -> tuple[int, int]:
  """Packs a stream of tokenized documents (each ending in EOS) into ``causal_lm`` rows and
  writes this process's missing shards, holding at most one shard of rows in memory.

  Returns:
    ``(rows, real tokens)`` of the whole split (every process packs the whole stream, to know
    where its shards start).
  """
  packer = Packer(max_length, pad_id)
  rows: list[np.ndarray] = []
  lengths: list[int] = []
  total = {"rows": 0, "tokens": 0, "shard": 0}

  def flush() -> None:
    s = total["shard"]
    total["shard"] += 1
    n = np.asarray(lengths, np.int32)
    total["rows"] += len(n)
    total["tokens"] += int(n.sum())
    path = shard_path(root, split, s)
    if s % process_count == process_index and not path.is_file():
      write_shard(path, n, np.zeros(len(n), np.int32), np.stack(rows), tag=str(process_index))
      if on_shard is not None:
        on_shard(int(n.sum()))
    rows.clear()
    lengths.clear()

  def take(made: Iterable[tuple[np.ndarray, int]]) -> None:
    for row, n in made:
      rows.append(row)
      lengths.append(n)
      if len(rows) == shard_rows:
        flush()

  for doc in docs:
    take(packer.add(doc))
  take(packer.finish())
  if rows:
    flush()
  return total["rows"], total["tokens"]


# --------------------------------------------------------------------------- reading


def _header(path: pathlib.Path, field: str) -> tuple[int, int]:
  """``(data offset, int32 count)`` of a shard; one-line `UserError` naming `field` unless it
  is a whole 1-D int32 ``.npy``."""
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, fortran, dtype = read(f)
      offset = f.tell()
  except FileNotFoundError:
    raise UserError(f"{field}: shard {str(path)!r} is missing; rerun distill-jax prepare-data to complete the set") from None
  except (ValueError, OSError) as e:
    raise UserError(f"{field}: shard {str(path)!r} is corrupt ({e}); rerun distill-jax prepare-data after "
                    f"deleting it") from None
  if dtype != np.dtype("<i4") or len(shape) != 1 or fortran:
    raise UserError(f"{field}: shard {str(path)!r} is not a prepared shard (dtype {dtype}, shape {shape})")
  return offset, int(shape[0])


class PreparedSplit:
  """One split of a prepared set, read from disk: the interface of `pipeline.Examples` that the
  pipeline uses (``lengths``, ``bucket_of``, ``assemble``, ...) and a Grain random-access data
  source (``len``, ``[i]``: one row's arrays).

  Only the row lengths (and class labels) live in memory; rows are read with ``os.pread``.
  """

  def __init__(self, root: pathlib.Path, split: str, manifest: Mapping[str, Any], field: str = "data.source"):
    info = manifest["splits"][split]
    self.root, self.split = root, split
    self.task, self.max_length = manifest["task"], int(manifest["max_length"])
    self.buckets = tuple(int(b) for b in manifest["buckets"])
    self.pad_id = int(manifest["pad_id"])
    self.special_ids = tuple(int(i) for i in manifest["special_ids"])
    self.label_names = tuple(manifest["label_names"]) if manifest.get("label_names") else None
    self.keys = tuple(manifest["keys"])
    self.num_truncated = int(info.get("num_truncated", 0))
    self.fingerprint = info["data_fingerprint"]
    self._row_ints = len(self.keys) * self.max_length
    shard_rows, rows = int(info["shard_rows"]), int(info["rows"])
    self._shard_rows = shard_rows
    self._shards: list[tuple[pathlib.Path, int, int]] = []  # (path, rows, data offset)
    lengths, labels = [], []
    for s in range(-(-rows // shard_rows)):
      path = shard_path(root, split, s)
      n = min(shard_rows, rows - s * shard_rows)
      offset, count = _header(path, field)
      want = n * (2 + self._row_ints)
      if count != want or path.stat().st_size != offset + 4 * want:
        raise UserError(f"{field}: shard {str(path)!r} is truncated or of another set ({path.stat().st_size} bytes, "
                        f"expected {offset + 4 * want}); delete it and rerun distill-jax prepare-data")
      self._shards.append((path, n, offset))
      head = self._pread(s, offset, 2 * n)
      lengths.append(head[:n])
      labels.append(head[n:])
    self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    self.labels = (np.concatenate(labels) if manifest.get("has_labels") and labels else None)

  # -- the `Examples` interface
  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def bucket_of(self) -> np.ndarray:
    return np.asarray(self.buckets)[np.searchsorted(self.buckets, self.lengths)]

  @property
  def offsets(self) -> np.ndarray:
    """Where each row starts in the split's token stream (as `Examples.offsets`)."""
    return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)[:-1]]).astype(np.int64)

  @property
  def tokens(self) -> dict[str, "_FlatTokens"]:
    """Lazy flat token arrays (``np.asarray`` reads the whole split: for small sets only)."""
    return {key: _FlatTokens(self, k) for k, key in enumerate(self.keys)}

  def assemble(self, indices: Sequence[int], length: int) -> dict[str, np.ndarray]:
    """`pipeline.assemble` of rows `indices` (``-1``: a padded example), read from the shards."""
    idx = np.asarray(indices, np.int64)
    rows = np.zeros((len(idx), len(self.keys), self.max_length), np.int32)
    for k, key in enumerate(self.keys):
      if key in _FILL_PAD:
        rows[:, k] = self.pad_id
    for r, i in enumerate(idx):
      if i >= 0:
        rows[r] = self.row(int(i))
    n = np.where(idx >= 0, self.lengths[np.maximum(idx, 0)] if len(self.lengths) else 0, 0)
    out = {"input_ids": rows[:, self.keys.index("input_ids"), :length].copy(),
           "attention_mask": (np.arange(length)[None, :] < n[:, None]).astype(np.int32)}
    for k, key in enumerate(self.keys):
      if key != "input_ids":
        out[key] = rows[:, k, :length].copy()
    if "loss_mask" not in out:
      special = (np.isin(out["input_ids"], self.special_ids) if self.task == "masked_lm"
                 else np.zeros(out["input_ids"].shape, bool))
      out["loss_mask"] = (out["attention_mask"] * np.logical_not(special)).astype(np.int32)
    if self.labels is not None:
      out["labels"] = np.where(idx >= 0, self.labels[np.maximum(idx, 0)], 0).astype(np.int32)
    return out

  # -- Grain's RandomAccessDataSource protocol
  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    row = self.row(int(i))
    out = {key: row[k] for k, key in enumerate(self.keys)}
    out["length"] = self.lengths[i]
    if self.labels is not None:
      out["label"] = self.labels[i]
    return out

  def __repr__(self) -> str:
    return f"PreparedSplit({str(self.root)!r}, {self.split!r}, rows={len(self)})"

  def row(self, i: int) -> np.ndarray:
    """Row `i`: ``int32 [K, max_length]``."""
    if not 0 <= i < len(self.lengths):
      raise IndexError(f"row {i} not in [0, {len(self.lengths)})")
    s, r = divmod(i, self._shard_rows)
    _, n, offset = self._shards[s]
    return self._pread(s, offset + 4 * (2 * n + r * self._row_ints), self._row_ints).reshape(
        len(self.keys), self.max_length)

  def shard_rows(self, s: int) -> np.ndarray:
    """All rows of shard `s`: ``int32 [n, K, max_length]`` (for fingerprints and copies)."""
    _, n, offset = self._shards[s]
    return self._pread(s, offset + 8 * n, n * self._row_ints).reshape(n, len(self.keys), self.max_length)

  @property
  def num_shards(self) -> int:
    return len(self._shards)

  def _pread(self, s: int, offset: int, count: int) -> np.ndarray:
    fd = os.open(self._shards[s][0], os.O_RDONLY)  # one open per read: no descriptor table per shard
    try:
      buf = os.pread(fd, 4 * count, offset)
    finally:
      os.close(fd)
    if len(buf) != 4 * count:
      raise UserError(f"data.source: shard {str(self._shards[s][0])!r} is truncated (changed while reading)")
    return np.frombuffer(buf, np.int32).copy()


class _FlatTokens:
  """``np.asarray(x)``: one token array of a `PreparedSplit` laid out flat as in `Examples`."""

  def __init__(self, split: PreparedSplit, k: int):
    self._split, self._k = split, k

  def __len__(self) -> int:
    return int(self._split.lengths.sum())

  def __array__(self, dtype=None, copy=None):
    parts = list(_flat_chunks(self._split, self._k))
    out = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return out.astype(dtype) if dtype is not None else out


def _flat_chunks(split: PreparedSplit, k: int) -> Iterator[np.ndarray]:
  start = 0
  for s in range(split.num_shards):
    rows = split.shard_rows(s)
    n = split.lengths[start:start + len(rows)]
    start += len(rows)
    yield rows[:, k][np.arange(split.max_length)[None, :] < n[:, None]]


def shards_fingerprint(split: PreparedSplit, task: str, max_length: int, pad_id: int) -> str:
  """`teacher_cache.data_fingerprint` of the in-memory `Examples` these shards hold, read shard
  by shard (one pass per token array; memory: one shard)."""
  h = hashlib.sha256(f"{task}|{max_length}|{pad_id}".encode())
  h.update(np.ascontiguousarray(split.offsets, np.int64).tobytes())
  h.update(np.ascontiguousarray(split.lengths, np.int64).tobytes())
  for k, name in sorted(enumerate(split.keys), key=lambda kv: kv[1]):
    h.update(name.encode())
    for chunk in _flat_chunks(split, k):
      h.update(np.ascontiguousarray(chunk, np.int32).tobytes())
  return h.hexdigest()


def fingerprint(examples: Any) -> str:
  """The data fingerprint of in-memory `Examples` or of a `PreparedSplit` (from its manifest)."""
  if isinstance(examples, PreparedSplit):
    return examples.fingerprint
  return examples_fingerprint(examples)


def read_json(path: pathlib.Path) -> Optional[dict]:
  try:
    out = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None


def is_prepared(source: str) -> bool:
  """Whether `source` is a directory that prepare-data wrote (complete or not)."""
  root = pathlib.Path(source).expanduser()
  if not root.is_dir():
    return False
  return any((read_json(root / name) or {}).get("format") == FORMAT for name in (MANIFEST, PROGRESS))


def open_prepared(source: str, field: str = "data.source") -> tuple[dict[str, Any], dict[str, PreparedSplit]]:
  """``(manifest, splits)`` of the complete prepared set at `source`; one-line `UserError`
  naming `field` when it is missing, unfinished, of another version, or a shard is missing or
  truncated."""
  root = pathlib.Path(source).expanduser()
  if not root.is_dir():
    raise UserError(f"{field}: no such directory {source!r}")
  manifest = read_json(root / MANIFEST)
  if manifest is None or manifest.get("format") != FORMAT:
    hint = " (unfinished: rerun distill-jax prepare-data to complete it)" if (root / PROGRESS).is_file() else ""
    raise UserError(f"{field}: {source!r} holds no complete prepared data (no valid {MANIFEST}){hint}")
  if manifest.get("version") != VERSION:
    raise UserError(f"{field}: prepared data version {manifest.get('version')!r} is not supported (expected "
                    f"{VERSION}); rerun distill-jax prepare-data")
  return manifest, {split: PreparedSplit(root, split, manifest, field) for split in SPLITS}


SETTINGS = ("max_length", "buckets", "text_columns", "label_column", "completion_column", "max_examples")


def check_compatible(manifest: Mapping[str, Any], *, tokenizer: Any,
                     task: str, settings: Mapping[str, Any], source: str) -> None:
  """One-line `UserError` naming the field unless the run's tokenizer, task and data settings
  are those the set was prepared with."""
  fp = tokenizer_fingerprint(tokenizer)
  if fp != manifest["tokenizer_fingerprint"]:
    raise UserError(f"data.source: {source!r} was prepared with another tokenizer (fingerprint "
                    f"{manifest['tokenizer_fingerprint'][:12]} != this run's {fp[:12]}); rerun distill-jax "
                    f"prepare-data with this run's teacher")
  if manifest["task"] != task:
    raise UserError(f"data.source: {source!r} was prepared for task {manifest['task']!r}, this run's is {task!r}")
  prepared = manifest["settings"]
  for key in SETTINGS:
    want = list(prepared[key]) if isinstance(prepared[key], (list, tuple)) else prepared[key]
    got = list(settings[key]) if isinstance(settings[key], (list, tuple)) else settings[key]
    if want != got:
      raise UserError(f"data.{key}: {got!r} differs from {want!r} that {source!r} was prepared with; use "
                      f"data.{key}={want!r} or prepare the data again")
