"""Parity of `load_model` / `Model.apply` with transformers' PyTorch models, on tiny checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny
import distill_jax.models as dm

TOL = 1e-4

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
    ("llama", "causal_lm", True, True),  # the key case: Flax Llama never ties its lm_head
    ("llama", "causal_lm", False, True),
    ("mistral", "causal_lm", True, True),
    ("gemma", "causal_lm", True, True),
    ("opt", "causal_lm", True, True),
    ("gpt_neo", "causal_lm", False, True),
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


def make_batch(family):
  """Two rows: right padding, and (for decoders) left padding."""
  ids = np.array([[5, 17, 42, 99, 7, 250, 31, 8], [12, 64, 128, 9, 0, 0, 0, 0]], np.int32)
  mask = (np.arange(8)[None] < np.array([[8], [4]])).astype(np.int32)
  if family in tiny.ENCODER_FAMILIES:
    ids = np.where(mask == 1, ids, 0)
  else:
    ids[1], mask[1] = np.roll(ids[1], 4), np.roll(mask[1], 4)
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
  out = model.apply(model.params, batch, outputs=want)
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
  assert len(out.hidden_states) == model.num_layers + 1 == len(ref.hidden_states)
  for ours, theirs in zip(out.hidden_states, ref.hidden_states):
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs.numpy()[valid], atol=TOL)
  assert len(out.attention_probs) == model.num_layers
  for ours, theirs in zip(out.attention_probs, ref.attentions):
    ours, theirs = np.asarray(ours), theirs.numpy()
    q_valid = valid[:, None, :, None] & valid[:, None, None, :]
    np.testing.assert_allclose(np.where(q_valid, ours, 0), np.where(q_valid, theirs, 0), atol=TOL)
  last = np.asarray(out.hidden_states[-1])
  expected = (last * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
  np.testing.assert_allclose(out.pooled, expected, atol=1e-5)
  assert out.values is None and out.attention_scores is None


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2", "opt"])
def test_scores_and_values(checkpoint, family):
  task = "masked_lm" if family in tiny.ENCODER_FAMILIES else "causal_lm"
  model = dm.load_model(checkpoint(family, task), task=task)
  assert {"attention_scores", "values"} <= model.capabilities
  batch = make_batch(family)
  apply = jax.jit(lambda p, b: model.apply(p, b, outputs=("attention_scores", "attention_probs", "values")))
  out = apply(model.params, batch)
  valid = batch["attention_mask"].astype(bool)
  b, t = valid.shape
  assert len(out.attention_scores) == len(out.values) == model.num_layers
  keys = valid[:, None, None, :]
  if family not in tiny.ENCODER_FAMILIES:
    keys = keys & np.tril(np.ones((t, t), bool))[None, None]
  rows = valid[:, None, :, None]
  for scores, probs, values in zip(out.attention_scores, out.attention_probs, out.values):
    assert scores.shape == (b, model.num_heads, t, t) and values.shape == (b, t, model.hidden_size)
    np.testing.assert_array_equal(np.asarray(scores)[~np.broadcast_to(keys, scores.shape)], -1e4)
    np.testing.assert_allclose(np.where(rows & keys, jax.nn.softmax(scores, -1), 0),
                               np.where(rows & keys, probs, 0), atol=1e-5)
  assert out.logits is None and out.hidden_states is None


def test_values_match_pytorch_value_projection(checkpoint):
  path = checkpoint("bert", "masked_lm")
  model = dm.load_model(path, task="masked_lm")
  batch = make_batch("bert")
  out = model.apply(model.params, batch, outputs=("values", "hidden_states"))
  pt = tiny._TASK_CLASSES["masked_lm"].from_pretrained(path).eval()
  for i, values in enumerate(out.values):
    value_layer = pt.bert.encoder.layer[i].attention.self.value
    with torch.no_grad():
      expected = value_layer(torch.tensor(np.asarray(out.hidden_states[i]))).numpy()
    np.testing.assert_allclose(values, expected, atol=TOL)


def test_pooling_cls_and_jit_dropout(checkpoint):
  model = dm.load_model(checkpoint("bert", "masked_lm"), task="masked_lm")
  batch = make_batch("bert")
  out = model.apply(model.params, batch, outputs=("pooled", "hidden_states"), pooling="cls")
  np.testing.assert_array_equal(out.pooled, out.hidden_states[-1][:, 0])
  apply = jax.jit(lambda p, b, rng: model.apply(p, b, train=True, rng=rng))
  a = apply(model.params, batch, jax.random.key(0)).logits
  b = apply(model.params, batch, jax.random.key(1)).logits
  assert not np.allclose(a, b)  # dropout is on
  same = model.apply(model.params, batch, train=True).logits  # no rng: deterministic
  np.testing.assert_allclose(same, model.apply(model.params, batch).logits, atol=1e-6)


def test_bfloat16_params_and_compute(checkpoint):
  path = checkpoint("llama", "causal_lm")
  model = dm.load_model(path, task="causal_lm", dtype="bfloat16", param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
  ref = dm.load_model(path, task="causal_lm")
  batch = make_batch("llama")
  logits = model.apply(model.params, batch).logits
  assert logits.dtype == jnp.bfloat16
  valid = batch["attention_mask"].astype(bool)
  diff = np.abs(np.asarray(logits, np.float32) - np.asarray(ref.apply(ref.params, batch).logits))[valid]
  assert diff.max() < 0.05


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
  with pytest.raises(ValueError, match=r"checkpoint: .*bert/encoder/layer/1/attention/self/key/kernel"):
    dm.load_model(path, task="masked_lm")


def test_untied_llama_head_without_lm_head_is_an_error(checkpoint, tmp_path):
  path = _copy_without(checkpoint("llama", "causal_lm", False), tmp_path / "ckpt", "lm_head.weight")
  with pytest.raises(ValueError, match="lm_head/kernel"):
    dm.load_model(path, task="causal_lm")


def test_unused_weights_warn_and_head_into_base(checkpoint):
  with pytest.warns(UserWarning, match="unused weight"):
    model = dm.load_model(checkpoint("bert", "masked_lm"), task="encoder")
  assert "cls" not in model.params


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="translation"), "task: unknown 'translation'"),
    (dict(task="sequence_classification"), "task: 'sequence_classification' is not available for family 'gpt2'"),
    (dict(task="causal_lm", dtype="int8"), "dtype: "),
])
def test_bad_arguments(checkpoint, kwargs, match):
  with pytest.raises(ValueError, match=match):
    dm.load_model(checkpoint("gpt2", "causal_lm"), **kwargs)


def test_bad_sources(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="name_or_path: .* holds no checkpoint"):
    dm.load_model(tmp_path, task="encoder")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  with pytest.raises(ValueError, match="name_or_path: .*no network.*HF_HUB_OFFLINE"):
    dm.load_model("nobody/not-a-model", task="encoder")


def test_unsupported_outputs(checkpoint):
  model = dm.load_model(checkpoint("llama", "causal_lm"), task="causal_lm")
  assert "values" not in model.capabilities
  with pytest.raises(ValueError, match="outputs: 'values' is not available for family 'llama'"):
    model.apply(model.params, make_batch("llama"), outputs=("logits", "values"))
  with pytest.raises(ValueError, match="outputs: unknown 'logprobs'"):
    model.check_outputs(("logprobs",))


def test_sharded_checkpoints(checkpoint, tmp_path):
  import transformers

  path = checkpoint("bert", "masked_lm")
  reference = dm.load_model(path, task="masked_lm")
  pt = tiny._TASK_CLASSES["masked_lm"].from_pretrained(path)
  pt.save_pretrained(tmp_path / "st", max_shard_size="20KB")
  flax_model = transformers.FlaxBertForMaskedLM(reference.hf_config, _do_init=False)
  flax_model.save_pretrained(tmp_path / "msgpack", params=reference.params, max_shard_size="20KB")
  reference.tokenizer.save_pretrained(tmp_path / "msgpack")
  assert (tmp_path / "st" / "model.safetensors.index.json").exists()
  assert (tmp_path / "msgpack" / "flax_model.msgpack.index.json").exists()
  for source in ("st", "msgpack"):
    model = dm.load_model(tmp_path / source, task="masked_lm")
    jax.tree.map(np.testing.assert_array_equal, model.params, reference.params)
