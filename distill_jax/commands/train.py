"""`distill-jax train [CONFIG.yaml] [KEY=VALUE ...]`: the distillation run (the loop is `training.loop`)."""

from __future__ import annotations

from distill_jax.config import root as config_lib
from distill_jax.training.loop import train


def main(cfg: config_lib.Config) -> int:
  result = train(cfg)
  print(f"run directory: {result.run_dir}")
  return 0
