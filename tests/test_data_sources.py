"""Sources: every local format, the offline pydoc corpus, splits, and bad-input errors."""

from __future__ import annotations

import json

import datasets
import pytest

from distill_jax.data import pipeline as data

ROWS = [{"text": "the first example", "label": "pos", "pair": "one"},
        {"text": "a second one", "label": "neg", "pair": "two"},
        {"text": "", "label": "neg", "pair": "three"},
        {"text": "and a third", "label": "pos", "pair": "four"}]


def _write(path, fmt):
  if fmt == "jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  elif fmt == "json":
    path.write_text(json.dumps(ROWS))
  elif fmt == "csv":
    path.write_text("text,label,pair\n" + "".join(f"{r['text']},{r['label']},{r['pair']}\n" for r in ROWS))
  elif fmt == "parquet":
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
  elif fmt == "txt":
    path.write_text("".join(r["text"] + "\n" for r in ROWS))
  return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt"])
def test_local_formats(tmp_path, fmt):
  path = _write(tmp_path / f"d.{fmt}", fmt)
  label = None if fmt == "txt" else "label"
  ds = data.load_texts(str(path), text_columns=("text",), label_column=label, cache_dir=str(tmp_path / "c"))
  assert ds["text"] == ["the first example", "a second one", "and a third"]  # the empty text is dropped
  if label:
    assert ds["label"] == ["pos", "neg", "pos"]


def test_config_format_names_jsonl_and_tsv(tmp_path):
  """`data.format` accepts the config's jsonl/tsv names for files whose suffix says otherwise."""
  path = _write(tmp_path / "d.data", "jsonl")
  assert data.load_texts(str(path), data_format="jsonl", cache_dir=str(tmp_path / "c"))["text"][0] == "the first example"
  (tmp_path / "t.data").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
  ds = data.load_texts(str(tmp_path / "t.data"), data_format="tsv", label_column="label", cache_dir=str(tmp_path / "c"))
  assert ds["label"] == ["pos", "neg", "pos"]


def test_tsv_suffix_in_any_case_is_tab_separated(tmp_path):
  """The suffix picks the format case-insensitively; the tab delimiter must follow it."""
  (tmp_path / "t.TSV").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS))
  ds = data.load_texts(str(tmp_path / "t.TSV"), label_column="label", cache_dir=str(tmp_path / "c"))
  assert ds["label"] == ["pos", "neg", "pos"]


def test_directory_and_pairs(tmp_path):
  d = tmp_path / "dir"
  (d / "sub").mkdir(parents=True)
  _write(d / "a.jsonl", "jsonl")
  _write(d / "sub" / "b.jsonl", "jsonl")
  ds = data.load_texts(str(d), text_columns=("text", "pair"), cache_dir=str(tmp_path / "c"))
  assert len(ds) == 8  # a row with an empty first text but a non-empty pair is kept
  assert ds["pair"][:4] == ["one", "two", "three", "four"]


def test_validation_carved_deterministically(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"text": f"example {i}"}) + "\n" for i in range(50)))
  kw = dict(validation_fraction=0.2, seed=3, cache_dir=str(tmp_path / "c"))
  train, val = data.load_texts(str(path), **kw), data.load_texts(str(path), split="validation", **kw)
  assert len(val) == 10 and len(train) == 40
  assert not set(train["text"]) & set(val["text"])
  assert data.load_texts(str(path), split="validation", **kw)["text"] == val["text"]


def test_pydoc_offline_stable_disjoint():
  train, val = data.load_texts("pydoc"), data.load_texts("pydoc", split="validation")
  assert len(train) > 500 and 0.03 < len(val) / (len(train) + len(val)) < 0.12
  assert data.pydoc_corpus("train")["text"] == train["text"]
  assert data.pydoc_corpus("validation")["text"] == val["text"]
  assert not set(train["text"]) & set(val["text"])
  assert all(len(t.split()) >= 8 and ">>>" not in t for t in train["text"])


@pytest.mark.parametrize("make, field", [
    (lambda p: data.load_texts(str(p / "missing.jsonl")), "data.source"),
    (lambda p: data.load_texts(str(p / "nodir") + "/"), "data.source"),
    (lambda p: data.load_texts(str(_write(p / "d.xml", "txt"))), "data.format"),
    (lambda p: data.load_texts(str(_write(p / "d.txt", "txt")), data_format="xml"), "data.format"),
    (lambda p: data.load_texts(str(_write(p / "d.jsonl", "jsonl")), text_columns=("body",)), "data.text_columns"),
    (lambda p: data.load_texts(str(_write(p / "d.jsonl", "jsonl")), label_column="y"), "data.label_column"),
    (lambda p: data.load_texts("pydoc", split="test"), "data.split"),
    (lambda p: data.load_texts(str(_write(p / "d.jsonl", "jsonl")), split="validation"), "data.split"),
])
def test_bad_input(tmp_path, make, field):
  with pytest.raises(ValueError, match=rf"^{field}: ") as e:
    make(tmp_path)
  assert "\n" not in str(e.value)


def test_missing_column_lists_columns(tmp_path):
  with pytest.raises(ValueError, match=r"has \['text', 'label', 'pair'\]"):
    data.load_texts(str(_write(tmp_path / "d.jsonl", "jsonl")), text_columns=("body",))


def test_empty_and_all_empty(tmp_path):
  (tmp_path / "e.jsonl").write_text("")
  with pytest.raises(ValueError, match=r"^data\.(path|source): "):
    data.load_texts(str(tmp_path / "e.jsonl"))
  (tmp_path / "blank.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "  ", ""]))
  with pytest.raises(ValueError, match=r"^data.text_columns: all 3 texts"):
    data.load_texts(str(tmp_path / "blank.jsonl"))
