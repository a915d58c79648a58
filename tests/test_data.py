"""Processing and iteration: packing, buckets, masking, determinism, sharding, resume, eval padding."""

from __future__ import annotations

import itertools
import json

import datasets
import jax
import numpy as np
import pytest

import tiny
from distill_jax.data import pipeline as data


@pytest.fixture(scope="module")
def bert():
  return tiny.tokenizer_for("bert")


@pytest.fixture(scope="module")
def gpt():
  return tiny.tokenizer_for("gpt2")


@pytest.fixture(scope="module")
def texts():
  return data.load_texts("pydoc").select(range(300))


@pytest.fixture(scope="module")
def mlm(texts, bert):
  return data.tokenize(texts, bert, task="masked_lm", max_length=64)


def _collect(it, n=None):
  return list(itertools.islice(it, n))


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_packing(texts, gpt):
  docs = texts.select(range(40))
  ex = data.tokenize(docs, gpt, task="causal_lm", max_length=32)
  batches = _collect(data.eval_batches(ex, global_batch_size=8, process_index=0, process_count=1))
  ids = np.concatenate([b["input_ids"][b["attention_mask"] == 1] for b in batches])
  eos = gpt.eos_token_id
  expected = np.concatenate([gpt(t, add_special_tokens=False)["input_ids"] + [eos] for t in docs["text"]])
  np.testing.assert_array_equal(ids, expected)  # no token lost, in order, EOS after each document
  assert {b["input_ids"].shape for b in batches} == {(8, 32)}
  labels = np.concatenate([b["labels"][b["attention_mask"] == 1] for b in batches])
  loss_mask = np.concatenate([b["loss_mask"][b["attention_mask"] == 1] for b in batches])
  np.testing.assert_array_equal(labels[:-1], expected[1:])  # next token, also across row boundaries
  np.testing.assert_array_equal(loss_mask, (expected != eos).astype(np.int32))  # no loss across documents
  for b in batches:
    assert not (b["loss_mask"] & (1 - b["attention_mask"])).any()


@pytest.mark.parametrize("max_length", [64, 12])  # 12 truncates the longer pairs
def test_prompt_completion_rows_score_the_completion_only(gpt, max_length):
  pairs = datasets.Dataset.from_dict({"prompt": ["Once upon a time", "", "The cat"],
                                      "completion": [" there was a dog.", "Hello world", " sat on the mat and slept."]})
  ex = data.tokenize(pairs, gpt, task="causal_lm", max_length=max_length, text_columns=("prompt",),
                     completion_column="completion", bucket=False)  # one bucket: rows in dataset order
  batch = next(iter(data.eval_batches(ex, global_batch_size=3, process_index=0, process_count=1)))
  eos, truncated = gpt.eos_token_id, 0
  for row, (prompt, completion) in enumerate(zip(pairs["prompt"], pairs["completion"])):
    p = gpt(prompt, add_special_tokens=False)["input_ids"]
    full = p + gpt(completion, add_special_tokens=False)["input_ids"] + [eos]
    truncated += len(full) > max_length
    full = full[:max_length]
    n = len(full)
    np.testing.assert_array_equal(batch["input_ids"][row, :n], full)
    np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(batch["input_ids"].shape[1]) < n)
    np.testing.assert_array_equal(batch["labels"][row, :n - 1], full[1:])
    # Position j predicts token j + 1: scored exactly when that token is a completion token (or the EOS).
    want = np.zeros(batch["input_ids"].shape[1], np.int32)
    want[max(len(p) - 1, 0):n - 1] = 1
    np.testing.assert_array_equal(batch["loss_mask"][row], want)
  assert ex.num_truncated == truncated and (truncated > 0) == (max_length == 12)


def test_completion_column_needs_one_causal_prompt_column(gpt):
  pairs = datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
  with pytest.raises(ValueError, match=r"^data\.completion_column: needs task causal_lm"):
    data.tokenize(pairs, gpt, task="masked_lm", max_length=8, text_columns=("prompt",), completion_column="completion")
  with pytest.raises(ValueError, match=r"^data\.text_columns: no column 'answer'"):
    data.tokenize(pairs, gpt, task="causal_lm", max_length=8, text_columns=("prompt",), completion_column="answer")


def test_buckets_shapes_and_report(mlm):
  assert mlm.buckets == (16, 32, 64)
  assert mlm.num_truncated > 0 and mlm.lengths.max() == 64
  shapes = {b["input_ids"].shape for b in _collect(data.train_batches(mlm, global_batch_size=8, num_epochs=1,
                                                                      process_index=0, process_count=1))}
  assert shapes <= {(8, 16), (8, 32), (8, 64)} and len(shapes) > 1
  rep = data.padding_report(mlm)
  assert 0 < rep["padding_fraction_buckets"] < rep["padding_fraction_max_length"]
  assert rep["padded_positions_saved"] > 0
  flat = data.tokenize(data.load_texts("pydoc").select(range(20)), tiny.tokenizer_for("bert"), task="encoder",
                       max_length=64, bucket=False)
  assert flat.buckets == (64,)


def test_batch_keys(mlm, texts, bert):
  b = next(data.train_batches(mlm, global_batch_size=4, process_index=0, process_count=1))
  assert sorted(b) == ["attention_mask", "input_ids", "loss_mask", "token_type_ids"]
  assert all(v.dtype == np.int32 for v in b.values())
  assert not np.isin(b["input_ids"][b["loss_mask"] == 1], mlm.special_ids).any()
  ds = datasets.Dataset.from_dict({"a": texts["text"][:16], "b": texts["text"][16:32], "y": ["x", "z"] * 8})
  ex = data.tokenize(ds, bert, task="sequence_classification", max_length=64, text_columns=("a", "b"),
                     label_column="y")
  assert ex.label_names == ("x", "z")
  b = next(data.train_batches(ex, global_batch_size=4, process_index=0, process_count=1))
  assert b["labels"].shape == (4,) and b["labels"].dtype == np.int32
  assert (b["token_type_ids"] == 1).any()  # the second segment of the pair
  assert b["loss_mask"].dtype == np.int32 and np.array_equal(b["loss_mask"], b["attention_mask"])  # 0/1, not -1


def test_mask_tokens_statistics_and_determinism():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 384, size=(64, 128)).astype(np.int32)
  ids[:, 0] = 2
  attn = np.ones_like(ids)
  attn[:, 100:] = 0
  fn = jax.jit(lambda key, i, a: data.mask_tokens(key, i, a, mask_token_id=4, vocab_size=384, special_ids=(0, 2)))
  key = jax.random.fold_in(jax.random.key(7), 3)
  masked, labels, loss_mask = map(np.asarray, fn(key, ids, attn))
  _same(dict(zip("abc", (masked, labels, loss_mask))), dict(zip("abc", map(np.asarray, fn(key, ids, attn)))))
  assert not (np.asarray(fn(jax.random.fold_in(jax.random.key(7), 4), ids, attn)[2]) == loss_mask).all()
  np.testing.assert_array_equal(labels, ids)
  assert not loss_mask[:, 100:].any() and not loss_mask[:, 0].any()
  assert abs(loss_mask.mean() / (99 / 128) - 0.15) < 0.01
  t = loss_mask == 1
  assert abs((masked[t] == 4).mean() - 0.8) < 0.03
  changed = (masked[t] != 4) & (masked[t] != ids[t])
  assert 0.07 < changed.mean() < 0.12  # 10% random (a few draw the same id back)
  np.testing.assert_array_equal(masked[~t], ids[~t])


def test_mask_batch(mlm, bert):
  b = next(data.train_batches(mlm, global_batch_size=4, process_index=0, process_count=1))
  out = data.mask_batch(jax.random.key(0), b, mask_token_id=bert.mask_token_id, vocab_size=len(bert),
                        special_ids=mlm.special_ids)
  assert set(out) == set(b) | {"labels"} and out["labels"].shape == b["input_ids"].shape


def test_determinism_and_shards(mlm):
  kw = dict(global_batch_size=8, seed=5, process_count=1, process_index=0)
  a, b = _collect(data.train_batches(mlm, **kw), 6), _collect(data.train_batches(mlm, **kw), 6)
  for x, y in zip(a, b):
    _same(x, y)
  c = _collect(data.train_batches(mlm, **{**kw, "seed": 6}), 6)
  assert any(x["input_ids"].shape != y["input_ids"].shape or (x["input_ids"] != y["input_ids"]).any()
             for x, y in zip(a, c))
  shards = [_collect(data.train_batches(mlm, **{**kw, "process_count": 4, "process_index": p}), 6) for p in range(4)]
  for step, whole in enumerate(a):
    parts = [s[step] for s in shards]
    assert all(p["input_ids"].shape[0] == 2 for p in parts)
    _same(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})


def test_epochs_reshuffle(mlm):
  n = data.steps_per_epoch(mlm, 8)
  batches = _collect(data.train_batches(mlm, global_batch_size=8, num_epochs=2, process_index=0, process_count=1))
  assert len(batches) == 2 * n
  first, second = batches[:n], batches[n:]
  assert any(x["input_ids"].shape != y["input_ids"].shape or (x["input_ids"] != y["input_ids"]).any()
             for x, y in zip(first, second))


@pytest.mark.parametrize("k", [0, 3, 40])  # 40 crosses an epoch boundary
def test_resume(mlm, k):
  kw = dict(global_batch_size=8, seed=1, process_index=1, process_count=2)
  straight = _collect(data.train_batches(mlm, **kw), k + 4)
  it = data.train_batches(mlm, **kw)
  _collect(it, k)
  state = json.loads(json.dumps(it.get_state()))
  resumed = data.train_batches(mlm, **kw)
  resumed.set_state(state)
  for want, got in zip(straight[k:], _collect(resumed, 4)):
    _same(want, got)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_each_example_once(mlm, process_count):
  seen = []
  for p in range(process_count):
    for b in data.eval_batches(mlm, global_batch_size=8, process_index=p, process_count=process_count):
      assert b["input_ids"].shape[0] == 8 // process_count
      real = b["attention_mask"].any(-1)
      assert not b["loss_mask"][~real].any()
      for row in b["input_ids"][real]:
        seen.append(tuple(row[row != mlm.pad_id]))
  want = [tuple(mlm.tokens["input_ids"][o:o + n]) for o, n in zip(mlm.offsets, mlm.lengths)]
  assert sorted(seen) == sorted(want)


def test_batch_errors(mlm, texts, bert):
  with pytest.raises(ValueError, match=r"^data\.global_batch_size: 6 is not divisible by process_count=4$"):
    data.train_batches(mlm, global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"^data\.global_batch_size: .* devices$"):
    data.train_batches(mlm, global_batch_size=12, process_index=0, process_count=1, num_devices=8)
  with pytest.raises(ValueError, match=r"^data\.global_batch_size: .* no full batch"):
    data.train_batches(mlm, global_batch_size=4096, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"^task: unknown 'seq2seq'"):
    data.tokenize(texts, bert, task="seq2seq", max_length=64)
  with pytest.raises(ValueError, match=r"^data.label_column: required"):
    data.tokenize(texts, bert, task="sequence_classification", max_length=64)
  with pytest.raises(ValueError, match=r"^data.text_columns: no column 'body'; the dataset has \['text'\]"):
    data.tokenize(texts, bert, task="encoder", max_length=64, text_columns=("body",))
  with pytest.raises(ValueError, match=r"^data.label_column: no column 'y'; the dataset has \['text'\]"):
    data.tokenize(texts, bert, task="sequence_classification", max_length=64, label_column="y")
  with pytest.raises(ValueError, match=r"^data.source: the dataset is empty$"):
    data.tokenize(datasets.Dataset.from_dict({"text": []}), bert, task="encoder", max_length=64)


def test_hub_unavailable_offline():
  with pytest.raises(ValueError, match=r"^data.source: hub dataset 'nobody/no-such-dataset'"):
    data.load_texts("nobody/no-such-dataset")


def test_tokenize_cache(tmp_path, texts, bert):
  sub = texts.select(range(30))
  a = data.tokenize(sub, bert, task="encoder", max_length=32, cache_dir=str(tmp_path))
  assert list(tmp_path.glob("tokenized-*.arrow"))
  b = data.tokenize(sub, bert, task="encoder", max_length=32, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(a.tokens["input_ids"], b.tokens["input_ids"])
