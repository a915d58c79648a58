"""Students derived from teachers, HF export, layer maps and vocabulary checks."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

import tiny
import distill_jax.models as dm
from test_models import TOL, checkpoint, make_batch, torch_inputs  # noqa: F401  (session fixture)


def _layer(params, i):
  """Layer `i` of the scanned stack: every leaf under a "layers" key, indexed on its leading axis."""
  flat = flatten_dict(params)
  return {k: np.asarray(v)[i] for k, v in flat.items() if "layers" in k}


def _non_layer(params):
  return {k: np.asarray(v) for k, v in flatten_dict(params).items() if "layers" not in k}


@pytest.mark.parametrize("family, task", [("bert", "masked_lm"), ("llama", "causal_lm"), ("gemma2", "causal_lm"),
                                          ("smollm3", "causal_lm")])
def test_init_student_copies_chosen_layers(checkpoint, family, task):
  teacher = dm.load_model(checkpoint(family, task, num_hidden_layers=4), task=task)
  student = dm.init_student(teacher, layers=[0, 2])
  assert student.num_layers == 2 and student.family == family and student.tokenizer is teacher.tokenizer
  for s, t in ((0, 0), (1, 2)):
    jax.tree.map(np.testing.assert_array_equal, _layer(student.params, s), _layer(teacher.params, t))
  jax.tree.map(np.testing.assert_array_equal, _non_layer(student.params), _non_layer(teacher.params))
  assert {np.asarray(x).dtype for x in jax.tree.leaves(student.params)} == {np.dtype(np.float32)}
  per_layer = getattr(teacher.hf_config, "layer_types", None) or getattr(teacher.hf_config, "no_rope_layers", None)
  if per_layer is not None:  # alternating attention / no-RoPE layers follow the copied layers
    kept = getattr(student.hf_config, "layer_types", None) or student.hf_config.no_rope_layers
    assert list(kept) == [per_layer[0], per_layer[2]]
  out = student.apply(student.params, make_batch(family), outputs=("logits", "hidden_states"))
  assert len(out.hidden_states) == 3
  every_other = dm.init_student(teacher, num_layers=2)
  jax.tree.map(np.testing.assert_array_equal, every_other.params, student.params)


def test_init_student_new_width_and_bad_layers(checkpoint):
  teacher = dm.load_model(checkpoint("bert", "masked_lm", num_hidden_layers=4), task="masked_lm")
  narrow = dm.init_student(teacher, num_layers=2, hidden_size=16, intermediate_size=32)
  assert (narrow.hidden_size, narrow.num_layers, narrow.num_heads) == (16, 2, 4)
  assert narrow.apply(narrow.params, make_batch("bert")).logits.shape == (2, 12, teacher.hf_config.vocab_size)
  with pytest.raises(ValueError, match=r"layers: \[0, 4\]"):
    dm.init_student(teacher, layers=[0, 4])
  with pytest.raises(ValueError, match="num_layers: 5"):
    dm.init_student(teacher, num_layers=5)


@pytest.mark.parametrize("family, task", [("bert", "masked_lm"), ("distilbert", "sequence_classification"),
                                          ("gpt2", "causal_lm"), ("llama", "causal_lm"), ("qwen3", "causal_lm"),
                                          ("gemma3_text", "causal_lm")])
def test_save_pretrained_loads_in_pytorch(checkpoint, tmp_path, family, task):
  teacher = dm.load_model(checkpoint(family, task, num_hidden_layers=4), task=task)
  student = dm.init_student(teacher, num_layers=2)
  params = jax.tree.map(lambda x: x + 0.01, student.params)  # "trained"; a tied head stays one array
  out_dir = student.save_pretrained(params, tmp_path / "student")
  assert oct((out_dir / "model.safetensors").stat().st_mode & 0o777) == "0o644"
  batch = make_batch(family)
  ours = student.apply(params, batch).logits
  pt, info = tiny._TASK_CLASSES[task].from_pretrained(out_dir, output_loading_info=True)
  assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    theirs = pt.eval()(**torch_inputs(family, batch)).logits.numpy()
  valid = batch["attention_mask"].astype(bool)
  if task == "sequence_classification":
    np.testing.assert_allclose(ours, theirs, atol=TOL)
  else:
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=TOL)
  reloaded = dm.load_model(out_dir, task=task)
  jax.tree.map(np.testing.assert_array_equal, reloaded.params, params)


def test_model_from_config_dict():
  config = tiny.config_for("gpt2").to_dict()
  model = dm.model_from_config(config, "causal_lm", seed=1)
  assert model.family == "gpt2" and model.tokenizer is None and model.vocab_size == tiny.VOCAB_SIZE
  assert model.apply(model.params, make_batch("gpt2")).logits.shape == (2, 12, tiny.VOCAB_SIZE)
  with pytest.raises(ValueError, match="family: unknown model_type 't5'"):
    dm.model_from_config({"model_type": "t5"}, "causal_lm")


@pytest.mark.parametrize("strategy, expected", [
    ("uniform", ((1, 3), (2, 6), (3, 9), (4, 12))),
    ("last", ((4, 12),)),
    ([2, 4, 8, 12], ((1, 2), (2, 4), (3, 8), (4, 12))),
    ([(0, 0), (4, 12)], ((0, 0), (4, 12))),
])
def test_layer_map(strategy, expected):
  assert dm.layer_map(12, 4, strategy) == expected


@pytest.mark.parametrize("args", [(12, 4, [1, 2, 13, 4]), (12, 4, [1, 2]), (12, 4, "middle"), (2, 4, "uniform"),
                                  (12, 4, [(5, 3)])])
def test_layer_map_errors(args):
  with pytest.raises(ValueError, match="^layers: "):
    dm.layer_map(*args)


def test_check_vocab(checkpoint, caplog):
  bert = dm.load_model(checkpoint("bert", "masked_lm"), task="masked_lm")
  gpt2 = dm.load_model(checkpoint("gpt2", "causal_lm"), task="causal_lm")
  assert dm.check_vocab(gpt2, dm.init_student(gpt2, num_layers=1)) == len(gpt2.tokenizer)
  with pytest.raises(ValueError, match="^vocab: "):
    dm.check_vocab(bert, gpt2)
  padded = dm.load_model(checkpoint("gpt2", "causal_lm", vocab_size=tiny.VOCAB_SIZE + 64), task="causal_lm")
  with caplog.at_level(logging.INFO, logger="distill_jax.models"):
    assert dm.check_vocab(padded, gpt2) == len(gpt2.tokenizer)
  assert "sliced" in caplog.text


def test_student_params_do_not_share_buffers_with_the_teacher(tmp_path):
  """A student's state is donated to the jitted step; a shared buffer would kill the teacher's."""
  teacher = dm.load_model(tiny.make_checkpoint(tmp_path / "t", "bert", "encoder", num_hidden_layers=2), "encoder")
  student = dm.init_student(teacher, num_layers=2)
  t_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(teacher.params) if isinstance(x, jax.Array)}
  s_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(student.params) if isinstance(x, jax.Array)}
  assert not t_ptrs & s_ptrs
  jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(student.params)
  jax.block_until_ready(jax.tree.leaves(teacher.params))  # the teacher's buffers are alive


def test_student_computes_in_its_own_dtype_with_f32_master_weights(tmp_path):
  teacher = dm.load_model(tiny.make_checkpoint(tmp_path / "t", "bert", "encoder", num_hidden_layers=2), "encoder",
                          dtype="bfloat16", param_dtype="bfloat16")
  student = dm.init_student(teacher, num_layers=1)
  assert student.dtype in ("float32", np.float32) or np.dtype(student.dtype) == np.float32
  assert {np.asarray(x).dtype for x in jax.tree.leaves(student.params)} == {np.dtype(np.float32)}
  half = dm.init_student(teacher, num_layers=1, dtype="bfloat16")
  batch = {"input_ids": np.array([[2, 7, 9, 3]]), "attention_mask": np.ones((1, 4), np.int32)}
  assert half.apply(half.params, batch, outputs=("hidden_states",)).hidden_states[-1].dtype == jax.numpy.bfloat16
