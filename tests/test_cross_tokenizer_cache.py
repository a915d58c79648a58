"""Cross-tokenizer distillation from a teacher cache: the sparse ULD / hybrid ULD against NumPy
references and their dense forms, `cache-teacher` on the teacher's own tokens, training from it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

from distill_jax import losses, models
from test_losses_cross_tokenizer import S_IDS, T_IDS, VT, _pair, _softmax

# --------------------------------------------------------------------------- the losses


def _top_k(zt, k):
  """The teacher's top-k (ids sorted ascending), log-probs and log tail, in float64 NumPy."""
  logp = np.log(_softmax(zt))
  ids = np.sort(np.argsort(-logp, axis=-1, kind="stable")[..., :k], axis=-1)
  kept = np.take_along_axis(logp, ids, -1)
  rest = np.ones(logp.shape, bool)
  np.put_along_axis(rest, ids, False, -1)
  log_tail = np.where(rest.any(-1), scipy.special.logsumexp(np.where(rest, logp, -np.inf), axis=-1), -np.inf)
  return ids.astype(np.int32), kept.astype(np.float32), log_tail.astype(np.float32)


def _buckets(logprobs, log_tails, temperature):
  """The teacher's tempered bucket probabilities (kept entries, then the tails)."""
  with np.errstate(divide="ignore"):
    return _softmax(np.concatenate([logprobs, *[t[..., None] for t in log_tails]], -1), temperature)


def _l1_with_tail(s, t_known, tail):
  """Σ_{j<n}|s↓_j − t↓_j| + |Σ_{j≥n} s↓_j − tail| for one position (n = len(t_known))."""
  s = np.sort(s)[::-1]
  s = np.concatenate([s, np.zeros(max(0, len(t_known) - len(s)))])
  t = np.sort(t_known)[::-1]
  return np.abs(s[:len(t)] - t).sum() + abs(s[len(t):].sum() - tail)


def _ref_sparse_uld(zs, ids, logprobs, log_tail, temperature=1.0):
  ps, out = _softmax(zs, temperature), np.zeros(zs.shape[:-1])
  b = _buckets(logprobs, [log_tail], temperature)
  k = ids.shape[-1]
  for idx in np.ndindex(*zs.shape[:-1]):
    out[idx] = _l1_with_tail(ps[idx], b[idx][:k], b[idx][k])
  return temperature**2 * out


def _ref_sparse_hybrid(zs, ids, logprobs, log_tail, s_ids, t_ids, vt, temperature=1.0):
  to_student = dict(zip(t_ids.tolist(), s_ids.tolist()))
  ps, out, k = _softmax(zs, temperature), np.zeros(zs.shape[:-1]), ids.shape[-1]
  for idx in np.ndindex(*zs.shape[:-1]):
    kept = ids[idx].tolist()
    shared = [t in to_student for t in kept]
    unkept_shared = len(t_ids) - sum(shared)
    tau = np.exp(log_tail[idx])
    tau_m = tau * unkept_shared / max(vt - k, 1)
    with np.errstate(divide="ignore"):
      b = _buckets(logprobs[idx], [np.log(tau_m), np.log(tau - tau_m)], temperature)
    kl = sum(b[j] * (np.log(b[j]) - np.log(ps[idx][to_student[t]])) for j, t in enumerate(kept) if shared[j] and b[j])
    rest_shared = [s for s in s_ids.tolist() if s not in {to_student[t] for t in kept if t in to_student}]
    if b[k] > 0:
      kl += b[k] * (np.log(b[k]) - np.log(ps[idx][rest_shared].sum()))
    rest_s = np.delete(ps[idx], s_ids)
    out[idx] = kl + _l1_with_tail(rest_s, b[:k][~np.asarray(shared)], b[k + 1])
  return temperature**2 * out


# Jitted once per shape, the temperature traced (one compilation for every temperature).
_sparse_uld = jax.jit(lambda zs, ids, lp, lt, t: losses.sparse_uld(zs, ids, lp, lt, temperature=t))
_sparse_hybrid = jax.jit(lambda zs, ids, lp, lt, t, s_ids, t_ids, vt: losses.sparse_hybrid_uld(
    zs, ids, lp, lt, student_shared_ids=s_ids, teacher_shared_ids=t_ids, teacher_vocab=vt, temperature=t),
    static_argnums=7)


@pytest.mark.parametrize("k", [1, 3, VT])
def test_sparse_uld_and_sparse_hybrid_uld_against_numpy(k):
  zs, zt = _pair(seed=k)
  ids, logprobs, log_tail = _top_k(zt, k)
  for temperature in (1.0, 2.0):
    np.testing.assert_allclose(_sparse_uld(zs, ids, logprobs, log_tail, temperature),
                               _ref_sparse_uld(zs, ids, logprobs, log_tail, temperature), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_sparse_hybrid(zs, ids, logprobs, log_tail, temperature, S_IDS, T_IDS, VT),
                               _ref_sparse_hybrid(zs, ids, logprobs, log_tail, S_IDS, T_IDS, VT, temperature),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vs,vt", [(11, 7), (7, 11)])
def test_with_the_whole_teacher_vocabulary_both_equal_their_dense_forms(vs, vt):
  zs, zt = _pair(seed=3, vs=vs, vt=vt)
  ids, logprobs, log_tail = _top_k(zt, vt)  # k = Vt: log_tail = -inf
  assert np.all(np.isneginf(log_tail))
  keep = (S_IDS < vs) & (T_IDS < vt)
  s_ids, t_ids = S_IDS[keep], T_IDS[keep]
  dense = jax.jit(lambda zs, zt, t: (losses.uld(zs, zt, temperature=t),
                                     losses.hybrid_uld(zs, zt, student_shared_ids=s_ids, teacher_shared_ids=t_ids,
                                                       temperature=t)))
  for temperature in (1.0, 0.5, 2.0):
    want_uld, want_hybrid = dense(zs, zt, temperature)
    np.testing.assert_allclose(_sparse_uld(zs, ids, logprobs, log_tail, temperature), want_uld, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_sparse_hybrid(zs, ids, logprobs, log_tail, temperature, s_ids, t_ids, vt), want_hybrid,
                               rtol=1e-5, atol=1e-6)


def test_sparse_uld_is_a_lower_bound_of_uld_against_the_whole_teacher():
  zs, zt = _pair(seed=4, shape=(64,))
  dense = np.asarray(jax.jit(losses.uld)(zs, zt))
  previous = np.zeros_like(dense)
  for k in (1, 2, 4, VT):  # tighter with every kept entry, exact at k = Vt
    got = np.asarray(_sparse_uld(zs, *_top_k(zt, k), 1.0))
    assert np.all(got <= dense + 1e-6) and np.all(got >= previous - 1e-6)
    previous = got
  np.testing.assert_allclose(previous, dense, rtol=1e-5, atol=1e-6)


def test_sparse_hybrid_uld_with_one_tokenizer_is_sparse_forward_kl_at_temperature_1():
  # (At T != 1 the sparse KLs temper the student's buckets, the cross-tokenizer forms its whole distribution.)
  zs, zt = _pair(seed=5, vs=VT, vt=VT)
  ids, logprobs, log_tail = _top_k(zt, 3)
  every = np.arange(VT, dtype=np.int32)
  got = _sparse_hybrid(zs, ids, logprobs, log_tail, 1.0, every, every, VT)
  np.testing.assert_allclose(got, jax.jit(losses.sparse_forward_kl)(zs, ids, logprobs, log_tail), rtol=1e-5, atol=1e-6)


def test_where_masks_values_and_gradients_and_the_gradients_are_right():
  zs, zt = _pair(seed=6)
  ids, logprobs, log_tail = _top_k(zt, 3)
  where = np.array([[True, False, True], [False, True, True]])
  bad = np.where(where[..., None], zs, np.nan)  # masked positions may hold anything
  hybrid = lambda z, **kw: losses.sparse_hybrid_uld(z, ids, logprobs, log_tail, student_shared_ids=S_IDS,  # noqa: E731
                                                    teacher_shared_ids=T_IDS, teacher_vocab=VT, **kw)
  uld = lambda z, **kw: losses.sparse_uld(z, ids, logprobs, log_tail, **kw)  # noqa: E731
  for fn in (uld, hybrid):
    masked = jax.jit(lambda z: (fn(z, where=where), jax.grad(lambda z: jnp.sum(fn(z, where=where)))(z)))
    got, grad = masked(jnp.asarray(bad))
    np.testing.assert_allclose(got, np.where(where, _sparse_uld(zs, ids, logprobs, log_tail, 1.0) if fn is uld else
                                             _sparse_hybrid(zs, ids, logprobs, log_tail, 1.0, S_IDS, T_IDS, VT), 0.0),
                               rtol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~where] == 0)
    check_grads(jax.jit(lambda z: fn(z, temperature=2.0)), (zs,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_the_chunked_forms_equal_the_logits_forms_in_value_and_gradients():
  rng = np.random.RandomState(7)
  b, t, d, vs, pad = 2, 5, 6, 11, 3  # a head padded by 3 columns that must not count
  h = rng.randn(b, t, d).astype(np.float32)
  w, bias = rng.randn(d, vs + pad).astype(np.float32), rng.randn(vs + pad).astype(np.float32)
  _, zt = _pair(seed=8, shape=(b, t))
  ids, logprobs, log_tail = _top_k(zt, 3)
  where = rng.rand(b, t) > 0.3
  kw = dict(student_shared_ids=S_IDS, teacher_shared_ids=T_IDS, teacher_vocab=VT, temperature=2.0)
  pairs = [(losses.sparse_uld, losses.chunked_sparse_uld, {"temperature": 2.0}),
           (losses.sparse_hybrid_uld, losses.chunked_sparse_hybrid_uld, kw)]
  for dense, chunked, hyper in pairs:
    def logits_path(h, w, bias, dense=dense, hyper=hyper):
      z = (jnp.einsum("btd,dv->btv", h, w) + bias)[..., :vs]
      return jnp.sum(dense(z, ids, logprobs, log_tail, where=where, **hyper))

    def chunked_path(h, w, bias, chunked=chunked, hyper=hyper):
      return jnp.sum(chunked(h, w, ids, logprobs, log_tail, where=where, chunk_size=2, student_bias=bias, vocab=vs,
                             **hyper))

    want, want_grads = jax.jit(jax.value_and_grad(logits_path, argnums=(0, 1, 2)))(h, w, bias)
    got, got_grads = jax.jit(jax.value_and_grad(chunked_path, argnums=(0, 1, 2)))(h, w, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- cache-teacher and training

import json  # noqa: E402
import os  # noqa: E402

from distill_jax.commands import cache_teacher  # noqa: E402
from distill_jax.data import alignment, teacher_cache  # noqa: E402
from distill_jax.data import pipeline as data  # noqa: E402
from distill_jax.errors import UserError  # noqa: E402
from distill_jax.training import loop as trainer  # noqa: E402
from distill_jax.training import run_report, run_setup  # noqa: E402
from test_cross_tokenizer_train import _config, setup  # noqa: E402,F401  (the tokenizer pair: fixture)
from test_teacher_cache import _shards  # noqa: E402

TOP_K = 16
CACHE = ["cache.top_k=16", "cache.shard_rows=4", "cache.batch_size=8", "cache.value_bits=8"]


def _cached_config(setup, cache_dir, run, *extra):
  return _config(setup, run, f"teachers.teacher.cache={cache_dir}", *CACHE, *extra)


@pytest.fixture(scope="module")
def xcache(setup):
  """The teacher's top-16 on its own tokens of the aligned rows, 8-bit values."""
  out = setup["root"] / "xcache"
  cache_teacher.write_cache(_cached_config(setup, out, "write"))
  return out


def test_the_cache_holds_the_teachers_top_k_per_teacher_token(setup, xcache):
  manifest = json.loads((xcache / "manifest.json").read_text())
  cfg = _config(setup, "rows")
  cross = run_setup.cross_tokenizer(cfg)
  train_ex, eval_ex = run_setup.load_aligned_data(cfg, cross)
  assert manifest["tokenizer_fingerprint"] == teacher_cache.tokenizer_fingerprint(cross.teacher_tokenizer)
  assert manifest[teacher_cache.STUDENT_TOKENIZER] == teacher_cache.tokenizer_fingerprint(cross.student_tokenizer)
  assert manifest["tokenizer_fingerprint"] != manifest[teacher_cache.STUDENT_TOKENIZER]
  fmt = teacher_cache.open_cache("teacher", str(xcache)).format
  assert fmt.vocab_size == len(cross.teacher_tokenizer) and fmt.top_k == TOP_K
  for split, ex in (("train", train_ex), ("validation", eval_ex)):
    mask = ex.row_arrays["teacher_attention_mask"]
    info = manifest["splits"][split]
    assert info["row_length"] == mask.shape[1] != ex.max_length  # teacher positions, not the student's
    assert info["tokens"] == mask.sum() and info["data_fingerprint"] == teacher_cache.data_fingerprint(ex)
    rows = np.concatenate([np.load(p) for name, p in _shards(xcache).items() if name.startswith(split)])
    assert rows.shape == (len(ex.lengths), mask.shape[1], fmt.bytes_per_token)
  # A rerun keeps the complete cache.
  before = {k: p.stat().st_mtime_ns for k, p in _shards(xcache).items()}
  cache_teacher.write_cache(_cached_config(setup, xcache, "write"))
  assert {k: p.stat().st_mtime_ns for k, p in _shards(xcache).items()} == before


def _live_sparse_sums(run, teacher, batches):
  """Per term ``(sum, count)`` of sparse_uld / sparse_hybrid_uld against the live teacher's exact top-k."""
  student, tokenizer = run.student, run.cross_tokenizer.teacher_tokenizer

  @jax.jit
  def sums_of(batch):
    t_logits = teacher.apply(teacher.params, alignment.teacher_batch(batch), outputs=("logits",)).logits
    top = losses.teacher_top_k(t_logits[..., :len(tokenizer)], TOP_K)
    ids, logprobs, log_tail = (losses.span_gather(a, batch["teacher_index"]) for a in top)
    s_logits = student.apply(run.initial_student_params, batch, outputs=("logits",)).logits[..., :student.vocab_size]
    where = (batch["student_span_end"] == 1) & (batch["attention_mask"] == 1)
    out = {}
    for b in run.objective.bound:
      kw = dict(temperature=b.term.temperature, where=where)
      if b.term.loss == "hybrid_uld":
        values = losses.sparse_hybrid_uld(s_logits, ids, logprobs, log_tail, student_shared_ids=np.asarray(b.shared[0]),
                                          teacher_shared_ids=np.asarray(b.shared[1]), teacher_vocab=len(tokenizer),
                                          **kw)
      else:
        values = losses.sparse_uld(s_logits, ids, logprobs, log_tail, **kw)
      out[b.term.name] = (jnp.sum(values), jnp.sum(where))
    return out

  totals = {}
  for batch in batches:
    for name, (s, c) in jax.device_get(sums_of(batch)).items():
      totals[name] = tuple(a + float(b) for a, b in zip(totals.get(name, (0.0, 0.0)), (s, c)))
  return totals


def test_the_validation_objective_from_the_cache_is_the_sparse_loss_against_the_live_teacher(setup, xcache,
                                                                                              monkeypatch):
  monkeypatch.setattr(run_setup, "load_teacher", lambda *a, **k: pytest.fail("a cached teacher was loaded"))
  run = run_setup.build_run(_cached_config(setup, xcache, "from_cache", "teachers.teacher.path=null"))
  assert not run.teachers and set(run.caches) == {"teacher"} and run.cross_tokenizer.teacher == "teacher"
  assert run.objective.chunk_size is not None  # the student's logits in chunks, against dense references below
  got = run_report.eval_loss(run, run.state, 0)
  monkeypatch.undo()
  teacher = models.load_model(setup["teacher"], "causal_lm")
  batches = data.eval_batches(run.eval_examples, global_batch_size=8, process_index=0, process_count=1)
  want = _live_sparse_sums(run, teacher, batches)
  for name, (s, c) in want.items():
    assert c > 0 and s > 0
    assert got[f"eval/{name}"] == pytest.approx(s / c, rel=2e-3), name  # 8-bit values


def test_train_from_the_cache_with_uld_and_hybrid_uld(setup, xcache, monkeypatch):
  monkeypatch.setattr(run_setup, "load_teacher", lambda *a, **k: pytest.fail("a cached teacher was loaded"))
  cfg = _cached_config(setup, xcache, "train_cache", "teachers.teacher.path=null", "train.steps=2",
                       "train.eval_every=0", "checkpoint.every=0", "data.prefetch=0", "data.num_workers=0",
                       "optimizer.warmup_steps=0", "objective.chunk_size=null")  # (the logits path)
  assert [t.loss for t in cfg.objective.terms] == ["uld", "hybrid_uld"]
  result = trainer.train(cfg)
  assert result.step == 2
  rows = [r for r in result.history if "loss" in r or "train/loss" in r]
  assert rows
  for row in rows:
    for key in ("loss", "uld", "hybrid_uld"):
      value = row.get(key, row.get(f"train/{key}"))
      assert value is not None and np.isfinite(value) and value > 0, (key, row)
  assert "perplexity" in {m["name"] for m in result.report["metrics"]}


def _one_line_error(match, fn):
  with pytest.raises((UserError, ValueError), match=match) as e:
    fn()
  assert "\n" not in str(e.value)


def test_a_mismatched_cache_is_one_line_before_any_model_loads_and_nothing_written(setup, xcache, monkeypatch):
  monkeypatch.setattr(run_setup, "_load_models", lambda *a, **k: pytest.fail("a model was loaded"))
  monkeypatch.setattr(run_setup, "load_teacher", lambda *a, **k: pytest.fail("a model was loaded"))
  for extra, match in [
      ([f"student.path={setup['student_bpe']}"],  # the teacher's tokenizer: other rows, another student tokenizer
       r"^teachers\.teacher\.cache: the cache was written with another student tokenizer \(fingerprint "),
      (["data.max_length=12"], r"^teachers\.teacher\.cache: the cache was written for other train data")]:
    cfg = _cached_config(setup, xcache, "mismatch", "teachers.teacher.path=null", *extra)
    _one_line_error(match, lambda: trainer.train(cfg))
    assert not os.path.exists(cfg.train.run_dir)
    # cache-teacher refuses to mix them into the same directory, before loading the teacher
    _one_line_error(r"^cache\.dir: .* holds a cache of another (student tokenizer|data)",
                    lambda: cache_teacher.write_cache(_cached_config(setup, xcache, "mismatch", *extra)))
  # A cache of the teacher on the student's tokens (same-tokenizer layout) cannot serve the aligned rows.
  same = setup["root"] / "same_layout"
  same.mkdir(exist_ok=True)
  manifest = json.loads((xcache / "manifest.json").read_text())
  del manifest[teacher_cache.STUDENT_TOKENIZER]
  (same / "manifest.json").write_text(json.dumps(manifest))
  os.symlink(xcache / "tokenizer", same / "tokenizer")
  cfg = _cached_config(setup, same, "mismatch", "teachers.teacher.path=null")
  _one_line_error(r"^teachers\.teacher\.cache: the cache holds the teacher's top-k on the student's tokens; this run "
                  r"needs them on its own tokens", lambda: trainer.train(cfg))
  assert not os.path.exists(cfg.train.run_dir)
  # ... nor the other way round: a same-tokenizer term on the student's rows.
  cfg = _cached_config(setup, xcache, "mismatch", "teachers.teacher.path=null",
                       "objective.terms=[{loss: sparse_forward_kl}]")
  _one_line_error(r"^teachers\.teacher\.cache: the cache holds the teacher's top-k on its own tokens of "
                  r"cross-tokenizer rows; this run needs them on the student's tokens", lambda: trainer.train(cfg))
  _one_line_error(r"^objective\.terms\[0\]\.top_k: uld against teacher 'teacher''s cache compares the cache\.top_k",
                  lambda: trainer.train(_cached_config(setup, xcache, "mismatch", "teachers.teacher.path=null",
                                                       "objective.terms[0].top_k=4")))


@pytest.mark.slow  # two CLI runs of cache-teacher (one killed) and one of train: a few minutes on 2 cores
def test_the_recipe_caches_across_tokenizers_resumes_after_a_kill_and_trains_from_the_cache_by_cli(setup):
  import subprocess
  import sys

  from test_cross_tokenizer_train import RECIPE

  out, run_dir = setup["root"] / "cli_cache", setup["root"] / "cli_train"
  common = [f"teacher.path={setup['teacher']}", f"student.path={setup['student']}", f"data.source={setup['text']}",
            "data.name=null", "data.max_length=16", "data.global_batch_size=8", "data.validation_split=null",
            "data.buckets=false", "data.prefetch=0", "data.num_workers=0", "logging.progress_bar=false",
            "logging.tensorboard=false", "eval.before_and_after=false", "export.enabled=false", *CACHE,
            f"teacher.cache={out}"]
  cli = [sys.executable, "-m", "distill_jax.cli"]
  env = dict(os.environ, DISTILL_JAX_FAULTS=json.dumps({"cache_exit_after_shards": 2}))
  killed = subprocess.run(cli + ["cache-teacher", RECIPE, *common], env=env, capture_output=True, text=True,
                          timeout=900)
  assert killed.returncode == 137, killed.stderr[-2000:]
  first = {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in _shards(out).items()}
  assert len(first) == 2 and not (out / "manifest.json").exists()
  resumed = subprocess.run(cli + ["cache-teacher", RECIPE, *common], capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in _shards(out).items() if k in first} == first
  manifest = json.loads((out / "manifest.json").read_text())
  assert teacher_cache.STUDENT_TOKENIZER in manifest and manifest["shards"] == len(_shards(out)) > 2
  trained = subprocess.run(cli + ["train", RECIPE, *common, "teacher.path=null", "train.steps=3",
                                  "optimizer.warmup_steps=0", "train.eval_every=0", "train.eval_batches=1",
                                  "checkpoint.every=0", f"train.run_dir={run_dir}"],
                           capture_output=True, text=True, timeout=900)
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert "teacher = the cache" in trained.stdout + trained.stderr
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "train/loss" in r]
  assert train and all(np.isfinite(r[f"train/{k}"]) and r[f"train/{k}"] > 0 for r in train for k in ("uld", "hybrid_uld"))


@pytest.mark.multihost
def test_two_processes_cache_their_own_shards_across_tokenizers(setup, xcache):
  from multihost_util import free_port, run_workers

  out = setup["root"] / "xcache_two_hosts"
  cli = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_jax", "cli.py")
  overrides = [f"teacher.path={setup['teacher']}", "teacher.task=causal_lm", f"teacher.cache={out}",
               "student.init=path", f"student.path={setup['student']}",
               "objective.terms=[{loss: uld, temperature: 2.0, weight: 0.5}, {loss: hybrid_uld}]",
               f"data.source={setup['text']}", "data.max_length=16", "data.global_batch_size=8",
               "data.validation_split=null", "data.buckets=false", "logging.progress_bar=false", *CACHE]
  coordinator = f"127.0.0.1:{free_port()}"
  logs = run_workers(cli, [("cache-teacher", *overrides, f"distributed.coordinator={coordinator}",
                            "distributed.num_processes=2", f"distributed.process_id={i}") for i in range(2)],
                     local_devices=2, timeout=600)
  assert "teacher cache:" in logs[0]
  got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, xcache))
  # The same rows, fingerprints (both tokenizers, the data) and sizes.
  assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
  reference, fmt = _shards(xcache), teacher_cache.open_cache("teacher", str(xcache)).format
  assert sorted(_shards(out)) == sorted(reference)
  for name, path in _shards(out).items():  # the same entries, up to float rounding on other device counts
    (ids_a, lp_a, _), (ids_b, lp_b, _) = (jax.device_get(teacher_cache.cache_codec.decode(fmt, np.load(p)))
                                          for p in (path, reference[name]))
    same = (ids_a == ids_b).all(-1)
    assert same.mean() > 0.99, name
    np.testing.assert_allclose(lp_a[same], lp_b[same], atol=0.05, err_msg=name)
