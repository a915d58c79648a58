"""On-policy (GKD) step: where the time goes between sampling, teacher scoring and the update.

    taskset -c 1 python benchmarks/on_policy.py [--batch 8] [--prompt 32] [--new 32] [--steps 5] [--out on_policy.json]

Random-weight Llama teacher and student (`init_student`, every other layer) of a small
CPU-sized shape; the objective is GKD's generalized JSD (beta 0.5).  Parts, each jitted
and timed alone (median of `--steps` calls after one warm-up call):

* ``sample``: the student continues the `--prompt`-token prompts by `--new` tokens
  (`on_policy.sampled_batch`, the KV-cache `generate`, temperature 1);
* ``score``: the teacher's forward on the sampled ``[B, P + N]`` sequences;
* ``update``: the supervised step on those sequences minus ``score`` (student forward +
  backward, objective, AdamW);
* ``step``: the whole on-policy step (lmbda 1), and the supervised step on data rows of
  the same length (lmbda 0) for comparison.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TERMS = ({"loss": "generalized_jsd", "beta": 0.5},)
# A SmolLM2-like Llama (tied head, GQA) shrunk for a CPU core: 4 -> 2 layers, width 256.
TEACHER = dict(vocab_size=4096, hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
COLUMNS = ("batch", "prompt", "new", "sample_ms", "score_ms", "update_ms", "sample_pct", "score_pct", "update_pct",
           "on_policy_step_ms", "supervised_step_ms")


def measure(batch: int, prompt: int, new: int, steps: int) -> dict:
  """Times the parts of one on-policy step (see the module docstring); milliseconds."""
  import jax
  import transformers

  from distill_jax import models

  from distill_jax.objective import objective as objective_lib

  from distill_jax.training import on_policy as on_policy_lib

  from distill_jax.training import state as state_lib
  from distill_jax.training import step as step_lib
  from distill_jax.models import generate

  teacher = models.model_from_config(transformers.LlamaConfig(**TEACHER), "causal_lm", seed=0)
  student = models.init_student(teacher, num_layers=2, seed=1)
  objective = objective_lib.build_objective(TERMS, student=student, teachers={"teacher": teacher})
  optimizer = state_lib.make_optimizer("adamw", 1e-4, schedule="constant")
  sample = functools.partial(generate.generate, student.module, max_new_tokens=new, temperature=1.0)
  policy = on_policy_lib.OnPolicy(lmbda=1.0, prompt_length=prompt, sample=sample)
  teacher_params = {"teacher": teacher.params}
  data = common.random_batch(batch, prompt + new, TEACHER["vocab_size"])
  state = state_lib.create_train_state(jax.tree.map(lambda x: x.copy(), student.params), optimizer)
  key = jax.random.key(0)

  sample_fn = jax.jit(functools.partial(on_policy_lib.sampled_batch, policy))
  samples = sample_fn(state.params["student"], data, key)
  score_fn = jax.jit(lambda p, b: teacher.apply(p, b, outputs=("logits",)).logits)
  kw = dict(student_apply=student.apply, teacher_applies={"teacher": teacher.apply}, objective=objective,
            optimizer=optimizer)
  supervised = jax.jit(functools.partial(step_lib.train_step, **kw))
  on_policy_step = jax.jit(functools.partial(step_lib.train_step, on_policy=policy, **kw))

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    return 1e3 * common.median(common.time_calls(lambda: jax.block_until_ready(fn(*args)), steps))

  sample_ms = timed(sample_fn, state.params["student"], data, key)
  score_ms = timed(score_fn, teacher.params, samples)
  update_ms = timed(supervised, state, teacher_params, samples) - score_ms
  total = sample_ms + score_ms + update_ms
  return dict(batch=batch, prompt=prompt, new=new, sample_ms=sample_ms, score_ms=score_ms, update_ms=update_ms,
              sample_pct=100 * sample_ms / total, score_pct=100 * score_ms / total, update_pct=100 * update_ms / total,
              on_policy_step_ms=timed(on_policy_step, state, teacher_params, data),
              supervised_step_ms=timed(supervised, state, teacher_params, data))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", help="write the row as JSON here")
  args = parser.parse_args(argv)
  row = measure(args.batch, args.prompt, args.new, args.steps)
  print(common.markdown_table([row], COLUMNS))
  common.write_json(args.out, {"command": common.command_line(), "env": common.env_info(), "results": [row]})


if __name__ == "__main__":
  main()
