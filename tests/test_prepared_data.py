"""Prepared data (`distill-jax prepare-data`): the same rows and batches as the in-memory path,
resumable whole shards, streaming without holding the source, bad input as one-line errors."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tiny
from distill_jax.commands import prepare_data
from distill_jax.config import root as config_lib
from distill_jax.data import pipeline as data
from distill_jax.data import prepared
from distill_jax.data import teacher_cache
from distill_jax.errors import UserError
from distill_jax.training import run_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepared")
  teacher = tiny.make_checkpoint(root / "teacher", "llama", "causal_lm", num_hidden_layers=1)
  bert = tiny.make_checkpoint(root / "bert", "bert", "masked_lm", num_hidden_layers=1)
  lines = tiny._corpus_lines()[:150]
  text = root / "text.jsonl"
  text.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 3]), "label": ["neg", "pos"][i % 2]}) + "\n"
                          for i in range(0, len(lines), 3)))
  return {"root": root, "teacher": str(teacher), "bert": str(bert), "text": str(text)}


def _overrides(setup, *extra, teacher="teacher", task="causal_lm"):
  return [f"teacher.path={setup[teacher]}", f"teacher.task={task}", "student.num_layers=1",
          f"data.source={setup['text']}", "data.max_length=16", "data.global_batch_size=8",
          "data.shard_rows=7", "logging.progress_bar=false", "logging.tensorboard=false",
          "eval.before_and_after=false", "export.enabled=false", "train.steps=2", *extra]


def _config(setup, *extra, **kw):
  return config_lib.load_config(None, _overrides(setup, *extra, **kw))


def _tokenizer(cfg):
  return run_setup.data_tokenizer(cfg, run_setup.main_teacher(cfg))


def _batches(examples, n, **kw):
  return list(itertools.islice(data.train_batches(examples, global_batch_size=8, seed=3, process_index=0,
                                                  process_count=1, **kw), n))


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a[k].dtype == b[k].dtype, k


def _shards(out):
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("shard-*.npy"))}


@pytest.fixture(scope="module")
def causal(setup):
  out = setup["root"] / "causal"
  prepare_data.prepare(_config(setup), str(out))
  return out


@pytest.mark.parametrize("task,teacher,extra", [
    ("causal_lm", "teacher", ()),
    ("masked_lm", "bert", ("data.max_length=24",)),  # length buckets, computed loss mask
    ("sequence_classification", "bert", ("data.max_length=24", "data.label_column=label")),  # class labels
])
def test_prepared_batches_equal_the_in_memory_ones(setup, causal, tmp_path, task, teacher, extra):
  cfg = _config(setup, *extra, teacher=teacher, task=task)
  out = causal if task == "causal_lm" else tmp_path / "prepared"
  if task != "causal_lm":
    prepare_data.prepare(cfg, str(out))
  tok = _tokenizer(cfg)
  mem_train, mem_val = run_setup.load_data(cfg, tok, task)
  disk_cfg = _config(setup, *extra, f"data.source={out}", teacher=teacher, task=task)
  disk_train, disk_val = run_setup.load_data(disk_cfg, _tokenizer(disk_cfg), task)
  assert isinstance(disk_train, prepared.PreparedSplit)
  np.testing.assert_array_equal(disk_train.lengths, mem_train.lengths)
  assert disk_train.buckets == mem_train.buckets and disk_train.label_names == mem_train.label_names
  # The manifest's fingerprint is the teacher cache's fingerprint of the in-memory rows, and
  # the lazily read flat arrays give it too.
  assert disk_train.fingerprint == teacher_cache.data_fingerprint(mem_train) == teacher_cache.data_fingerprint(disk_train)
  assert disk_val.fingerprint == teacher_cache.data_fingerprint(mem_val)
  for a, b in zip(_batches(mem_train, 6), _batches(disk_train, 6)):
    _same(a, b)
  evals = lambda ex: list(data.eval_batches(ex, global_batch_size=8, process_index=0, process_count=1))  # noqa: E731
  for a, b in zip(evals(mem_val), evals(disk_val), strict=True):
    _same(a, b)


def test_manifest(setup, causal):
  m = json.loads((causal / "manifest.json").read_text())
  assert m["format"] == prepared.FORMAT and m["version"] == prepared.VERSION and m["task"] == "causal_lm"
  assert m["tokenizer_fingerprint"] == teacher_cache.tokenizer_fingerprint(_tokenizer(_config(setup)))
  assert m["keys"] == ["input_ids", "labels", "loss_mask"] and m["max_length"] == 16
  for split in prepared.SPLITS:
    info = m["splits"][split]
    assert info["num_shards"] == len(list((causal / split).glob("shard-*.npy"))) == -(-info["rows"] // 7)
    assert 0 <= info["padding_fraction"] < 1 and len(info["data_fingerprint"]) == 64
  assert m["tokens"] == sum(m["splits"][s]["tokens"] for s in prepared.SPLITS)
  assert m["data"]["source"] == setup["text"] and not (causal / "progress.json").exists()


def test_resume_is_exact_by_index(setup, causal):
  _, splits = prepared.open_prepared(str(causal))
  ex = splits["train"]
  full = _batches(ex, 9)
  it = data.train_batches(ex, global_batch_size=8, seed=3, process_index=0, process_count=1)
  head = list(itertools.islice(it, 4))
  state = json.loads(json.dumps(it.get_state()))  # JSON, as the checkpoint stores it
  again = data.train_batches(ex, global_batch_size=8, seed=3, process_index=0, process_count=1)
  again.set_state(state)
  for a, b in zip(full, head + list(itertools.islice(again, 5)), strict=True):
    _same(a, b)


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_read_disjoint_rows_that_cover_the_global_batch(causal, process_count):
  _, splits = prepared.open_prepared(str(causal))
  ex = splits["train"]
  glob = _batches(ex, 3)
  hosts = [list(itertools.islice(data.train_batches(ex, global_batch_size=8, seed=3, process_index=p,
                                                    process_count=process_count), 3))
           for p in range(process_count)]
  for step in range(3):
    joined = {k: np.concatenate([h[step][k] for h in hosts]) for k in glob[step]}
    _same(joined, glob[step])


def test_killed_prepare_resumes_to_identical_shards(setup, causal, tmp_path):
  out = tmp_path / "killed"
  env = dict(os.environ, DISTILL_JAX_FAULTS=json.dumps({"cache_exit_after_shards": 2}))
  code = ("import sys; from distill_jax.config import root as c; from distill_jax.commands import prepare_data as p;"
          "p.prepare(c.load_config(None, sys.argv[2:]), sys.argv[1])")
  proc = subprocess.run([sys.executable, "-c", code, str(out), *_overrides(setup)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 137, proc.stderr[-2000:]
  assert len(_shards(out)) == 2 and not (out / "manifest.json").exists() and (out / "progress.json").exists()
  with pytest.raises(UserError, match=r"^data.source: .* holds no complete prepared data .*unfinished"):
    prepared.open_prepared(str(out))
  first = _shards(out)
  prepare_data.prepare(_config(setup), str(out))
  resumed = _shards(out)
  assert {k: resumed[k] for k in first} == first  # the finished shards were not rewritten
  assert resumed == _shards(causal)  # byte-identical to an uninterrupted run
  assert json.loads((out / "manifest.json").read_text())["splits"] == json.loads(
      (causal / "manifest.json").read_text())["splits"]


def test_streaming_equals_in_memory_and_never_holds_the_source(setup, causal, tmp_path):
  # pydoc has its own validation split, so the streamed rows must equal the in-memory ones.
  base = ("data.source=pydoc", "data.max_examples=60", "data.max_length=32")
  mem, stream = tmp_path / "mem", tmp_path / "stream"
  prepare_data.prepare(_config(setup, *base), str(mem))
  prepare_data.prepare(_config(setup, *base, "data.streaming=true"), str(stream))
  workers = tmp_path / "workers"  # two forked tokenizing processes keep the order
  prepare_data.prepare(_config(setup, *base, "data.streaming=true", "data.num_workers=2", "data.shard_rows=5"),
                       str(workers))
  assert _shards(mem) == _shards(stream)
  m, s, w = (json.loads((d / "manifest.json").read_text()) for d in (mem, stream, workers))
  assert m["splits"] == s["splits"]
  assert [w["splits"][k]["data_fingerprint"] for k in prepared.SPLITS] == [
      m["splits"][k]["data_fingerprint"] for k in prepared.SPLITS]


def test_streaming_local_files_carve_validation_once(setup, tmp_path):
  out = tmp_path / "carved"
  cfg = _config(setup, "data.streaming=true", "data.validation_fraction=0.2")
  prepare_data.prepare(cfg, str(out))
  tok = _tokenizer(cfg)
  docs = [json.loads(line)["text"] for line in open(setup["text"])]
  total = sum(len(x) + 1 for x in tok(docs, add_special_tokens=False)["input_ids"])
  m = json.loads((out / "manifest.json").read_text())
  assert m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"] == total  # each document once
  assert 0 < m["splits"]["validation"]["tokens"] < 0.5 * total
  with pytest.raises(ValueError, match=r"^data.text_columns: no column 'body'"):
    prepare_data.prepare(_config(setup, "data.streaming=true", "data.text_columns=[body]"), str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()
  with pytest.raises(UserError, match=r"^data.streaming: streams pack causal_lm documents only"):
    prepare_data.prepare(_config(setup, "data.streaming=true", teacher="bert", task="masked_lm"),
                         str(tmp_path / "y"))
  assert not (tmp_path / "y").exists()


def test_packed_stream_holds_one_shard(tmp_path):
  """A counted generator: the writer never buffers more than one shard of rows ahead."""
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(3, 100, rng.integers(1, 40))) + [2] for _ in range(400)]
  length, shard_rows = 16, 5
  seen = {"yielded": 0, "written": 0, "max_ahead": 0}

  def counted():
    for d in docs:
      seen["yielded"] += len(d)
      seen["max_ahead"] = max(seen["max_ahead"], seen["yielded"] - seen["written"])
      yield d

  rows, tokens = prepared.write_packed_stream(
      tmp_path, "train", counted(), max_length=length, pad_id=0, shard_rows=shard_rows,
      on_shard=lambda n: seen.__setitem__("written", seen["written"] + n))
  assert tokens == sum(map(len, docs)) == seen["written"] and rows == -(-tokens // length)
  assert seen["max_ahead"] <= shard_rows * length + 40 + length
  # the packed rows are `pipeline._pack`'s
  flat = np.concatenate([np.asarray(d, np.int32) for d in docs])
  offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
  ex = data._pack(flat, offsets, length, 0, ())
  for s in range(-(-rows // shard_rows)):
    got = np.load(prepared.shard_path(tmp_path, "train", s))
    want = np.concatenate(prepared.rows_from_examples(ex, s * shard_rows, min((s + 1) * shard_rows, rows)),
                          axis=None)
    np.testing.assert_array_equal(got, want)


def test_bad_input_is_one_line_before_any_model_loads(setup, causal, tmp_path, monkeypatch):
  def no_models(*a, **k):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(run_setup, "_load_models", no_models)
  load = lambda *extra, **kw: run_setup.build_run(_config(setup, f"data.source={causal}", *extra, **kw))  # noqa: E731
  with pytest.raises(ValueError, match=r"^data.max_length: 32 differs from 16 that .* was prepared with"):
    load("data.max_length=32")
  with pytest.raises(ValueError, match=r"^data.source: .* was prepared with another tokenizer"):
    load(teacher="bert", task="causal_lm")
  missing = tmp_path / "gone"
  with pytest.raises(ValueError, match=r"^data.source: no such file"):
    run_setup.build_run(_config(setup, f"data.source={missing}"))
  # a truncated shard
  broken = tmp_path / "broken"
  shutil.copytree(causal, broken)
  shard = broken / "train" / "shard-00001.npy"
  shard.write_bytes(shard.read_bytes()[:-10])
  before = sorted(p.name for p in broken.rglob("*"))
  with pytest.raises(UserError, match=r"^data.source: shard .*shard-00001.npy' is truncated"):
    run_setup.build_run(_config(setup, f"data.source={broken}"))
  assert sorted(p.name for p in broken.rglob("*")) == before  # nothing written
  with pytest.raises(ValueError) as err:
    load("data.max_length=32")
  assert "\n" not in str(err.value)


def test_prepare_refuses_another_set_and_non_empty_dirs(setup, causal, tmp_path):
  before = _shards(causal)
  with pytest.raises(UserError, match=r"^OUT_DIR: .* holds data prepared with another max_length"):
    prepare_data.prepare(_config(setup, "data.max_length=32"), str(causal))
  assert _shards(causal) == before
  other = tmp_path / "other"
  other.mkdir()
  (other / "x.txt").write_text("x")
  with pytest.raises(UserError, match=r"^OUT_DIR: .* is not empty and holds no prepared data"):
    prepare_data.prepare(_config(setup), str(other))
  with pytest.raises(UserError, match=r"^data.source: .* is prepared data already"):
    prepare_data.prepare(_config(setup, f"data.source={causal}"), str(tmp_path / "again"))
  assert not (tmp_path / "again").exists()


_WORKER = r'''
import itertools, json, sys
import numpy as np
from distill_jax.commands import prepare_data
from distill_jax.config import root as config_lib
from distill_jax.data import pipeline as data, prepared

out, port, pid, result = sys.argv[1:5]
cfg = config_lib.load_config(None, sys.argv[5:] + [
    f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2", f"distributed.process_id={pid}"])
wrote, read = [], []
write = prepared.write_shard
prepared.write_shard = lambda path, *a, **k: (wrote.append(f"{path.parent.name}/{path.name}"), write(path, *a, **k))[1]
assemble = prepared.PreparedSplit.assemble
def logged(self, indices, length):
  read.append([int(i) for i in indices])
  return assemble(self, indices, length)
prepared.PreparedSplit.assemble = logged
prepare_data.prepare(cfg, out)
_, splits = prepared.open_prepared(out)
batches = list(itertools.islice(data.train_batches(splits["train"], global_batch_size=8, seed=3, num_threads=0), 3))
np.savez(result, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
with open(result + ".json", "w") as f:
  json.dump({"wrote": wrote, "read": read}, f)
'''


@pytest.mark.multihost
def test_two_processes_write_their_shards_and_read_disjoint_rows(setup, causal, tmp_path):
  from multihost_util import free_port, run_workers

  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  out, port = tmp_path / "two", free_port()
  run_workers(str(script), [[out, port, p, tmp_path / f"result{p}", *_overrides(setup)] for p in range(2)],
              local_devices=1, timeout=300)
  logs = [json.loads((tmp_path / f"result{p}.json").read_text()) for p in range(2)]
  shards = sorted(_shards(causal))
  for p, log in enumerate(logs):  # each process wrote exactly its share: shards s % 2 == p of each split
    assert sorted(log["wrote"]) == [s for s in shards if int(s[-9:-4]) % 2 == p]
  assert _shards(out) == _shards(causal)  # together: the single-process set, byte for byte
  _, splits = prepared.open_prepared(str(causal))
  ex = splits["train"]
  glob = _batches(ex, 3)
  plan = data._Batches(ex, 8, 3, True, 0, 8)
  hosts = [np.load(tmp_path / f"result{p}.npz") for p in range(2)]
  for step in range(3):
    rows = [set(log["read"][step]) for log in logs]
    assert not rows[0] & rows[1] and rows[0] | rows[1] == set(plan.plan(0)[step].tolist())  # disjoint, covering
    for k in glob[step]:
      np.testing.assert_array_equal(np.concatenate([h[f"{step}/{k}"] for h in hosts]), glob[step][k])


def _losses(run_dir):
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_train_from_prepared_equals_in_memory_and_resumes_bit_identical(setup, causal, tmp_path):
  from distill_jax.training import loop

  run = lambda name, *extra: loop.train(_config(  # noqa: E731
      setup, "student.init=from_teacher", "objective.terms=[{loss: forward_kl, temperature: 2.0}]",
      "optimizer.schedule=constant", "optimizer.warmup_steps=0", "train.log_every=1", "train.eval_batches=1",
      "checkpoint.every=2", "checkpoint.async_save=false", f"train.run_dir={tmp_path / name}", *extra))
  run("memory", "train.steps=4")
  run("prepared", "train.steps=4", f"data.source={causal}")
  run("resumed", "train.steps=2", f"data.source={causal}")
  resumed = run("resumed", "train.steps=4", f"data.source={causal}")
  assert resumed.resumed_from == 2
  want = _losses(tmp_path / "memory")
  assert [s for s, *_ in want] == [1, 2, 3, 4]
  assert _losses(tmp_path / "prepared") == want
  assert _losses(tmp_path / "resumed") == want


def test_mixture_order_is_seeded_weighted_and_stops_at_the_first_exhausted_part():
  from distill_jax.data import sources

  order = sources.mixture_order([3000, 500, 10_000], [3.0, 1.0, 6.0], seed=7)
  np.testing.assert_array_equal(order, sources.mixture_order([3000, 500, 10_000], [3.0, 1.0, 6.0], seed=7))
  assert not np.array_equal(order[:50], sources.mixture_order([3000, 500, 10_000], [3.0, 1.0, 6.0], seed=8)[:50])
  part = np.searchsorted([3000, 3500], order, side="right")
  counts = np.bincount(part, minlength=3)
  assert 450 <= counts[1] <= 500 and abs(counts[0] / counts[2] - 0.5) < 0.08  # shares hold to the end
  for i, start in enumerate([0, 3000, 3500]):  # each part's documents in order, none twice
    np.testing.assert_array_equal(order[part == i], start + np.arange(counts[i]))
  streamed = list(sources.mix_streams([iter(range(0, 3000)), iter(range(3000, 3500)), iter(range(3500, 13_500))],
                                      [3.0, 1.0, 6.0], seed=7))
  np.testing.assert_array_equal(streamed, order)


def test_mixture_prepares_the_same_rows_streamed_or_in_memory(setup, tmp_path):
  mix = (f"data.mixture=[{{source: pydoc, weight: 2}}, {{source: {setup['text']}, validation_split: train}}]",
         "data.max_examples=80", "data.max_length=32")
  mem, stream = tmp_path / "mem", tmp_path / "stream"
  prepare_data.prepare(_config(setup, *mix), str(mem))
  prepare_data.prepare(_config(setup, *mix, "data.streaming=true"), str(stream))
  assert _shards(mem) == _shards(stream)
  m = json.loads((mem / "manifest.json").read_text())
  assert [x["weight"] for x in m["data"]["mixture"]] == [2.0, 1.0]
  cfg = _config(setup, *mix)
  train, _ = run_setup.load_data(cfg, _tokenizer(cfg), "causal_lm")
  assert m["splits"]["train"]["data_fingerprint"] == teacher_cache.data_fingerprint(train)
  other = _config(setup, *mix, "train.seed=1")
  assert teacher_cache.data_fingerprint(run_setup.load_data(other, _tokenizer(other), "causal_lm")[0]) != \
      m["splits"]["train"]["data_fingerprint"]


def test_cli_prepare_data(setup, causal, tmp_path, capsys):
  from distill_jax import cli

  config = tmp_path / "run.yaml"
  config.write_text(f"teachers:\n  teacher:\n    path: {setup['teacher']}\n    task: causal_lm\n"
                    "objective:\n  terms:\n    - {loss: forward_kl}\n")
  out = tmp_path / "cli"
  assert cli.main(["prepare-data", str(config), str(out), *_overrides(setup)[2:]]) == 0
  assert f"train with data.source={out}" in capsys.readouterr().out
  assert _shards(out) == _shards(causal)
  assert cli.main(["prepare-data", str(config), str(out), *_overrides(setup)[2:], "data.max_length=32"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("distill-jax: error: OUT_DIR: ") and "another max_length" in err and "\n" not in err


def test_cache_teacher_reads_the_prepared_rows(setup, causal, tmp_path):
  from distill_jax.commands import cache_teacher

  out = tmp_path / "cache"
  cfg = _config(setup, f"data.source={causal}", f"teacher.cache={out}",
                "objective.terms=[{loss: sparse_forward_kl}]", "cache.top_k=8", "cache.shard_rows=64",
                "cache.batch_size=16")
  _, manifest = cache_teacher.write_cache(cfg, progress_bar=False)
  mine = json.loads((causal / "manifest.json").read_text())
  for split in prepared.SPLITS:  # the cache's rows are the prepared ones, by fingerprint and count
    assert manifest["splits"][split]["data_fingerprint"] == mine["splits"][split]["data_fingerprint"]
    assert manifest["splits"][split]["rows"] == mine["splits"][split]["rows"]
  cache = teacher_cache.open_cache("teacher", str(out))
  _, splits = prepared.open_prepared(str(causal))
  cache.check(_tokenizer(_config(setup)), splits)  # training from both lines up
