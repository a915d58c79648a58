"""`distill-jax plan`: FLOPs and roofline arithmetic against hand-computed numbers, topology
names, the bounded batch search, and a tiny config compiled for a TPU slice without a TPU."""

from __future__ import annotations

import json
import os

import pytest

from distill_jax import cli
from distill_jax.commands import plan
from distill_jax.config import root as config_lib
from distill_jax.errors import UserError
from distill_jax.evaluation import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- FLOPs (hand numbers)

# vocab 10, width 4, 2 layers, 2 query heads, 1 kv head of width 2, MLP 8 (gated).
SMALL = flops.ModelShape(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2,
                         intermediate_size=8)


def test_keys_per_query_by_hand():
  assert flops.keys_per_query(4) == 2.5  # queries see 1, 2, 3, 4 keys
  assert flops.keys_per_query(8, window=3) == 21 / 8  # 1, 2, 3, 3, 3, 3, 3, 3
  assert flops.keys_per_query(4, window=8) == 2.5  # a window longer than the sequence is global


def test_forward_flops_by_hand():
  f = flops.forward_flops(SMALL, batch=1, seq_len=4)
  # per token and layer: qkv 2·4·(2+2)·2 = 64, output 2·2·2·4 = 32, MLP 2·4·8·3 = 192 -> 288; 4 tokens, 2 layers
  assert f.layers_weights == 2304
  # 4 · tokens · heads · head_dim · mean keys = 4·4·2·2·2.5 = 160 per layer
  assert f.layers_attention == 320
  assert f.head == 4 * 2 * 4 * 10
  assert f.total == 2944


def test_sliding_window_layers_count_fewer_keys():
  local = flops.ModelShape(**{**SMALL.__dict__, "layer_windows": (3, None)})
  f = flops.forward_flops(local, batch=1, seq_len=8)
  assert f.layers_attention == 4 * 8 * 2 * 2 * (21 / 8) + 4 * 8 * 2 * 2 * 4.5


def test_step_flops_by_hand():
  s = flops.step_flops([SMALL], SMALL, batch=1, seq_len=4, remat="full")
  assert (s.teacher_forward, s.student_forward_backward) == (2944, 3 * 2944)
  assert s.recompute == 2304 + 320  # the layers' forward again, not the head
  assert s.model == 11776 and s.hardware == 14400
  assert flops.step_flops([SMALL], SMALL, batch=1, seq_len=4, remat="dots").recompute == 320
  assert flops.step_flops([SMALL], SMALL, batch=1, seq_len=4, remat="none").recompute == 0


def test_llama_8b_weight_flops_are_two_per_matmul_param():
  """MaxText's count: 2 FLOPs per token per matmul weight. Llama-3.1-8B has 8,030,261,248 params, of
  which 525,336,576 are the input embedding (a gather, no FLOPs) and 266,240 norm weights."""
  llama = flops.ModelShape(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                           head_dim=128, intermediate_size=14336)
  f = flops.forward_flops(llama, batch=1, seq_len=1)
  assert f.layers_weights + f.head == 2 * (8_030_261_248 - 525_336_576 - 266_240)


def test_roofline_by_hand():
  step = flops.StepFlops(teacher_forward=1e15, student_forward_backward=3e15, recompute=1e15)
  chip = flops.CHIPS["v5e"]  # 197 TFLOP/s, 819 GB/s
  r = flops.roofline(step, chip, num_chips=16, hbm_bytes_per_device=819e9 * 0.1)
  assert r.compute_s == pytest.approx(5e15 / (16 * 197e12))
  assert r.memory_s == pytest.approx(0.1)
  assert r.bound == "compute" and r.step_s == r.compute_s
  assert r.mfu == pytest.approx(4 / 5)  # compute-bound: model / hardware FLOPs
  slow = flops.roofline(step, chip, num_chips=16, hbm_bytes_per_device=819e9 * 10)
  assert slow.bound == "memory" and slow.mfu == pytest.approx(4e15 / (10 * 16 * 197e12))


def test_hbm_bytes_by_hand():
  assert flops.step_hbm_bytes(teacher_weight_bytes=10, student_weight_bytes=3, student_passes=3,
                              state_bytes=5) == 10 + 9 + 10


# --------------------------------------------------------------------------- topologies


@pytest.mark.parametrize("text, name, chips", [
    ("v5e:4x4", "v5e:4x4", 16), ("v5p:2x2x2", "v5p:2x2x2", 8), ("v4:2x2x4", "v4:2x2x4", 16),
    ("v6e:8x8", "v6e:8x8", 64), ("v5e-16", "v5e:4x4", 16), ("v5e-8", "v5e:2x4", 8), ("v6e-64", "v6e:8x8", 64),
    ("v5p-16", "v5p:2x2x2", 8), ("v5p-8", "v5p:2x2x1", 4), ("v5p-32", "v5p:2x2x4", 16),
    ("v5p-128", "v5p:4x4x4", 64), ("v4-32", "v4:2x2x4", 16), ("v5litepod-16", "v5e:4x4", 16),
])
def test_parse_topology(text, name, chips):
  t = plan.parse_topology(text)
  assert (t.name, t.num_chips) == (name, chips)


@pytest.mark.parametrize("text, match", [
    ("v7:2x2", "--topology: expected CHIP"), ("v5e:2x2x2", "v5e slices have 2 axes"),
    ("v5p-6", "counted as TensorCores"), ("v5p-9", "counts TensorCores"), ("v5e-12", "not a v5e slice size"), ("4x4", "--topology: expected"),
])
def test_parse_topology_errors_are_one_line(text, match):
  with pytest.raises(UserError, match=match) as e:
    plan.parse_topology(text)
  assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- batch search


def _fake_measure(calls, per_row, fixed, oom_above=None):
  def measure(b):
    calls.append(b)
    if oom_above is not None and b > oom_above:
      return plan.Memory(b, None, None, None, None, None, None, 0.0, "RESOURCE_EXHAUSTED")
    return plan.Memory(b, fixed + per_row * b, per_row * b, fixed, 0, 0, 0, 0.0)
  return measure


@pytest.mark.parametrize("start, oom_above", [(8, None), (64, None), (8, 40), (256, 100)])
def test_search_finds_the_largest_multiple_of_the_shards(start, oom_above):
  calls = []
  # fits while 10 + 3·b <= 100, i.e. b <= 30; batches are multiples of 4: the answer is 28
  lo, hi, seen = plan.search_batch(_fake_measure(calls, 3, 10, oom_above), start, 4, 100, max_compiles=6)
  assert (lo, hi) == (28, 32)
  assert len(calls) == len(set(calls)) <= 6


def test_search_stops_at_its_compile_budget():
  calls = []
  lo, hi, _ = plan.search_batch(_fake_measure(calls, 1, 0), 8, 8, 10 ** 9, max_compiles=3)
  assert calls == [8, 16, 32] and (lo, hi) == (32, None)


def test_search_when_nothing_fits():
  calls = []
  lo, hi, _ = plan.search_batch(_fake_measure(calls, 1, 1000), 16, 4, 100, max_compiles=6)
  assert (lo, hi) == (0, 4) and calls == [16, 8, 4]


def test_oom_temporaries_read_from_xla_error():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (98.46G) "
         "exceeds available HBM (95.74G).")
  assert plan.oom_temporaries(msg) == int(98.46 * 2 ** 30)
  assert plan.oom_temporaries("RESOURCE_EXHAUSTED: something else") is None


def test_not_fit_line_names_the_largest_batch_and_the_knobs():
  cfg = config_lib.load_config(os.path.join(ROOT, "configs", "pod", "qwen3_8b_to_1p7b.yaml"))
  report = {"per_device_gib": {"total": 27.7, "eval_total": 3.0, "hbm": 16.0}, "train_fits": False,
            "topology": "v5e:4x4", "global_batch": 32, "seq_len": 4096, "largest_fitting_batch": 8,
            "batch_shards": 8}
  line = plan.not_fit_line(report, cfg)
  assert "\n" not in line
  assert "27.7 GiB per device of 16 GiB on v5e:4x4 at global batch 32 x 4096" in line
  assert "largest global batch that fits: 8" in line
  assert "mesh (data,fsdp,tensor = 1,8,2), student.remat (full)" in line


# --------------------------------------------------------------------------- a tiny config on a v5e:2x2 slice


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
  """A 1-layer Llama teacher and student given by config.json alone (no weights, no tokenizer)."""
  root = tmp_path_factory.mktemp("plan")
  for name, width in (("teacher", 64), ("student", 32)):
    os.makedirs(root / name)
    with open(root / name / "config.json", "w", encoding="utf-8") as f:
      json.dump({"model_type": "llama", "vocab_size": 512, "hidden_size": width, "intermediate_size": 2 * width,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False}, f)
  path = root / "plan.yaml"
  path.write_text(
      f"teacher: {{path: {root / 'teacher'}, dtype: bfloat16, param_dtype: bfloat16}}\n"
      f"student: {{init: path, path: {root / 'student'}, dtype: bfloat16, remat: full}}\n"
      "objective: {terms: [{loss: forward_kl}]}\n"
      "data: {max_length: 32, global_batch_size: 4}\n"
      "mesh: {data: 1, fsdp: 2, tensor: 2}\n")
  return str(path)


def test_plan_of_a_tiny_config_fits_a_v5e_slice(tiny_config, tmp_path, capsys):
  out = tmp_path / "plan.json"
  assert cli.main(["plan", tiny_config, "--topology", "v5e:2x2", "--no-search", "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "plan on v5e:2x2: 4 x TPU v5 lite (16 GiB HBM each), mesh data=1 fsdp=2 tensor=2" in text
  assert "roofline ESTIMATE" in text and "attention splash" in text  # auto on a TPU
  r = json.loads(out.read_text())
  g = r["per_device_bytes"]
  assert r["fits"] and r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert 0 <= g["temporaries"] < g["total"] < 2 ** 30 and g["eval_total"] > 0  # tiny: temps may be 0
  # Student params: float32, layers and embeddings split over fsdp × tensor (at most 4 ways) + the Adam moments.
  assert g["optimizer"] == pytest.approx(2 * g["student_params"], rel=0.05)
  assert g["batch"] == 4 * 4 * 32 * 4 // 2  # 4 int32 [4, 32] arrays over 2 batch shards
  shape = flops.ModelShape(vocab_size=512, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                           intermediate_size=64)
  teacher = flops.ModelShape(**{**shape.__dict__, "hidden_size": 64, "head_dim": 16, "intermediate_size": 128})
  assert r["flops"]["model_per_step"] == flops.step_flops([teacher], shape, 4, 32, "full").model
  assert list(r["search"]) == ["4"] and ">= 4, not searched (--no-search)" in text


def test_plan_that_does_not_fit_exits_1_with_one_line(tiny_config, capsys):
  code = cli.main(["plan", tiny_config, "data.global_batch_size=2", "train.attention=xla", "--topology", "v5e-4",
                   "--hbm-gib", "0.0001"])
  err = capsys.readouterr().err
  assert code == 1
  assert err.count("\n") == 1 and err.startswith("plan: does not fit: the train step needs ")
  assert "no global batch fits" in err and "data.global_batch_size (2)" in err


def test_plan_needs_config_json_only_and_names_the_field(tmp_path, capsys):
  cfg = tmp_path / "c.yaml"
  cfg.write_text(f"teacher: {{path: {tmp_path / 'missing'}}}\nobjective: {{terms: [{{loss: forward_kl}}]}}\n")
  assert cli.main(["plan", str(cfg), "--topology", "v5e:2x2"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "teachers.teacher.path: plan reads" in err


def test_without_libtpu_plan_says_how_to_install_it(monkeypatch):
  real = plan.importlib.util.find_spec
  monkeypatch.setattr(plan.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(UserError, match=r'^plan: libtpu is not installed; .*pip install -e "\.\[tpu\]"$'):
    plan.topology_devices(plan.parse_topology("v5e:2x2"))


# --------------------------------------------------------------------------- the pod recipes (real config.json shapes)

POD_RECIPES = sorted(os.path.join("configs", "pod", n) for n in os.listdir(os.path.join(ROOT, "configs", "pod")))


def _recipe_command(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    first = f.readline().strip()
  prefix = f"# distill-jax plan {path} --topology "
  assert first.startswith(prefix), first
  return first[len(prefix):]


@pytest.mark.parametrize("path", POD_RECIPES)
def test_pod_recipe_starts_with_its_plan_command_and_loads(path):
  topology = plan.parse_topology(_recipe_command(path))
  cfg = config_lib.load_config(os.path.join(ROOT, path))
  assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == topology.num_chips
  for p in [t.path for t in cfg.teachers.values()] + [cfg.student.path]:
    assert os.listdir(os.path.join(ROOT, p)) == ["config.json"]  # shapes only, no weights


@pytest.mark.slow
@pytest.mark.parametrize("path", POD_RECIPES)
def test_pod_recipe_plans_from_config_json_alone(path, monkeypatch):
  """Each recipe's train and eval steps compile for its slice (minutes each on a 2-core CPU)."""
  monkeypatch.chdir(ROOT)
  topology = plan.parse_topology(_recipe_command(path))
  r = plan.plan(config_lib.load_config(path), topology, search=False)
  assert r["chips"] == topology.num_chips and r["flops"]["model_per_step"] > 0
  assert r["per_device_bytes"]["params"] > 0 and 0 < r["roofline_estimate"]["mfu"] <= 1
