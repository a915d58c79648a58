"""`distill-jax prepare-data CONFIG OUT_DIR`: tokenize the run's data once into on-disk shards.

The format and reader are in :mod:`distill_jax.data.prepared`. The rows are those `train`
builds (same tokenizer, packing, ``max_length``, buckets): by default the splits are
tokenized in memory exactly as `train` does (``data.num_workers`` processes of
``datasets.map``); with ``data.streaming`` (``causal_lm`` packing) the source is read as a
stream and packed shard by shard, never held whole. Shards are whole files (temp + rename):
a killed run resumes with exactly the missing ones. With several processes, process ``p``
writes the shards ``s % process_count == p``; process 0 writes the manifest last.
Train from the result with ``data.source=OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any, Optional

import jax
import numpy as np

from distill_jax.config import root as config_lib
from distill_jax.data import pipeline as data
from distill_jax.data import prepared, sources
from distill_jax.data.teacher_cache import tokenizer_fingerprint
from distill_jax.errors import UserError
from distill_jax.training import distributed, faults, run_setup
from distill_jax.training.run_log import echo


def _barrier(name: str, procs: int) -> None:
  if procs > 1:
    from jax.experimental import multihost_utils  # deferred: only multi-process runs need it

    multihost_utils.sync_global_devices(f"distill_jax.prepare_data.{name}")


def _meta(cfg: config_lib.Config, tokenizer_fp: str, task: str, keys: tuple[str, ...], buckets: tuple[int, ...],
          pad_id: int, special_ids: tuple[int, ...], label_names: Optional[tuple], has_labels: bool,
          shard_rows: int, expected: Optional[dict]) -> dict[str, Any]:
  """What identifies a prepared set: a rerun with the same meta resumes, another is refused."""
  d = cfg.data
  return {
      "format": prepared.FORMAT, "version": prepared.VERSION,
      "tokenizer_fingerprint": tokenizer_fp, "task": task, "max_length": d.max_length,
      "keys": list(keys), "buckets": list(buckets), "pad_id": int(pad_id), "special_ids": [int(i) for i in special_ids],
      "label_names": list(label_names) if label_names else None, "has_labels": has_labels,
      "settings": run_setup.data_settings(cfg), "shard_rows": shard_rows, "expected": expected,
      "data": {"source": d.source, "name": d.name, "split": d.split, "validation_split": d.validation_split,
               "validation_fraction": d.validation_fraction, "seed": cfg.train.seed, "format": d.format,
               "streaming": d.streaming, "mixture": [m.to_dict() for m in d.mixture]},
  }


def _stream_docs(cfg: config_lib.Config, tokenizer: Any, part: str, *, check: bool = False):
  """The tokenized documents of split `part` (``"train"`` / ``"validation"``) as a stream: of
  ``data.source``, or the ``data.mixture`` of its sources (`check`: read the first example of
  each source only, for the one-line errors before anything is written)."""
  d = cfg.data
  streams = []
  for source, name, split, validation_split, _ in run_setup.data_parts(cfg):
    kw = dict(name=name, text_columns=d.text_columns, data_format=None if d.format == "auto" else d.format,
              cache_dir=d.cache_dir)
    if part == "train":
      carve = None if validation_split or source == sources.PYDOC else (d.validation_fraction, cfg.train.seed, part)
      rows = sources.stream_texts(source, split=split, carve=carve, **kw)
    elif validation_split or source == sources.PYDOC:
      rows = sources.stream_texts(source, split=validation_split or "validation", **kw)
    else:
      rows = sources.stream_texts(source, split=split, carve=(d.validation_fraction, cfg.train.seed, part), **kw)
    if check:
      next(iter(rows))
    streams.append(rows)
  if check:
    return None
  rows = (sources.mix_streams(streams, [m.weight for m in d.mixture], cfg.train.seed + (part != "train"))
          if d.mixture else streams[0])
  if part == "train":
    rows = sources.take(rows, d.max_examples)
  return data.tokenize_stream(rows, tokenizer, text_columns=d.text_columns, num_workers=d.num_workers)


def prepare(cfg: config_lib.Config, out_dir: str, *, progress_bar: Optional[bool] = None
            ) -> tuple[str, dict[str, Any]]:
  """Writes (or completes) the prepared data set of `cfg` in `out_dir`; see the module docstring.

  Returns:
    ``(directory, manifest)``.

  Raises:
    UserError / ValueError: one line naming the field (data, tokenizer, OUT_DIR), before any
      shard is written.
  """
  distributed.initialize_from(cfg.distributed)
  d = cfg.data
  if prepared.is_prepared(d.source):
    raise UserError(f"data.source: {d.source!r} is prepared data already; train from it with data.source")
  root = pathlib.Path(out_dir).expanduser()
  task = run_setup._student_task(cfg)  # noqa: SLF001 — the task `train` tokenizes for
  tokenizer = run_setup.data_tokenizer(cfg, run_setup.main_teacher(cfg))
  # Before tokenizing: a call with truncation changes the tokenizer's serialized state.
  tokenizer_fp = tokenizer_fingerprint(tokenizer)
  import datasets  # deferred: heavy, only needed once the config is valid

  datasets.disable_progress_bars()
  splits: dict[str, Any] = {}
  if d.streaming:
    if task != "causal_lm" or d.completion_column is not None:
      raise UserError(f"data.streaming: streams pack causal_lm documents only; this run's task is {task!r}"
                      f"{' with data.completion_column' if d.completion_column else ''}")
    for split in prepared.SPLITS:  # a missing source, split or column: before anything is written
      _stream_docs(cfg, tokenizer, split, check=True)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    keys, buckets, specials = prepared.Packer.KEYS, (d.max_length,), tuple(sorted(set(tokenizer.all_special_ids)))
    meta = _meta(cfg, tokenizer_fp, task, keys, buckets, pad_id, specials, None, False,
                 d.shard_rows or prepared.default_shard_rows(len(keys), d.max_length), None)
  else:
    train_ex, eval_ex = run_setup.load_data(cfg, tokenizer, task)
    splits = {"train": train_ex, "validation": eval_ex}
    keys = prepared.token_keys(train_ex)
    meta = _meta(cfg, tokenizer_fp, task, keys, train_ex.buckets, train_ex.pad_id, train_ex.special_ids,
                 train_ex.label_names, train_ex.labels is not None,
                 d.shard_rows or prepared.default_shard_rows(len(keys), d.max_length),
                 {s: prepared.fingerprint(ex) for s, ex in splits.items()})
  # Only a multi-host job asks JAX (which starts its backend) who is who.
  p, procs = (jax.process_index(), jax.process_count()) if cfg.distributed.enabled else (0, 1)
  main = p == 0
  done = prepared.check_or_start(root, meta, create=main) if main else None
  _barrier("started", procs)
  if not main:
    done = prepared.check_or_start(root, meta, create=False)
  if done is not None:
    echo(f"prepared data {root} is already complete")
    return str(root), done
  from tqdm.auto import tqdm  # deferred: progress bars only here

  show = cfg.logging.progress_bar if progress_bar is None else progress_bar
  bar = tqdm(desc="preparing data", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
             mininterval=0.5, disable=not show or p != 0)
  t0 = time.perf_counter()
  fault = faults.from_env()
  written = [0]

  def on_shard(tokens: int) -> None:
    bar.update(tokens)
    bar.set_postfix(tok_per_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)
    written[0] += 1
    if 0 < fault.cache_exit_after_shards <= written[0]:
      os._exit(fault.cache_exit_code)  # a kill between shards (test hook, shared with cache-teacher)

  shard_rows = meta["shard_rows"]
  kw = dict(process_index=p, process_count=procs, on_shard=on_shard)
  totals = {}
  for split in prepared.SPLITS:
    if d.streaming:
      totals[split] = prepared.write_packed_stream(root, split, _stream_docs(cfg, tokenizer, split),
                                                   max_length=d.max_length, pad_id=meta["pad_id"],
                                                   shard_rows=shard_rows, **kw)
    else:
      ex = splits[split]
      prepared.write_examples(root, split, ex, shard_rows, **kw)
      totals[split] = (len(ex), int(np.sum(ex.lengths)))
  bar.close()
  _barrier("written", procs)
  if main:
    _finish(root, meta, totals, splits, cfg, task, t0)
  _barrier("manifest", procs)  # every process returns the complete set
  manifest = json.loads((root / prepared.MANIFEST).read_text())
  rows = ", ".join(f"{s}: {i['rows']:,} rows" for s, i in manifest["splits"].items())
  echo(f"prepared {manifest['tokens']:,} tokens ({rows}) in {root}: {manifest['bytes']:,} bytes, "
       f"{manifest['seconds']:.1f}s")
  return str(root), manifest


def _finish(root: pathlib.Path, meta: dict[str, Any], totals: dict[str, tuple[int, int]], splits: dict[str, Any],
            cfg: config_lib.Config, task: str, t0: float) -> None:
  """Process 0, once every shard is written: checks them, fingerprints the rows, writes the manifest."""
  d = cfg.data
  manifest = dict(meta)
  manifest["splits"] = {}
  shard_rows = meta["shard_rows"]
  for split, (rows, tokens) in totals.items():
    if rows == 0:
      raise UserError(f"data.source: the {split} split of {d.source!r} holds no examples")
    manifest["splits"][split] = {"rows": rows, "tokens": tokens, "shard_rows": shard_rows,
                                 "num_shards": -(-rows // shard_rows),
                                 "num_truncated": int(getattr(splits.get(split), "num_truncated", 0))}
  missing = [str(prepared.shard_path(root, split, s).relative_to(root)) for split, info in manifest["splits"].items()
             for s in range(info["num_shards"]) if not prepared.shard_path(root, split, s).is_file()]
  if missing:
    raise UserError(f"OUT_DIR: shards {missing[:3]} are missing after preparing (do all processes share {root}?)")
  for split, info in manifest["splits"].items():
    info["data_fingerprint"] = ""
    view = prepared.PreparedSplit(root, split, manifest, "OUT_DIR")
    got = prepared.shards_fingerprint(view, task, d.max_length, meta["pad_id"])
    if meta["expected"] is not None and got != meta["expected"][split]:  # the in-memory rows vs the shards
      raise UserError(f"OUT_DIR: the shards in {str(root)!r} differ from this run's {split} rows (written by a run "
                      f"of other data?); delete the directory and prepare again")
    info["data_fingerprint"] = got
    bucketed = float(view.bucket_of.sum())
    info["padding_fraction"] = round(1.0 - info["tokens"] / bucketed, 6) if bucketed else 0.0
    info["padding_fraction_max_length"] = round(1.0 - info["tokens"] / (info["rows"] * d.max_length), 6)
  manifest["tokens"] = sum(info["tokens"] for info in manifest["splits"].values())
  manifest["bytes"] = int(sum(f.stat().st_size for f in root.glob("*/shard-*.npy") if ".tmp-" not in f.name))
  manifest["seconds"] = round(time.perf_counter() - t0, 3)
  tmp = root / (prepared.MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=1))
  os.replace(tmp, root / prepared.MANIFEST)
  (root / prepared.PROGRESS).unlink(missing_ok=True)
  for stale in root.glob("*/shard-*.tmp-*.npy"):  # left by a process killed mid-write
    stale.unlink()


def main(cfg: config_lib.Config, out_dir: str) -> int:
  out, manifest = prepare(cfg, out_dir)
  print(f"prepared data: {out} ({manifest['tokens']:,} tokens); train with data.source={out}")
  return 0
