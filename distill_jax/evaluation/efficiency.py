"""Efficiency of a student against its teacher: parameters, bytes on disk and in memory, throughput."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.evaluation.metrics import apply_kwargs, outputs_for_task


def count_params(params: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def params_nbytes(params: Any) -> int:
  """Bytes taken by the parameter arrays of a pytree (in their current dtypes)."""
  return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def dir_size_bytes(path: str | os.PathLike) -> int:
  """Total size of the regular files under ``path`` (symlinks not followed)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      file_path = os.path.join(root, name)
      if not os.path.islink(file_path):
        total += os.path.getsize(file_path)
  return total


# Weight files by preference: one format's size is what a checkpoint costs to ship (an
# export holds both Flax and PyTorch copies of the same weights).
_WEIGHT_PATTERNS = ("model*.safetensors", "flax_model*.msgpack", "pytorch_model*.bin")


def weights_size_bytes(path: str | os.PathLike) -> int:
  """On-disk size of one checkpoint's weights: the first format present in `_WEIGHT_PATTERNS`.

  Falls back to `dir_size_bytes` for a directory with none of them (or a single file).
  """
  import glob

  if os.path.isdir(path):
    for pattern in _WEIGHT_PATTERNS:
      files = glob.glob(os.path.join(path, pattern))
      if files:
        return sum(os.path.getsize(f) for f in files)
  return dir_size_bytes(path)


def measure_throughput(model: Any, params: Any, batch: Mapping[str, Any], *, warmup: int = 2,
                       iters: int = 10, pooling: Optional[str] = None) -> dict[str, float]:
  """Inference throughput of ``model`` on ``batch`` on the default device.

  The forward pass (the outputs :func:`evaluate` requests for the task) is jitted; the
  first ``warmup`` calls (compilation included) are not timed; the median of ``iters``
  timed calls, each ended by ``block_until_ready``, is used.

  Args:
    model: a model with ``.task`` and ``.apply``.
    params: its params.
    batch: one batch (its real examples and tokens are what is counted).
    warmup: untimed calls first (at least 1).
    iters: timed calls (at least 1).
    pooling: forwarded to ``apply`` when not ``None``.

  Returns:
    ``{"examples_per_s", "tokens_per_s", "seconds_per_batch"}``.

  Raises:
    ValueError: `iters` < 1.
  """
  if iters < 1:
    raise ValueError(f"iters: {iters} must be >= 1 (measure_efficiency(iters=0) skips the timing)")
  kwargs = apply_kwargs(outputs_for_task(model.task), pooling)
  forward = jax.jit(lambda p, b: model.apply(p, b, **kwargs))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  for _ in range(max(warmup, 1)):
    jax.block_until_ready(forward(params, batch))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(forward(params, batch))
    times.append(time.perf_counter() - start)
  seconds = max(statistics.median(times), 1e-12)
  attention_BxT = np.asarray(batch["attention_mask"]).astype(bool)
  return {
      "examples_per_s": float(attention_BxT.any(-1).sum() / seconds),
      "tokens_per_s": float(attention_BxT.sum() / seconds),
      "seconds_per_batch": float(seconds),
  }


def measure_efficiency(student: Any, student_params: Any, teacher: Any, teacher_params: Any,
                       batch: Mapping[str, Any], *, student_dir: Optional[str] = None,
                       teacher_dir: Optional[str] = None, warmup: int = 2, iters: int = 10,
                       pooling: Optional[str] = None) -> dict[str, Any]:
  """Sizes and throughput of student and teacher, in the form :mod:`report` reads.

  Args:
    student: the student model.
    student_params: its params.
    teacher: the teacher model (``None``: its entries are ``None``).
    teacher_params: its params.
    batch: the batch to time both on.
    student_dir: the exported student's directory, for its on-disk size.
    teacher_dir: the teacher checkpoint's directory, for its on-disk size.
    warmup: see :func:`measure_throughput`.
    iters: timed calls (``eval.throughput_batches``); 0 skips the timing: neither model runs
      and the rates are None.
    pooling: forwarded to ``apply`` when not ``None``.

  Returns:
    ``{"device", "{teacher,student}_params", "{teacher,student}_param_bytes",
    "{teacher,student}_disk_bytes" (None without a dir),
    "{teacher,student}_examples_per_s", "{teacher,student}_tokens_per_s"}`` (rates None when
    `iters` is 0).
  """
  result: dict[str, Any] = {"device": jax.devices()[0].device_kind}
  for role, model, params, path in (("teacher", teacher, teacher_params, teacher_dir),
                                    ("student", student, student_params, student_dir)):
    if model is None:  # a teacher read from its cache: nothing to time or count
      result.update({f"{role}_{k}": None for k in ("params", "param_bytes", "disk_bytes", "examples_per_s",
                                                   "tokens_per_s")})
      continue
    speed = (measure_throughput(model, params, batch, warmup=warmup, iters=iters, pooling=pooling) if iters
             else {"examples_per_s": None, "tokens_per_s": None})
    result[f"{role}_params"] = count_params(params)
    result[f"{role}_param_bytes"] = params_nbytes(params)
    result[f"{role}_disk_bytes"] = weights_size_bytes(path) if path is not None else None
    result[f"{role}_examples_per_s"] = speed["examples_per_s"]
    result[f"{role}_tokens_per_s"] = speed["tokens_per_s"]
  return result
