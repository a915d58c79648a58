"""Integrity checks of a checkpointed state: leaf fingerprints and structure.

Orbax does not detect flipped bytes inside an array file (it restores wrong
values silently), so every save stores :func:`integrity_record` of the state and
every restore compares it with :func:`integrity_mismatch`. Before restoring,
:func:`structure_mismatch` compares the saved leaf paths and shapes with the
state to restore into. Both return a one-line reason (or None) and raise
nothing; :mod:`distill_jax.checkpoint.manager` turns a reason into its error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INTEGRITY_VERSION = "sum32-weighted32-v1"


# ------------------------------------------------------------------ fingerprints


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """Two uint32 sums over the bits of ``x``, independent of sharding and order."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = x.dtype.itemsize
    if width == 8:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
      bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  bits = bits.reshape(-1)
  index = jnp.arange(bits.shape[0], dtype=jnp.uint32)
  weights = index * jnp.uint32(2654435761) + jnp.uint32(1)  # Knuth multiplicative hash
  # Integer sums wrap mod 2**32 and are exact in any reduction order.
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                    jnp.sum(bits * weights, dtype=jnp.uint32)])


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_leaf_fingerprint(x) for x in leaves])


def _to_host(x: jax.Array) -> np.ndarray:
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def state_fingerprints(state: Any) -> dict[str, list[int]]:
  """``{leaf path: [sum, weighted sum]}``; one jitted reduction per device set."""
  paths_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  groups: dict[Any, list[int]] = {}
  for i, (_, leaf) in enumerate(paths_leaves):
    sharding = getattr(leaf, "sharding", None)
    devices = (tuple(sorted(d.id for d in sharding.device_set))
               if isinstance(leaf, jax.Array) and sharding is not None else None)
    groups.setdefault(devices, []).append(i)
  result: dict[str, list[int]] = {}
  for indices in groups.values():
    values = _to_host(_fingerprints([paths_leaves[i][1] for i in indices]))
    for i, (a, b) in zip(indices, values):
      result[jax.tree_util.keystr(paths_leaves[i][0])] = [int(a), int(b)]
  return result


def integrity_record(state: Any) -> dict[str, Any]:
  """The JSON record saved next to ``state``: format version and leaf fingerprints."""
  return {"version": INTEGRITY_VERSION, "leaves": state_fingerprints(state)}


def integrity_mismatch(integrity: Any, state: Any) -> str | None:
  """Why the restored ``state`` does not match its saved record, or None."""
  if not isinstance(integrity, Mapping) or integrity.get("version") != INTEGRITY_VERSION:
    return "unknown integrity record"
  actual = state_fingerprints(state)
  for key, expected in integrity["leaves"].items():
    if actual.get(key) != list(expected):
      return f"state leaf {key} does not match its saved fingerprint"
  return None


# ------------------------------------------------------------------ structure


def structure_mismatch(step_dir: Path, metadata: Any, abstract_state: Any) -> str | None:
  """Names the first leaf whose path or shape differs (a mismatch, not corruption)."""
  saved = {jax.tree_util.keystr(p): getattr(m, "shape", None)
           for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
  wanted = {jax.tree_util.keystr(p): _stored_shape(a)
            for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  saved_keys = {_plain_key(k): k for k in saved}
  for key, shape in wanted.items():
    saved_key = saved_keys.get(_plain_key(key))
    if saved_key is None:
      return (f"checkpoint {step_dir} has no state leaf {key}: the state structure changed"
              " since it was saved")
    saved_shape = saved[saved_key]
    if saved_shape is not None and tuple(saved_shape) != shape:
      return (f"checkpoint {step_dir} stores state leaf {key} with shape {tuple(saved_shape)},"
              f" the current state wants {shape}")
  return None


def _stored_shape(leaf: Any) -> tuple[int, ...]:
  """The shape Orbax stores for ``leaf`` (typed PRNG keys are stored as key data)."""
  dtype = getattr(leaf, "dtype", None)
  shape = tuple(getattr(leaf, "shape", ()))
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype)).shape)
  return shape


def _plain_key(keystr: str) -> str:
  """``.params['w']`` and ``['params']['w']`` both become ``params/w``."""
  for ch in "[]'\".":
    keystr = keystr.replace(ch, "/")
  return "/".join(p for p in keystr.split("/") if p)


__all__ = ["INTEGRITY_VERSION", "state_fingerprints", "integrity_record",
           "integrity_mismatch", "structure_mismatch"]
