"""Every kind of bad input through the CLI: a non-zero exit, ONE line naming the field, no
traceback unless ``--debug``, and nothing written to an existing run directory.

The table runs `distill_jax.cli.main` in-process (the CLI's own parsing and error
handling, 8 forced CPU devices from conftest) so that the models load once; a few cases
also go through a real subprocess to check exit codes and stderr of the process itself.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from test_reliability import cli_command, cli_env, error_line, jax_cache, tiny_gpt2  # noqa: F401

TERMS = "objective.terms"


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else -1)
          for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_gpt2):  # noqa: F811
  """Checkpoints and data files the cases point at."""
  import tiny

  root = tmp_path_factory.mktemp("bad_inputs")
  files = {"teacher": tiny_gpt2}
  files["other_vocab"] = tiny.make_checkpoint(root / "gpt2_other_tokenizer", "gpt2", "causal_lm")
  tiny.tokenizer_for("bert").save_pretrained(files["other_vocab"])  # same widths, another vocabulary
  files["missing_column"] = root / "missing_column.jsonl"
  files["missing_column"].write_text("".join(f'{{"body": "line {i} of text"}}\n' for i in range(40)))
  files["empty"] = root / "empty.jsonl"
  files["empty"].write_text("")
  files["two_lines"] = root / "two_lines.jsonl"
  files["two_lines"].write_text('{"text": "one line of text"}\n{"text": "and another one"}\n')
  files["undecodable"] = root / "undecodable.txt"
  files["undecodable"].write_bytes(b"good line one\n" * 20 + b"bad \xff\xfe\xfa bytes \x80\x81\n" * 20)
  return files


def _base(teacher: pathlib.Path, run_dir: pathlib.Path) -> list[str]:
  return ["train", f"teachers.teacher.path={teacher}", "teachers.teacher.task=causal_lm", "student.init=from_teacher",
          "student.num_layers=1", f"{TERMS}=[{{loss: forward_kl}}]", "data.max_length=16", "data.global_batch_size=8",
          "data.max_examples=64", "train.steps=2", f"train.run_dir={run_dir}", "logging.progress_bar=false",
          "eval.before_and_after=false", "export.enabled=false"]


# (case id, overrides (``<name>`` stands for a path of `inputs`), text the one-line error must contain)
CASES = [
    # config
    ("unknown key", ["train.stepz=3"], "train.stepz"),
    ("wrong type", ["train.steps=many"], "train.steps"),
    ("negative temperature", [f"{TERMS}=[{{loss: forward_kl, temperature: -1.0}}]"], "temperature"),
    ("beta outside [0,1]", [f"{TERMS}=[{{loss: generalized_jsd, beta: 1.5}}]"], "beta"),
    ("weights sum to zero", [f"{TERMS}=[{{loss: forward_kl, weight: 0.0}}]"], "weight"),
    ("layer index out of range", [f"{TERMS}=[{{loss: hidden_mse, layers: [9]}}]"], "layers"),
    ("mesh not matching devices", ["mesh.data=3"], "mesh"),
    # models
    ("missing model path", ["teachers.teacher.path=<missing>"], "teachers.teacher.path"),
    ("vocab mismatch for a logit loss", ["student.init=path", "student.path=<other_vocab>"], "vocab"),
    ("hidden size mismatch without projection", ["student.init=config", "student.hidden_size=16", f"{TERMS}=[{{loss: hidden_mse}}]"],
     "projection"),
    # data
    ("missing column", ["data.source=<missing_column>"], "data.text_columns"),
    ("empty file", ["data.source=<empty>"], "data.source"),
    ("missing data file", ["data.source=<missing>.jsonl"], "data.source"),
    ("two lines: no full batch", ["data.source=<two_lines>"], "data.global_batch_size"),
    ("undecodable bytes", ["data.source=<undecodable>", "data.format=text"], "data.source"),
    ("global batch not divisible by devices", ["data.global_batch_size=6"], "data.global_batch_size"),
]


@pytest.fixture()
def existing_run(tmp_path) -> pathlib.Path:
  """A run directory with files in it (no resumable config, so every case reaches its own check)."""
  run_dir = tmp_path / "run"
  (run_dir / "checkpoints").mkdir(parents=True)
  (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
  (run_dir / "report.md").write_text("# an earlier report\n")
  return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("case, overrides, field", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_field(case, overrides, field, inputs, existing_run, capsys):
  from distill_jax import cli

  values = {k: str(v) for k, v in inputs.items()}
  values["missing"] = str(existing_run.parent / "no_such_model")
  for name, value in values.items():
    overrides = [o.replace(f"<{name}>", value) for o in overrides]
  args = _base(inputs["teacher"], existing_run) + overrides
  before = _snapshot(existing_run)
  code = cli.main(args)
  err = capsys.readouterr().err
  assert code != 0, (case, err[-2000:])
  errors = [line for line in err.splitlines() if line.startswith("distill-jax: error:")]
  assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
  assert field in errors[0], (case, errors[0])
  assert _snapshot(existing_run) == before, case


DATA_AND_DEVICE_CASES = [c for c in CASES if c[2].startswith("data.") or c[2] == "mesh"]


@pytest.mark.parametrize("case, overrides, field", DATA_AND_DEVICE_CASES, ids=[c[0] for c in DATA_AND_DEVICE_CASES])
def test_data_and_device_errors_come_before_any_model_load(case, overrides, field, inputs, existing_run, capsys,
                                                           monkeypatch):
  from distill_jax import cli, models

  def no_model(*args, **kwargs):
    raise AssertionError(f"{case}: a model was loaded before the data/device check")

  monkeypatch.setattr(models, "load_model", no_model)
  monkeypatch.setattr(models, "model_from_config", no_model)
  values = {k: str(v) for k, v in inputs.items()} | {"missing": str(existing_run.parent / "no_such_file")}
  for name, value in values.items():
    overrides = [o.replace(f"<{name}>", value) for o in overrides]
  before = _snapshot(existing_run)
  assert cli.main(_base(inputs["teacher"], existing_run) + overrides) != 0
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill-jax: error:")]
  assert len(errors) == 1 and field in errors[0], (case, errors)
  assert _snapshot(existing_run) == before


@pytest.mark.slow
def test_a_changed_model_shape_refuses_to_resume_an_existing_run(tmp_path, inputs, capsys):
  from distill_jax import cli

  run_dir = tmp_path / "run"
  run_dir.mkdir()
  from distill_jax.config import root as config_lib

  config_lib.dump_yaml(config_lib.load_config(None, _base(inputs["teacher"], run_dir)[1:]), str(run_dir / "config.yaml"))
  before = _snapshot(run_dir)
  assert cli.main(_base(inputs["teacher"], run_dir) + ["student.num_layers=2"]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "student.num_layers: changed from 1 to 2" in err[0], err
  assert _snapshot(run_dir) == before


@pytest.mark.parametrize("debug", [False, True])
def test_cli_process_exit_code_and_traceback_only_with_debug(tmp_path, jax_cache, debug):  # noqa: F811
  args = (["--debug"] if debug else []) + ["train", "train.stepz=3", f"train.run_dir={tmp_path / 'run'}"]
  proc = subprocess.run(cli_command(*args), env=cli_env(jax_cache), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  if debug:
    assert "Traceback" in proc.stderr and "train.stepz" in proc.stderr
  else:
    assert proc.stderr.strip().splitlines() == [error_line(proc)]
    assert "train.stepz" in proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_process_data_error_is_one_line(tmp_path, inputs, jax_cache):  # noqa: F811
  args = _base(inputs["teacher"], tmp_path / "run") + [f"data.source={inputs['empty']}"]
  proc = subprocess.run(cli_command(*args), env=cli_env(jax_cache), capture_output=True, text=True, timeout=300)
  line = error_line(proc)
  assert "data.source" in line
  assert not (tmp_path / "run").exists()
