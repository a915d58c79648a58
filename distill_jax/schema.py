"""The config schema's machinery: frozen pydantic sections whose errors are one line.

:func:`section` turns a class into a frozen pydantic dataclass (``extra="forbid"``, no
inf/NaN) whose construction raises a :class:`ConfigError` naming the dotted field;
:class:`Section` names the allowed keys of an unknown one. The sections themselves live in
:mod:`distill_jax.config.sections` and :mod:`distill_jax.objective.terms`, the root and
the YAML/override loading in :mod:`distill_jax.config.root`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Annotated, Any, Literal, Mapping, Sequence, Union

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

from distill_jax.errors import UserError


# `teachers.<name>.path: student`: the teacher is a frozen copy of the student's initial weights.
SELF_TEACHER = "student"
# `pkg:<module>`: a model directory shipped in an installed package, `<module>.get_model_path()`.
PKG_PREFIX = "pkg:"
# Metric keys the train step logs besides the terms (a term named so gets a suffix).
RESERVED_METRICS = ("loss", "grad_norm", "nonfinite", "on_policy")

Task = Literal["causal_lm", "masked_lm", "sequence_classification", "encoder"]
DType = Literal["float32", "bfloat16", "float16"]
Int, Float, Bool = StrictInt, StrictFloat, StrictBool  # no "10" -> 10, no true -> 1 (a float takes ints)
PosInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
PosFloat = Annotated[StrictFloat, Field(gt=0)]
NonNegFloat = Annotated[StrictFloat, Field(ge=0)]
Unit = Annotated[StrictFloat, Field(ge=0, le=1)]  # [0, 1]
UnitOpen = Annotated[StrictFloat, Field(ge=0, lt=1)]  # [0, 1)
Fraction = Annotated[StrictFloat, Field(gt=0, lt=1)]  # (0, 1)


class ConfigError(UserError):
  """A problem with the user's configuration; its message is one line."""


def fail(message: str):
  raise ConfigError(f"config: {message}")


def invalid(message: str, *fields: str) -> PydanticCustomError:
  """A failed rule of a section: ``@name`` in `message` is the dotted path of its field `name`
  (pydantic knows where the section is; the section does not)."""
  return PydanticCustomError("config", message, {"message": message, "fields": fields})


def dotted(loc: Sequence[Union[str, int]]) -> str:
  out = ""
  for part in loc:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out


def describe(value: Any) -> str:
  text = repr(value).replace("\n", " ")
  return text if len(text) <= 60 else text[:57] + "..."


def error_line(error: ValidationError, prefix: tuple = ()) -> str:
  """The first error of a pydantic ``ValidationError`` as one line naming the dotted field."""
  e = error.errors(include_url=False)[0]
  loc = prefix + tuple(e["loc"])
  where = dotted(loc)
  if e["type"] == "config":
    text = e["ctx"]["message"]
    for name in sorted(e["ctx"]["fields"], key=len, reverse=True):
      text = text.replace("@" + name, dotted(loc + (name,)))
    return f"config: {text}" if e["ctx"]["fields"] or not where else f"config: {where} {text}"
  if e["type"] in ("missing", "missing_argument"):
    return f"config: {where} is required"
  return f"config: {where or 'the config'}: {e['msg']}, got {describe(e['input'])}"


class Section:
  """Base of the schema's sections: unknown keys name the allowed ones; ``to_dict``."""

  @model_validator(mode="before")
  @classmethod
  def _known_keys(cls, data: Any) -> Any:
    raw = data.kwargs if isinstance(data, ArgsKwargs) else data
    if isinstance(raw, Mapping):
      allowed = list(cls.__dataclass_fields__)
      for key in raw:
        if key not in allowed:
          close = difflib.get_close_matches(str(key), allowed, n=1)
          hint = f" (did you mean {close[0]!r}?)" if close else ""
          raise invalid(f"unknown key '@{key}'{hint}; allowed: {', '.join(allowed)}", str(key))
    return data

  def to_dict(self) -> dict[str, Any]:
    """Plain YAML/JSON-able dict (tuples become lists); :func:`config_from_dict` inverts it."""
    return adapter(type(self)).dump_python(self, mode="json")


@functools.cache
def adapter(cls: type) -> TypeAdapter:
  return TypeAdapter(cls)


def section(prefix: str):
  """Makes a frozen pydantic dataclass whose direct construction raises one-line ConfigErrors."""
  def wrap(cls):
    cls = _pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
      try:
        init(self, *args, **kwargs)
      except ValidationError as e:
        raise ConfigError(error_line(e, tuple(prefix.split(".")) if prefix else ())) from None

    cls.__init__ = __init__
    return cls
  return wrap


def field_of(default_factory):
  return dataclasses.field(default_factory=default_factory)
