"""Jitted KV-cache generation for our decoders (`decoder.Decoder`), greedy or sampled.

Shapes are fixed: the left-padded prompt ``[B, P]`` is prefilled once into a preallocated
cache of ``P + N`` slots, then a `lax.while_loop` of single-token steps writes one token per
row per step (stopping early once every row has met an EOS).  Each row's positions continue
from its own last real prompt position, as transformers' `generate` builds them from the
attention mask.  Compiled once per (module, shapes, sampling settings).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from distill_jax.models import decoder


def _check_args(module: Any, input_ids_BxP: jax.Array, attention_mask_BxP: jax.Array, max_new_tokens: int,
                temperature: float, top_k: int, top_p: float, rng: Optional[jax.Array]) -> None:
  if not isinstance(module, decoder.Decoder) or module.task != "causal_lm":
    raise ValueError(f"module: generate needs a causal_lm decoder.Decoder, got {type(module).__name__} "
                     f"(task {getattr(module, 'task', None)!r})")
  if input_ids_BxP.ndim != 2 or input_ids_BxP.shape != attention_mask_BxP.shape:
    raise ValueError(f"input_ids {tuple(input_ids_BxP.shape)} and attention_mask {tuple(attention_mask_BxP.shape)} "
                     "must both be [B, P]")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens: {max_new_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"temperature: {temperature} must be >= 0 (0 = greedy)")
  if top_k < 0:
    raise ValueError(f"top_k: {top_k} must be >= 0 (0 = no top-k filter)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p: {top_p} must be in (0, 1]")
  if temperature > 0 and rng is None:
    raise ValueError("rng: sampling (temperature > 0) needs a PRNG key")


def generate(module: decoder.Decoder, params: Any, input_ids_BxP: jax.Array, attention_mask_BxP: jax.Array, *,
             max_new_tokens: int, rng: Optional[jax.Array] = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: Optional[int | Sequence[int]] = None,
             pad_token_id: int = 0) -> dict[str, jax.Array]:
  """Continues left-padded prompts by `max_new_tokens` tokens.

  Args:
    module: a causal_lm `Decoder`.
    params: its params (``{"params": ...}``'s inner tree).
    input_ids_BxP: ``[B, P]`` prompts, left-padded (the last slot of every row is a real token).
    attention_mask_BxP: ``[B, P]`` 1 for real prompt tokens.
    max_new_tokens: `N`, static.
    rng: PRNG key; needed when sampling (the output is a function of it).
    temperature: 0 = greedy; else logits are divided by it and sampled.
    top_k: keep the `top_k` largest logits (0 = all), as transformers' top-k warper.
    top_p: nucleus: keep the smallest set of largest-probability tokens whose mass exceeds
      `top_p` (1 = all), as transformers' top-p warper (applied after top-k).
    eos_token_id: id(s) that end a row; later tokens of the row are `pad_token_id`.
    pad_token_id: the id written after a row's EOS.

  Returns:
    `tokens` ``[B, P + N]`` int32 (prompt then generated); `attention_mask` ``[B, P + N]``: 1
    on real prompt tokens and on generated tokens up to and including the first EOS;
    `generated_mask` ``[B, P + N]``: the same on generated tokens only.

  Raises:
    ValueError: bad arguments (one line each).
  """
  input_ids_BxP, attention_mask_BxP = jnp.asarray(input_ids_BxP), jnp.asarray(attention_mask_BxP)
  _check_args(module, input_ids_BxP, attention_mask_BxP, max_new_tokens, temperature, top_k, top_p, rng)
  if eos_token_id is None:
    eos = ()
  elif isinstance(eos_token_id, int):
    eos = (int(eos_token_id),)
  else:
    eos = tuple(int(i) for i in eos_token_id)
  return _decode(module, params, input_ids_BxP.astype(jnp.int32), attention_mask_BxP.astype(jnp.int32),
                 jax.random.key(0) if rng is None else rng, max_new_tokens=int(max_new_tokens),
                 temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), eos=eos,
                 pad=int(pad_token_id))


def filter_logits(logits_BxV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Float32 logits divided by `temperature` (> 0), then top-k, then top-p filtered (removed: -inf).

  transformers' warpers, in their order: top-k keeps ties with the k-th logit; top-p drops
  the tokens whose ascending cumulative probability is ``<= 1 - top_p``, always keeping the
  most likely one.
  """
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    order_BxV = jnp.argsort(logits_BxV, axis=-1)  # ascending
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    drop_sorted_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1) <= 1 - top_p
    drop_sorted_BxV = drop_sorted_BxV.at[:, -1].set(False)
    drop_BxV = jnp.take_along_axis(drop_sorted_BxV, jnp.argsort(order_BxV, axis=-1), axis=-1)
    logits_BxV = jnp.where(drop_BxV, -jnp.inf, logits_BxV)
  return logits_BxV


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """``[B]`` next tokens: the argmax when `temperature` is 0, else a sample of `filter_logits`."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "temperature", "top_k", "top_p", "eos",
                                             "pad"))
def _decode(module, params, input_ids_BxP, attention_mask_BxP, rng, *, max_new_tokens, temperature, top_k, top_p,
            eos, pad):
  b, p = input_ids_BxP.shape
  n = max_new_tokens
  variables = {"params": params}
  cache = decoder.init_cache(module.spec, b, p + n, module.dtype)
  # Generated slots count as real keys from the start: causality hides each until it is written.
  key_mask_BxS = jnp.concatenate([attention_mask_BxP, jnp.ones((b, n), jnp.int32)], axis=1)
  positions_BxP = decoder.default_position_ids(attention_mask_BxP, p)
  # The whole prompt fills the cache (dynamic RoPE sees the prompt's length, as in transformers);
  # step 0 then feeds the last prompt token again for its logits.
  cache = module.apply(variables, input_ids_BxP, key_mask_BxS, positions_BxP, cache=cache, cache_index=0,
                       want=frozenset())["cache"]
  tokens_BxS = jnp.concatenate([input_ids_BxP, jnp.full((b, n), pad, jnp.int32)], axis=1)
  eos_E = jnp.asarray(eos, jnp.int32)

  def step(state):
    i, cache, tokens_BxS, done_B, rng = state
    slot = p - 1 + i
    token_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxS, slot, 1, axis=1)
    out = module.apply(variables, token_Bx1, key_mask_BxS, positions_BxP[:, -1:] + i, cache=cache,
                       cache_index=slot, want=frozenset({"logits"}))
    rng, key = jax.random.split(rng)
    next_B = sample_logits(out["logits"][:, 0], key, temperature, top_k, top_p)
    next_B = jnp.where(done_B, pad, next_B)
    tokens_BxS = jax.lax.dynamic_update_slice_in_dim(tokens_BxS, next_B[:, None], slot + 1, axis=1)
    done_B = done_B | jnp.isin(next_B, eos_E)
    return i + 1, out["cache"], tokens_BxS, done_B, rng

  def running(state):
    return (state[0] < n) & ~jnp.all(state[3])

  state = (jnp.int32(0), cache, tokens_BxS, jnp.zeros((b,), bool), rng)
  tokens_BxS = jax.lax.while_loop(running, step, state)[2]
  is_eos_BxN = jnp.isin(tokens_BxS[:, p:], eos_E).astype(jnp.int32)
  generated_BxN = (jnp.cumsum(is_eos_BxN, axis=1) - is_eos_BxN == 0).astype(jnp.int32)
  return {"tokens": tokens_BxS,
          "attention_mask": jnp.concatenate([attention_mask_BxP, generated_BxN], axis=1),
          "generated_mask": jnp.concatenate([jnp.zeros_like(attention_mask_BxP), generated_BxN], axis=1)}
