"""One distillation train step: step time, tokens/s, compile time, memory and MFU.

    python benchmarks/step.py --preset bert-base [--batch 8] [--seq 128] [--modes jit,sharded,pmap]
        [--dtypes float32,bfloat16] [--steps 20] [--warmup 2] [--layer-loop auto|scan|unroll] [--out step.json]

The step is the product's `distill_jax.training.step.train_step`: teacher forward (no gradient),
student forward + backward, AdamW update (global-norm clipping 1.0), with the objective
``forward_kl(T=2)`` on the logits + ``hidden_mse`` on the last hidden state built by
`build_objective`.  Models come from HF configs with random weights (see
`common.PRESETS`); the student is `init_student(teacher, num_layers=...)`.

Modes: ``jit`` (one device, ``jax.jit`` with the state donated), ``sharded``
(`make_jit_step` on a ``("data", "fsdp")`` mesh over every device) and ``pmap``
(`make_pmap_step`).  ``bfloat16`` means bf16 compute with f32 student (master) params; the
teacher's params are stored in bf16 too.

Compile time is ``lower`` + ``compile`` of the step, timed separately from the steps.
MFU = model FLOPs per step / step time / peak, with the FLOP accounting of
`common.step_flops` and, on CPU, a large-matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TERMS = ({"loss": "forward_kl", "temperature": 2.0}, {"loss": "hidden_mse", "layers": "last"})
MODES = ("jit", "sharded", "pmap")
DTYPES = ("float32", "bfloat16")
COLUMNS = ("preset", "layers", "mode", "dtype", "devices", "batch", "seq", "step_ms", "tokens_per_s", "lower_s", "compile_s",
           "peak_mem_MiB", "mfu_pct", "peak_TFLOPs")


class Setup:
  """Teacher, student, objective, optimizer and a host batch for one preset and dtype."""

  def __init__(self, preset: common.Preset, dtype: str, *, batch: int, seq: int, seed: int = 0,
               teacher_layers: int | None = None, remat: str = "none", attention: str = "xla",
               chunk_size: int | None = 128, layer_loop: str = "auto"):
    import jax
    import jax.numpy as jnp

    from distill_jax import models
    from distill_jax.models import layers
    from distill_jax.objective.objective import build_objective
    from distill_jax.training.state import make_optimizer

    # Bad --attention / --layer-loop: one line before any model is built.
    impl = layers.resolve_attention(attention, jax.default_backend(), field="--attention")
    unroll = layers.resolve_layer_loop(layer_loop, jax.default_backend(), field="--layer-loop")
    self.preset, self.dtype, self.batch_size, self.seq = preset, dtype, batch, seq
    self.hf_config = common.hf_config(preset)
    if teacher_layers is not None:
      self.hf_config.num_hidden_layers = teacher_layers
    self.teacher = models.model_from_config(self.hf_config, preset.task, seed=seed, dtype=dtype)
    self.student = models.init_student(self.teacher, num_layers=min(preset.student_layers, self.teacher.num_layers),
                                       seed=seed + 1, remat=remat)
    self.teacher, self.student = (dataclasses.replace(m, module=m.module.clone(attention_impl=impl,
                                                                                unroll_layers=unroll))
                                  for m in (self.teacher, self.student))
    teacher_params = self.teacher.params
    if dtype != "float32":
      teacher_params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                    teacher_params)
    self.teacher_params = {"teacher": teacher_params}
    # chunk_size: logit terms from hidden states + heads in chunks of this many positions
    # (the default); None: the dense [B, T, V] logits path.
    self.objective = build_objective(TERMS, student=self.student, teachers={"teacher": self.teacher},
                                     chunk_size=chunk_size)
    self.optimizer = make_optimizer("adamw", 1e-4, schedule="constant", weight_decay=0.01, clip_norm=1.0)
    self.projections = self.objective.init_projections(jax.random.PRNGKey(seed))
    self.batch = common.random_batch(batch, seq, int(self.hf_config.vocab_size), seed)
    self.flops = common.step_flops(common.model_shape(self.teacher.params, self.hf_config),
                                   common.model_shape(self.student.params, self.student.hf_config), batch, seq)
    self.teacher_layers = self.teacher.num_layers

  def step_kwargs(self) -> dict:
    return dict(student_apply=self.student.apply, teacher_applies={"teacher": self.teacher.apply},
                objective=self.objective, optimizer=self.optimizer)

  def fresh_state(self):
    import jax
    import jax.numpy as jnp

    from distill_jax.training.state import create_train_state

    # `init_student` shares the copied layers' buffers with the teacher; donating the state
    # would then donate teacher buffers too ("buffer previously donated"), so copy.
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), self.student.params)
    return create_train_state(params, self.optimizer, projection_params=self.projections, seed=0)


class JaxRunner:
  """A compiled step in one mode; `step()` runs one update and blocks on its loss."""

  def __init__(self, setup: Setup, mode: str):
    import jax
    import jax.numpy as jnp

    from distill_jax.training import sharding

    from distill_jax.training import step

    self.setup, self.mode = setup, mode
    kwargs = setup.step_kwargs()
    if mode == "jit":
      self.devices = 1
      dev = jax.devices()[0]
      fn = jax.jit(functools.partial(step.train_step, **kwargs), donate_argnums=0)
      self.state = jax.device_put(setup.fresh_state(), dev)
      self.teacher_params = jax.device_put(setup.teacher_params, dev)
      self.batch = jax.device_put(setup.batch, dev)
    elif mode == "sharded":
      self.devices = jax.device_count()
      mesh = sharding.make_mesh(data=-1, fsdp=1)
      state = setup.fresh_state()
      js = step.make_jit_step(mesh=mesh, state=state, teacher_params=setup.teacher_params, **kwargs)
      fn = js.train.jitted
      self.state = jax.device_put(state, js.state_sharding)
      self.teacher_params = jax.device_put(setup.teacher_params, js.teacher_sharding)
      self.batch = sharding.shard_batch(setup.batch, mesh)
    elif mode == "pmap":
      self.devices = jax.local_device_count()
      ps = step.make_pmap_step(**kwargs)
      fn = ps.train.pmapped
      n = self.devices
      self.state = step.replicate(setup.fresh_state())
      self.teacher_params = step.replicate(setup.teacher_params)
      b = setup.batch_size
      if b % n:
        raise SystemExit(f"--batch {b} is not divisible by the {n} pmap devices")
      self.batch = {k: jnp.reshape(jnp.asarray(v), (n, b // n) + v.shape[1:]) for k, v in setup.batch.items()}
    else:
      raise SystemExit(f"--modes: unknown {mode!r}; allowed: {', '.join(MODES)}")
    start = time.perf_counter()
    lowered = fn.lower(self.state, self.teacher_params, self.batch)
    self.lower_s = time.perf_counter() - start
    start = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.memory = common.memory_analysis(self.compiled)
    try:
      cost = self.compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      self.xla_flops = float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001
      self.xla_flops = float("nan")

  def step(self) -> float:
    self.state, metrics = self.compiled(self.state, self.teacher_params, self.batch)
    return float(metrics["loss"].ravel()[0] if self.mode == "pmap" else metrics["loss"])


def breakdown(setup: Setup, steps: int) -> dict:
  """Median ms of the step's parts, each jitted alone: where the time goes.

  ``teacher_fwd``: the teacher's forward; ``student_fwd_bwd``: student forward + objective +
  gradient (teacher outputs precomputed); ``optimizer``: clipping + AdamW update.
  """
  import jax
  import optax

  from distill_jax.training import step as step_lib

  s = setup
  state = s.fresh_state()
  tp, batch = s.teacher_params, {k: jax.numpy.asarray(v) for k, v in s.batch.items()}
  teachers = {"teacher": s.teacher.apply}
  teacher_fn = jax.jit(lambda tp, b: step_lib._teacher_outputs(tp, b, teachers, s.objective))
  t_out = teacher_fn(tp, batch)

  def loss(params, t_out, b):
    out = s.student.apply(params["student"], b, outputs=s.objective.outputs_for("student"), train=True,
                          rng=jax.random.PRNGKey(0))
    return s.objective(out, t_out, b, params["projections"], state.step)[0]

  grad_fn = jax.jit(jax.grad(loss))
  grads = grad_fn(state.params, t_out, batch)

  def update(grads, opt_state, params):
    updates, opt_state = s.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update_fn = jax.jit(update)
  update_fn(grads, state.opt_state, state.params)
  parts = {"teacher_fwd": lambda: jax.block_until_ready(teacher_fn(tp, batch)),
           "student_fwd_bwd": lambda: jax.block_until_ready(grad_fn(state.params, t_out, batch)),
           "optimizer": lambda: jax.block_until_ready(update_fn(grads, state.opt_state, state.params))}
  times = {k: [] for k in parts}
  for _ in range(steps):
    for k, fn in parts.items():
      times[k] += common.time_calls(fn, 1)
  return {k: 1e3 * common.median(v) for k, v in times.items()}


PROFILE_STEPS = 3


def profile_summary(trace_dir: str, hlo_text: str, steps: int, top: int = 25) -> dict:
  """Per-step milliseconds of the executed XLA ops in a perfetto trace, by op and by category.

  ``trace_dir`` holds a ``jax.profiler.trace(..., create_perfetto_trace=True)`` of `steps`
  steps; `hlo_text` is the compiled step's optimized HLO, which gives each op its shape and
  jax ``op_name``.  Categories, first match: ``optimizer`` (under the update's ``cond``),
  ``vocab`` (a dim of at least 8192: logits and their gradients), ``dot``, ``scan
  bookkeeping`` (copies, zero broadcasts, dynamic-(update-)slices) and ``elementwise/reduce``.
  Times are summed over threads, so with intra-op threads they exceed the wall time.
  """
  import collections
  import glob
  import gzip
  import json
  import re

  shapes, names = {}, {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
    if m and m.group(1) not in shapes:
      name = re.search(r'op_name="([^"]*)"', line)
      shapes[m.group(1)], names[m.group(1)] = m.group(2), name.group(1) if name else ""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  ops = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in shapes:
      ops[e["name"]] += e.get("dur", 0) / 1e3 / steps

  def category(op: str) -> str:
    dims = [int(d) for d in re.findall(r"\d+", shapes[op].split("{")[0])]
    if "/cond/" in names[op]:
      return "optimizer"
    if len(dims) >= 2 and max(dims) >= 8192:
      return "vocab"
    if "dot_general" in names[op]:
      return "dot"
    if re.match(r"copy\.|wrapped_broadcast|.*dynamic", op):
      return "scan bookkeeping"
    return "elementwise/reduce"

  by_category = collections.Counter()
  for op, ms in ops.items():
    by_category[category(op)] += ms
  return {"ms_per_step_by_category": dict(by_category.most_common()),
          "top_ops": [{"op": op, "ms_per_step": ms, "shape": shapes[op], "op_name": names[op][-80:]}
                      for op, ms in ops.most_common(top)]}


def result_row(setup: Setup, runner: JaxRunner, times: list[float], peak: float, peak_source: str) -> dict:
  import jax

  step_s = common.median(times)
  cpu = jax.devices()[0].platform == "cpu"
  total_peak = peak if cpu else peak * runner.devices
  mem = runner.memory.get("peak_estimate_bytes")
  return {"preset": setup.preset.name, "layers": setup.teacher_layers, "mode": runner.mode, "dtype": setup.dtype, "devices": runner.devices,
          "batch": setup.batch_size, "seq": setup.seq, "step_ms": 1e3 * step_s,
          "tokens_per_s": setup.flops["tokens"] / step_s, "lower_s": runner.lower_s, "compile_s": runner.compile_s,
          "peak_mem_MiB": mem / 2**20 if mem is not None else "n/a",
          "mfu_pct": 100 * setup.flops["flops_per_step"] / step_s / total_peak,
          "peak_TFLOPs": total_peak / 1e12, "peak_source": peak_source, "steps_timed": len(times),
          "step_times_s": times, "memory_analysis": runner.memory, "device_memory": common.device_memory_stats(),
          "xla_cost_flops": runner.xla_flops, **setup.flops}


def parse_args(argv=None, description: str = __doc__):
  parser = argparse.ArgumentParser(description=description.splitlines()[0])
  parser.add_argument("--preset", default="bert-base", help=", ".join(common.PRESETS))
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
  parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
  parser.add_argument("--modes", default="jit", help="comma list of " + ", ".join(MODES))
  parser.add_argument("--dtypes", default="float32", help="comma list of " + ", ".join(DTYPES))
  parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  parser.add_argument("--out", default=None, help="write JSON results here")
  parser.add_argument("--teacher-layers", default=None,
                      help="comma list of teacher depths (default: the preset's); compile time vs depth")
  parser.add_argument("--remat", default="none", help="the student's remat policy: none, full, dots")
  parser.add_argument("--chunk-size", type=int, default=128,
                      help="objective.chunk_size: positions per chunk of the logit terms (0: dense [B, T, V] logits)")
  parser.add_argument("--layer-loop", default="auto", help="the models' layer stack: auto (unroll on CPU, else "
                      "scan), scan, unroll (train.layer_loop)")
  parser.add_argument("--attention", default="xla", help="the models' attention: auto, xla, cudnn (GPU), splash (TPU)")
  parser.add_argument("--breakdown", action="store_true", help="also time teacher fwd / student fwd+bwd / optimizer")
  parser.add_argument("--profile", default=None, help="write a jax.profiler trace (perfetto) of 3 steps of the first mode here and print "
                      "its per-op and per-category summary (`profile_summary`)")
  parser.add_argument("--dump-hlo", default=None, help="write the first mode's optimized HLO text here")
  return parser


def main(argv=None) -> dict:
  args = parse_args(argv).parse_args(argv)
  import jax

  preset = common.get_preset(args.preset)
  batch, seq = args.batch or preset.batch, args.seq or preset.seq
  rows = []
  payload = {"env": common.env_info(), "command": common.command_line(), "terms": TERMS, "results": rows}
  for dtype in args.dtypes.split(","):
    if dtype not in DTYPES:
      raise SystemExit(f"--dtypes: unknown {dtype!r}; allowed: {', '.join(DTYPES)}")
    peak, peak_source = common.device_peak(dtype)
    for depth in (args.teacher_layers.split(",") if args.teacher_layers else [None]):
      setup = Setup(preset, dtype, batch=batch, seq=seq, remat=args.remat, attention=args.attention,
                    chunk_size=args.chunk_size or None, layer_loop=args.layer_loop,
                    teacher_layers=None if depth is None else int(depth))
      peak = _run_setup(args, setup, rows, payload, peak, peak_source)
  print()
  print(common.markdown_table(rows, COLUMNS))
  print(f"\npeak: {rows[0]['peak_source']}; FLOPs/step {rows[0]['flops_per_step']:.4g} "
        f"(N_teacher={rows[0]['n_teacher']:,}, N_student={rows[0]['n_student']:,}); "
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  return payload


def _run_setup(args, setup: Setup, rows: list, payload: dict, peak: float, peak_source: str) -> float:
  """Times every mode of `args.modes` on `setup`, appending a row each; returns the updated peak."""
  import jax

  dtype, preset, batch, seq = setup.dtype, setup.preset, setup.batch_size, setup.seq
  if args.breakdown:
    parts = breakdown(setup, args.steps)
    print(common.markdown_table([dict(preset=preset.name, dtype=dtype, batch=batch, seq=seq, **parts)],
                                ("preset", "dtype", "batch", "seq", *parts)), flush=True)
    payload.setdefault("breakdown_ms", {})[dtype] = parts
  for mode in args.modes.split(","):
    runner = JaxRunner(setup, mode)
    for _ in range(args.warmup):
      runner.step()
    times = common.time_calls(runner.step, args.steps)
    if jax.devices()[0].platform == "cpu":  # load drifts: the best of before and after the steps
      peak = max(peak, common.matmul_peak(dtype))
    row = result_row(setup, runner, times, peak, peak_source)
    if args.profile and not rows:
      with jax.profiler.trace(args.profile, create_perfetto_trace=True):
        for _ in range(PROFILE_STEPS):
          runner.step()
      summary = profile_summary(args.profile, runner.compiled.as_text(), PROFILE_STEPS)
      payload["profile"] = summary
      print("profile, ms per step (summed over threads):", {k: round(v) for k, v in
                                                             summary["ms_per_step_by_category"].items()})
      for op in summary["top_ops"]:
        print(f"  {op['ms_per_step']:8.1f} ms  {op['op']:36s} {op['shape'][:36]:36s} {op['op_name']}")
    if args.dump_hlo and not rows:
      with open(args.dump_hlo, "w") as f:
        f.write(runner.compiled.as_text())
    rows.append(row)
    print(common.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    common.write_json(args.out, dict(payload, results=rows))  # after every row: a timeout keeps the rest
    del runner
  return peak


if __name__ == "__main__":
  main()
