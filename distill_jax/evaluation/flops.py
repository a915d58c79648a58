"""Model FLOPs of a distillation step and a roofline estimate of its time on a TPU chip.

Pure arithmetic, no JAX: `distill-jax plan` (distill_jax/commands/plan.py) feeds it the
configs' shapes. FLOPs are counted the way MaxText's ``calculate_tflops_training_per_device``
counts them (XLA's cost analysis counts a scanned layer body once, so it is not used):

* per layer and token: ``2 · d · (q + 2·kv) · h`` (q/k/v), ``2 · q · h · d`` (output),
  ``2 · d · f · m`` (MLP, ``m`` = 3 matrices when gated, 2 else), and attention
  ``4 · q · h · K`` where ``K`` is the mean number of keys a causal query sees
  (``(T + 1) / 2``, fewer in a sliding-window layer);
* the head (unembedding): ``2 · d · V`` per token;
* a forward pass is 1×, forward + backward is 3×; the teacher only runs forward; the
  student's remat policy recomputes in the backward pass (``full``: the layers' forward
  again, ``dots``: the attention score/value products), counted apart as ``recompute``.

Model FLOPs (MFU's numerator) leave the recompute out; the roofline time includes it.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published numbers of one TPU chip (one JAX device: v4 and v5p run as megacore).

  Attributes:
    name: the topology prefix (``v5e``).
    device_kind: what ``jax.Device.device_kind`` says for it.
    hbm_gib: HBM per chip, GiB.
    bf16_tflops: peak bf16 dense matmul throughput, TFLOP/s.
    hbm_gbps: HBM bandwidth, GB/s.
    cores_per_chip: TensorCores per chip (cloud slice names of v4/v5p count cores).
    dims: 2 (a 2-D torus, ``4x4``) or 3 (``2x2x2``).
  """

  name: str
  device_kind: str
  hbm_gib: float
  bf16_tflops: float
  hbm_gbps: float
  cores_per_chip: int
  dims: int

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * GIB)


# cloud.google.com/tpu/docs/system-architecture-tpu-vm (v4, v5e, v5p, v6e pages).
CHIPS: Mapping[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32, 275, 1228, 2, 3),
    "v5e": Chip("v5e", "TPU v5 lite", 16, 197, 819, 1, 2),
    "v5p": Chip("v5p", "TPU v5", 95, 459, 2765, 2, 3),
    "v6e": Chip("v6e", "TPU v6 lite", 32, 918, 1640, 1, 2),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The numbers of a decoder that its FLOPs depend on.

  Attributes:
    vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size:
      as in the HF config.
    gated_mlp: three MLP matrices (gate, up, down) rather than two.
    layer_windows: per layer, the sliding window, or None for a global layer (empty: all global).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  gated_mlp: bool = True
  layer_windows: tuple[Optional[int], ...] = ()

  def windows(self) -> tuple[Optional[int], ...]:
    return self.layer_windows or (None,) * self.num_layers


def keys_per_query(seq_len: int, window: Optional[int] = None) -> float:
  """Mean number of keys a causal query attends to over ``seq_len`` positions.

  Query ``t`` (1-based) sees ``min(t, window)`` keys: ``(T + 1) / 2`` for a global layer.
  """
  t = int(seq_len)
  if window is None or window >= t:
    return (t + 1) / 2
  w = int(window)
  return (w * (w + 1) / 2 + (t - w) * w) / t


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
  """FLOPs of one forward pass over a batch, by part."""

  layers_weights: float  # q/k/v, output and MLP matmuls of every layer
  layers_attention: float  # score and value products of every layer
  head: float  # the unembedding

  @property
  def layers(self) -> float:
    return self.layers_weights + self.layers_attention

  @property
  def total(self) -> float:
    return self.layers + self.head


def forward_flops(shape: ModelShape, batch: int, seq_len: int) -> ForwardFlops:
  """FLOPs of one forward pass of ``batch × seq_len`` tokens (MaxText's counting, causal attention)."""
  tokens = float(batch) * seq_len
  d, h, q, kv = shape.hidden_size, shape.head_dim, shape.num_heads, shape.num_kv_heads
  mats = 3 if shape.gated_mlp else 2
  per_token = 2 * d * (q + 2 * kv) * h + 2 * q * h * d + 2 * d * shape.intermediate_size * mats
  weights = tokens * per_token * shape.num_layers
  attention = sum(4 * tokens * q * h * keys_per_query(seq_len, w) for w in shape.windows())
  head = tokens * 2 * d * shape.vocab_size
  return ForwardFlops(weights, attention, head)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one distillation step over the global batch."""

  teacher_forward: float
  student_forward_backward: float
  recompute: float

  @property
  def model(self) -> float:
    """Model FLOPs (MFU's numerator): teacher forward + student forward and backward."""
    return self.teacher_forward + self.student_forward_backward

  @property
  def hardware(self) -> float:
    """What the chips execute: model FLOPs + remat recompute."""
    return self.model + self.recompute


def recompute_flops(student: ForwardFlops, remat: str) -> float:
  """FLOPs the student's remat policy recomputes in the backward pass.

  ``full`` runs the layers' forward again; ``dots`` saves the weight matmuls and recomputes
  the attention products (they have batch dimensions); ``none`` saves everything; any other
  (named) policy is counted as ``full``, an upper bound.
  """
  if remat == "none":
    return 0.0
  if remat == "dots":
    return student.layers_attention
  return student.layers


def step_flops(teachers: Sequence[ModelShape], student: ModelShape, batch: int, seq_len: int,
               remat: str = "none") -> StepFlops:
  """Teacher forward(s) + student forward and backward (3×) + the student's remat recompute."""
  t = sum(forward_flops(s, batch, seq_len).total for s in teachers)
  s = forward_flops(student, batch, seq_len)
  return StepFlops(t, 3 * s.total, recompute_flops(s, remat))


def step_hbm_bytes(*, teacher_weight_bytes: float, student_weight_bytes: float, student_passes: int,
                   state_bytes: float) -> float:
  """HBM bytes one device moves per step for weights and optimizer state (activations not counted).

  Args:
    teacher_weight_bytes: the teacher weights a device reads per forward (its tensor shard of
      the whole model: fsdp shards are gathered before use).
    student_weight_bytes: the same for the student, in its compute dtype.
    student_passes: reads of the student weights (forward, backward, and a remat forward).
    state_bytes: this device's params + optimizer state (read and written by the update).
  """
  return teacher_weight_bytes + student_passes * student_weight_bytes + 2 * state_bytes


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A roofline estimate of one step: the slower of compute and HBM traffic (ICI not modelled)."""

  compute_s: float
  memory_s: float
  mfu: float

  @property
  def step_s(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def bound(self) -> str:
    return "compute" if self.compute_s >= self.memory_s else "memory"


def roofline(flops: StepFlops, chip: Chip, num_chips: int, hbm_bytes_per_device: float) -> Roofline:
  """Step time ``max(hardware FLOPs / (chips · peak), bytes / bandwidth)`` and MFU = model FLOPs / (time · chips · peak)."""
  peak = chip.bf16_tflops * 1e12
  compute_s = flops.hardware / (num_chips * peak)
  memory_s = hbm_bytes_per_device / (chip.hbm_gbps * 1e9)
  step_s = max(compute_s, memory_s)
  return Roofline(compute_s, memory_s, flops.model / (step_s * num_chips * peak) if step_s > 0 else 0.0)
