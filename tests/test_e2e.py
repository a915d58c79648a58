"""End to end through the real CLI: train -> eval -> export -> reload with transformers (PyTorch).

The trained run is the reference run of `test_reliability` (a tiny GPT-2 distillation on 2
forced CPU devices, built once per session).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_reliability import (STEPS, checkpoint_state, cli_command, error_line, exported_params, jax_cache,  # noqa: F401
                              loss_history, ok, reference, rows, run_cli, tiny_gpt2)


@pytest.fixture()
def env(jax_cache):  # noqa: F811
  from test_reliability import cli_env

  return cli_env(jax_cache)


@pytest.mark.slow
def test_run_directory_holds_everything(reference):  # noqa: F811
  names = {p.name for p in reference.iterdir()}
  assert {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "report.md", "report.json", "curves.png",
          "student", "undistilled_eval.json"} <= names
  assert any(p.name.startswith("events.out.tfevents") for p in (reference / "tensorboard").iterdir())
  assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()) == [4, 6, 8]  # keep_last=3, every 2
  assert [s for s, *_ in loss_history(reference)] == list(range(1, STEPS + 1))
  assert all(np.isfinite(loss) for _, loss, *_ in loss_history(reference))
  student = {p.name for p in (reference / "student").iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= student
  assert oct((reference / "student" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
  eval_steps = [r["step"] for r in rows(reference) if "eval/loss" in r]
  assert eval_steps[0] == 0 and eval_steps[-1] == STEPS  # the undistilled eval loss starts the eval curve
  report = json.loads((reference / "report.json").read_text())
  by_name = {r["name"]: r for r in report["metrics"]}
  # Before and after distillation, against the teacher (8 steps of a tiny model prove no improvement).
  for name in ("kl_teacher_student", "top1_agreement", "perplexity"):
    assert all(np.isfinite(by_name[name][k]) for k in ("undistilled", "distilled", "improvement")), by_name[name]
  assert report["nonfinite_steps"] == []
  assert "Distillation report" in (reference / "report.md").read_text()
  assert (reference / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so_and_touches_nothing(reference, tiny_gpt2, env):  # noqa: F811
  from test_reliability import train_args

  before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
  start = time.perf_counter()
  proc = ok(run_cli(train_args(tiny_gpt2, reference), env))
  said = proc.stdout + proc.stderr
  assert "already complete" in said and f"finished step {STEPS}" in said
  assert time.perf_counter() - start < 60  # no model load, eval or export
  assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_eval_and_export_commands_then_transformers_reloads_the_student(reference, env, tmp_path):  # noqa: F811
  before = (reference / "report.json").stat().st_mtime_ns
  proc = ok(run_cli(["eval", str(reference)], env))
  assert "report:" in proc.stdout
  assert (reference / "report.json").stat().st_mtime_ns > before
  assert json.loads((reference / "report.json").read_text())["metrics"]

  out = tmp_path / "exported"
  proc = ok(run_cli(["export", str(reference), str(out)], env))
  assert str(out) in proc.stdout
  exported = exported_params(out)
  for key, value in exported_params(reference / "student").items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  line = error_line(run_cli(["export", str(reference), str(out)], env))  # refuses to overwrite
  assert "out_dir" in line and "not empty" in line

  # The checkpoint's student params are what was exported (flax names match by suffix).
  saved = {k: v for k, v in checkpoint_state(reference, STEPS).items() if k.startswith(".params['student']")
           or k.startswith("['params']['student']")}
  import distill_jax as dj

  flax_student = dj.load_model(str(out), task="causal_lm")
  loaded = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(flax_student.params)}
  assert len(saved) == len(loaded)
  for key, value in loaded.items():
    match = [v for k, v in saved.items() if k.endswith(key)]
    assert len(match) == 1, key
    np.testing.assert_array_equal(match[0], value, err_msg=key)

  # PyTorch transformers loads the export and computes what our Flax student computes.
  import torch
  import transformers

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  enc = tokenizer(["The quick brown fox jumps over the lazy dog.", "Return the value."], padding="max_length",
                  max_length=16, truncation=True, return_tensors="np")
  batch = {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32)}
  ours = flax_student.apply(flax_student.params, batch, outputs=("logits", "hidden_states"))
  with torch.no_grad():
    ref = torch_model(input_ids=torch.from_numpy(enc["input_ids"]).long(),
                      attention_mask=torch.from_numpy(enc["attention_mask"]).long(), output_hidden_states=True)
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(ours.logits)[real], ref.logits.numpy()[real], atol=1e-4, rtol=0)
  assert len(ours.hidden_states) == len(ref.hidden_states)
  for h_ours, h_ref in zip(ours.hidden_states, ref.hidden_states):
    np.testing.assert_allclose(np.asarray(h_ours)[real], h_ref.numpy()[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("command, options", [
    ([], ["train", "eval", "export", "--debug"]),
    (["train"], ["CONFIG", "KEY=VALUE", "train.steps", "distributed.coordinator"]),
    (["eval"], ["RUN_DIR", "KEY=VALUE"]),
    (["export"], ["RUN_DIR", "OUT_DIR", "--overwrite", "--step"]),
])
def test_help_of_each_command_exits_0_and_lists_its_options(command, options):
  proc = subprocess.run([sys.executable, "-m", "distill_jax.cli", *command, "--help"], capture_output=True, text=True,
                        timeout=60, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  for option in options:
    assert option in proc.stdout, (option, proc.stdout)
