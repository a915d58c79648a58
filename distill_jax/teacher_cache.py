"""The offline teacher cache: the teacher runs once, students train from its top-k log-probs.

``distill-jax cache-teacher CONFIG`` (`write_cache`) tokenizes the run's training and
validation data exactly as training does (same tokenizer, packing, rows), runs the teacher
over every row and writes, per token, its top-``cache.top_k`` token ids, their
log-probabilities and the log of the tail mass, packed by :mod:`distill_jax.cache_codec`
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

A run whose ``teachers.<name>.cache`` names the directory never loads that teacher:
`TeacherCache` checks the tokenizer and data fingerprints against the run's own (a
mismatch is a one-line error) and gathers the packed rows of each batch through the Grain
pipeline (:func:`distill_jax.data.train_batches` ``extras``); the step decodes them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from distill_jax import cache_codec
from distill_jax import config as config_lib
from distill_jax.errors import UserError

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
VERSION = 1
_BATCH_KEY = "teacher_cache.{}"


def batch_key(teacher: str) -> str:
  """The batch entry holding teacher `teacher`'s packed cache rows ``uint8 [B, L, bytes]``."""
  return _BATCH_KEY.format(teacher)


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, specials)."""
  from distill_jax import data

  return hashlib.sha256(data.tokenizer_key(tokenizer).encode("utf-8")).hexdigest()


def data_fingerprint(examples: Any) -> str:
  """sha256 of the tokenized rows (task, row length, every token array, row offsets/lengths)."""
  h = hashlib.sha256(f"{examples.task}|{examples.max_length}|{examples.pad_id}".encode())
  for name in ("offsets", "lengths"):
    h.update(np.ascontiguousarray(getattr(examples, name), np.int64).tobytes())
  for name in sorted(examples.tokens):
    h.update(name.encode())
    h.update(np.ascontiguousarray(examples.tokens[name], np.int32).tobytes())
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
class TeacherCache:
  """A complete cache directory, opened for training: the teacher as the objective sees it.

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

  def apply(self, params: Any, batch: Mapping[str, Any], *, outputs=("logits",), train=False, rng=None,
            pooling=None) -> Any:
    """Dense teacher logits rebuilt from the batch's packed rows, for evaluation: the kept
    log-probabilities, and the tail mass spread evenly over the other ``V - k`` tokens
    (top-1 agreement is exact; KL to it is the KL to that completion of the top-k)."""
    del params, outputs, train, rng, pooling
    import jax.numpy as jnp

    from distill_jax.models import ModelOutputs

    ids, logprobs, log_tail = cache_codec.decode(self.format, jnp.asarray(batch[batch_key(self.name)]))
    others = max(self.vocab_size - self.top_k, 1)
    fill = jnp.broadcast_to((log_tail - np.log(others))[..., None], ids.shape[:-1] + (self.vocab_size,))
    logits = jnp.put_along_axis(fill, ids, logprobs, axis=-1, inplace=False)
    return ModelOutputs(logits=logits)

  @functools.cached_property
  def tokenizer(self) -> Any:
    """The tokenizer the rows were made with (read once)."""
    from distill_jax.models import checkpoints

    return checkpoints.load_tokenizer(self.root / TOKENIZER_DIR)

  def check(self, tokenizer: Any, splits: Mapping[str, Any]) -> None:
    """One-line `UserError` naming ``teachers.<name>.cache`` unless the run's tokenizer and
    tokenized splits (``{"train": Examples, "validation": Examples}``) are the cached ones."""
    field = f"teachers.{self.name}.cache"
    fp = tokenizer_fingerprint(tokenizer)
    if fp != self.manifest["tokenizer_fingerprint"]:
      raise UserError(f"{field}: the cache was written with another tokenizer (fingerprint "
                      f"{self.manifest['tokenizer_fingerprint'][:12]} != this run's {fp[:12]}); rerun "
                      f"distill-jax cache-teacher for this tokenizer")
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
    return CachedRows(self.root, split, self.manifest["splits"][split], self.format.bytes_per_token)


class CachedRows:
  """``(indices, length) -> uint8 [len(indices), length, bytes]``: packed rows of one split,
  read from memory-mapped shards (index ``-1``, a padded example: zeros)."""

  def __init__(self, root: pathlib.Path, split: str, info: Mapping[str, Any], bytes_per_token: int):
    self._root, self._split = root, split
    self._shard_rows = int(info["shard_rows"])
    self._bytes = bytes_per_token
    self._maps: dict[int, np.ndarray] = {}

  def _shard(self, s: int) -> np.ndarray:
    if s not in self._maps:  # np.load of a memory map: thread-safe reads, pages on demand
      self._maps[s] = np.load(_shard_path(self._root, self._split, s), mmap_mode="r")
    return self._maps[s]

  def __call__(self, indices: np.ndarray, length: int) -> np.ndarray:
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


# --------------------------------------------------------------------------- writing


def cached_teacher(cfg: config_lib.Config) -> tuple[str, str]:
  """``(teacher name, directory)`` that ``distill-jax cache-teacher`` writes; one-line errors."""
  c = cfg.cache
  with_cache = [n for n, t in cfg.teachers.items() if t.cache is not None]
  from distill_jax import run_setup

  name = c.teacher or (with_cache[0] if len(with_cache) == 1 else run_setup.main_teacher(cfg))
  tc = cfg.teachers[name]
  out = c.dir or tc.cache
  if out is None:
    raise UserError(f"cache.dir: is required (where to write teacher {name!r}'s cache), or set teachers.{name}.cache")
  if tc.path is None or tc.path == config_lib.SELF_TEACHER:
    raise UserError(f"teachers.{name}.path: the teacher to cache must be a checkpoint, got {tc.path!r}")
  if tc.task != "causal_lm":
    raise UserError(f"teachers.{name}.task: only causal_lm teachers are cached, got {tc.task!r}")
  return name, out


def _meta(cfg: config_lib.Config, name: str, fmt: cache_codec.CacheFormat, tokenizer: Any,
          splits: Mapping[str, Any], checksum: tuple[str, list]) -> dict[str, Any]:
  """What identifies a cache: a rerun with the same meta resumes, another one is refused."""
  checksum, checksum_files = checksum
  return {
      "version": VERSION, "format": fmt.to_dict(), "top_k": fmt.top_k, "bytes_per_token": fmt.bytes_per_token,
      "teacher": {"name": name, "path": cfg.teachers[name].path, "checksum": checksum,
                  "dtype": cfg.teachers[name].dtype, "param_dtype": cfg.teachers[name].param_dtype,
                  "precision": cfg.train.precision, "files": checksum_files},
      "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
      "splits": {split: {"rows": len(ex.lengths), "row_length": int(ex.max_length),
                         "shard_rows": cfg.cache.shard_rows, "data_fingerprint": data_fingerprint(ex),
                         "tokens": int(np.sum(ex.lengths))}
                 for split, ex in splits.items()},
  }


def _identity(meta: Mapping[str, Any]) -> dict[str, Any]:
  """The parts of a cache's meta that must match for a rerun to resume it."""
  teacher = meta.get("teacher", {})  # the weights, wherever they are now
  return {"version": meta.get("version"), "format": meta.get("format"),
          "teacher": tuple(teacher.get(k) for k in ("checksum", "dtype", "param_dtype", "precision")),
          "tokenizer": meta.get("tokenizer_fingerprint"),
          "data": {s: (v.get("data_fingerprint"), v.get("shard_rows")) for s, v in meta.get("splits", {}).items()}}


def _check_or_write_meta(root: pathlib.Path, meta: Mapping[str, Any]) -> None:
  """A fresh directory gets ``progress.json``; a partial or complete one must have been
  started with the same identity (else a one-line error, and nothing is touched)."""
  progress = root / "progress.json"
  for path in (root / MANIFEST, progress):
    if path.is_file():
      old, new = _identity(json.loads(path.read_text())), _identity(meta)
      diff = [k for k in new if old[k] != new[k]]
      if diff:
        raise UserError(f"cache.dir: {str(root)!r} holds a cache of another {', '.join(diff)}; choose another "
                        f"directory or delete it")
      return
  if root.exists() and any(root.iterdir()):
    raise UserError(f"cache.dir: {str(root)!r} is a non-empty directory that is not a teacher cache")
  if jax.process_index() == 0:
    root.mkdir(parents=True, exist_ok=True)
    tmp = progress.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, progress)


def _encoder(name: str, teacher: Any, fmt: cache_codec.CacheFormat, mesh: Any):
  """``(batch) -> uint8 [B, L, bytes]``, jitted: forward, top-k + tail, encode, on this
  process's devices: the teacher sharded over `mesh` by its logical axes (``mesh.fsdp`` /
  ``mesh.tensor``), the rows split over its batch axes."""
  from distill_jax import models, sharding, step

  v = fmt.vocab_size
  logical = {(name,) + path: axes for path, axes in models.logical_axes(teacher).items()}
  params = step.shard_teacher_params({name: teacher.params}, mesh, logical=logical)[name]

  def encode(params, batch):
    logits_BxTxV = teacher.apply(params, batch, outputs=("logits",)).logits[..., :v]
    ids, logprobs, log_tail = cache_codec.top_k_teacher(logits_BxTxV, fmt.top_k)
    return cache_codec.encode(fmt, ids, logprobs, log_tail)

  rows = sharding.batch_sharding(mesh)
  jitted = jax.jit(encode, out_shardings=rows)
  # Host rows are placed explicitly: with several processes jit takes no numpy for a sharded input.
  return lambda batch: jitted(params, jax.device_put(batch, rows))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"distill_jax.teacher_cache.{name}")


def write_cache(cfg: config_lib.Config, *, progress_bar: Optional[bool] = None) -> tuple[str, dict[str, Any]]:
  """Writes (or completes) the teacher cache the config asks for; see the module docstring.

  Returns:
    ``(directory, manifest)``.

  Raises:
    UserError / ValueError: one line naming the field (teacher, data, cache directory),
      before the teacher is loaded.
  """
  from distill_jax import data, distributed, faults, run_setup, sharding
  from distill_jax.models import checkpoints
  from distill_jax.run_log import echo

  distributed.initialize_from(cfg.distributed)
  run_setup.set_precision(cfg)
  name, out = cached_teacher(cfg)
  root = pathlib.Path(out).expanduser()
  tc = cfg.teachers[name]
  field = f"teachers.{name}.path"
  with run_setup.field_errors(field):
    teacher_dir = checkpoints.resolve_checkpoint(config_lib.resolve_model_path(tc.path, field))
  tokenizer = checkpoints.load_tokenizer(teacher_dir)
  if tokenizer is None:
    raise UserError(f"{field}: the checkpoint has no tokenizer files")
  import datasets

  datasets.disable_progress_bars()
  train_ex, eval_ex = run_setup.load_data(cfg, tokenizer, "causal_lm")
  splits = {"train": train_ex, "validation": eval_ex}
  # The tokenizer's size (a padded embedding has more rows; `Model.vocab_size` is the same
  # rule, checked once the teacher is loaded).
  vocab = len(tokenizer)
  if cfg.cache.top_k > vocab:
    raise UserError(f"cache.top_k: {cfg.cache.top_k} must be <= the teacher's {vocab} tokens")
  fmt = cache_codec.CacheFormat(vocab, cfg.cache.top_k, cfg.cache.value_bits)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
  meta = _meta(cfg, name, fmt, tokenizer, splits, _checksum(root, teacher_dir))
  main = distributed.is_main_process()
  if main:  # process 0 checks (or starts) the directory, then the others look
    _check_or_write_meta(root, meta)
  _barrier("started")
  if not main:
    _check_or_write_meta(root, meta)
  if (root / MANIFEST).is_file():
    echo(f"teacher cache {root} is already complete")
    return str(root), json.loads((root / MANIFEST).read_text())
  if main:
    tokenizer.save_pretrained(str(root / TOKENIZER_DIR))
  teacher = run_setup.load_teacher(name, tc)
  if teacher.vocab_size != fmt.vocab_size:
    raise UserError(f"{field}: the model has {teacher.vocab_size} usable tokens, its tokenizer {fmt.vocab_size}")
  encode = _encoder(name, teacher, fmt, mesh)
  shards = sharding.num_batch_shards(mesh)
  batch_size = -(-cfg.cache.batch_size // shards) * shards  # whole rows per batch shard
  fault = faults.from_env()
  p, procs = jax.process_index(), jax.process_count()
  todo = [(split, s) for split in SPLITS
          for s in range(_num_shards(len(splits[split].lengths), cfg.cache.shard_rows))
          if s % procs == p and not _shard_path(root, split, s).is_file()]
  tokens = sum(int(np.sum(splits[split].lengths[s * cfg.cache.shard_rows:(s + 1) * cfg.cache.shard_rows]))
               for split, s in todo)
  from tqdm.auto import tqdm

  show = cfg.logging.progress_bar if progress_bar is None else progress_bar
  bar = tqdm(total=tokens, desc=f"caching teacher {name!r}", unit="tok", unit_scale=True, dynamic_ncols=True,
             file=sys.stderr, mininterval=0.5, disable=not show or p != 0)
  t0, written = time.perf_counter(), 0
  for split, s in todo:
    ex = splits[split]
    rows = np.arange(s * cfg.cache.shard_rows, min((s + 1) * cfg.cache.shard_rows, len(ex.lengths)))
    chunks = []
    for start in range(0, len(rows), batch_size):
      idx = rows[start:start + batch_size]
      idx = np.concatenate([idx, np.full(batch_size - len(idx), -1, idx.dtype)])  # one shape
      batch = data.assemble(ex, idx, ex.max_length)
      batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
      chunks.append(encode(batch))
    packed = np.concatenate(jax.device_get(chunks))[:len(rows)]
    path = _shard_path(root, split, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{p}.npy")  # a kill mid-write leaves this, never `path`
    np.save(tmp, packed)
    os.replace(tmp, path)
    written += 1
    done = int(np.sum(ex.lengths[rows]))
    bar.update(done)
    bar.set_postfix(tok_per_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)
    if 0 < fault.cache_exit_after_shards <= written:
      os._exit(fault.cache_exit_code)  # a kill between shards (test hook)
  bar.close()
  _barrier("written")
  manifest = dict(meta)
  files = [_shard_path(root, split, s) for split in SPLITS
           for s in range(_num_shards(meta["splits"][split]["rows"], cfg.cache.shard_rows))]
  missing = [str(f.relative_to(root)) for f in files if not f.is_file()]
  if missing:
    raise UserError(f"cache.dir: shards {missing[:3]} are missing after caching (do all processes share {root}?)")
  tokens_all = sum(meta["splits"][split]["tokens"] for split in SPLITS)
  stored = sum(meta["splits"][split]["rows"] * meta["splits"][split]["row_length"] for split in SPLITS)
  manifest.update(tokens=tokens_all, stored_positions=stored, bytes=int(sum(f.stat().st_size for f in files)),
                  shards=len(files), seconds=round(time.perf_counter() - t0, 3))
  if main:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)
    (root / "progress.json").unlink(missing_ok=True)
    for stale in root.glob("*/shard-*.tmp-*.npy"):  # left by a process killed mid-write
      stale.unlink()
  _barrier("manifest")  # every process returns a complete cache
  echo(f"cached teacher {name!r}: {tokens_all:,} tokens, {fmt.bytes_per_token} B/token "
       f"(top {fmt.top_k}, {fmt.value_bits}-bit values), {manifest['bytes']:,} bytes in {root}")
  return str(root), manifest
