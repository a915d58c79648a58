"""The offline teacher cache: the teacher runs once, students train from its top-k log-probs.

``distill-jax cache-teacher CONFIG`` (:mod:`distill_jax.commands.cache_teacher`) tokenizes the run's training and
validation data exactly as training does (same tokenizer, packing, rows), runs the teacher
over every row and writes, per token, its top-``cache.top_k`` token ids, their
log-probabilities and the log of the tail mass, packed by :mod:`distill_jax.data.cache_codec`
(Elias-Fano ids + ``cache.value_bits`` value codes, encoded on the device right after the
teacher's forward). Layout of ``DIR``::

  manifest.json               written last: format, sizes, fingerprints (the cache is complete)
  tokenizer/                  the tokenizer the rows were made with
  train/shard-00000.npy ...   uint8 [rows, max_length, bytes_per_token], cache.shard_rows rows each
  validation/shard-00000.npy ...

Shards are the unit of work: each is written to a temporary name and renamed, so a killed
run leaves only whole shards, and a rerun computes exactly the missing ones (none twice,
none skipped). With several processes, process ``p`` writes the shards ``s`` with
``s % process_count == p`` on its own local devices; process 0 writes the manifest after
all have finished.

A teacher that the cross-tokenizer terms read is cached on its own tokens of the aligned rows
(``teacher_input_ids``): its shards hold ``teacher_length`` positions per row in its own
vocabulary, ``tokenizer/`` is the teacher's, and the manifest also holds the student
tokenizer's fingerprint (`STUDENT_TOKENIZER`; the rows depend on both); `TeacherCache.check`
compares both, and the step gathers the entries at the student's span-final positions.

A run whose ``teachers.<name>.cache`` names the directory never loads that teacher:
`TeacherCache` checks the tokenizer and data fingerprints against the run's own (a
mismatch is a one-line error) and gathers the packed rows of each batch through the Grain
pipeline (:func:`distill_jax.data.pipeline.train_batches` ``extras``); the step decodes them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data import cache_codec
from distill_jax.data import pipeline as data
from distill_jax.errors import UserError
from distill_jax.models import checkpoints
from distill_jax.models.outputs import ModelOutputs
from distill_jax.objective.objective import CachedTeacher

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
#: Manifest key of a cross-tokenizer cache: the student tokenizer's fingerprint (its rows depend on both).
STUDENT_TOKENIZER = "student_tokenizer_fingerprint"
SPLITS = ("train", "validation")
VERSION = 1
_BATCH_KEY = "teacher_cache.{}"


def batch_key(teacher: str) -> str:
  """The batch entry holding teacher `teacher`'s packed cache rows ``uint8 [B, L, bytes]``."""
  return _BATCH_KEY.format(teacher)


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, specials)."""
  return hashlib.sha256(data.tokenizer_key(tokenizer).encode("utf-8")).hexdigest()


def data_fingerprint(examples: Any) -> str:
  """sha256 of the tokenized rows (task, row length, every token array, row offsets/lengths)."""
  h = hashlib.sha256(f"{examples.task}|{examples.max_length}|{examples.pad_id}".encode())
  for name in ("offsets", "lengths"):
    h.update(np.ascontiguousarray(getattr(examples, name), np.int64).tobytes())
  for name in sorted(examples.tokens):
    h.update(name.encode())
    h.update(np.ascontiguousarray(examples.tokens[name], np.int32).tobytes())
  row_arrays = getattr(examples, "row_arrays", None) or {}  # a cross-tokenizer row: the teacher's tokens, spans
  for name in sorted(row_arrays):
    h.update(f"row:{name}:{row_arrays[name].shape}".encode())
    h.update(np.ascontiguousarray(row_arrays[name], np.int32).tobytes())
  return h.hexdigest()


def teacher_checksum(path: str | os.PathLike) -> str:
  """sha256 over the checkpoint's config.json and weight files (names and contents)."""
  h = hashlib.sha256()
  for f in _weight_files(pathlib.Path(path)):
    h.update(f.name.encode())
    with open(f, "rb") as stream:
      for block in iter(lambda: stream.read(1 << 24), b""):
        h.update(block)
  return h.hexdigest()


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  return [path / "config.json"] + sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".msgpack"))


def _checksum(root: pathlib.Path, teacher_dir: pathlib.Path) -> tuple[str, list]:
  """`teacher_checksum` and the files' ``[name, size, mtime_ns]``; a rerun on an unchanged
  checkpoint (same names, sizes, times) reuses the checksum its cache recorded instead of
  reading every weight again."""
  files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in _weight_files(teacher_dir)]
  for path in (root / MANIFEST, root / "progress.json"):
    if path.is_file():
      teacher = json.loads(path.read_text()).get("teacher", {})
      if teacher.get("files") == files:
        return teacher["checksum"], files
  return teacher_checksum(teacher_dir), files


def _shard_path(root: pathlib.Path, split: str, shard: int) -> pathlib.Path:
  return root / split / f"shard-{shard:05d}.npy"


def _num_shards(rows: int, shard_rows: int) -> int:
  return -(-rows // shard_rows)


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherCache(CachedTeacher):
  """A complete cache directory, opened for training: the objective's `CachedTeacher`.

  Attributes:
    name: the teacher's name in the config.
    root: the directory.
    manifest: ``manifest.json``.
    format: the `cache_codec.CacheFormat` of its rows.
  """

  name: str
  root: pathlib.Path
  manifest: Mapping[str, Any]
  format: cache_codec.CacheFormat
  task: str = "causal_lm"
  family: str = "teacher cache"
  capabilities: tuple[str, ...] = ("logits",)
  hidden_size: int = 0

  @property
  def vocab_size(self) -> int:
    return self.format.vocab_size

  @property
  def top_k(self) -> int:
    return self.format.top_k

  @property
  def batch_key(self) -> str:
    return _BATCH_KEY.format(self.name)

  @property
  def cross_tokenizer(self) -> bool:
    """Whether the cache holds the teacher's top-k on its own tokens of cross-tokenizer rows
    (``teacher_length`` positions per row, in the teacher's vocabulary; the step gathers them at
    ``teacher_index``), rather than on the student's tokens."""
    return STUDENT_TOKENIZER in self.manifest

  def decode(self, rows: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ids, logprobs, log_tail)`` of this cache's packed rows ``uint8 [B, L, bytes]`` (jittable)."""
    return cache_codec.decode(self.format, rows)

  def apply(self, params: Any, batch: Mapping[str, Any], *, outputs=("logits",), train=False, rng=None,
            pooling=None) -> Any:
    """Dense teacher logits rebuilt from the batch's packed rows, for evaluation: the kept
    log-probabilities, and the tail mass spread evenly over the other ``V - k`` tokens
    (top-1 agreement is exact; KL to it is the KL to that completion of the top-k)."""
    del params, outputs, train, rng, pooling
    ids, logprobs, log_tail = self.decode(jnp.asarray(batch[self.batch_key]))
    others = max(self.vocab_size - self.top_k, 1)
    fill = jnp.broadcast_to((log_tail - np.log(others))[..., None], ids.shape[:-1] + (self.vocab_size,))
    logits = jnp.put_along_axis(fill, ids, logprobs, axis=-1, inplace=False)
    return ModelOutputs(logits=logits)

  @functools.cached_property
  def tokenizer(self) -> Any:
    """The tokenizer the rows were made with (read once)."""
    return checkpoints.load_tokenizer(self.root / TOKENIZER_DIR)

  def check(self, tokenizer: Any, splits: Mapping[str, Any], *, student_tokenizer: Any = None) -> None:
    """One-line `UserError` naming ``teachers.<name>.cache`` unless the run's tokenizer and
    tokenized splits (``{"train": Examples, "validation": Examples}``) are the cached ones.

    A cross-tokenizer run passes the teacher's tokenizer as `tokenizer` and the student's as
    `student_tokenizer` (the rows depend on both); its cache must be a `cross_tokenizer` one.
    """
    field = f"teachers.{self.name}.cache"
    cross = student_tokenizer is not None
    if cross != self.cross_tokenizer:
      held = "on its own tokens of cross-tokenizer rows" if self.cross_tokenizer else "on the student's tokens"
      want = "its own tokens (a cross-tokenizer run)" if cross else "the student's tokens"
      raise UserError(f"{field}: the cache holds the teacher's top-k {held}; this run needs them on {want}; rerun "
                      f"distill-jax cache-teacher with this run's config")
    checks = [("tokenizer", "tokenizer_fingerprint", tokenizer)]
    if cross:
      checks = [("teacher tokenizer", "tokenizer_fingerprint", tokenizer),
                ("student tokenizer", STUDENT_TOKENIZER, student_tokenizer)]
    for what, key, tok in checks:
      fp = tokenizer_fingerprint(tok)
      if fp != self.manifest[key]:
        raise UserError(f"{field}: the cache was written with another {what} (fingerprint "
                        f"{self.manifest[key][:12]} != this run's {fp[:12]}); rerun "
                        f"distill-jax cache-teacher for this {what}")
    for split, examples in splits.items():
      want, got = self.manifest["splits"][split]["data_fingerprint"], data_fingerprint(examples)
      if want != got:
        raise UserError(f"{field}: the cache was written for other {split} data (fingerprint {want[:12]} != this "
                        f"run's {got[:12]}: data.source, data.max_length, data.max_examples, or train.seed when "
                        f"the validation rows are carved from the split, differ); rerun distill-jax cache-teacher "
                        f"with this run's data settings")

  def student_vocab(self, student: Any, field: str) -> int:
    """The vocabulary the cached entries index; one-line ValueError naming `field` unless the
    student is a causal LM whose tokenizer and logits cover it."""
    if student.task != "causal_lm":
      raise ValueError(f"{field}: a teacher cache needs a causal_lm student, got task {student.task!r}")
    if student.vocab_size < self.vocab_size:
      raise ValueError(f"{field}: the cache indexes {self.vocab_size} tokens, the student has {student.vocab_size}")
    cached, own = self.tokenizer, student.tokenizer
    if cached is not None and own is not None and cached.get_vocab() != own.get_vocab():
      raise ValueError(f"{field}: the student's tokenizer differs from the one the cache was written with")
    return self.vocab_size

  def rows(self, split: str) -> "CachedRows":
    info = self.manifest["splits"][split]
    # Cross-tokenizer rows are the teacher's: all their positions, whatever the student's length.
    return CachedRows(self.root, split, info, self.format.bytes_per_token,
                      length=int(info["row_length"]) if self.cross_tokenizer else None)


class CachedRows:
  """``(indices, length) -> uint8 [len(indices), length, bytes]``: packed rows of one split,
  read from memory-mapped shards (index ``-1``, a padded example: zeros)."""

  def __init__(self, root: pathlib.Path, split: str, info: Mapping[str, Any], bytes_per_token: int,
               length: int | None = None):
    self._root, self._split, self._length = root, split, length
    self._shard_rows = int(info["shard_rows"])
    self._bytes = bytes_per_token
    self._maps: dict[int, np.ndarray] = {}

  def _shard(self, s: int) -> np.ndarray:
    if s not in self._maps:  # np.load of a memory map: thread-safe reads, pages on demand
      self._maps[s] = np.load(_shard_path(self._root, self._split, s), mmap_mode="r")
    return self._maps[s]

  def __call__(self, indices: np.ndarray, length: int) -> np.ndarray:
    length = self._length or length  # a fixed row length (the teacher's) wins over the batch's
    indices = np.asarray(indices)
    out = np.zeros((len(indices), length, self._bytes), np.uint8)
    shard_of, row_of = np.divmod(indices, self._shard_rows)
    for s in np.unique(shard_of[indices >= 0]):  # one gather per shard the batch touches
      rows = (indices >= 0) & (shard_of == s)
      out[rows] = self._shard(int(s))[row_of[rows], :length]
    return out


def open_cache(name: str, path: str) -> TeacherCache:
  """Opens the complete cache at `path` for teacher `name`; one-line `UserError` when absent,
  incomplete or of an unknown version."""
  field = f"teachers.{name}.cache"
  root = pathlib.Path(path).expanduser()
  manifest_path = root / MANIFEST
  if not manifest_path.is_file():
    hint = " (an unfinished cache: rerun distill-jax cache-teacher to complete it)" if root.is_dir() else ""
    raise UserError(f"{field}: {str(root)!r} holds no complete teacher cache (no {MANIFEST}){hint}")
  manifest = json.loads(manifest_path.read_text())
  if manifest.get("version") != VERSION:
    raise UserError(f"{field}: cache version {manifest.get('version')!r} is not supported (expected {VERSION})")
  try:
    fmt = cache_codec.CacheFormat.from_dict(manifest["format"])
  except ValueError as e:
    raise UserError(f"{field}: {e}") from None
  return TeacherCache(name, root, manifest, fmt)
