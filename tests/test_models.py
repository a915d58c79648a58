"""Parity of `load_model` / `Model.apply` with transformers' PyTorch models, on tiny checkpoints."""

from __future__ import annotations

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


def torch_outputs(path, family, task, batch):
  model = tiny._TASK_CLASSES[task].from_pretrained(path, attn_implementation="eager").eval()
  kwargs = dict(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]))
  if family not in tiny.ENCODER_FAMILIES:
    kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(batch["attention_mask"], -1) - 1, 0))
  with torch.no_grad():
    return model(**kwargs, output_hidden_states=True, output_attentions=True)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity_with_pytorch(checkpoint, case):
  family, task, tie, safe = case
  path = checkpoint(family, task, tie, safe)
  model = dm.load_model(path, task=task)
  assert model.family == family and model.task == task
  batch = make_batch(family)
  want = ("logits", "hidden_states", "attention_probs", "pooled")
  out = model.apply(model.params, batch, outputs=want)
  ref = torch_outputs(path, family, task, batch)
  valid = batch["attention_mask"].astype(bool)

  if task == "sequence_classification":
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=TOL)
    assert out.logits.shape == (2, model.hf_config.num_labels)
  elif task == "encoder":
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.last_hidden_state.numpy()[valid], atol=TOL)
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
