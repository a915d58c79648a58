"""`distill-jax plan CONFIG [KEY=VALUE ...] --topology v5e:4x4`: will this run fit a TPU slice?

Deviceless: with `libtpu` installed (``pip install -e ".[tpu]"``) jax describes a TPU slice
without one (`jax.experimental.topologies`), and the config's own train and eval steps are
compiled over that slice's devices with the config's mesh. XLA's memory analysis of the
compiled step gives the bytes per device. Only the models' ``config.json`` files are read
(abstract params from `jax.eval_shape`), never weights, data or tokenizers.

The report (text, and JSON with ``--json``): per device the params, optimizer state, batch,
temporaries and total against the chip's HBM; the largest global batch that fits (a bounded
search of compiles); model FLOPs per step and a roofline estimate of step time and MFU
(`distill_jax.evaluation.flops`). A plan that does not fit exits 1 with one line.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import models
from distill_jax.models import layers
from distill_jax.commands import common
from distill_jax.config import root as config_lib
from distill_jax.data import pipeline as data_lib
from distill_jax.errors import UserError, first_line
from distill_jax.evaluation import flops as flops_lib
from distill_jax.objective import objective as objective_lib
from distill_jax.training import run_setup, sharding
from distill_jax.training import state as state_lib
from distill_jax.training import step as step_lib

GIB = flops_lib.GIB
INSTALL_HINT = 'pip install -e ".[tpu]"'
DEFAULT_MAX_COMPILES = 6  # train-step compiles the batch search may spend (the first included)

# ----------------------------------------------------------------------------- topologies


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its chip and the chips along each torus axis."""

  chip: flops_lib.Chip
  dims: tuple[int, ...]

  @property
  def name(self) -> str:
    """jax's topology string, e.g. ``v5e:4x4``."""
    return f"{self.chip.name}:{'x'.join(map(str, self.dims))}"

  @property
  def num_chips(self) -> int:
    return int(np.prod(self.dims))


def _slice_dims(chips: int, ndim: int) -> tuple[int, ...]:
  """The torus of a cloud slice of `chips` chips: from ``2x2(x1)`` double the smallest axis (the last on ties)."""
  if chips == 1:
    return (1,) * ndim
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f"{chips} chips")
  dims = [2, 2] + [1] * (ndim - 2)
  while int(np.prod(dims)) < chips:
    smallest = min(dims)
    axis = max(i for i, d in enumerate(dims) if d == smallest)
    dims[axis] *= 2
  return tuple(dims)


def parse_topology(text: str) -> Topology:
  """A topology from jax's string (``v5e:4x4``, ``v5p:2x2x2``) or a cloud slice name (``v5e-16``,
  ``v5p-16``: a v4/v5p name counts TensorCores, two per chip).

  Raises:
    UserError: one line naming ``--topology`` and the allowed forms.
  """
  allowed = (f"--topology: expected CHIP:AxB[xC] (e.g. v5e:4x4, v5p:2x2x2) or a cloud slice name (e.g. v5e-16, "
             f"v5p-16) with CHIP one of {', '.join(flops_lib.CHIPS)}, got {text!r}")
  m = re.fullmatch(r"\s*(v\d+[a-z]?)(?:(:)([\dx]+)|-(\d+))\s*", text.lower().replace("litepod", "e"))
  if not m or m.group(1) not in flops_lib.CHIPS:
    raise UserError(allowed)
  chip = flops_lib.CHIPS[m.group(1)]
  if m.group(2):
    try:
      dims = tuple(int(d) for d in m.group(3).split("x"))
    except ValueError:
      raise UserError(allowed) from None
    if len(dims) != chip.dims or min(dims) < 1:
      raise UserError(f"--topology: {chip.name} slices have {chip.dims} axes (e.g. "
                      f"{'4x4' if chip.dims == 2 else '2x2x2'}), got {text!r}")
    return Topology(chip, dims)
  count = int(m.group(4))
  if count % chip.cores_per_chip:
    raise UserError(f"--topology: {text!r} counts TensorCores, {chip.cores_per_chip} per {chip.name} chip")
  try:
    return Topology(chip, _slice_dims(count // chip.cores_per_chip, chip.dims))
  except ValueError:
    raise UserError(f"--topology: {text!r} is not a {chip.name} slice size (1, 4, 8, 16, ... chips"
                    f"{', counted as TensorCores' if chip.cores_per_chip > 1 else ''})") from None


def topology_devices(topology: Topology) -> list:
  """Compile-only devices of the slice (one per chip: v4 and v5p as megacore)."""
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"plan: libtpu is not installed; deviceless TPU planning needs it: {INSTALL_HINT}")
  # libtpu's start-up asks the cloud metadata server otherwise (and warns at length); several
  # planning processes on one machine may load it at once (it takes a lockfile otherwise).
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", f"{topology.chip.name}-{topology.num_chips}")):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies  # only here: it loads libtpu

  host = tuple(min(d, 2) for d in topology.dims) + (1,) * (3 - len(topology.dims))
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.name, chips_per_host_bounds=host, num_slices=1,
        chip_config_name="megacore" if topology.chip.cores_per_chip > 1 else "default")
  except Exception as e:  # libtpu's errors carry no stable type
    raise UserError(f"--topology: libtpu cannot describe {topology.name}: {first_line(e)}") from e
  return list(desc.devices)


# ----------------------------------------------------------------------------- abstract models


def _abstract(build: Callable[[], models.Model], param_dtype: str) -> models.Model:
  """`build()` (a `model_from_config` call) under `jax.eval_shape`: the model with param shapes only."""
  holder = {}

  def params():
    holder["model"] = build()
    return holder["model"].params

  floating = jnp.dtype(param_dtype)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, floating if jnp.issubdtype(x.dtype, jnp.floating)
                                                       else x.dtype), jax.eval_shape(params))
  return dataclasses.replace(holder["model"], params=shapes)


def _model_config(path: str, field: str) -> Any:
  path = config_lib.resolve_model_path(path, field)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise UserError(f"{field}: plan reads {os.path.join(path, 'config.json')}, which does not exist (a directory "
                    f"holding the model's config.json is enough)")
  with run_setup.field_errors(field):
    return models.load_config(path)


def abstract_models(cfg: config_lib.Config) -> tuple[models.Model, dict[str, models.Model]]:
  """The student and teachers of `cfg` as they would be built for a run, with abstract params."""
  teachers = {}
  for name, tc in cfg.teachers.items():
    if tc.cache is not None:
      raise UserError(f"teachers.{name}.cache: plan compiles live teachers only (give teachers.{name}.path)")
    if tc.path == config_lib.SELF_TEACHER:
      continue
    field = f"teachers.{name}.path"
    hf = _model_config(tc.path, field)
    with run_setup.field_errors(field):
      teachers[name] = _abstract(functools.partial(models.model_from_config, hf, tc.task, dtype=tc.dtype),
                                 tc.param_dtype)
  s = cfg.student
  source = s.teacher or next((n for n, t in cfg.teachers.items() if t.path != config_lib.SELF_TEACHER), None)
  overrides = dict(s.config)
  if s.num_labels is not None:
    overrides["num_labels"] = s.num_labels
  if s.init == "path":
    hf = _model_config(s.path, "student.path")
    task = s.task or (cfg.teachers[source].task if source else "causal_lm")
  elif source is None:
    raise UserError("student.init: self-distillation needs student.init=path (a checkpoint to start from)")
  elif s.init == "from_teacher":  # the teacher's config with a subset of its layers (weights don't matter here)
    teacher = teachers[source]
    depth = teacher.num_layers
    n = len(s.layers) if s.layers else (s.num_layers or depth)
    layers = tuple(s.layers) or tuple(i * (depth // n) for i in range(n))
    if not 1 <= n <= depth or max(layers) >= depth:
      raise UserError(f"student.num_layers: {n} (layers {list(layers)}) is out of range 1..{depth} (the teacher's)")
    hf, task = models.student_config(teacher.hf_config, layers, **overrides), s.task or teacher.task
    overrides = {}
  else:  # "config"
    hf, task = teachers[source].hf_config, s.task or teachers[source].task
    if s.num_layers is not None:
      overrides.setdefault("num_hidden_layers", s.num_layers)
    if s.hidden_size is not None:
      overrides.setdefault("hidden_size", s.hidden_size)
  with run_setup.field_errors("student.path" if s.init == "path" else "student.config"):
    student = _abstract(functools.partial(models.model_from_config, hf, task, dtype=s.dtype, remat=s.remat,
                                          **overrides), s.param_dtype)
  for name, tc in cfg.teachers.items():
    if tc.path == config_lib.SELF_TEACHER:
      teachers[name] = dataclasses.replace(student, params=jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(tc.param_dtype)), student.params))
  return student, teachers


def model_shape(model: models.Model) -> flops_lib.ModelShape:
  """The FLOPs-relevant numbers of a decoder (or encoder) `model`."""
  spec = model.spec
  windows = tuple(getattr(spec, "layer_windows", ()) or ())
  return flops_lib.ModelShape(
      vocab_size=int(spec.vocab_size), hidden_size=int(spec.hidden_size), num_layers=int(spec.num_layers),
      num_heads=int(spec.num_heads), num_kv_heads=int(getattr(spec, "num_kv_heads", spec.num_heads)),
      head_dim=int(getattr(spec, "head_dim", spec.hidden_size // spec.num_heads)),
      intermediate_size=int(spec.intermediate_size),
      gated_mlp=model.family in models.DECODER_FAMILIES and not getattr(spec, "is_gpt2", False),
      layer_windows=windows)


# ----------------------------------------------------------------------------- the compiled steps


@dataclasses.dataclass
class Planned:
  """Everything the compiles need, built once from the config."""

  cfg: config_lib.Config
  topology: Topology
  mesh: Any
  student: Any
  teachers: dict
  step: step_lib.JitStep
  state: Any  # abstract TrainState
  teacher_params: dict  # abstract
  task: str
  attention: str  # the models' attention_impl


def build_plan(cfg: config_lib.Config, topology: Topology, devices: Sequence[Any]) -> Planned:
  """Models, objective, optimizer, mesh over `devices` and the jitted steps, as `run_setup.build_run` makes them."""
  if cfg.mesh.mode != "jit":
    raise UserError("mesh.mode: plan compiles the jit step over the slice's mesh; set mesh.mode=jit")
  if cfg.objective.on_policy is not None:
    raise UserError("objective.on_policy: plan does not compile on-policy sampling yet; plan without it")
  run_setup.set_precision(cfg)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
  student, teachers = abstract_models(cfg)
  objective = objective_lib.build_objective(cfg.resolved_terms(), student=student, teachers=teachers,
                                            chunk_size=cfg.objective.chunk_size)
  main = run_setup.main_teacher(cfg)
  if student.task in ("causal_lm", "masked_lm") and teachers[main].task == student.task:
    models.check_vocab(teachers[main], student)
  # The attention kernel the config selects on a TPU (auto: splash) and the activation constraints on the mesh.
  attention_impl = layers.resolve_attention(cfg.train.attention, devices[0].platform)
  unroll_layers = layers.resolve_layer_loop(cfg.train.layer_loop, devices[0].platform)
  student = run_setup.runtime_model(student, attention_impl, mesh, unroll_layers)
  teachers = {n: run_setup.runtime_model(t, attention_impl, mesh, unroll_layers) for n, t in teachers.items()}
  optimizer = cfg.optimizer.build(cfg.train.steps)
  projections = jax.eval_shape(objective.init_projections, jax.random.PRNGKey(0))
  state = jax.eval_shape(functools.partial(state_lib.create_train_state, optimizer=optimizer, seed=cfg.train.seed),
                         student.params, projection_params=projections)
  teacher_params = {n: t.params for n, t in teachers.items()}
  logical = {(name,) + path: names for name, model in {**teachers, "student": student}.items()
             for path, names in models.logical_axes(model).items()}
  transform = None
  if student.task == "masked_lm":  # the masking's numbers don't change the memory; any mask id does
    transform = functools.partial(data_lib.mask_batch, mask_token_id=0, vocab_size=int(student.vocab_size),
                                  special_ids=(), prob=cfg.data.mlm_probability)
  step = step_lib.make_jit_step(student_apply=student.apply, teacher_applies={n: t.apply for n, t in teachers.items()},
                                objective=objective, optimizer=optimizer, batch_transform=transform, mesh=mesh,
                                state=state, teacher_params=teacher_params, logical=logical)
  return Planned(cfg, topology, mesh, student, teachers, step, state, teacher_params, student.task, attention_impl)


def batch_shapes(task: str, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch of the data pipeline's contract for `task`, as shapes."""
  row = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  out = {"input_ids": row, "attention_mask": row, "loss_mask": row}
  if task == "causal_lm":
    out["labels"] = row
  elif task == "sequence_classification":
    out["labels"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return out


def _device_bytes(shapes: Any, shardings: Any) -> int:
  """Bytes one device holds of `shapes` laid out by `shardings` (the largest shard of each leaf)."""
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, s: int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize, shapes, shardings))
  return int(sum(leaves))


@dataclasses.dataclass
class Memory:
  """Per-device bytes of one compiled step (None where XLA refused to compile: out of memory)."""

  batch: int
  total: Optional[int]
  temporaries: Optional[int]
  arguments: Optional[int]
  outputs: Optional[int]
  aliased: Optional[int]
  code: Optional[int]
  compile_s: float
  error: Optional[str] = None

  def fits(self, hbm: int) -> bool:
    return self.total is not None and self.total <= hbm


_EXHAUSTED = re.compile(r"(?i)resource_exhausted|out of memory|exceeds? .*memory|hbm")
_TEMPS_NEEDED = re.compile(r"temporaries \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def oom_temporaries(message: str) -> Optional[int]:
  """The temporaries' bytes XLA's out-of-memory error names ("... HLO temporaries (98.46G) exceeds ..."), or None."""
  needed = _TEMPS_NEEDED.search(message)
  return int(float(needed.group(1)) * _UNITS[needed.group(2)]) if needed else None


def compile_memory(planned: Planned, batch: int, *, train: bool = True) -> Memory:
  """Compiles the train (or eval) step at global `batch` and reads XLA's per-device memory analysis."""
  fn = planned.step.train.jitted if train else planned.step.eval.jitted
  seq = planned.cfg.data.max_length
  start = time.perf_counter()
  try:
    compiled = fn.lower(planned.state, planned.teacher_params, batch_shapes(planned.task, batch, seq)).compile()
  except Exception as e:  # XLA raises its own runtime error type; only out-of-memory is an answer
    if not _EXHAUSTED.search(str(e)):
      raise
    return Memory(batch, None, oom_temporaries(str(e)), None, None, None, None, time.perf_counter() - start, first_line(e)[:300])
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return Memory(batch, int(total), int(m.temp_size_in_bytes), int(m.argument_size_in_bytes),
                int(m.output_size_in_bytes), int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
                time.perf_counter() - start)


def search_batch(measure: Callable[[int], Memory], start: int, shards: int, hbm: int, max_compiles: int,
                 known: Optional[Mapping[int, Memory]] = None) -> tuple[int, Optional[int], dict[int, Memory]]:
  """The largest global batch (a multiple of `shards`) whose step fits `hbm`, in at most `max_compiles` compiles.

  Doubles (or halves) from `start` until the answer is bracketed, then guesses by linear
  interpolation of the measured totals (temporaries grow about linearly with the batch),
  falling back to bisection.

  Returns:
    ``(largest batch seen to fit (0: none), smallest batch seen not to fit (None: none), {batch: Memory})``.
  """
  seen = dict(known or {})

  def get(b: int) -> Memory:
    if b not in seen:
      seen[b] = measure(b)
    return seen[b]

  def bounds() -> tuple[int, Optional[int]]:
    fit = [b for b, m in seen.items() if m.fits(hbm)]
    miss = [b for b, m in seen.items() if not m.fits(hbm)]
    return max(fit, default=0), min(miss, default=None)

  get(start)
  while len(seen) < max_compiles + len(known or {}):
    lo, hi = bounds()
    if hi is not None and hi - lo <= shards:
      break
    if hi is None:
      nxt = lo * 2
    elif lo == 0:
      if hi <= shards:
        break
      nxt = max(shards, (hi // 2) // shards * shards)
    else:
      nxt = _interpolate(seen, lo, hi, shards, hbm)
    if nxt in seen:
      break
    get(nxt)
  lo, hi = bounds()
  return lo, hi, seen


def _interpolate(seen: Mapping[int, Memory], lo: int, hi: int, shards: int, hbm: int) -> int:
  """The next batch to try strictly between `lo` (fits) and `hi` (doesn't): linear in the totals, else the middle."""
  mid = (lo + hi) // 2 // shards * shards
  guess = mid
  a, b = seen[lo], seen[hi]
  if b.total is not None and b.total > a.total:
    slope = (b.total - a.total) / (hi - lo)
    guess = int((lo + (hbm - a.total) / slope) // shards * shards)
  else:  # `hi` did not compile: the slope from the two largest fitting points, if there are two
    fits = sorted(k for k, m in seen.items() if m.total is not None and k <= lo)
    if len(fits) >= 2 and seen[fits[-1]].total > seen[fits[-2]].total:
      p, q = fits[-2], fits[-1]
      slope = (seen[q].total - seen[p].total) / (q - p)
      guess = int((lo + (hbm - a.total) / slope) // shards * shards)
  guess = min(max(guess, lo + shards), hi - shards)
  return guess if lo < guess < hi else mid


# ----------------------------------------------------------------------------- the report


def _gib(x: Optional[float]) -> Optional[float]:
  return None if x is None else round(x / GIB, 4)


def plan(cfg: config_lib.Config, topology: Topology, *, search: bool = True,
         max_compiles: int = DEFAULT_MAX_COMPILES, devices: Optional[Sequence[Any]] = None,
         hbm_gib: Optional[float] = None, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Compiles the config's train and eval steps for `topology` and returns the report (JSON-ready).

  Args:
    cfg: the run's config.
    topology: from `parse_topology`.
    search: search the largest global batch that fits (else compile the config's only).
    max_compiles: train-step compiles the search may spend, the config's batch included.
    devices: the slice's devices (default: `topology_devices`).
    hbm_gib: the budget per device (default: the chip's HBM).
    log: called with a line per compile.
  """
  devices = topology_devices(topology) if devices is None else devices
  planned = build_plan(cfg, topology, devices)
  mesh, chip = planned.mesh, topology.chip
  hbm = chip.hbm_bytes if hbm_gib is None else int(hbm_gib * GIB)
  shards = sharding.num_batch_shards(mesh)
  batch, seq = cfg.data.global_batch_size, cfg.data.max_length
  sharding.check_batch_size(batch, mesh)
  eval_batch = cfg.data.eval_batch_size or batch
  sharding.check_batch_size(eval_batch, mesh, field="data.eval_batch_size")

  def measure(b: int) -> Memory:
    m = compile_memory(planned, b)
    log(f"  compiled train step at batch {b}: "
        + (f"{m.total / GIB:.2f} GiB per device" if m.total is not None else "out of memory")
        + f" ({m.compile_s:.0f} s)")
    return m

  train = measure(batch)
  seen = {batch: train}
  lo = batch if train.fits(hbm) else 0
  hi = None if train.fits(hbm) else batch
  if search:
    lo, hi, seen = search_batch(measure, batch, shards, hbm, max_compiles - 1, known=seen)
  evaluation = compile_memory(planned, eval_batch, train=False)
  log(f"  compiled eval step at batch {eval_batch}: "
      + (f"{evaluation.total / GIB:.2f} GiB per device" if evaluation.total is not None else "out of memory"))

  st = planned.step
  params_b = _device_bytes(planned.state.params, st.state_sharding.params)
  student_b = _device_bytes(planned.state.params["student"], st.state_sharding.params["student"])
  opt_b = _device_bytes(planned.state.opt_state, st.state_sharding.opt_state)
  teacher_b = _device_bytes(planned.teacher_params, st.teacher_sharding)
  batch_b = _device_bytes(batch_shapes(planned.task, batch, seq),
                          {k: st.batch_sharding for k in batch_shapes(planned.task, batch, seq)})

  s_shape = model_shape(planned.student)
  t_shapes = [model_shape(planned.teachers[n]) for n in planned.teachers]
  remat = cfg.student.remat
  step_flops = flops_lib.step_flops(t_shapes, s_shape, batch, seq, remat)
  tensor = mesh.shape["tensor"]
  nbytes = lambda tree, dtype=None: sum(int(np.prod(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize  # noqa: E731
                                        for x in jax.tree.leaves(tree))
  hbm_traffic = flops_lib.step_hbm_bytes(
      teacher_weight_bytes=nbytes(planned.teacher_params) / tensor,
      student_weight_bytes=nbytes(planned.state.params["student"], cfg.student.dtype) / tensor,
      student_passes=2 + (remat != "none"), state_bytes=params_b + opt_b)
  roof = flops_lib.roofline(step_flops, chip, topology.num_chips, hbm_traffic)
  fits = train.fits(hbm) and evaluation.fits(hbm)
  per_device = {"student_params": student_b, "teacher_params": teacher_b, "params": params_b + teacher_b,
                "optimizer": opt_b, "batch": batch_b, "temporaries": train.temporaries, "total": train.total,
                "eval_total": evaluation.total, "hbm": hbm}
  return {
      "topology": topology.name, "chip": chip.name, "device_kind": chip.device_kind, "chips": topology.num_chips,
      "hbm_gib": chip.hbm_gib, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch": batch, "seq_len": seq, "eval_batch": eval_batch, "remat": remat,
      "attention": planned.attention,
      "student": {"params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(planned.student.params))),
                  "dtype": cfg.student.dtype, "param_dtype": cfg.student.param_dtype},
      "teachers": {n: {"params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t.params))),
                       "dtype": cfg.teachers[n].dtype, "param_dtype": cfg.teachers[n].param_dtype}
                   for n, t in planned.teachers.items()},
      "per_device_gib": {k: _gib(v) for k, v in per_device.items()},
      "per_device_bytes": per_device,
      "fits": fits, "train_fits": train.fits(hbm), "eval_fits": evaluation.fits(hbm),
      "largest_fitting_batch": lo, "smallest_failing_batch": hi, "batch_shards": shards, "searched": search,
      "search": {str(b): {"total_gib": _gib(m.total), "fits": m.fits(hbm), "compile_s": round(m.compile_s, 1),
                          **({"error": m.error} if m.error else {})} for b, m in sorted(seen.items())},
      "flops": {"model_per_step": step_flops.model, "teacher_forward": step_flops.teacher_forward,
                "student_forward_backward": step_flops.student_forward_backward,
                "remat_recompute": step_flops.recompute, "hardware_per_step": step_flops.hardware,
                "counting": "MaxText (6·N·tokens style, causal attention), not XLA cost analysis"},
      "roofline_estimate": {"step_s": roof.step_s, "compute_s": roof.compute_s, "memory_s": roof.memory_s,
                            "bound": roof.bound, "mfu": roof.mfu, "tokens_per_s": batch * seq / roof.step_s,
                            "note": f"estimate from {chip.name}'s published {chip.bf16_tflops:g} TFLOP/s bf16 and "
                                    f"{chip.hbm_gbps:g} GB/s HBM; weights + optimizer traffic only, ICI not "
                                    f"modelled"},
  }


def knobs(cfg: config_lib.Config) -> str:
  m = cfg.mesh
  return (f"knobs: mesh (data,fsdp,tensor = {m.data},{m.fsdp},{m.tensor}), student.remat ({cfg.student.remat}), "
          f"data.global_batch_size ({cfg.data.global_batch_size}), data.max_length ({cfg.data.max_length})")


def not_fit_line(report: Mapping[str, Any], cfg: config_lib.Config) -> str:
  """The one line of a plan that does not fit."""
  g = report["per_device_gib"]
  step = "train" if not report["train_fits"] else "eval"
  need = g["total"] if step == "train" else g["eval_total"]
  temps = g.get("temporaries") if step == "train" else None
  need_s = (f"{need:.1f} GiB" if need is not None else
            f"over {temps:.1f} GiB of temporaries" if temps else "more than XLA would compile")
  lo = report["largest_fitting_batch"]
  if lo:
    largest = f"largest global batch that fits: {lo}"
  elif report.get("searched", True):
    largest = f"no global batch fits (down to {report['batch_shards']}, one per batch shard)"
  else:
    largest = "largest global batch not searched (--no-search)"
  return (f"plan: does not fit: the {step} step needs {need_s} per device of {g['hbm']:g} GiB on "
          f"{report['topology']} at global batch {report['global_batch']} x {report['seq_len']}; {largest}; "
          f"{knobs(cfg)}")


def format_report(r: Mapping[str, Any]) -> str:
  g, f, e = r["per_device_gib"], r["flops"], r["roofline_estimate"]
  mesh = r["mesh"]
  teachers = ", ".join(f"{n} {t['params'] / 1e9:.2f}B ({t['param_dtype']})" for n, t in r["teachers"].items())
  lo, hi = r["largest_fitting_batch"], r["smallest_failing_batch"]
  fmt = lambda x: "n/a (out of memory)" if x is None else f"{x:7.2f} GiB"  # noqa: E731
  if not r["searched"]:
    largest = f">= {lo}, not searched (--no-search)" if lo else "not searched (--no-search)"
  elif lo and hi:
    largest = f"{lo}" + (" (exact)" if hi - lo <= r["batch_shards"] else f" (< {hi} does not fit)")
  elif lo:
    largest = f">= {lo} (the search stopped there)"
  else:
    largest = "none"
  lines = [
      f"plan on {r['topology']}: {r['chips']} x {r['device_kind']} ({r['hbm_gib']:g} GiB HBM each), mesh "
      f"data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}",
      f"student {r['student']['params'] / 1e9:.2f}B params ({r['student']['param_dtype']}, compute "
      f"{r['student']['dtype']}, remat {r['remat']}); teachers: {teachers}; attention {r['attention']}",
      f"train step, global batch {r['global_batch']} x {r['seq_len']}, per device:",
      f"  params       {fmt(g['params'])}  (student {g['student_params']:.2f}, teacher {g['teacher_params']:.2f})",
      f"  optimizer    {fmt(g['optimizer'])}",
      f"  batch        {fmt(g['batch'])}",
      f"  temporaries  {fmt(g['temporaries'])}" + ("  (XLA: out of memory; the temporaries alone exceed HBM)"
                                                     if g["total"] is None and g["temporaries"] else ""),
      f"  total        {fmt(g['total'])} of {g['hbm']:g} GiB: {'fits' if r['train_fits'] else 'DOES NOT FIT'}",
      f"eval step, global batch {r['eval_batch']}: {fmt(g['eval_total'])}: "
      f"{'fits' if r['eval_fits'] else 'DOES NOT FIT'}",
      f"largest global batch that fits (multiples of {r['batch_shards']}): {largest}; compiled: "
      + ", ".join(f"{b} ({'fits' if m['fits'] else 'no'})" for b, m in r["search"].items()),
      f"model FLOPs per step: {f['model_per_step']:.3e} (teacher forward {f['teacher_forward']:.3e}, student "
      f"forward+backward {f['student_forward_backward']:.3e}); remat recompute {f['remat_recompute']:.3e} more",
      f"roofline ESTIMATE: {e['step_s']:.3f} s/step ({e['bound']}-bound), {e['tokens_per_s']:,.0f} tokens/s, "
      f"MFU {100 * e['mfu']:.0f}% ({e['note']})",
  ]
  return "\n".join(lines)


def main(items: Sequence[str], topology: str, *, json_out: Optional[str] = None, search: bool = True,
         max_compiles: int = DEFAULT_MAX_COMPILES, hbm_gib: Optional[float] = None) -> int:
  """`distill-jax plan`: prints the report; 0 when the train and eval steps fit, else 1 with one line on stderr."""
  cfg = common.load_command_config(items)
  topo = parse_topology(topology)
  if max_compiles < 1:
    raise UserError(f"--max-compiles: must be >= 1, got {max_compiles}")
  if hbm_gib is not None and not hbm_gib > 0:
    raise UserError(f"--hbm-gib: must be > 0, got {hbm_gib}")
  report = plan(cfg, topo, search=search, max_compiles=max_compiles, hbm_gib=hbm_gib,
                log=lambda s: print(s, flush=True))
  print(format_report(report), flush=True)
  if json_out:
    with open(json_out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  if not report["fits"]:
    print(not_fit_line(report, cfg), file=sys.stderr)
    return 1
  return 0
