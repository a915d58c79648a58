"""`distill-jax bench SCRIPT [ARGS ...]`: hand over to ``benchmarks/SCRIPT.py`` of a source checkout.

The benchmarks are not part of the installed package (they compare against PyTorch, write
RESULTS tables and read the repository's configs), so the command looks for them in the
current directory and beside an editable install, and otherwise says where they are in one line.
"""

from __future__ import annotations

import os
import pathlib
import runpy
import sys
from typing import Sequence

from distill_jax.errors import UserError

SCRIPTS = ("step", "torch_reference", "on_policy", "vocab_kl", "scaling", "data", "teacher_cache")


def find_script(script: str) -> pathlib.Path:
  """``benchmarks/<script>.py`` in the working directory or beside an editable install."""
  if script not in SCRIPTS:
    raise UserError(f"bench: script must be one of {', '.join(SCRIPTS)}, got {script!r}")
  package = pathlib.Path(__file__).resolve().parents[2]  # the checkout root of an editable install
  candidates = [pathlib.Path.cwd() / "benchmarks" / f"{script}.py", package / "benchmarks" / f"{script}.py"]
  for path in candidates:
    if path.is_file():
      return path
  raise UserError(f"bench: benchmarks/{script}.py ships with the source checkout, not the installed package: "
                  f"run from a clone of distill_jax (looked in {', '.join(str(c.parent) for c in candidates)})")


def main(script: str, args: Sequence[str]) -> int:
  path = find_script(script)
  sys.argv = [os.fspath(path), *args]
  runpy.run_path(os.fspath(path), run_name="__main__")
  return 0
