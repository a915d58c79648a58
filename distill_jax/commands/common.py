"""What several commands share: the ``[CONFIG.yaml] [KEY=VALUE ...]`` arguments."""

from __future__ import annotations

import os
from typing import Sequence

from distill_jax.config import root as config_lib
from distill_jax.errors import UserError


def split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
  """The leading item is the YAML file unless it is a ``KEY=VALUE`` override."""
  config = None
  overrides = []
  for i, item in enumerate(items):
    if i == 0 and "=" not in item:
      config = item
    else:
      overrides.append(item)
  return config, overrides


def load_command_config(items: Sequence[str]) -> config_lib.Config:
  """The command's config: ``[CONFIG.yaml] [KEY=VALUE ...]`` (no file: the packaged default)."""
  path, overrides = split_config_and_overrides(items)
  if path is not None and not os.path.isfile(path):
    raise UserError(f"config: file {path!r} does not exist")
  return config_lib.load_config(path, overrides)
