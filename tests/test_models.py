"""`load_model` / `Model.apply` equal transformers' PyTorch models, through the public contract.

Family-level details (every config feature, generate) are in test_models_decoder.py,
test_models_encoder.py and test_generate.py; here every family goes through `dm.load_model`
on checkpoints saved by PyTorch transformers, with non-default numeric config fields
(tests/tiny.py), batches longer than any sliding window, left and right padding.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny
import distill_jax.models as dm

TOL = 1e-4
BF16_TOL = 5e-3  # bf16 params and compute vs float32: the measured error (2.1e-3) with a margin
SEQ = 12  # longer than the tiny sliding windows (6)

# (family, task, tie_word_embeddings, safetensors)
CASES = [
    ("bert", "masked_lm", True, True),
    ("bert", "sequence_classification", True, False),  # pytorch_model.bin
    ("roberta", "masked_lm", True, True),
    ("roberta", "encoder", True, True),
    ("distilbert", "masked_lm", True, True),
    ("distilbert", "sequence_classification", True, True),
    ("gpt2", "causal_lm", True, True),
    ("gpt2", "encoder", True, True),
    ("llama", "causal_lm", True, True),
    ("llama", "causal_lm", False, True),
    ("mistral", "causal_lm", False, True),
    ("qwen2", "causal_lm", True, True),
    ("qwen3", "causal_lm", False, True),
    ("gemma", "causal_lm", True, True),
    ("gemma2", "causal_lm", True, True),
    ("gemma3_text", "causal_lm", True, True),
    ("smollm3", "causal_lm", True, True),
]


def case_id(case):
  family, task, tie, safe = case
  return f"{family}-{task}-{'tied' if tie else 'untied'}-{'st' if safe else 'bin'}"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
  cache = {}

  def make(family, task, tie=True, safe=True, **overrides):
    key = (family, task, tie, safe, tuple(sorted(overrides.items())))
    if key not in cache:
      path = tmp_path_factory.mktemp(f"{family}-{task}")
      cache[key] = tiny.make_checkpoint(path, family, task, tie_word_embeddings=tie, safetensors=safe,
                                        **overrides)
    return cache[key]

  return make


def make_batch(family, seq=SEQ):
  """Two rows: one full, one with 7 real tokens (left-padded for decoders, right for encoders)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, tiny.VOCAB_SIZE, size=(2, seq)).astype(np.int32)
  mask = (np.arange(seq)[None] < np.array([[seq], [7]])).astype(np.int32)
  if family in tiny.ENCODER_FAMILIES:
    ids = np.where(mask == 1, ids, 0)
  else:
    ids[1], mask[1] = np.roll(np.where(mask[1] == 1, ids[1], 0), seq - 7), np.roll(mask[1], seq - 7)
  return {"input_ids": ids, "attention_mask": mask}


def torch_inputs(family, batch):
  """`batch` for a PyTorch model, decoders with the positions of `make_batch`'s left padding."""
  kwargs = dict(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]))
  if family not in tiny.ENCODER_FAMILIES:
    kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(batch["attention_mask"], -1) - 1, 0))
  return kwargs


def torch_outputs(path, family, task, batch):
  model = tiny._TASK_CLASSES[task].from_pretrained(path, attn_implementation="eager").eval()
  with torch.no_grad():
    return model(**torch_inputs(family, batch), output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity_with_pytorch(checkpoint, case):
  family, task, tie, safe = case
  path = checkpoint(family, task, tie, safe)
  model = dm.load_model(path, task=task)
  assert model.family == family and model.task == task
  batch = make_batch(family)
  want = ("hidden_states", "attention_probs", "pooled") + (("logits",) if task != "encoder" else ())
  out = jax.jit(lambda p, b: model.apply(p, b, outputs=want))(model.params, batch)
  ref = torch_outputs(path, family, task, batch)
  valid = batch["attention_mask"].astype(bool)

  if task == "sequence_classification":
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=TOL)
    assert out.logits.shape == (2, model.hf_config.num_labels)
  elif task == "encoder":
    assert out.logits is None and "logits" not in model.capabilities
    np.testing.assert_allclose(np.asarray(out.hidden_states[-1])[valid], ref.last_hidden_state.numpy()[valid],
                               atol=TOL)
  else:
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], atol=TOL)
  assert out.hidden_states.shape[0] == model.num_layers + 1 == len(ref.hidden_states)
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs.numpy()[valid], atol=TOL)
  assert out.attention_probs.shape[0] == model.num_layers
  q_valid = valid[:, None, :, None] & valid[:, None, None, :]
  for ours, theirs in zip(out.attention_probs, ref.attentions):
    np.testing.assert_allclose(np.where(q_valid, ours, 0), np.where(q_valid, theirs.numpy(), 0), atol=TOL)
  last = np.asarray(out.hidden_states[-1]) if family in tiny.ENCODER_FAMILIES or task == "encoder" else None
  if last is not None:
    expected = (last * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
    np.testing.assert_allclose(out.pooled, expected, atol=1e-5)
  assert out.values is None and out.attention_scores is None


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "gemma2"])
def test_scores_and_values(checkpoint, family):
  task = "masked_lm" if family in tiny.ENCODER_FAMILIES else "causal_lm"
  model = dm.load_model(checkpoint(family, task), task=task)
  assert {"attention_scores", "values"} <= model.capabilities
  batch = make_batch(family)
  apply = jax.jit(lambda p, b: model.apply(p, b, outputs=("attention_scores", "attention_probs", "values")))
  out = apply(model.params, batch)
  valid = batch["attention_mask"].astype(bool)
  b, t = valid.shape
  assert out.attention_scores.shape == (model.num_layers, b, model.num_heads, t, t)
  assert out.values.shape[:3] == (model.num_layers, b, t)
  keys = valid[:, None, None, :]
  if family not in tiny.ENCODER_FAMILIES:
    keys = keys & np.tril(np.ones((t, t), bool))[None, None]
  rows = valid[:, None, :, None]
  for scores, probs in zip(out.attention_scores, out.attention_probs):
    masked = np.broadcast_to(rows & ~keys, scores.shape)  # masked keys of real queries
    assert np.all(np.asarray(scores)[masked] == -1e4)
    np.testing.assert_allclose(np.where(rows & keys, jax.nn.softmax(scores, -1), 0),
                               np.where(rows & keys, probs, 0), atol=1e-5)
  assert out.logits is None and out.hidden_states is None


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_values_match_pytorch_value_projection(checkpoint, family):
  task = "masked_lm" if family == "bert" else "causal_lm"
  path = checkpoint(family, task)
  model = dm.load_model(path, task=task)
  batch = make_batch(family)
  out = jax.jit(lambda p, b: model.apply(p, b, outputs=("values",)))(model.params, batch)  # not op by op
  pt = tiny._TASK_CLASSES[task].from_pretrained(path, attn_implementation="eager").eval()
  layers = pt.bert.encoder.layer if family == "bert" else pt.model.layers
  captured = []
  hooks = [(layer.attention.self.value if family == "bert" else layer.self_attn.v_proj).register_forward_hook(
      lambda mod, args, result: captured.append(result.numpy())) for layer in layers]
  with torch.no_grad():
    pt(**torch_inputs(family, batch))
  for hook in hooks:
    hook.remove()
  valid = batch["attention_mask"].astype(bool)
  for ours, theirs in zip(out.values, captured):
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=TOL)


def test_pooling_cls_and_jit_dropout(checkpoint):
  model = dm.load_model(checkpoint("bert", "masked_lm"), task="masked_lm")
  batch = make_batch("bert")
  out = jax.jit(lambda p, b: model.apply(p, b, outputs=("pooled", "hidden_states"), pooling="cls"))(
      model.params, batch)
  np.testing.assert_array_equal(out.pooled, out.hidden_states[-1][:, 0])
  apply = jax.jit(lambda p, b, rng: model.apply(p, b, train=True, rng=rng))
  a = apply(model.params, batch, jax.random.key(0)).logits
  b = apply(model.params, batch, jax.random.key(1)).logits
  assert not np.allclose(a, b)  # dropout is on
  np.testing.assert_array_equal(a, apply(model.params, batch, jax.random.key(0)).logits)
  same = jax.jit(lambda p, b: model.apply(p, b, train=True))(model.params, batch).logits  # no rng: deterministic
  np.testing.assert_allclose(same, jax.jit(model.apply)(model.params, batch).logits, atol=1e-6)


def test_bfloat16_params_and_compute(checkpoint):
  path = checkpoint("llama", "causal_lm")
  model = dm.load_model(path, task="causal_lm", dtype="bfloat16", param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
  ref = dm.load_model(path, task="causal_lm")
  batch = make_batch("llama")
  out = jax.jit(lambda p, b: model.apply(p, b, outputs=("logits", "hidden_states")))(model.params, batch)
  assert out.hidden_states.dtype == jnp.bfloat16
  valid = batch["attention_mask"].astype(bool)
  ref_logits = np.asarray(jax.jit(ref.apply)(ref.params, batch).logits)
  diff = np.abs(np.asarray(out.logits, np.float32) - ref_logits)[valid]
  assert diff.max() < BF16_TOL  # measured 2.1e-3 (logits up to 0.74)
  # The tolerance is far below what a real mistake does: the model without its last layer.
  spec = ref.spec
  short = dataclasses.replace(spec, num_layers=spec.num_layers - 1, layer_windows=spec.layer_windows[:-1],
                              layer_rope=spec.layer_rope[:-1])
  params = {**ref.params, "layers": jax.tree.map(lambda x: x[:-1], ref.params["layers"])}
  shallow = jax.jit(ref.module.clone(spec=short).apply)({"params": params}, jnp.asarray(batch["input_ids"]),
                                                        jnp.asarray(batch["attention_mask"]))["logits"]
  assert np.abs(np.asarray(shallow) - ref_logits)[valid].max() > 10 * BF16_TOL  # measured 0.18


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "bert"])
def test_tied_head_is_one_array(checkpoint, family):
  """A tied head is the embedding itself: the parameter count is PyTorch's, not one table more."""
  task = "masked_lm" if family == "bert" else "causal_lm"
  path = checkpoint(family, task, True)
  model = dm.load_model(path, task=task)
  pt = tiny._TASK_CLASSES[task].from_pretrained(path)
  ours = sum(int(np.size(x)) for x in jax.tree.leaves(model.params))
  assert ours == pt.num_parameters()


def _copy_without(src, dest, weight):
  """A copy of checkpoint `src` at `dest` whose safetensors lack the PyTorch-named `weight`."""
  import shutil

  import safetensors.numpy

  shutil.copytree(src, dest)
  state = safetensors.numpy.load_file(src / "model.safetensors")
  del state[weight]
  safetensors.numpy.save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
  return dest


def test_missing_weight_is_listed(checkpoint, tmp_path):
  path = _copy_without(checkpoint("bert", "masked_lm"), tmp_path / "ckpt",
                       "bert.encoder.layer.1.attention.self.key.weight")
  with pytest.raises(ValueError, match=r"checkpoint: .*bert\.encoder\.layer\.1\.attention\.self\.key\.weight"):
    dm.load_model(path, task="masked_lm")


def test_untied_llama_head_without_lm_head_is_an_error(checkpoint, tmp_path):
  path = _copy_without(checkpoint("llama", "causal_lm", False), tmp_path / "ckpt", "lm_head.weight")
  with pytest.raises(ValueError, match=r"checkpoint: .*lm_head\.weight"):
    dm.load_model(path, task="causal_lm")


def test_unused_weights_warn_and_head_into_base(checkpoint):
  with pytest.warns(UserWarning, match="unused"):
    model = dm.load_model(checkpoint("bert", "masked_lm"), task="encoder")
  assert model.task == "encoder" and "logits" not in model.capabilities


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="translation"), "task: unknown 'translation'"),
    (dict(task="sequence_classification"), "task: 'sequence_classification' is not available for family 'gpt2'"),
    (dict(task="causal_lm", dtype="int8"), "dtype: "),
    (dict(task="causal_lm", remat="some"), "remat: "),
])
def test_bad_arguments(checkpoint, kwargs, match):
  with pytest.raises(ValueError, match=match):
    dm.load_model(checkpoint("gpt2", "causal_lm"), **kwargs)


def test_unimplemented_config_feature_is_one_line(checkpoint, tmp_path):
  import shutil

  path = tmp_path / "yarn"
  shutil.copytree(checkpoint("llama", "causal_lm"), path)
  config = json.loads((path / "config.json").read_text())
  config.pop("rope_parameters", None)
  config["rope_theta"] = 1e5
  config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="yarn") as info:
    dm.load_model(path, task="causal_lm")
  assert "\n" not in str(info.value) and "rope" in str(info.value)
  with pytest.raises(ValueError, match="family: unknown model_type 't5'"):
    dm.model_from_config({"model_type": "t5"}, "causal_lm")


def test_bad_sources(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="name_or_path: .* holds no checkpoint"):
    dm.load_model(tmp_path, task="encoder")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  with pytest.raises(ValueError, match="name_or_path: .*no network.*HF_HUB_OFFLINE"):
    dm.load_model("nobody/not-a-model", task="encoder")


def test_outputs_are_checked(checkpoint):
  model = dm.load_model(checkpoint("gpt2", "encoder"), task="encoder")
  with pytest.raises(ValueError, match="outputs: 'logits' is not available for family 'gpt2'"):
    model.apply(model.params, make_batch("gpt2"), outputs=("logits",))
  with pytest.raises(ValueError, match="outputs: unknown 'logprobs'"):
    model.check_outputs(("logprobs",))


def _flax_named(state):
  """A transformers-Flax-named nested state (what a `flax_model.msgpack` holds) of a PyTorch state."""
  from flax.traverse_util import unflatten_dict

  flat = {}
  for name, value in state.items():
    *path, leaf = name.split(".")
    if leaf == "weight" and value.ndim == 2 and "embeddings" not in path[-1]:
      leaf, value = "kernel", value.T
    elif leaf == "weight":
      leaf = "embedding" if "embeddings" in path[-1] else "scale"
    flat[tuple(path) + (leaf,)] = value
  return unflatten_dict(flat)


def _save_sharded_bin(state, out):
  """`pytorch_model-0000i-of-00002.bin` shards + index, as older transformers wrote them."""
  out.mkdir()
  names = sorted(state)
  shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
  for file, keys in shards.items():
    torch.save({k: torch.tensor(state[k]) for k in keys}, out / file)
  weight_map = {k: file for file, keys in shards.items() for k in keys}
  (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoints(checkpoint, tmp_path):
  import flax.serialization

  from distill_jax.models import checkpoints

  path = checkpoint("bert", "masked_lm")
  reference = dm.load_model(path, task="masked_lm")
  pt = tiny._TASK_CLASSES["masked_lm"].from_pretrained(path)
  pt.save_pretrained(tmp_path / "st", max_shard_size="20KB")
  state = checkpoints.read_state_dict(path)
  _save_sharded_bin(state, tmp_path / "bin")
  (tmp_path / "msgpack").mkdir()
  (tmp_path / "msgpack" / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(_flax_named(state)))
  for source in ("st", "bin", "msgpack"):
    reference.tokenizer.save_pretrained(tmp_path / source)
    (tmp_path / source / "config.json").write_text((path / "config.json").read_text())
  assert (tmp_path / "st" / "model.safetensors.index.json").exists()
  assert (tmp_path / "bin" / "pytorch_model.bin.index.json").exists()
  for source in ("st", "bin", "msgpack"):
    model = dm.load_model(tmp_path / source, task="masked_lm")
    jax.tree.map(np.testing.assert_array_equal, model.params, reference.params)


def test_compile_is_one_scan_whatever_the_depth(checkpoint):
  """The layer stack is one scan: the lowered program does not grow with depth."""
  sizes = []
  for layers in (2, 8):
    model = dm.load_model(checkpoint("llama", "causal_lm", num_hidden_layers=layers), task="causal_lm")
    text = jax.jit(lambda p, b: model.apply(p, b).logits).lower(model.params, make_batch("llama")).as_text()
    sizes.append(len(text))
  assert sizes[1] < sizes[0] * 1.1
