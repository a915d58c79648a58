"""cuDNN attention against XLA's on a GPU: a bf16 decoder's forward and gradient, both measured
against the float32 XLA model (so bf16 rounding shows as the floor); prints the differences.

    python benchmarks/cudnn_check.py        # on the device machine, from the repo root
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "tests")
import tiny  # noqa: E402
from distill_jax import models  # noqa: E402

print(jax.devices())
config = tiny.config_for("llama", hidden_size=256, num_attention_heads=4)  # head_dim 64, 2 KV heads
ids = jax.random.randint(jax.random.key(1), (4, 128), 4, tiny.VOCAB_SIZE)
mask = jnp.ones((4, 128), jnp.int32).at[1, 90:].set(0)
real = np.asarray(mask, bool)


def run(dtype, impl):
  model = models.model_from_config(config, "causal_lm", dtype=dtype)
  module = model.module.clone(attention_impl=impl)

  def loss(p):
    out = module.apply({"params": p}, ids, mask)
    return jnp.sum(jnp.where(mask[..., None] > 0, out["last_hidden"].astype(jnp.float32), 0) ** 2) / 1e4, out["logits"]

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (value, logits), grads = step(model.params)
  fused = "__cudnn$fmha" in step.lower(model.params).compile().as_text()
  return float(value), np.asarray(logits, np.float32), grads, fused


ref = run("float32", "xla")
for dtype, impl in (("bfloat16", "xla"), ("bfloat16", "cudnn")):
  value, logits, grads, fused = run(dtype, impl)
  rel = jax.tree.map(lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)), grads, ref[2])
  print(f"{dtype} {impl}: cuDNN fmha in HLO={fused} loss={value:.6f} (f32 {ref[0]:.6f}) "
        f"max|dlogits|={np.abs(logits - ref[1])[real].max():.4g} worst grad rel-L2 err={max(jax.tree.leaves(rel)):.4g}")
