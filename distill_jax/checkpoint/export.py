"""Atomic export of the student as a Hugging Face checkpoint directory."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol


class SavesPretrained(Protocol):
  """What ``export_student`` needs of a model (``distill_jax.models.Model``)."""

  def save_pretrained(self, params: Any, out_dir: os.PathLike[str] | str) -> None:
    ...


def export_student(model: SavesPretrained, params: Any, out_dir: os.PathLike[str] | str,
                   *, overwrite: bool = False) -> Path:
  """Writes the student as a Hugging Face checkpoint, atomically.

  The files are written by ``model.save_pretrained(params, tmp_dir)`` into a
  temporary directory next to ``out_dir``, which is then renamed onto
  ``out_dir``: a crash leaves either the old directory or the new one, never a
  half-written export. Call it from one process, with fully addressable params.

  Args:
    model: an object with ``save_pretrained(params, out_dir)``.
    params: the student params to export.
    out_dir: the export directory; must be absent or empty unless ``overwrite``.
    overwrite: replace a non-empty ``out_dir``.

  Returns:
    ``out_dir`` as a ``Path``.

  Raises:
    FileExistsError: ``out_dir`` is not empty (or is a file) and not ``overwrite``.
  """
  out = Path(out_dir)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"export path {out} exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(
        f"export directory {out} is not empty; pass overwrite=True to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = out.parent / f".{out.name}.tmp-{token}"
  tmp.mkdir()
  try:
    model.save_pretrained(params, tmp)
    if out.is_dir() and any(out.iterdir()):
      old = out.parent / f".{out.name}.old-{token}"
      os.rename(out, old)
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)  # replaces an empty directory atomically on POSIX
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


__all__ = ["SavesPretrained", "export_student"]
