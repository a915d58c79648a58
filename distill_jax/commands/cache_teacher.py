"""`distill-jax cache-teacher CONFIG`: run a teacher once over the run's rows and write its cache.

The format, layout and reader are in :mod:`distill_jax.data.teacher_cache`; this command
tokenizes the training and validation data exactly as `train` does (or reads the rows of a
prepared ``data.source``, so a cache and a prepared set line up), runs the teacher (sharded
over this process's devices) over every row and writes whole shards (temp + rename), so a
killed run resumes with exactly the missing ones. With several processes, process ``p``
writes the shards ``s % process_count == p``; process 0 writes the manifest last.

A teacher that the cross-tokenizer terms (``uld``, ``hybrid_uld``) read, whose tokenizer may
differ from the student's, runs on its own tokens of the aligned rows training builds
(`run_setup.load_aligned_data`: ``teacher_input_ids``): its top-k in its own vocabulary per
teacher token, ``teacher_length`` positions per row; the manifest also records the student
tokenizer's fingerprint (the rows depend on both), and training gathers the entries at the
student's span-final positions.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from distill_jax import models
from distill_jax.config import root as config_lib
from distill_jax.data import cache_codec
from distill_jax.data import pipeline as data
from distill_jax.data import prepared
from distill_jax.data import alignment
from distill_jax.data.teacher_cache import (MANIFEST, SPLITS, STUDENT_TOKENIZER, TOKENIZER_DIR, VERSION, _checksum,
                                            _num_shards, _shard_path, tokenizer_fingerprint)
from distill_jax.errors import UserError
from distill_jax.models import checkpoints
from distill_jax.training import distributed, faults, run_setup, sharding, step
from distill_jax.training.run_log import echo

def cached_teacher(cfg: config_lib.Config) -> tuple[str, str]:
  """``(teacher name, directory)`` that ``distill-jax cache-teacher`` writes; one-line errors."""
  c = cfg.cache
  with_cache = [n for n, t in cfg.teachers.items() if t.cache is not None]

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


def _teacher_rows(examples: Any, own_tokens: bool) -> tuple[int, np.ndarray]:
  """``(row length, tokens per row)`` of what the teacher runs on: the rows, or (`own_tokens`,
  a cross-tokenizer teacher) their teacher side."""
  if own_tokens:
    mask = examples.row_arrays[alignment.TEACHER_INPUTS["attention_mask"]]
    return int(mask.shape[1]), mask.sum(axis=1)
  return int(examples.max_length), np.asarray(examples.lengths)


def _meta(cfg: config_lib.Config, name: str, fmt: cache_codec.CacheFormat, tokenizer: Any,
          splits: Mapping[str, Any], checksum: tuple[str, list],
          student_tokenizer: Any = None) -> dict[str, Any]:
  """What identifies a cache: a rerun with the same meta resumes, another one is refused.
  `student_tokenizer`: a cross-tokenizer cache's (the teacher ran on its own tokens of the rows)."""
  checksum, checksum_files = checksum
  own = student_tokenizer is not None
  extra = {STUDENT_TOKENIZER: tokenizer_fingerprint(student_tokenizer)} if own else {}
  return {**extra,
      "version": VERSION, "format": fmt.to_dict(), "top_k": fmt.top_k, "bytes_per_token": fmt.bytes_per_token,
      "teacher": {"name": name, "path": cfg.teachers[name].path, "checksum": checksum,
                  "dtype": cfg.teachers[name].dtype, "param_dtype": cfg.teachers[name].param_dtype,
                  "precision": cfg.train.precision, "files": checksum_files},
      "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
      "splits": {split: {"rows": len(ex.lengths), "row_length": _teacher_rows(ex, own)[0],
                         "shard_rows": cfg.cache.shard_rows, "data_fingerprint": prepared.fingerprint(ex),
                         "tokens": int(np.sum(_teacher_rows(ex, own)[1]))}
                 for split, ex in splits.items()},
  }


def _identity(meta: Mapping[str, Any]) -> dict[str, Any]:
  """The parts of a cache's meta that must match for a rerun to resume it."""
  teacher = meta.get("teacher", {})  # the weights, wherever they are now
  return {"version": meta.get("version"), "format": meta.get("format"),
          "teacher": tuple(teacher.get(k) for k in ("checksum", "dtype", "param_dtype", "precision")),
          "tokenizer": meta.get("tokenizer_fingerprint"), "student tokenizer": meta.get(STUDENT_TOKENIZER),
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

    multihost_utils.sync_global_devices(f"distill_jax.data.teacher_cache.{name}")


def write_cache(cfg: config_lib.Config, *, progress_bar: Optional[bool] = None) -> tuple[str, dict[str, Any]]:
  """Writes (or completes) the teacher cache the config asks for; see the module docstring.

  Returns:
    ``(directory, manifest)``.

  Raises:
    UserError / ValueError: one line naming the field (teacher, data, cache directory),
      before the teacher is loaded.
  """

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
  import datasets  # deferred: heavy, only needed once the config is valid

  datasets.disable_progress_bars()
  # A cross-tokenizer teacher: the aligned rows training builds (its tokenizer: this checkpoint's).
  cross = run_setup.cross_tokenizer(cfg, {name: tokenizer})
  own_tokens = cross is not None and cross.teacher == name
  if cross is None:
    train_ex, eval_ex = run_setup.load_data(cfg, tokenizer, "causal_lm")
  else:
    train_ex, eval_ex = run_setup.load_aligned_data(cfg, cross)
  splits = {"train": train_ex, "validation": eval_ex}
  row_tokens = {split: _teacher_rows(ex, own_tokens)[1] for split, ex in splits.items()}
  # The tokenizer's size (a padded embedding has more rows; `Model.vocab_size` is the same
  # rule, checked once the teacher is loaded).
  vocab = len(tokenizer)
  if cfg.cache.top_k > vocab:
    raise UserError(f"cache.top_k: {cfg.cache.top_k} must be <= the teacher's {vocab} tokens")
  fmt = cache_codec.CacheFormat(vocab, cfg.cache.top_k, cfg.cache.value_bits)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
  meta = _meta(cfg, name, fmt, tokenizer, splits, _checksum(root, teacher_dir),
               cross.student_tokenizer if own_tokens else None)
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
  tokens = sum(int(np.sum(row_tokens[split][s * cfg.cache.shard_rows:(s + 1) * cfg.cache.shard_rows]))
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
      if own_tokens:  # the teacher's own tokens of the rows
        batch = alignment.teacher_batch(batch)
      else:
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
      chunks.append(encode(batch))
    packed = np.concatenate(jax.device_get(chunks))[:len(rows)]
    path = _shard_path(root, split, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{p}.npy")  # a kill mid-write leaves this, never `path`
    np.save(tmp, packed)
    os.replace(tmp, path)
    written += 1
    done = int(np.sum(row_tokens[split][rows]))
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


def main(cfg: config_lib.Config) -> int:
  out, manifest = write_cache(cfg)
  print(f"teacher cache: {out} ({manifest['tokens']:,} tokens, {manifest['bytes_per_token']} B/token)")
  return 0
