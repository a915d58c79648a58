"""Where text comes from: hub datasets, local files, and the built-in offline ``pydoc`` corpus.

Every loader returns a :class:`datasets.Dataset` holding the requested split with the text
column(s) (and the label column, when named) checked to exist.  Errors are one-line
``ValueError`` s that name the config field (``data.path``, ``data.format``,
``data.text_columns``, ...), raised before anything is tokenized.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import datasets
import numpy as np

from distill_jax.errors import first_line

_LOG = logging.getLogger(__name__)

# File suffix -> `datasets` packaged builder.
FORMATS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
    ".txt": "text", ".text": "text",
}
_BUILDERS = ("json", "csv", "parquet", "text")

PYDOC = "pydoc"
# Share of the pydoc paragraphs held out for validation (by a stable hash of their text).
PYDOC_VALIDATION_PERCENT = 8


def load_texts(source: str, *, split: str = "train", name: Optional[str] = None,
               text_columns: Sequence[str] = ("text",), label_column: Optional[str] = None,
               data_format: Optional[str] = None, validation_fraction: Optional[float] = None,
               seed: int = 0, cache_dir: Optional[str] = None) -> datasets.Dataset:
  """Loads one split of a text dataset, checked against the named columns.

  Args:
    source: ``"pydoc"`` (built-in offline English prose), a local file or directory of
      JSON/JSONL/CSV/TSV/Parquet/plain-text files (text: one example per line), or a hub
      dataset id (read offline from the HF cache when present).
    split: ``"train"`` or ``"validation"`` (or any split the dataset has).
    name: hub dataset config name (e.g. ``"sst2"`` for ``glue``).
    text_columns: one column, or two for text pairs (e.g. ``("sentence1", "sentence2")``).
    label_column: class-label column for sequence classification, or ``None``.
    data_format: ``"json" | "csv" | "parquet" | "text"``; inferred from file suffixes when
      ``None``.
    validation_fraction: when the source has no ``split``, carve this fraction out of
      ``"train"`` deterministically (given ``seed``); ``"train"`` then excludes it.
    seed: seed of the carved split.
    cache_dir: `datasets` cache directory (``None``: the default HF cache).

  Returns:
    A ``datasets.Dataset`` of the split, with rows whose texts are all empty removed.

  Raises:
    ValueError: one line naming the field, for a missing file, unknown format, missing
      column, unavailable hub dataset, empty dataset or all-empty texts.
  """
  text_columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
  if not 1 <= len(text_columns) <= 2:
    raise ValueError(f"data.text_columns: expected one column or a pair, got {list(text_columns)}")
  if validation_fraction is not None and not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"data.validation_fraction: must be in (0, 1), got {validation_fraction}")
  if source == PYDOC:
    ds = pydoc_corpus(split)
    splits = None
  else:
    splits = _load_local(source, data_format, cache_dir) if _is_path(source) else _load_hub(
        source, name, cache_dir)
    ds = _pick_split(splits, split, validation_fraction, seed)
  check_columns(ds, text_columns, label_column)
  return _drop_empty(ds, text_columns)


def pydoc_corpus(split: str = "train") -> datasets.Dataset:
  """Real English prose shipped with Python: paragraphs of ``pydoc_data.topics``.

  Paragraphs are whitespace-normalized, deduplicated, and kept only when they read as prose
  (at least 8 words, mostly letters, ending like a sentence, no grammar or REPL lines).  A
  paragraph is in ``"validation"`` when a SHA-1 of its text falls in the first
  ``PYDOC_VALIDATION_PERCENT`` percent, so the split is identical on every run and machine
  (and stable for a paragraph even when another Python version adds topics).

  Args:
    split: ``"train"`` or ``"validation"``.

  Returns:
    A dataset with one ``"text"`` column.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"data.split: pydoc has splits ['train', 'validation'], got {split!r}")
  from pydoc_data.topics import topics

  want_validation = split == "validation"
  seen, texts = set(), []
  for key in sorted(topics):
    for para in re.split(r"\n\s*\n", topics[key]):
      text = " ".join(para.split())
      if text in seen or not _is_prose(text):
        continue
      seen.add(text)
      bucket = int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "big") % 100
      if (bucket < PYDOC_VALIDATION_PERCENT) == want_validation:
        texts.append(text)
  return datasets.Dataset.from_dict({"text": texts}, split=datasets.Split(split))


def _is_prose(text: str) -> bool:
  if len(text.split()) < 8 or ">>>" in text or "::=" in text or text[-1] not in ".?!:":
    return False
  letters = sum(c.isalpha() or c.isspace() for c in text)
  return letters >= 0.8 * len(text)


def _is_path(source: str) -> bool:
  if os.path.exists(source):
    return True
  return (source.startswith(("/", "./", "../", "~")) or os.path.splitext(source)[1].lower() in FORMATS
          or any(c in source for c in "*?"))


def _local_files(path: str, data_format: Optional[str]) -> list[str]:
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(f) and (data_format or os.path.splitext(f)[1].lower() in FORMATS))
    if not files:
      raise ValueError(f"data.source: no data files ({', '.join(sorted(FORMATS))}) under {path!r}")
  else:
    files = sorted(glob.glob(path)) if any(c in path for c in "*?") else [path]
    if not files or not all(os.path.isfile(f) for f in files):
      raise ValueError(f"data.source: no such file {path!r}")
  return files


def _local_format(files: Sequence[str], data_format: Optional[str], path: str) -> tuple[str, dict]:
  """The `datasets` builder of `files` and its keyword arguments."""
  if data_format is None:
    kinds = {FORMATS.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds:
      bad = next(f for f in files if os.path.splitext(f)[1].lower() not in FORMATS)
      raise ValueError(f"data.format: cannot infer the format of {bad!r}; allowed suffixes: "
                       f"{', '.join(sorted(FORMATS))} (or set data.format to one of {', '.join(_BUILDERS)})")
    if len(kinds) > 1:
      raise ValueError(f"data.format: mixed formats {sorted(kinds)} under {path!r}; use one")
    data_format = kinds.pop()
  # The config's finer names map onto `datasets`' builders (jsonl is json lines, tsv a tab CSV).
  tab_separated = data_format == "tsv" or all(os.path.splitext(f)[1].lower() == ".tsv" for f in files)
  data_format = {"jsonl": "json", "tsv": "csv"}.get(data_format, data_format)
  if data_format not in _BUILDERS:
    raise ValueError(f"data.format: unknown {data_format!r}; allowed: {', '.join(_BUILDERS + ('jsonl', 'tsv'))}")
  if all(os.path.getsize(f) == 0 for f in files):
    raise ValueError(f"data.source: {path!r} is empty (no examples)")
  return data_format, ({"delimiter": "\t"} if data_format == "csv" and tab_separated else {})


def _load_local(path: str, data_format: Optional[str], cache_dir: Optional[str]) -> datasets.DatasetDict:
  path = os.path.expanduser(path)
  files = _local_files(path, data_format)
  data_format, kwargs = _local_format(files, data_format, path)
  try:
    return datasets.load_dataset(data_format, data_files={"train": files}, cache_dir=cache_dir, **kwargs)
  except Exception as e:  # noqa: BLE001 — parse errors surface as many types.
    raise ValueError(f"data.source: cannot read {path!r} as {data_format}: {first_line(e.__cause__ or e)}") from e


def _load_hub(name_or_id: str, config_name: Optional[str], cache_dir: Optional[str]) -> datasets.DatasetDict:
  try:
    return datasets.load_dataset(name_or_id, config_name, cache_dir=cache_dir)
  except Exception as e:  # noqa: BLE001 — datasets raises many types for "not available".
    raise ValueError(f"data.source: hub dataset {name_or_id!r} (config {config_name!r}) is not available "
                     f"(offline cache miss or unknown id): {first_line(e)}") from e


def _pick_split(splits: datasets.DatasetDict, split: str, validation_fraction: Optional[float],
                seed: int) -> datasets.Dataset:
  if split in splits and not (validation_fraction and split == "train" and "validation" not in splits):
    return splits[split]
  if validation_fraction and "train" in splits and split in ("train", "validation"):
    if len(splits["train"]) < 2:
      raise ValueError(f"data.validation_fraction: cannot carve validation from {len(splits['train'])} example(s)")
    parts = splits["train"].train_test_split(test_size=validation_fraction, seed=seed, shuffle=True)
    return parts["train" if split == "train" else "test"]
  hint = "; set data.validation_fraction to carve one from train" if split == "validation" else ""
  raise ValueError(f"data.split: no split {split!r}; available: {', '.join(splits)}{hint}")


def check_columns(ds: datasets.Dataset, text_columns: Sequence[str], label_column: Optional[str]) -> None:
  """One-line ValueError naming the field of a missing text or label column, or an empty split."""
  for field, cols in (("data.text_columns", text_columns), ("data.label_column", [label_column] if label_column else [])):
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
      raise ValueError(f"{field}: no column {missing[0]!r}; the dataset has {ds.column_names}")
  if len(ds) == 0:
    raise ValueError(f"data.source: the dataset{f' {ds.split} split' if ds.split else ''} is empty")


def _drop_empty(ds: datasets.Dataset, text_columns: Sequence[str]) -> datasets.Dataset:
  def nonempty(batch):
    return [any(isinstance(t, str) and t.strip() for t in texts) for texts in zip(*(batch[c] for c in text_columns))]

  kept = ds.filter(nonempty, batched=True, desc="drop empty texts")
  if len(kept) == 0:
    raise ValueError(f"data.text_columns: all {len(ds)} texts in {list(text_columns)} are empty")
  if len(kept) < len(ds):
    _LOG.warning("data: dropped %d of %d examples with empty %s", len(ds) - len(kept), len(ds), list(text_columns))
  return kept


def stream_texts(source: str, *, split: str = "train", name: Optional[str] = None,
                 text_columns: Sequence[str] = ("text",), data_format: Optional[str] = None,
                 carve: Optional[tuple[float, int, str]] = None, cache_dir: Optional[str] = None
                 ) -> Iterator[dict[str, Any]]:
  """Examples of one split, one at a time, never holding the split (``data.streaming``): a hub
  dataset through `datasets`' streaming mode, local files read lazily, or ``pydoc``.

  Args:
    source, split, name, text_columns, data_format, cache_dir: as in :func:`load_texts`.
    carve: ``(fraction, seed, part)``: keep the examples of ``part`` (``"train"`` or
      ``"validation"``) of a deterministic carve of `split`: example ``i`` is in validation
      when a hash of ``(seed, i)`` falls below `fraction` (not the in-memory split's carve).

  Yields:
    Example dicts whose text columns are not all empty (as :func:`load_texts` keeps them).

  Raises:
    ValueError: one line naming the field, for a missing source or column, or an empty split.
  """
  text_columns = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
  if source == PYDOC:
    rows: Any = pydoc_corpus(split)
  elif _is_path(source):
    if split != "train":
      raise ValueError(f"data.split: local files have the split 'train' only, got {split!r}")
    files = _local_files(os.path.expanduser(source), data_format)
    fmt, kwargs = _local_format(files, data_format, source)
    rows = datasets.load_dataset(fmt, data_files={"train": files}, split="train", streaming=True, **kwargs)
  else:
    try:
      rows = datasets.load_dataset(source, name, split=split, streaming=True, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 — datasets raises many types for "not available".
      raise ValueError(f"data.source: hub dataset {source!r} (config {name!r}, split {split!r}) is not available "
                       f"for streaming: {first_line(e)}") from e
  seen = 0
  for i, row in enumerate(rows):
    if i == 0:
      missing = [c for c in text_columns if c not in row]
      if missing:
        raise ValueError(f"data.text_columns: no column {missing[0]!r}; the dataset has {list(row)}")
    if carve is not None and (_carved(i, carve[0], carve[1]) != (carve[2] == "validation")):
      continue
    if any(isinstance(row[c], str) and row[c].strip() for c in text_columns):
      seen += 1
      yield row
  if not seen:
    raise ValueError(f"data.source: the {split} split of {source!r} holds no examples with text in "
                     f"{list(text_columns)}")


def _carved(index: int, fraction: float, seed: int) -> bool:
  digest = hashlib.sha1(f"{seed}:{index}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2 ** 64


def take(rows: Iterator[dict[str, Any]], limit: Optional[int]) -> Iterator[dict[str, Any]]:
  """The first `limit` rows (all when None)."""
  return rows if limit is None else itertools.islice(rows, limit)


def _choices(weights: Sequence[float], seed: int) -> Iterator[int]:
  """An endless, seeded sequence of part indices drawn with probabilities ∝ `weights`."""
  p = np.asarray(weights, np.float64)
  p = p / p.sum()
  rng = np.random.default_rng([seed, len(p)])
  while True:
    yield from rng.choice(len(p), size=4096, p=p).tolist()


def mixture_order(sizes: Sequence[int], weights: Sequence[float], seed: int) -> np.ndarray:
  """Where each document of a mixture comes from: indices into the parts laid end to end.

  Part ``i`` is drawn with probability ``weights[i] / sum(weights)`` (seeded by `seed`), its
  documents in order, until a drawn part has none left (so the shares hold to the end).

  Returns:
    ``[N]`` int64 indices into the concatenation of the parts.
  """
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  taken, order = [0] * len(sizes), []
  for c in _choices(weights, seed):
    if taken[c] == sizes[c]:
      break
    order.append(starts[c] + taken[c])
    taken[c] += 1
  return np.asarray(order, np.int64)


def mix_datasets(parts: Sequence[datasets.Dataset], weights: Sequence[float], seed: int,
                 columns: Sequence[str]) -> datasets.Dataset:
  """The mixture (:func:`mixture_order`) of in-memory parts, keeping `columns`."""
  parts = [p.select_columns(list(columns)) for p in parts]
  try:
    joined = datasets.concatenate_datasets(parts)
  except ValueError as e:
    raise ValueError(f"data.mixture: the sources' columns {list(columns)} have different types: {first_line(e)}") from e
  return joined.select(mixture_order([len(p) for p in parts], weights, seed))


def mix_streams(parts: Sequence[Iterator[dict[str, Any]]], weights: Sequence[float], seed: int
                ) -> Iterator[dict[str, Any]]:
  """The mixture of streamed parts: the same draws as :func:`mix_datasets`, one example at a time."""
  parts = [iter(p) for p in parts]
  for c in _choices(weights, seed):
    row = next(parts[c], None)
    if row is None:
      return
    yield row
