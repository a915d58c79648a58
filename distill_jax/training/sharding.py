"""Device meshes, parameter sharding rules and multi-host batch placement.

One `Mesh` with axes ``("data", "fsdp", "tensor")`` serves every layout: the batch is
split over ``data`` and ``fsdp``; model parameters are placed by their logical axis names
(`LOGICAL_RULES`: the embedding width over ``fsdp``, heads, MLP width and vocabulary over
``tensor``), so a teacher too large for one device is sharded, not replicated.  Leaves
without names (projections, toy params) follow a size rule that looks only at the shape.
Adam moments find their param's names by path, so they are laid out like their params.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical axis name of a param dimension -> mesh axis (models/layers.py names them).
LOGICAL_RULES = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}
# Leaves with fewer elements are replicated: sharding them saves nothing and costs a gather.
DEFAULT_MIN_SHARD_SIZE = 2**18


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ``("data", "fsdp", "tensor")`` mesh.

  Args:
    data: size of the data-parallel axis; ``-1`` takes every device left after the others.
    fsdp: size of the parameter-sharding axis (params and optimizer state split over it).
    tensor: size of the tensor-parallel axis (attention heads, MLP width, vocabulary).
    devices: devices to use (default: all devices of all processes, process-major, so that
      each process's devices hold a contiguous slice of the batch).

  Returns:
    A `Mesh` of shape ``[data, fsdp, tensor]``.

  Raises:
    ValueError: naming ``mesh.data`` / ``mesh.fsdp`` / ``mesh.tensor`` when the axes do not
      multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if size < 1:
      raise ValueError(f"mesh.{name}={size} must be >= 1")
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f"mesh.fsdp × mesh.tensor = {fsdp}×{tensor} does not divide the {n} devices")
    data = n // (fsdp * tensor)
  if data < 1:
    raise ValueError(f"mesh.data={data} must be >= 1 or -1 (all remaining devices)")
  if data * fsdp * tensor != n:
    raise ValueError(f"mesh.data × mesh.fsdp × mesh.tensor = {data}×{fsdp}×{tensor} = {data * fsdp * tensor} "
                     f"does not equal the {n} devices")
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp, tensor), MESH_AXES)


def param_spec(shape: Sequence[int], fsdp_size: int, *, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
  """The size rule: split a large matrix on its largest axis divisible by ``fsdp_size``.

  Args:
    shape: the leaf's shape.
    fsdp_size: number of devices along ``fsdp``.
    min_size: leaves with fewer elements (and every leaf of rank < 2) are replicated.

  Returns:
    A `PartitionSpec` with ``"fsdp"`` on at most one axis.
  """
  shape = tuple(shape)
  if fsdp_size <= 1 or len(shape) < 2 or int(np.prod(shape)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], a)):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def logical_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> P:
  """The `PartitionSpec` of a leaf with logical axis `names` under `LOGICAL_RULES`.

  A dimension goes to its mesh axis when that axis has more than one device, divides the
  dimension and is not used by an earlier dimension; otherwise it is replicated.
  """
  spec, used = [], set()
  for name, size in zip(names, shape):
    axis = LOGICAL_RULES.get(name)
    if axis is not None and axis not in used and mesh.shape.get(axis, 1) > 1 and size % mesh.shape[axis] == 0:
      spec.append(axis)
      used.add(axis)
    else:
      spec.append(None)
  return P(*spec)


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_shardings(tree: Any, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SHARD_SIZE,
                    logical: Optional[Mapping[tuple[str, ...], Sequence[Optional[str]]]] = None) -> Any:
  """`NamedSharding` for every leaf of ``tree`` (arrays or `jax.ShapeDtypeStruct`s).

  Args:
    tree: params, a `TrainState` or teacher params (or their shapes).
    mesh: the mesh.
    min_size: leaves with fewer elements are replicated.
    logical: param path (a tuple of keys, e.g. ``("student", "layers", "mlp", "kernel")``)
      -> logical axis names.  A leaf whose path *ends* with such a path (a param, or its
      Adam moments deep inside the optimizer state) is placed by `logical_spec`; any other
      leaf by the size rule over ``fsdp``.
  """
  logical = dict(logical or {})
  longest = max((len(k) for k in logical), default=0)
  fsdp_size = mesh.shape["fsdp"]

  def place(path, x):
    shape = np.shape(x)
    keys = _path_keys(path)
    names = next((logical[keys[-n:]] for n in range(min(longest, len(keys)), 0, -1) if keys[-n:] in logical), None)
    if names is not None and len(names) == len(shape):
      spec = logical_spec(names, shape, mesh) if int(np.prod(shape)) >= min_size else P()
    else:
      spec = param_spec(shape, fsdp_size, min_size=min_size)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(place, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``("data", "fsdp")``, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch_size: int, mesh: Mesh, *, field: str = "data.global_batch_size") -> None:
  """One-line ValueError naming ``field`` when the batch cannot be split over the mesh."""
  shards = num_batch_shards(mesh)
  if global_batch_size % shards:
    raise ValueError(f"{field}={global_batch_size} is not divisible by the {shards} batch shards "
                     f"(mesh.data={mesh.shape['data']} × mesh.fsdp={mesh.shape['fsdp']})")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a batch on the mesh; each process passes only its local slice.

  With one process the local slice is the global batch.  With several, process ``i``
  passes rows ``[i·b, (i+1)·b)`` of the global batch (``b`` = local batch size) and the
  result is one global `jax.Array` of ``b × process_count`` rows.

  Raises:
    ValueError: naming ``data.global_batch_size`` when the global batch does not split.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    global_rows = value.shape[0] * jax.process_count()
    check_batch_size(global_rows, mesh)
    out[key] = jax.make_array_from_process_local_data(sharding, value, (global_rows,) + value.shape[1:])
  return out


def put_global(tree: Any, shardings: Any) -> Any:
  """Places host arrays that every process holds whole (e.g. teacher params) on the mesh.

  Works with several processes too: each device's shard is cut from the local copy.
  """
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree, shardings)
