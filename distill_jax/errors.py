"""The user-error base class and the one helper every one-line error message uses."""

from __future__ import annotations

from typing import Optional


class UserError(ValueError):
  """Bad input from the user (config, files, models, data): shown as one line, no traceback."""


def first_line(exc: BaseException, limit: Optional[int] = None, *, with_type: bool = False) -> str:
  """The first line of `exc`'s message (its type's name when empty), cut at `limit` characters.

  Args:
    exc: the exception.
    limit: at most this many characters (``...`` marks a cut); None: the whole line.
    with_type: prefix ``TypeName: `` (for messages that wrap another library's error).
  """
  lines = str(exc).strip().splitlines()
  line = lines[0] if lines else ""
  if limit is not None and len(line) > limit:
    line = line[:limit] + "..."
  if not line:
    return type(exc).__name__
  return f"{type(exc).__name__}: {line}" if with_type else line
