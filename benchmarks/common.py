"""Shared helpers of the benchmark scripts: presets, FLOP accounting, peaks, timing, output.

Nothing here is timed by tests; `tests/test_benchmarks.py` only runs the scripts on the
``tiny`` preset so that they keep working.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# --------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
  """A teacher/student pair built from an HF config with random weights (no download).

  Attributes:
    name: preset name.
    family: HF ``model_type``.
    task: `distill_jax.models.TASKS` entry.
    teacher: HF config fields of the teacher (on top of the family's defaults).
    student_layers: student depth; ``init_student`` copies every k-th teacher layer.
    batch, seq: default global batch and sequence length (accelerator-sized).
  """

  name: str
  family: str
  task: str
  teacher: dict
  student_layers: int
  batch: int
  seq: int


PRESETS = {
    # tests/tiny.py-sized: for smoke tests only.
    "tiny": Preset("tiny", "bert", "masked_lm", dict(vocab_size=384, hidden_size=32, num_attention_heads=4,
                                                     num_hidden_layers=2, intermediate_size=64,
                                                     max_position_embeddings=128), 1, 4, 32),
    "tiny-gpt2": Preset("tiny-gpt2", "gpt2", "causal_lm", dict(vocab_size=384, n_embd=32, n_head=4, n_layer=2,
                                                               n_inner=64, n_positions=128), 1, 4, 32),
    # bert-base-uncased's shape (110M) -> 6 layers (DistilBERT's depth).
    "bert-base": Preset("bert-base", "bert", "masked_lm", {}, 6, 32, 128),
    # gpt2 (124M) -> 6 layers (distilgpt2's depth).
    "gpt2": Preset("gpt2", "gpt2", "causal_lm", dict(n_positions=1024), 6, 8, 1024),
    # TinyLlama-1.1B's shape (22 layers, d=2048, GQA 32/4, vocab 32000) -> 11 layers:
    # teacher 1.1B + student 0.6B with f32 AdamW state fits one 80 GB GPU at batch 4 x 1024.
    "llama-1b": Preset("llama-1b", "llama", "causal_lm",
                       dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                            tie_word_embeddings=False), 11, 4, 1024),
}


def hf_config(preset: Preset):
  """The teacher's `transformers.PretrainedConfig` (family defaults + the preset's fields)."""
  import transformers

  cls = {"bert": transformers.BertConfig, "gpt2": transformers.GPT2Config,
         "llama": transformers.LlamaConfig}[preset.family]
  return cls(**preset.teacher)


def get_preset(name: str) -> Preset:
  if name not in PRESETS:
    raise SystemExit(f"--preset: unknown {name!r}; allowed: {', '.join(PRESETS)}")
  return PRESETS[name]


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  """Host (NumPy) batch of random token ids, every position real."""
  import numpy as np

  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(5, vocab, size=(batch, seq), dtype=np.int32),
          "attention_mask": np.ones((batch, seq), np.int32)}


# --------------------------------------------------------------------------- FLOP accounting


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What the FLOP count needs from one model."""

  matmul_params: int  # non-embedding 2-D weights + the unembedding (V x H)
  num_layers: int
  hidden: int  # attention width (heads x head_dim)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()


def model_shape(params: Any, hf_cfg) -> ModelShape:
  """Matmul parameter count: every dense kernel (the stacked layers' too), plus the unembedding.

  A tied head (BERT, GPT-2, tied Llama) has no kernel of its own: ``vocab x hidden`` is
  added.  An untied head (``lm_head``) is a kernel and is counted as such.
  """
  import jax
  import numpy as np

  vocab = int(hf_cfg.vocab_size)
  hidden = int(hf_cfg.hidden_size)
  total, head = 0, False
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not _path_name(path).endswith("kernel"):
      continue
    total += int(np.size(leaf))
    head |= vocab in np.shape(leaf)
  if not head:
    total += vocab * hidden
  return ModelShape(total, int(hf_cfg.num_hidden_layers), hidden)


def step_flops(teacher: ModelShape, student: ModelShape, batch: int, seq: int) -> dict:
  """FLOPs of one distillation step, written out.

  Per token: teacher forward ``2·N_t + 2·2·L_t·T·d_t``; student forward + backward
  ``3 × (2·N_s + 2·2·L_s·T·d_s)`` (QKᵀ and AV: ``2·T·d`` multiply-adds each per token and
  layer; causal masking not discounted).  The optimizer, norms, softmax and the losses are
  not counted.
  """
  t = 2 * teacher.matmul_params + 4 * teacher.num_layers * seq * teacher.hidden
  s = 3 * (2 * student.matmul_params + 4 * student.num_layers * seq * student.hidden)
  tokens = batch * seq
  return {"tokens": tokens, "flops_per_token_teacher": t, "flops_per_token_student": s,
          "flops_per_step": (t + s) * tokens, "n_teacher": teacher.matmul_params,
          "n_student": student.matmul_params}


# Dense peaks (no sparsity) in FLOP/s by `device_kind` substring; SXM parts.
GPU_PEAKS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},  # SXM; PCIe is 756 / 51
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


def device_peak(dtype: str, measured_cpu: Optional[float] = None) -> tuple[float, str]:
  """(peak FLOP/s, where it came from) for the first device."""
  import jax

  dev = jax.devices()[0]
  if dev.platform == "cpu":
    if measured_cpu is None:
      measured_cpu = matmul_peak(dtype)
    return measured_cpu, (f"measured {dtype} 2048² jitted matmul on this CPU in the same run "
                          "(median of 7, best of the measurements before and after each mode's steps)")
  for key, peaks in GPU_PEAKS.items():
    if key.lower() in dev.device_kind.lower():
      return peaks[dtype], f"{key} dense {dtype} datasheet peak"
  return float("nan"), f"unknown device kind {dev.device_kind!r}"


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 7) -> float:
  """Achieved FLOP/s of a large jitted ``n x n`` matmul (median of ``repeats``)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), dtype) * 0.5
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = time_calls(lambda: f(a, a).block_until_ready(), repeats)
  return 2 * n**3 / statistics.median(times)


# --------------------------------------------------------------------------- timing


def torch_matmul_peak(n: int = 2048, repeats: int = 7) -> float:
  """Achieved FLOP/s of a float32 ``n x n`` matmul in PyTorch (CPU), for context."""
  import torch

  a = torch.full((n, n), 0.5)
  a @ a
  return 2 * n**3 / statistics.median(time_calls(lambda: a @ a, repeats))


def time_calls(fn: Callable[[], Any], n: int) -> list[float]:
  """Wall seconds of ``n`` calls of ``fn`` (which must block until its result is ready)."""
  out = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def memory_analysis(compiled) -> dict:
  """Bytes from ``compiled.memory_analysis()``; ``peak_estimate`` = args + outputs + temps − aliased."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    ma = None
  if ma is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", "_bytes"): int(getattr(ma, f, 0) or 0) for f in fields}
  out["peak_estimate_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                                - out["alias_bytes"])
  return out


def device_memory_stats() -> dict:
  import jax

  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    stats = None
  if not stats:
    return {}
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def peak_rss_bytes() -> int:
  import resource

  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --------------------------------------------------------------------------- environment and output


def env_info() -> dict:
  """Date, machine and versions, for every results file."""
  info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "python": platform.python_version(), "cores": os.cpu_count()}
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
  except OSError:
    info["cpu"] = platform.processor()
  import importlib.metadata as md

  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
      info[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  try:
    import jax

    info["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  except Exception:  # noqa: BLE001
    pass
  try:
    info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True, check=False).stdout.strip()
  except OSError:
    pass
  return info


def command_line() -> str:
  return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def write_json(path: Optional[str], payload: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(payload, f, indent=1, default=str)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """Rows as a markdown table (header + separator + rows), floats to 4 significant digits."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)
