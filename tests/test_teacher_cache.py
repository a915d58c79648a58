"""The offline teacher cache: written once, resumable, checked against the run, and the loss
from it equals the same sparse loss from the live teacher."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

import flax
import numpy as np
import pytest

import tiny
from distill_jax.commands import cache_teacher
from distill_jax.data import cache_codec
from distill_jax.config import root as config_lib
from distill_jax.training import run_report
from distill_jax.training import run_setup
from distill_jax.data import teacher_cache
from distill_jax.training import loop as trainer
from distill_jax.errors import UserError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("teacher_cache")
  teacher = tiny.make_checkpoint(root / "teacher", "llama", "causal_lm", num_hidden_layers=2, rope_theta=5000.0,
                                 initializer_range=0.3)  # peaked: a KL worth measuring
  student = tiny.make_checkpoint(root / "student", "llama", "causal_lm", num_hidden_layers=1, hidden_size=16,
                                 intermediate_size=32, seed=3)
  lines = tiny._corpus_lines()[:120]
  text = root / "text.jsonl"
  text.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 3])}) + "\n" for i in range(0, len(lines), 3)))
  return {"root": root, "teacher": str(teacher), "student": str(student), "text": str(text)}


def _overrides(setup, cache_dir, *extra):
  return [f"teacher.path={setup['teacher']}", "teacher.task=causal_lm", f"teacher.cache={cache_dir}",
          "student.init=path", f"student.path={setup['student']}",
          "objective.terms=[{loss: sparse_forward_kl, temperature: 2.0}]",
          f"data.source={setup['text']}", "data.max_length=16", "data.global_batch_size=8",
          "data.validation_split=null", "data.buckets=false", "cache.top_k=16", "cache.shard_rows=20",
          "cache.batch_size=8", "logging.progress_bar=false", "logging.tensorboard=false",
          "eval.before_and_after=false", "export.enabled=false", "train.steps=2",
          f"train.run_dir={setup['root'] / 'runs' / os.path.basename(str(cache_dir))}", *extra]


def _config(setup, cache_dir, *extra):
  return config_lib.load_config(None, _overrides(setup, cache_dir, *extra))


def _shards(cache_dir):
  return {str(p.relative_to(cache_dir)): p for p in sorted(cache_dir.rglob("shard-[0-9][0-9][0-9][0-9][0-9].npy"))}


@pytest.fixture(scope="module")
def cache8(setup):
  """A complete cache with 8-bit values (the equality test's precision)."""
  out = setup["root"] / "cache8"
  cache_teacher.write_cache(_config(setup, out, "cache.value_bits=8"))
  return out


def test_manifest_says_what_the_cache_holds(setup, cache8):
  manifest = json.loads((cache8 / "manifest.json").read_text())
  fmt = teacher_cache.open_cache("teacher", str(cache8)).format
  assert manifest["top_k"] == 16 and manifest["format"]["value_bits"] == 8
  assert manifest["bytes_per_token"] == fmt.bytes_per_token
  split_tokens = [manifest["splits"][s]["tokens"] for s in teacher_cache.SPLITS]
  assert manifest["tokens"] == sum(split_tokens) and min(split_tokens) > 0
  assert manifest["bytes"] == sum(p.stat().st_size for p in _shards(cache8).values())
  assert manifest["teacher"]["path"] == setup["teacher"] and len(manifest["teacher"]["checksum"]) == 64
  assert len(manifest["tokenizer_fingerprint"]) == 64
  assert not (cache8 / "progress.json").exists() and (cache8 / "tokenizer" / "tokenizer.json").is_file()
  for split in teacher_cache.SPLITS:
    info = manifest["splits"][split]
    rows = np.concatenate([np.load(p) for name, p in _shards(cache8).items() if name.startswith(split)])
    assert rows.shape == (info["rows"], info["row_length"], fmt.bytes_per_token) and rows.dtype == np.uint8


def test_loss_from_the_cache_equals_the_live_sparse_loss(setup, cache8):
  # The same run twice: once against the live teacher (its exact top-16 + tail), once from the
  # cache (teacher never loaded); the whole validation objective agrees to 8-bit precision.
  live = run_setup.build_run(_config(setup, cache8, "teacher.cache=null", "objective.terms[0].top_k=16"))
  cached = run_setup.build_run(_config(setup, cache8, "teacher.path=null"))
  assert not cached.teachers and set(cached.caches) == {"teacher"} and cached.objective.teacher_names == ()
  a = run_report.eval_loss(live, live.state, 0)
  b = run_report.eval_loss(cached, cached.state, 0)
  assert a["eval/loss"] > 0.05
  assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=3e-3)


def test_a_cache_of_other_data_or_tokenizer_is_refused_before_any_model_loads(setup, cache8):
  cfg = _config(setup, cache8, "teacher.path=null", "data.max_length=12")
  with pytest.raises(UserError, match=r"teachers\.teacher\.cache: the cache was written for other train data"):
    trainer.train(cfg)
  assert not os.path.exists(cfg.train.run_dir)  # nothing written
  other = tiny.tokenizer_for("bert")  # another vocabulary
  cache = teacher_cache.open_cache("teacher", str(cache8))
  with pytest.raises(UserError, match="another tokenizer"):
    cache.check(other, {})
  with pytest.raises(UserError, match="holds no complete teacher cache"):
    teacher_cache.open_cache("teacher", str(setup["root"] / "nowhere"))


def test_a_finished_cache_is_kept_and_another_setting_on_it_refused(setup, cache8):
  before = {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in _shards(cache8).items()}
  out, manifest = cache_teacher.write_cache(_config(setup, cache8, "cache.value_bits=8"))
  assert manifest["top_k"] == 16
  with pytest.raises(UserError, match="holds a cache of another format"):
    cache_teacher.write_cache(_config(setup, cache8, "cache.value_bits=8", "cache.top_k=8"))
  assert {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in _shards(cache8).items()} == before
  stray = setup["root"] / "not_a_cache"
  stray.mkdir()
  (stray / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="non-empty directory that is not a teacher cache"):
    cache_teacher.write_cache(_config(setup, stray))
  assert [p.name for p in stray.iterdir()] == ["notes.txt"]


def test_sparse_terms_only_against_a_cache(setup, cache8):
  with pytest.raises(config_lib.ConfigError, match=r"objective\.terms\[0\]\.loss: teacher 'teacher' is read from "
                                                   r"its cache .* allowed: sparse_forward_kl"):
    _config(setup, cache8, "objective.terms=[{loss: forward_kl}]")
  with pytest.raises(UserError, match=r"cache\.top_k: 100000 must be <= the teacher's \d+ tokens"):
    cache_teacher.write_cache(_config(setup, setup["root"] / "too_many", "cache.top_k=100000"))
  assert not (setup["root"] / "too_many").exists()


def test_a_student_derived_from_a_cached_teacher_reads_its_weights_once_and_never_runs_it(setup, cache8,
                                                                                        monkeypatch):
  loaded = []
  real_load = run_setup.models.load_model

  def load_model(*args, **kwargs):
    model = real_load(*args, **kwargs)
    loaded.append((args[0], weakref.ref(model)))
    return model

  monkeypatch.setattr(run_setup.models, "load_model", load_model)
  run = run_setup.build_run(_config(setup, cache8, "teacher.path=null", "student.init=from_teacher",
                                    "student.path=null", "student.num_layers=1", "student.layers=[1]"))
  gc.collect()
  assert [path for path, _ in loaded] == [setup["teacher"]]  # read once, from the path the cache records
  assert loaded[0][1]() is None  # and dropped: no reference to the teacher's model outlives the set-up
  assert not run.teachers and not run.teacher_params and run.objective.teacher_names == ()  # never run
  teacher = real_load(setup["teacher"], "causal_lm")
  t, s = (dict(flax.traverse_util.flatten_dict(m.params, sep="/")) for m in (teacher, run.student))
  assert run.student.num_layers == 1 and sorted(s) == sorted(t)
  for key in t:  # embeddings, norm and head as they are; of the stacked layers, the teacher's second
    want = np.asarray(t[key])[1:2] if key.startswith("layers/") else np.asarray(t[key])
    np.testing.assert_array_equal(np.asarray(s[key]), want, err_msg=key)


@pytest.mark.slow
def test_a_killed_cache_run_resumes_without_repeating_or_skipping(setup, cache8):
  out = setup["root"] / "killed"
  args = [sys.executable, "-m", "distill_jax.cli", "cache-teacher", *_overrides(setup, out, "cache.value_bits=8")]
  env = dict(os.environ, DISTILL_JAX_FAULTS=json.dumps({"cache_exit_after_shards": 2}))
  killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
  assert killed.returncode == 137, killed.stderr[-2000:]
  first = _shards(out)
  assert len(first) == 2 and not (out / "manifest.json").exists() and (out / "progress.json").exists()
  assert not list(out.rglob("*.tmp*"))  # whole shards only
  stamps = {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in first.items()}
  (out / "train" / "shard-00003.tmp-0.npy").write_bytes(b"half a shard")  # as a kill mid-write leaves
  resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in _shards(out).items() if k in first} == stamps
  reference = _shards(cache8)
  assert sorted(_shards(out)) == sorted(reference)  # nothing skipped
  assert not list(out.rglob("*.tmp*"))
  for name, path in _shards(out).items():  # and the same bytes as the uninterrupted run
    np.testing.assert_array_equal(np.load(path), np.load(reference[name]))
  got = json.loads((out / "manifest.json").read_text())
  want = json.loads((cache8 / "manifest.json").read_text())
  assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}


@pytest.mark.multihost
def test_two_processes_cache_their_own_shards_of_the_same_cache(setup, cache8):
  from multihost_util import free_port, run_workers

  out = setup["root"] / "two_hosts"
  cli = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_jax", "cli.py")
  coordinator = f"127.0.0.1:{free_port()}"
  args = [("cache-teacher", *_overrides(setup, out, "cache.value_bits=8"), f"distributed.coordinator={coordinator}",
           "distributed.num_processes=2", f"distributed.process_id={i}") for i in range(2)]
  logs = run_workers(cli, args, local_devices=2, timeout=600)
  assert "teacher cache:" in logs[0]
  reference = _shards(cache8)
  assert sorted(_shards(out)) == sorted(reference)
  # Two devices per process instead of eight: the same teacher math up to float rounding, so
  # the same entries and values to the format's precision (a code may round the other way).
  fmt = teacher_cache.open_cache("teacher", str(cache8)).format
  for name, path in _shards(out).items():
    ids_a, lp_a, tail_a = map(np.asarray, cache_codec.decode(fmt, np.load(path)))
    ids_b, lp_b, tail_b = map(np.asarray, cache_codec.decode(fmt, np.load(reference[name])))
    same = (ids_a == ids_b).all(-1)
    assert same.mean() > 0.99, name
    np.testing.assert_allclose(lp_a[same], lp_b[same], atol=0.05, err_msg=name)
    np.testing.assert_allclose(tail_a, tail_b, rtol=1e-2, atol=1e-3, err_msg=name)
  got = json.loads((out / "manifest.json").read_text())
  want = json.loads((cache8 / "manifest.json").read_text())
  assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
