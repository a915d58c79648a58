"""How the step's cost grows with sequence length, batch size and (forced host) device count.

    python benchmarks/scaling.py --preset bert-base [--seqs 32,64,128] [--batches 2,4,8]
        [--device-counts 1,2,4] [--batch 8] [--seq 128] [--steps 5] [--out scaling.json]

Each point runs `benchmarks/step.py` in a fresh subprocess (so ``XLA_FLAGS=
--xla_force_host_platform_device_count=N`` can be set before jax starts): sequence and
batch sweeps in ``jit`` mode on one device, the device sweep in ``sharded`` mode with the
global batch fixed.  On a CPU, forced host devices share the same cores: the device sweep
shows the overhead of splitting, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COLUMNS = ("sweep", "mode", "devices", "batch", "seq", "step_ms", "tokens_per_s", "ms_per_token_x1000", "compile_s",
           "peak_mem_MiB", "mfu_pct")


def run_point(preset: str, *, batch: int, seq: int, mode: str, devices: int, dtype: str, steps: int,
              warmup: int) -> dict:
  """One `step.py` run in a subprocess; returns its result row."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "point.json")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "step.py"), "--preset", preset,
           "--batch", str(batch), "--seq", str(seq), "--modes", mode, "--dtypes", dtype, "--steps", str(steps),
           "--warmup", str(warmup), "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise SystemExit(f"step.py failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    with open(out) as f:
      return json.load(f)["results"][0]


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="bert-base", help=", ".join(common.PRESETS))
  parser.add_argument("--seqs", default="32,64,128", help="sequence sweep (at --batch)")
  parser.add_argument("--batches", default="2,4,8", help="batch sweep (at --seq)")
  parser.add_argument("--device-counts", default="1,2,4", help="forced host devices, sharded mode (at --batch, --seq)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  points = ([("seq", "jit", 1, args.batch, s) for s in _ints(args.seqs)]
            + [("batch", "jit", 1, b, args.seq) for b in _ints(args.batches)]
            + [("devices", "sharded", n, args.batch, args.seq) for n in _ints(args.device_counts)])
  rows = []
  for sweep, mode, devices, batch, seq in points:
    row = run_point(args.preset, batch=batch, seq=seq, mode=mode, devices=devices, dtype=args.dtype,
                    steps=args.steps, warmup=args.warmup)
    row = dict(row, sweep=sweep, ms_per_token_x1000=1e6 * row["step_ms"] / 1e3 / (batch * seq))
    rows.append(row)
    print(common.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
  print()
  print(common.markdown_table(rows, COLUMNS))
  print("\nms_per_token_x1000 = step time per token in µs; each row is a fresh process "
        "(XLA_FLAGS=--xla_force_host_platform_device_count=<devices>)")
  common.write_json(args.out, {"env": common.env_info(), "command": common.command_line(), "results": rows})
  return {"results": rows}


if __name__ == "__main__":
  main()
