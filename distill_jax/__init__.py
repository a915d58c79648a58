"""distill_jax: knowledge distillation for language models on JAX accelerators.

A frozen Hugging Face teacher teaches a smaller student through pure functional losses
(logits, features, relations) in one jitted train step.  Heavy modules are imported
lazily so that ``import distill_jax`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_LAZY = {
    "losses": ("distill_jax.losses", None),
    "ModelOutputs": ("distill_jax.models", "ModelOutputs"),
    "Model": ("distill_jax.models", "Model"),
    "load_model": ("distill_jax.models", "load_model"),
    "init_student": ("distill_jax.models", "init_student"),
    "layer_map": ("distill_jax.models", "layer_map"),
    "Objective": ("distill_jax.objective.objective", "Objective"),
    "build_objective": ("distill_jax.objective.objective", "build_objective"),
    "TrainState": ("distill_jax.training.state", "TrainState"),
    "train_step": ("distill_jax.training.step", "train_step"),
    "eval_step": ("distill_jax.training.step", "eval_step"),
    "Config": ("distill_jax.config.root", "Config"),
    "load_config": ("distill_jax.config.root", "load_config"),
    "train": ("distill_jax.training.loop", "train"),
    "RunResult": ("distill_jax.training.loop", "RunResult"),
    "export_student": ("distill_jax.checkpoint.manager", "export_student"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
  try:
    module_name, attr = _LAZY[name]
  except KeyError:
    raise AttributeError(f"module 'distill_jax' has no attribute {name!r}") from None
  module = importlib.import_module(module_name)
  value = module if attr is None else getattr(module, attr)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return __all__
