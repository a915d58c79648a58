"""On-policy distillation (GKD, Agarwal et al. 2024): the student learns on its own samples.

With probability ``lmbda`` per step the train step replaces the data batch by continuations
that the student samples, with its current params, from the batch's prompts; teacher and
student then score those sequences and the logit terms cover the generated tokens only.

Prompts (causal LM): the first ``prompt_length`` tokens of each data row.  Packed rows are
full; a right-padded row shorter than that keeps its real tokens.  Either way the prompt is
left-aligned here (padding moved to the left, as `generate` needs), so any causal LM data
set works unchanged.  A row without a real token contributes nothing.

PRNG: the draw and the sampling keys come from ``fold_in(fold_in(seed_key, step), STREAM)``,
a stream of its own: dropout and data keys are those of the supervised step, and a run
(sampled tokens included) is a function of ``(seed, step)``, so exact resume still holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

# fold_in data of the on-policy stream (any constant other than the step's own use).
STREAM = 0x6B64

# (params, input_ids_BxP, attention_mask_BxP, *, rng) -> generate's dict of [B, P + N] arrays.
SampleFn = Callable[..., Mapping[str, jax.Array]]


@dataclasses.dataclass(frozen=True, eq=False)
class OnPolicy:
  """The static on-policy settings bound into the step.

  Attributes:
    lmbda: probability that a step trains on student samples (0: never, 1: always).
    prompt_length: `P`, the tokens of each row that prompt the student.
    sample: the student's sampler, e.g. `models.generate.generate` bound to its module.
  """

  lmbda: float
  prompt_length: int
  sample: SampleFn


def keys(step_key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(draw_key, sample_key)`` of a step from its key ``fold_in(state.rng, state.step)``."""
  return tuple(jax.random.split(jax.random.fold_in(step_key, STREAM)))


def draw(draw_key: jax.Array, lmbda: float) -> jax.Array:
  """Scalar bool: whether this step is on-policy (true with probability `lmbda`)."""
  return jax.random.uniform(draw_key) < lmbda


def left_aligned_prompts(input_ids_BxT: jax.Array, attention_mask_BxT: jax.Array,
                         prompt_length: int) -> tuple[jax.Array, jax.Array]:
  """The first `prompt_length` tokens of each row, left-padded.

  Args:
    input_ids_BxT: ``[B, T]`` rows whose real tokens come first (packed or right-padded).
    attention_mask_BxT: ``[B, T]`` 1 on real tokens.
    prompt_length: `P` (rows shorter than that give prompts of `T` tokens).

  Returns:
    ``(input_ids_BxP, attention_mask_BxP)`` int32, real tokens at the right end, 0 elsewhere.
  """
  prompt_length = min(prompt_length, input_ids_BxT.shape[1])
  ids_BxP = input_ids_BxT[:, :prompt_length].astype(jnp.int32)
  mask_BxP = attention_mask_BxT[:, :prompt_length].astype(jnp.int32)
  shift_Bx1 = prompt_length - mask_BxP.sum(-1, keepdims=True)
  slot_1xP = jnp.arange(prompt_length)[None, :]
  aligned_BxP = jnp.take_along_axis(ids_BxP, (slot_1xP - shift_Bx1) % prompt_length, axis=1)
  real_BxP = (slot_1xP >= shift_Bx1).astype(jnp.int32)
  return aligned_BxP * real_BxP, real_BxP


def generated_loss_mask(generated_mask_BxS: jax.Array) -> jax.Array:
  """``[B, S]`` bool: positions whose next-token logits predict a generated token.

  The logits at position `t` predict token `t + 1`, so the mask is `generated_mask` shifted
  left by one (the last position predicts nothing).
  """
  gen_BxS = generated_mask_BxS.astype(bool)
  return jnp.concatenate([gen_BxS[:, 1:], jnp.zeros_like(gen_BxS[:, :1])], axis=1)


def sampled_batch(on_policy: OnPolicy, student_params: Any, batch: Mapping[str, jax.Array],
                  sample_key: jax.Array) -> dict[str, jax.Array]:
  """The student's continuations of the batch's prompts, as a batch.

  Args:
    on_policy: the settings.
    student_params: the student's current params (sampling is not differentiated).
    batch: the data batch (``input_ids``, ``attention_mask`` ``[B, T]``).
    sample_key: PRNG key of the sampling.

  Returns:
    ``input_ids``, ``attention_mask`` (prompt + generated up to EOS), ``labels`` (next
    tokens) and ``loss_mask`` (`generated_loss_mask`), all ``[B, P + N]`` int32.
  """
  ids_BxP, mask_BxP = left_aligned_prompts(batch["input_ids"], batch["attention_mask"], on_policy.prompt_length)
  out = on_policy.sample(jax.lax.stop_gradient(student_params), ids_BxP, mask_BxP, rng=sample_key)
  has_prompt_Bx1 = mask_BxP[:, -1:]  # left-aligned: the last slot is real unless the row is empty
  tokens_BxS = out["tokens"]
  labels_BxS = jnp.concatenate([tokens_BxS[:, 1:], jnp.zeros_like(tokens_BxS[:, :1])], axis=1)
  loss_mask_BxS = generated_loss_mask(out["generated_mask"]).astype(jnp.int32) * has_prompt_Bx1
  return {"input_ids": tokens_BxS, "attention_mask": out["attention_mask"] * has_prompt_Bx1,
          "labels": labels_BxS, "loss_mask": loss_mask_BxS}
