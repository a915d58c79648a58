"""The bert-base step's matmul shapes in JAX (XLA:CPU) and PyTorch (MKL), alternating in one process.

    python benchmarks/cpu_gemm.py [--tokens 1024] [--hidden 768] [--ffn 3072] [--vocab 30522]
        [--repeats 7] [--out gemm.json]

Each case is one jitted JAX matmul and the same expression in PyTorch, float32, called
alternately (JAX then PyTorch, ``--repeats`` times after one warm-up each); the median is
reported as GFLOP/s.  The cases are the step's GEMMs at batch 8 × seq 128 = 1024 tokens:
``mlp_in`` / ``mlp_out`` (the layers' largest, forward and dX), ``mlp_dw`` (a weight
gradient: the token axis contracted, a transposed left operand), ``logits`` (``h @ Eᵀ``
against the tied ``[V, D]`` embedding), ``head_dx`` (``dz @ E``) and ``head_dw``
(``dzᵀ @ h``), plus a square 2048² matmul for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COLUMNS = ("case", "m", "k", "n", "jax_GFLOPs", "torch_GFLOPs", "jax_over_torch")


def cases(tokens: int, hidden: int, ffn: int, vocab: int) -> dict:
  """``name -> (fn(a, b), a shape, b shape, flops)``; fn is written once for both frameworks."""
  return {
      "square_2048": (lambda a, b: a @ b, (2048, 2048), (2048, 2048), 2 * 2048**3),
      "mlp_in": (lambda a, b: a @ b, (tokens, hidden), (hidden, ffn), 2 * tokens * hidden * ffn),
      "mlp_out": (lambda a, b: a @ b, (tokens, ffn), (ffn, hidden), 2 * tokens * hidden * ffn),
      "mlp_dw": (lambda a, b: a.T @ b, (tokens, hidden), (tokens, ffn), 2 * tokens * hidden * ffn),
      "logits": (lambda a, b: a @ b.T, (tokens, hidden), (vocab, hidden), 2 * tokens * hidden * vocab),
      "head_dx": (lambda a, b: a @ b, (tokens, vocab), (vocab, hidden), 2 * tokens * hidden * vocab),
      "head_dw": (lambda a, b: a.T @ b, (tokens, vocab), (tokens, hidden), 2 * tokens * hidden * vocab),
  }


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--hidden", type=int, default=768)
  parser.add_argument("--ffn", type=int, default=3072)
  parser.add_argument("--vocab", type=int, default=30522)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default=None, help="write JSON results here")
  args = parser.parse_args(argv)
  for name in ("tokens", "hidden", "ffn", "vocab", "repeats"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name}: must be a positive integer, got {getattr(args, name)}")

  import jax
  import numpy as np
  import torch

  rng = np.random.default_rng(0)
  rows = []
  for name, (fn, a_shape, b_shape, flops) in cases(args.tokens, args.hidden, args.ffn, args.vocab).items():
    a_np, b_np = (rng.standard_normal(s, dtype=np.float32) for s in (a_shape, b_shape))
    a_j, b_j = jax.device_put(a_np), jax.device_put(b_np)
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    jitted = jax.jit(fn)
    calls = {"jax": lambda: jitted(a_j, b_j).block_until_ready(), "torch": lambda: fn(a_t, b_t)}
    times = {k: [] for k in calls}
    for k, call in calls.items():
      call()
    for _ in range(args.repeats):
      for k, call in calls.items():
        times[k] += common.time_calls(call, 1)
    gflops = {k: flops / common.median(v) / 1e9 for k, v in times.items()}
    rows.append({"case": name, "m": a_shape[1] if name.endswith("_dw") else a_shape[0],
                 "k": a_shape[0] if name.endswith("_dw") else a_shape[1],
                 "n": b_shape[0] if name == "logits" else b_shape[1],
                 "jax_GFLOPs": gflops["jax"], "torch_GFLOPs": gflops["torch"],
                 "jax_over_torch": gflops["jax"] / gflops["torch"]})
  print(common.markdown_table(rows, COLUMNS))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"env": common.env_info(), "command": common.command_line(), "results": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
