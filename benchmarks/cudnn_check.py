"""cuDNN attention == XLA attention on a GPU (bf16 decoder forward and gradient); prints max diffs."""
import logging, sys, time
logging.basicConfig(level=logging.WARNING)
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
import tiny
from distill_jax import models
print(jax.devices())
model = models.model_from_config(tiny.config_for("llama", hidden_size=256, num_attention_heads=4),
                          "causal_lm", dtype="bfloat16")
ids = jax.random.randint(jax.random.key(1), (4, 128), 4, tiny.VOCAB_SIZE)
mask = jnp.ones((4, 128), jnp.int32).at[1, 90:].set(0)
def loss(p, module):
  out = module.apply({"params": p}, ids, mask)
  return jnp.sum(jnp.where(mask[..., None] > 0, out["last_hidden"].astype(jnp.float32), 0) ** 2) / 1e4, out["logits"]
res = {}
for impl in ("xla", "cudnn"):
  f = jax.jit(jax.value_and_grad(lambda p: loss(p, model.module.clone(attention_impl=impl)), has_aux=True))
  (v, logits), g = f(model.params)
  hlo = f.lower(model.params).compile().as_text()
  res[impl] = (v, logits, g)
  print(impl, float(v), "cudnn custom call:", "cudnn" in hlo.lower() and "__cudnn$fmha" in hlo)
real = np.asarray(mask, bool)
print("logits max diff", float(np.abs(np.asarray(res["xla"][1]) - np.asarray(res["cudnn"][1]))[real].max()),
      "max |logit|", float(np.abs(np.asarray(res["xla"][1])).max()))
gd = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12)), res["cudnn"][2], res["xla"][2])
print("grad max rel diff", max(jax.tree.leaves(gd)))
