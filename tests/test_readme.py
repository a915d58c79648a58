"""README must never rot: its first Python example runs, and .ci/run uses its commands."""

import pathlib
import re
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_api_example_runs():
  code = _blocks("python")[0]
  exec(compile(code, "README.md", "exec"), {})


def test_readme_has_exactly_two_setup_commands_and_ci_uses_the_test_one():
  for marker in ("<!-- ci:run -->", "<!-- ci:test -->"):
    assert README.count(marker) == 1, marker
  ci = (ROOT / ".ci" / "run").read_text()
  assert "ci:test" in ci and "README.md" in ci
  out = subprocess.run(
      ["awk", r"/<!-- ci:test -->/{f=1;next} f&&/^```/{if(b)exit; b=1; next} f&&b{print}", "README.md"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
  assert "pytest" in out and 'pip install -e ".[test]"' in out


def _train_examples() -> list[list[str]]:
  lines = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
  return [shlex.split(line)[2:] for line in lines if line.startswith("distill-jax train ")]


@pytest.mark.parametrize("args", _train_examples(), ids=" ".join)
def test_readme_train_examples_are_valid_configs(args):
  """Every `distill-jax train ...` example of README parses and validates (nothing runs)."""
  import distill_jax as dj

  path = args[0] if args and args[0].endswith(".yaml") else None
  overrides = args[1:] if path else args
  config = dj.load_config(str(ROOT / path) if path else None, overrides)
  assert config.train.steps > 0
