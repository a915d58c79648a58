"""Smoke tests: every benchmark script runs on the tiny preset for a step or two.

No timing is asserted; this only keeps the scripts from rotting.  Each script runs in a
subprocess (as a user runs it) with one forced host device unless stated.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script, *args, devices=1, timeout=600):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.slow  # a script end to end (tens of seconds): the second pass
def test_step_all_modes_and_dtypes(tmp_path):
  out = tmp_path / "step.json"
  stdout = _run("step.py", "--preset", "tiny", "--modes", "jit,sharded,pmap", "--steps", "1", "--warmup", "1",
                "--batch", "4", "--out", str(out), devices=2)
  rows = json.loads(out.read_text())["results"]
  assert [(r["mode"], r["dtype"]) for r in rows] == [(m, "float32") for m in ("jit", "sharded", "pmap")]
  assert [r["devices"] for r in rows] == [1, 2, 2]
  for r in rows:
    assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and r["compile_s"] > 0
  assert "| tiny | 2 | jit | float32 |" in stdout  # preset, teacher layers, mode, dtype


def test_flop_accounting_counts_tied_and_untied_heads():
  sys.path.insert(0, BENCH)
  import common

  step = common.step_flops(common.ModelShape(100, 2, 8), common.ModelShape(50, 1, 8), batch=2, seq=4)
  assert step["flops_per_token_teacher"] == 2 * 100 + 4 * 2 * 4 * 8
  assert step["flops_per_token_student"] == 3 * (2 * 50 + 4 * 1 * 4 * 8)
  assert step["flops_per_step"] == 8 * (step["flops_per_token_teacher"] + step["flops_per_token_student"])


def test_profile_summary_splits_a_trace_by_op_and_category(tmp_path):
  sys.path.insert(0, BENCH)
  import jax
  import jax.numpy as jnp
  import step

  compiled = jax.jit(lambda a, b: jnp.tanh(a @ b) * 2 + jnp.exp(a)).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile()
  a = jnp.ones((64, 64))
  compiled(a, a).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(2):
      compiled(a, a).block_until_ready()
  summary = step.profile_summary(str(tmp_path), compiled.as_text(), steps=2)
  hlo = compiled.as_text()
  assert summary["top_ops"] and all(f"%{op['op']} = " in hlo for op in summary["top_ops"])
  assert set(summary["ms_per_step_by_category"]) <= {"optimizer", "vocab", "dot", "scan bookkeeping",
                                                       "elementwise/reduce"}
  assert sum(summary["ms_per_step_by_category"].values()) == pytest.approx(
      sum(op["ms_per_step"] for op in summary["top_ops"]))  # every op of this small program is in the top


@pytest.mark.slow  # a script end to end (tens of seconds): the second pass
def test_torch_reference_bf16(tmp_path):
  out = tmp_path / "torch.json"
  _run("torch_reference.py", "--preset", "tiny-gpt2", "--dtype", "bfloat16", "--steps", "1", "--warmup", "1",
       "--out", str(out))
  rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
  assert set(rows) == {"jax-jit", "torch-eager"}
  assert rows["torch-eager"]["jax_over_torch"] > 0
  assert all(r["cpu_ms"] > 0 and len(r["step_cpu_s"]) == len(r["step_sys_s"]) == 1 for r in rows.values())


@pytest.mark.slow
def test_scaling(tmp_path):
  out = tmp_path / "scaling.json"
  _run("scaling.py", "--preset", "tiny", "--seqs", "16", "--batches", "2", "--device-counts", "2", "--batch", "2",
       "--seq", "16", "--steps", "1", "--warmup", "0", "--out", str(out))
  rows = json.loads(out.read_text())["results"]
  assert [(r["sweep"], r["devices"]) for r in rows] == [("seq", 1), ("batch", 1), ("devices", 2)]


def test_gpu_script_is_valid_bash():
  subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu.sh")], check=True)


@pytest.mark.slow  # a script end to end (tens of seconds): the second pass
def test_on_policy_split(tmp_path):
  out = tmp_path / "on_policy.json"
  stdout = _run("on_policy.py", "--batch", "2", "--prompt", "4", "--new", "2", "--steps", "1", "--out", str(out))
  (row,) = json.loads(out.read_text())["results"]
  assert row["sample_ms"] > 0 and row["score_ms"] > 0 and row["on_policy_step_ms"] > 0
  assert "| sample_ms | score_ms | update_ms |" in stdout


@pytest.mark.slow
def test_teacher_cache_quick(tmp_path):
  out = tmp_path / "teacher_cache.json"
  _run("teacher_cache.py", "--quick", "--out", str(out), timeout=1200)
  result = json.loads(out.read_text())
  assert [result["cache"][k]["bytes_per_token"] > 0 for k in ("k64", "k128")] == [True, True]
  assert set(result["precision"]) == {f"value_bits_{b}" for b in range(4, 9)}
  for run in result["training"].values():
    assert run["held_out_kl_after"] < run["held_out_kl_before"]


@pytest.mark.slow  # imports jax and torch in a subprocess
def test_cpu_gemm(tmp_path):
  out = tmp_path / "gemm.json"
  stdout = _run("cpu_gemm.py", "--tokens", "16", "--hidden", "8", "--ffn", "16", "--vocab", "40", "--repeats", "1",
                "--out", str(out))
  rows = json.loads(out.read_text())["results"]
  assert [r["case"] for r in rows] == ["square_2048", "mlp_in", "mlp_out", "mlp_dw", "logits", "head_dx", "head_dw"]
  assert [(r["m"], r["k"], r["n"]) for r in rows[1:]] == [(16, 8, 16), (16, 16, 8), (8, 16, 16), (16, 8, 40),
                                                         (16, 40, 8), (40, 16, 8)]
  assert all(r["jax_GFLOPs"] > 0 and r["torch_GFLOPs"] > 0 for r in rows) and "| logits | 16 | 8 | 40 |" in stdout
  bad = subprocess.run([sys.executable, os.path.join(BENCH, "cpu_gemm.py"), "--repeats", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
  assert bad.returncode == 1 and bad.stderr.strip() == "--repeats: must be a positive integer, got 0"
