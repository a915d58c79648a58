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
  root = pathlib.Path(path)
  files = [root / "config.json"] + sorted(f for f in root.iterdir() if f.suffix in (".safetensors", ".bin", ".msgpack"))
  h = hashlib.sha256()
  for f in files:
    h.update(f.name.encode())
    with open(f, "rb") as stream:
      for block in iter(lambda: stream.read(1 << 24), b""):
        h.update(block)
  return h.hexdigest()


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

  def tokenizer(self) -> Any:
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
                        f"run's {got[:12]}: data.source, data.max_length, data.max_examples... differ); rerun "
                        f"distill-jax cache-teacher with this run's data settings")

  def student_vocab(self, student: Any, field: str) -> int:
    """The vocabulary the cached entries index; one-line ValueError naming `field` unless the
    student is a causal LM whose tokenizer and logits cover it."""
    if student.task != "causal_lm":
      raise ValueError(f"{field}: a teacher cache needs a causal_lm student, got task {student.task!r}")
    if student.vocab_size < self.vocab_size:
      raise ValueError(f"{field}: the cache indexes {self.vocab_size} tokens, the student has {student.vocab_size}")
    cached, own = self.tokenizer(), student.tokenizer
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
    self._shard_rows, self._rows = int(info["shard_rows"]), int(info["rows"])
    self._bytes = bytes_per_token
    self._maps: dict[int, np.ndarray] = {}

  def _shard(self, s: int) -> np.ndarray:
    if s not in self._maps:  # np.load of a memory map: thread-safe reads, pages on demand
      self._maps[s] = np.load(_shard_path(self._root, self._split, s), mmap_mode="r")
    return self._maps[s]

  def __call__(self, indices: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros((len(indices), length, self._bytes), np.uint8)
    for row, i in enumerate(np.asarray(indices)):
      if i >= 0:
        shard, j = divmod(int(i), self._shard_rows)
        out[row] = self._shard(shard)[j, :length]
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
          splits: Mapping[str, Any], checksum: str) -> dict[str, Any]:
  """What identifies a cache: a rerun with the same meta resumes, another one is refused."""
  return {
      "version": VERSION, "format": fmt.to_dict(), "top_k": fmt.top_k, "bytes_per_token": fmt.bytes_per_token,
      "teacher": {"name": name, "path": cfg.teachers[name].path, "checksum": checksum,
                  "dtype": cfg.teachers[name].dtype},
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
          "teacher": (teacher.get("checksum"), teacher.get("dtype")),
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


def _encoder(teacher: Any, fmt: cache_codec.CacheFormat, mesh: Any):
  """Jitted ``(params, batch) -> uint8 [B, L, bytes]``: forward, top-k + tail, encode, on the
  process's own devices (rows split over `mesh`, params replicated)."""
  from jax.sharding import NamedSharding, PartitionSpec

  v = fmt.vocab_size

  def encode(params, batch):
    logits_BxTxV = teacher.apply(params, batch, outputs=("logits",)).logits[..., :v]
    ids, logprobs, log_tail = cache_codec.top_k_teacher(logits_BxTxV, fmt.top_k)
    return cache_codec.encode(fmt, ids, logprobs, log_tail)

  rows = NamedSharding(mesh, PartitionSpec("rows"))
  jitted = jax.jit(encode, in_shardings=(NamedSharding(mesh, PartitionSpec()), rows), out_shardings=rows)
  # Host rows are placed explicitly: with several processes jit takes no numpy for a sharded input.
  return lambda params, batch: jitted(params, jax.device_put(batch, rows))


def write_cache(cfg: config_lib.Config, *, progress_bar: Optional[bool] = None) -> tuple[str, dict[str, Any]]:
  """Writes (or completes) the teacher cache the config asks for; see the module docstring.

  Returns:
    ``(directory, manifest)``.

  Raises:
    UserError / ValueError: one line naming the field (teacher, data, cache directory),
      before the teacher is loaded.
  """
  from distill_jax import data, distributed, faults, run_setup
  from distill_jax.models import checkpoints
  from distill_jax.run_log import echo

  if cfg.distributed.enabled:
    d = cfg.distributed
    distributed.initialize(d.coordinator, d.num_processes, d.process_id, heartbeat_timeout_s=d.heartbeat_timeout_s,
                           initialization_timeout_s=d.initialization_timeout_s)
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
  hf_vocab = len(tokenizer)
  config_vocab = json.loads((teacher_dir / "config.json").read_text()).get("vocab_size", hf_vocab)
  fmt = cache_codec.CacheFormat(min(hf_vocab, int(config_vocab)), min(cfg.cache.top_k, hf_vocab),
                                cfg.cache.value_bits)
  meta = _meta(cfg, name, fmt, tokenizer, splits, teacher_checksum(teacher_dir))
  _check_or_write_meta(root, meta)
  if (root / MANIFEST).is_file():
    echo(f"teacher cache {root} is already complete")
    return str(root), json.loads((root / MANIFEST).read_text())
  if jax.process_index() == 0:
    tokenizer.save_pretrained(str(root / TOKENIZER_DIR))
  teacher = run_setup.load_teacher(name, tc)
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("rows",))
  encode = _encoder(teacher, fmt, mesh)
  params = jax.device_put(teacher.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  batch_size = -(-cfg.cache.batch_size // mesh.size) * mesh.size  # whole rows per local device
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
      chunks.append(encode(params, batch))
    packed = np.concatenate(jax.device_get(chunks))[:len(rows)]
    path = _shard_path(root, split, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{p}.npy")
    np.save(tmp, packed)
    os.replace(tmp, path)
    written += 1
    done = int(np.sum(ex.lengths[rows]))
    bar.update(done)
    bar.set_postfix(tok_per_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)
    if 0 < fault.cache_exit_after_shards <= written:
      os._exit(fault.cache_exit_code)  # a kill between shards (test hook)
  bar.close()
  if procs > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("distill_jax.teacher_cache.done")
  manifest = dict(meta)
  missing = [(split, s) for split in SPLITS
             for s in range(_num_shards(meta["splits"][split]["rows"], cfg.cache.shard_rows))
             if not _shard_path(root, split, s).is_file()]
  if missing:
    raise UserError(f"cache.dir: shards {missing[:3]} are missing after caching (does every process see {root}?)")
  files = [f for f in root.rglob("*.npy")]
  tokens_all = sum(meta["splits"][split]["tokens"] for split in SPLITS)
  stored = sum(meta["splits"][split]["rows"] * meta["splits"][split]["row_length"] for split in SPLITS)
  manifest.update(tokens=tokens_all, stored_positions=stored, bytes=int(sum(f.stat().st_size for f in files)),
                  shards=len(files), seconds=round(time.perf_counter() - t0, 3))
  if p == 0:
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)
    (root / "progress.json").unlink(missing_ok=True)
  echo(f"cached teacher {name!r}: {tokens_all:,} tokens, {fmt.bytes_per_token} B/token "
       f"(top {fmt.top_k}, {fmt.value_bits}-bit values), {manifest['bytes']:,} bytes in {root}")
  return str(root), manifest
