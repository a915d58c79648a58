"""The same distillation step in PyTorch, timed against the JAX step in the same run.

    python benchmarks/torch_reference.py --preset bert-base [--batch 8] [--seq 128]
        [--dtype float32|bfloat16] [--steps 20] [--warmup 2] [--compile] [--no-jax] [--out torch.json]

The PyTorch side is the loop a PyTorch user writes (the reference text's): teacher under
``torch.no_grad()`` in eval mode, student forward in train mode (dropout on), loss =
``KL(p_T‖p_S)·T²`` (T=2, mean over tokens) + MSE of the last hidden states, backward,
global-norm clipping 1.0, ``torch.optim.AdamW`` — on transformers' PyTorch classes built
from the same HF config as the JAX preset, same batch, same dtype (``bfloat16``: teacher
weights in bf16, student f32 weights under ``torch.autocast`` bf16).  ``--compile`` adds a
``torch.compile``d copy of the same loop.

JAX and PyTorch steps alternate, one each per iteration, so machine load hits both alike;
medians are reported with the JAX/PyTorch throughput ratio (> 1: JAX is faster).  Each step
also records the process's CPU seconds (``time.process_time``, every thread): on a machine
shared with other jobs, wall time also measures who waited for a core, CPU time mostly the
work.  Neither framework's threads keep spinning after a step (checked: a process idle for
1 s after a step used 0.000 CPU s, PyTorch's OpenMP and XLA's pool alike; 0.05 s after a
PyTorch step too), so the alternation does not steal cores from the other framework.  The
kernel's share of the CPU seconds (``step_sys_s``: mostly page faults of each step's fresh
allocations) is recorded too: it is not the same alone and alternating (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import step as jax_step  # noqa: E402

TEMPERATURE = 2.0
COLUMNS = ("preset", "impl", "dtype", "batch", "seq", "step_ms", "cpu_ms", "tokens_per_s", "compile_s", "jax_over_torch")


class TorchRunner:
  """Teacher + student as transformers PyTorch modules and the reference training loop."""

  def __init__(self, preset: common.Preset, dtype: str, *, batch: int, seq: int, compile: bool = False,
               seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = {"masked_lm": transformers.AutoModelForMaskedLM, "causal_lm": transformers.AutoModelForCausalLM}[preset.task]
    config = common.hf_config(preset)
    student_config = config.__class__(**{**config.to_dict(), **_depth(config, preset.student_layers)})
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.dtype = dtype
    self.teacher = cls.from_config(config).to(self.device).eval()
    if dtype == "bfloat16":
      self.teacher = self.teacher.to(torch.bfloat16)
    self.student = cls.from_config(student_config).to(self.device).train()
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-4, weight_decay=0.01)
    host = common.random_batch(batch, seq, int(config.vocab_size), seed)
    self.input_ids = torch.as_tensor(host["input_ids"], dtype=torch.long, device=self.device)
    self.attention_mask = torch.as_tensor(host["attention_mask"], dtype=torch.long, device=self.device)
    self.compile_s = 0.0
    self._step = self._eager_step
    if compile:
      self._step = torch.compile(self._eager_step)
      start = time.perf_counter()
      self.step()
      self.compile_s = time.perf_counter() - start

  def _eager_step(self):
    import torch
    import torch.nn.functional as F

    autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")
    with torch.no_grad(), autocast:
      t_out = self.teacher(input_ids=self.input_ids, attention_mask=self.attention_mask, output_hidden_states=True)
    with autocast:
      s_out = self.student(input_ids=self.input_ids, attention_mask=self.attention_mask, output_hidden_states=True)
      t = TEMPERATURE
      kl = F.kl_div(F.log_softmax(s_out.logits.float() / t, -1), F.log_softmax(t_out.logits.float() / t, -1),
                    log_target=True, reduction="none").sum(-1)
      mask = self.attention_mask.float()
      kl = (kl * mask).sum() / mask.sum() * t * t
      mse = F.mse_loss(s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float())
      loss = kl + mse
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
    self.optimizer.step()
    return loss

  def breakdown(self, steps: int) -> dict:
    """Median ms of teacher forward / student forward+loss+backward / clip+AdamW, run apart."""
    import torch
    import torch.nn.functional as F

    def autocast():
      return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16")

    def teacher():
      with torch.no_grad(), autocast():
        return self.teacher(input_ids=self.input_ids, attention_mask=self.attention_mask, output_hidden_states=True)

    t_out = teacher()

    def student():
      with autocast():
        s_out = self.student(input_ids=self.input_ids, attention_mask=self.attention_mask, output_hidden_states=True)
        t = TEMPERATURE
        kl = F.kl_div(F.log_softmax(s_out.logits.float() / t, -1), F.log_softmax(t_out.logits.float() / t, -1),
                      log_target=True, reduction="batchmean") * t * t
        loss = kl + F.mse_loss(s_out.hidden_states[-1].float(), t_out.hidden_states[-1].float())
      loss.backward()
      if self.device.type == "cuda":
        torch.cuda.synchronize()

    def optimizer():
      torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
      self.optimizer.step()
      if self.device.type == "cuda":
        torch.cuda.synchronize()

    parts = {"teacher_fwd": lambda: teacher().logits.sum().item(), "student_fwd_bwd": student,
             "optimizer": optimizer}
    times = {k: [] for k in parts}
    for _ in range(steps):
      for k, fn in parts.items():
        times[k] += common.time_calls(fn, 1)
    self.optimizer.zero_grad(set_to_none=True)
    return {k: 1e3 * common.median(v) for k, v in times.items()}

  def step(self) -> float:
    return float(self._step().item())  # .item() waits for the device


def _depth(config, layers: int) -> dict:
  key = "num_hidden_layers" if hasattr(config, "num_hidden_layers") and config.model_type != "gpt2" else "n_layer"
  return {key: layers}


def main(argv=None) -> dict:
  parser = jax_step.parse_args(argv, __doc__)
  parser.set_defaults(modes="jit")
  parser.add_argument("--dtype", default="float32", choices=jax_step.DTYPES)
  parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd loop (slow on CPU)")
  parser.add_argument("--no-jax", action="store_true", help="PyTorch only (no ratio)")
  args = parser.parse_args(argv)
  preset = common.get_preset(args.preset)
  batch, seq = args.batch or preset.batch, args.seq or preset.seq

  load_before = _loadavg()
  print(f"loadavg before: {load_before}", flush=True)
  runners = {}
  if not args.no_jax:
    setup = jax_step.Setup(preset, args.dtype, batch=batch, seq=seq, layer_loop=args.layer_loop)
    runners["jax-jit"] = jax_step.JaxRunner(setup, "jit")
  runners["torch-eager"] = TorchRunner(preset, args.dtype, batch=batch, seq=seq)
  if args.compile:
    runners["torch-compile"] = TorchRunner(preset, args.dtype, batch=batch, seq=seq, compile=True)
  for runner in runners.values():
    for _ in range(args.warmup):
      runner.step()
  times = {name: [] for name in runners}
  cpu_times = {name: [] for name in runners}
  sys_times = {name: [] for name in runners}  # kernel CPU s (page faults of fresh allocations, mostly)
  for _ in range(args.steps):  # alternate: load drifts hit every implementation alike
    for name, runner in runners.items():
      wall, cpu, kernel = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
      runner.step()
      times[name].append(time.perf_counter() - wall)
      cpu_times[name].append(time.process_time() - cpu)
      sys_times[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel)

  tokens = batch * seq
  jax_s = common.median(times["jax-jit"]) if "jax-jit" in times else None
  rows = []
  for name, runner in runners.items():
    step_s = common.median(times[name])
    compile_s = runner.lower_s + runner.compile_s if name == "jax-jit" else runner.compile_s
    rows.append({"preset": preset.name, "impl": name, "dtype": args.dtype, "batch": batch, "seq": seq,
                 "step_ms": 1e3 * step_s, "cpu_ms": 1e3 * common.median(cpu_times[name]),
                 "tokens_per_s": tokens / step_s, "compile_s": compile_s,
                 "jax_over_torch": step_s / jax_s if jax_s else "n/a", "step_times_s": times[name],
                 "step_cpu_s": cpu_times[name], "step_sys_s": sys_times[name]})
  payload = {"env": common.env_info(), "command": common.command_line(), "results": rows}
  print(common.markdown_table(rows, COLUMNS))
  if args.breakdown:
    parts = {"torch-eager": runners["torch-eager"].breakdown(args.steps)}
    if "jax-jit" in runners:
      parts["jax-jit"] = jax_step.breakdown(runners["jax-jit"].setup, args.steps)
    payload["breakdown_ms"] = parts
    print()
    print(common.markdown_table([dict(impl=k, **v) for k, v in parts.items()],
                                ("impl", "teacher_fwd", "student_fwd_bwd", "optimizer")))
  if jax_s and runners["torch-eager"].device.type == "cpu":
    payload["matmul_gflops"] = {"jax": common.matmul_peak("float32") / 1e9,
                                "torch": common.torch_matmul_peak() / 1e9}
    print("\n2048² float32 matmul GFLOP/s, same run: " + ", ".join(
        f"{k} {v:.1f}" for k, v in payload["matmul_gflops"].items()))
  print("\njax_over_torch = this implementation's median step time / JAX's (JAX/PyTorch throughput ratio); "
        "steps alternate between implementations in one process")
  payload["loadavg"] = {"before": load_before, "after": _loadavg()}
  print(f"loadavg after: {payload['loadavg']['after']}")
  if jax_s:
    torch_s = common.median(times["torch-eager"])
    jax_cpu, torch_cpu = (common.median(cpu_times[k]) for k in ("jax-jit", "torch-eager"))
    jax_sys, torch_sys = (common.median(sys_times[k]) for k in ("jax-jit", "torch-eager"))
    print(f"RATIO {preset.name} {args.dtype} batch={batch} seq={seq}: JAX/PyTorch-eager throughput "
          f"{torch_s / jax_s:.2f}x (step median: jax {jax_s:.2f} s, torch-eager {torch_s:.2f} s; "
          f"CPU s per step: jax {jax_cpu:.2f}, torch-eager {torch_cpu:.2f}, ratio {torch_cpu / jax_cpu:.2f}x "
          f"(of which kernel: jax {jax_sys:.2f}, torch-eager {torch_sys:.2f}); "
          f"{args.steps} alternating steps; loadavg before {load_before}, after {payload['loadavg']['after']})")
  common.write_json(args.out, payload)
  return payload


def _loadavg() -> str:
  """The 1/5/15-minute load averages (``/proc/loadavg``), or ``"n/a"``."""
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "n/a"


if __name__ == "__main__":
  main()
