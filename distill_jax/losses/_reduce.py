"""Masked reductions, and the mask helpers and hyperparameter checks every loss family shares.

Losses return unreduced values; callers reduce them here.  Metrics travel as
``(sum, count)`` so that they can be summed over hosts and divided once.

Hyperparameters given as Python (or NumPy) numbers are checked when the loss is called
(or traced), with a one-line ``ValueError`` naming the argument and the allowed range.  A
jax or NumPy array (e.g. a value traced under ``jit``, or a temperature schedule's output)
cannot be checked at trace time and is not: the caller must pass a valid value.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


def is_static(value: Any) -> bool:
  """Whether a hyperparameter is a concrete number (checked) rather than an array (not checked)."""
  return not isinstance(value, (jax.Array, np.ndarray))


def _show(value: Any) -> str:
  return str(value) if isinstance(value, numbers.Number) else repr(value)


def check_range(
    name: str, value: Any, *, low: float, high: float | None = None,
    low_open: bool = False, high_open: bool = False,
) -> None:
  """Raises a one-line ``ValueError`` unless a static ``value`` is a finite number in range.

  Args:
    name: the argument's name, for the message.
    value: the hyperparameter; arrays (traced or not) are not checked (see `is_static`).
    low: the lower bound.
    high: the upper bound, or ``None`` for none.
    low_open: exclude ``low`` itself.
    high_open: exclude ``high`` itself.
  """
  if not is_static(value):
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name}: {_show(value)} must be a real number")
  if not math.isfinite(value):
    raise ValueError(f"{name}: {_show(value)} must be finite")
  below = value <= low if low_open else value < low
  above = high is not None and (value >= high if high_open else value > high)
  if below or above:
    if high is None:
      allowed = f"> {low}" if low_open else f">= {low}"
    else:
      allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{name}: {_show(value)} must be {allowed}")


def check_positive_int(name: str, value: Any) -> None:
  """Raises a one-line ``ValueError`` unless ``value`` is an integer > 0 (arrays are refused)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{name}: {_show(value)} must be a positive integer")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
  """Raises a one-line ``ValueError`` unless ``value`` is one of ``allowed``."""
  if value not in tuple(allowed):
    raise ValueError(f"{name}: {_show(value)} must be one of {list(allowed)}")


def broadcast_mask(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
  """Broadcasts an optional boolean mask to ``shape`` (``None`` stays ``None``)."""
  if where is None:
    return None
  return jnp.broadcast_to(jnp.asarray(where, dtype=bool), shape)


def mask_or_ones(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array:
  """`broadcast_mask`, with ``None`` meaning every entry is kept (an all-True mask)."""
  mask = broadcast_mask(where, shape)
  return jnp.ones(shape, bool) if mask is None else mask


def mask_inputs(x: ArrayLike, mask: jax.Array | None, fill: float | int = 0) -> jax.Array:
  """Replaces masked entries of ``x`` by ``fill``; trailing axes of ``x`` beyond ``mask`` broadcast.

  Applied to the *inputs* of a loss so that NaN/inf at masked positions never reach an
  operation whose gradient could turn ``0 * inf`` into NaN.
  """
  x = jnp.asarray(x)
  if mask is None:
    return x
  mask = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
  return jnp.where(mask, x, jnp.asarray(fill, x.dtype))


def mask_outputs(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Sets masked loss values to exactly zero (their gradient is zero too)."""
  if mask is None:
    return values
  return jnp.where(mask, values, jnp.zeros((), values.dtype))


def masked_sum_and_count(
    values: ArrayLike, where: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array]:
  """Sum of the unmasked values and their number, both float32.

  Args:
    values: unreduced loss values, any shape ``[...]``.
    where: optional boolean mask broadcastable to ``values.shape``; ``True`` keeps.

  Returns:
    ``(sum, count)``, two float32 scalars. Masked entries contribute exactly 0 to the
    sum (and get zero gradient) even when they are NaN or inf.
  """
  values = jnp.asarray(values, dtype=jnp.float32)
  mask = broadcast_mask(where, values.shape)
  if mask is None:
    return jnp.sum(values), jnp.asarray(values.size, dtype=jnp.float32)
  return jnp.sum(mask_outputs(values, mask)), jnp.sum(mask, dtype=jnp.float32)


def masked_mean(values: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
  """Mean of the unmasked values, float32; 0 (not NaN) when everything is masked.

  Args:
    values: unreduced loss values, any shape ``[...]``.
    where: optional boolean mask broadcastable to ``values.shape``; ``True`` keeps.

  Returns:
    A float32 scalar :math:`\\sum_i m_i v_i / \\max(1, \\sum_i m_i)`.
  """
  total, count = masked_sum_and_count(values, where)
  return total / jnp.maximum(count, 1.0)
