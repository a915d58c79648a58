"""Naive vs chunked token-level forward KL (value + student gradient) for large vocabularies.

Reports per config: compiled temporary memory (``memory_analysis().temp_size_in_bytes``;
when XLA reports 0 — the CPU backend does once temporaries pass ~1 GB — the peak RSS
increase of a fresh subprocess that compiles and runs the step), median wall time, and
the max abs difference of value and gradients between the two implementations.

  python benchmarks/vocab_kl.py                                   # CPU-feasible default
  python benchmarks/vocab_kl.py --vocab 32768 131072 --tokens 2048 4096 8192 16384 \
      --hidden 2048 --out vocab_kl.json                           # accelerator sweep
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import losses

IMPLS = ("naive", "chunked")


def _step(impl: str, chunk_size: int, temperature: float):
  """jit(value_and_grad) of the mean token KL w.r.t. the student hidden states and head."""
  if impl == "chunked":
    per_token = functools.partial(
        losses.chunked_forward_kl, chunk_size=chunk_size, temperature=temperature)
  else:
    def per_token(hs, ws, ht, wt):
      return losses.forward_kl(
          jnp.dot(hs, ws, preferred_element_type=jnp.float32),
          jnp.dot(ht, wt, preferred_element_type=jnp.float32), temperature=temperature)
  loss = lambda hs, ws, ht, wt: losses.masked_mean(per_token(hs, ws, ht, wt))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _inputs(tokens: int, vocab: int, hidden: int, dtype):
  """Unit-variance hidden states and heads scaled so that logits have std 2."""
  rng = np.random.RandomState(0)
  states = lambda: jnp.asarray(rng.randn(tokens, hidden), dtype)
  head = lambda: jnp.asarray(rng.randn(hidden, vocab) * (2.0 / np.sqrt(hidden)), dtype)
  return states(), head(), states(), head()


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize()


def _measure_rss(impl, tokens, vocab, hidden, chunk_size, dtype_name) -> None:
  """Subprocess entry: prints the peak RSS increase of compiling and running one step."""
  args = _inputs(tokens, vocab, hidden, jnp.dtype(dtype_name))
  jax.block_until_ready(args)
  before = _rss_bytes()
  jax.block_until_ready(_step(impl, chunk_size, 1.0)(*args))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"peak_rss_increase": max(peak - before, 0)}))


def _peak_rss(impl, tokens, vocab, hidden, chunk_size, dtype_name) -> int:
  out = subprocess.run(
      [sys.executable, __file__, "--_rss", impl, str(tokens), str(vocab), str(hidden),
       str(chunk_size), dtype_name], check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])["peak_rss_increase"]


def run_config(tokens, vocab, hidden, chunk_size, dtype_name, repeats, impls):
  args = _inputs(tokens, vocab, hidden, jnp.dtype(dtype_name))
  rows, results = [], {}
  for impl in impls:
    step = _step(impl, chunk_size, 1.0)
    compiled = step.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    source = "memory_analysis"
    if temp == 0 and jax.default_backend() == "cpu":
      temp, source = _peak_rss(impl, tokens, vocab, hidden, chunk_size, dtype_name), "peak RSS"
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    results[impl] = out
    rows.append(dict(impl=impl, tokens=tokens, vocab=vocab, hidden=hidden, chunk_size=chunk_size,
                     dtype=dtype_name, temp_bytes=int(temp), memory_source=source,
                     median_s=statistics.median(times)))
  if len(results) == 2:
    (v_n, g_n), (v_c, g_c) = results["naive"], results["chunked"]
    value_diff = float(jnp.abs(v_n - v_c))
    grad_diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in zip(g_n, g_c))
    for row in rows:
      row.update(loss=float(v_n), max_abs_diff_value=value_diff, max_abs_diff_grad=grad_diff)
  return rows


def markdown(rows) -> str:
  lines = ["| impl | tokens | vocab | hidden | chunk | temp memory (MiB) | source | median (s) "
           "| loss | max abs diff value | max abs diff grad |",
           "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['impl']} | {r['tokens']} | {r['vocab']} | {r['hidden']} | {r['chunk_size']} "
        f"| {r['temp_bytes'] / 2**20:.1f} | {r['memory_source']} | {r['median_s']:.3f} "
        f"| {r.get('loss', float('nan')):.4f} | {r.get('max_abs_diff_value', float('nan')):.2e} "
        f"| {r.get('max_abs_diff_grad', float('nan')):.2e} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_rss":
    impl, tokens, vocab, hidden, chunk, dtype_name = sys.argv[2:8]
    _measure_rss(impl, int(tokens), int(vocab), int(hidden), int(chunk), dtype_name)
    return
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, nargs="+", default=[32768])
  parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--chunk-size", type=int, default=512)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args(argv)
  rows = []
  for vocab in args.vocab:
    for tokens in args.tokens:
      rows += run_config(tokens, vocab, args.hidden, args.chunk_size, args.dtype, args.repeats,
                         args.impls)
      print(f"done tokens={tokens} vocab={vocab}", file=sys.stderr, flush=True)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
  print(markdown(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
