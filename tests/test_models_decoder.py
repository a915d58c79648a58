"""Parity of our Flax decoders with transformers' PyTorch models, on tiny random checkpoints.

Every case sets non-default values of the config fields that change the numbers (RoPE base
and scaling, windows shorter than the batch, eps, tying, biases, head_dim, GQA, softcaps);
all torch params are perturbed so biases and norm weights are not their zero/one init.
"""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp
import flax.linen as nn
import safetensors.numpy
from flax.traverse_util import flatten_dict

from distill_jax.models import checkpoints, decoder, decoder_spec, layers

V = 384
B, T = 2, 48
TOL = 1e-4
_RIGHT_PAD, _LEFT_PAD = 10, 13


def _llama3(theta=1e5):
  return {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


CASES = {
    "llama_llama3_gqa_tied": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters=_llama3()),
    "llama_linear_bias_untied": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True, rms_norm_eps=1e-4,
        rope_parameters={"rope_type": "linear", "rope_theta": 5e4, "factor": 2.5}),
    "llama_dynamic_past_max_positions": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=64, max_position_embeddings=32, hidden_act="gelu_new",
        rope_parameters={"rope_type": "dynamic", "rope_theta": 2e4, "factor": 3.0}),
    "mistral_sliding8": lambda: transformers.MistralConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen2_bias_sliding": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=64, max_position_embeddings=128, use_sliding_window=True, sliding_window=8,
        max_window_layers=1, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3_qknorm_head_dim": lambda: transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128, attention_bias=True,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    # README's Qwen3 sliding layers: use_sliding_window + max_window_layers give layer_types
    # (full, sliding, sliding), windows shorter than the batch.
    "qwen3_sliding_layers": lambda: transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=3, intermediate_size=64, max_position_embeddings=128, use_sliding_window=True,
        sliding_window=8, max_window_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    "gemma_head_dim_bias": lambda: transformers.GemmaConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128, attention_bias=True,
        rms_norm_eps=1e-2, rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    "gemma2_softcaps_sliding8": lambda: transformers.Gemma2Config(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=3, intermediate_size=64, max_position_embeddings=128, query_pre_attn_scalar=12,
        attn_logit_softcapping=0.2, final_logit_softcapping=0.5, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 5e4}),
    "gemma3_local_global_rope": lambda: transformers.Gemma3TextConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=3, intermediate_size=64, max_position_embeddings=128, query_pre_attn_scalar=10,
        final_logit_softcapping=0.4, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
    "smollm3_no_rope_layers": lambda: transformers.SmolLM3Config(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
        intermediate_size=64, max_position_embeddings=128, no_rope_layers=[1, 0, 1], attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 2e5}, pad_token_id=0, bos_token_id=2,
        eos_token_id=3),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_head=4, n_layer=2, n_inner=48, n_positions=64, layer_norm_epsilon=1e-3,
        bos_token_id=2, eos_token_id=3),
}


def _perturbed_model(config, task_cls=transformers.AutoModelForCausalLM, seed=0):
  """A random eager PyTorch model whose every param (biases, norm weights too) is perturbed."""
  torch.manual_seed(seed)
  model = task_cls.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(name, HF config, torch model, checkpoint dir) of one case, built once per module."""
  config = CASES[request.param]()
  model = _perturbed_model(config)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, config, model, path


def _batch():
  """Two rows of 48 tokens: row 0 right-padded, row 1 left-padded; positions of the real tokens."""
  ids = np.random.default_rng(0).integers(4, V, (B, T))
  mask = np.ones((B, T), np.int64)
  mask[0, -_RIGHT_PAD:] = 0
  mask[1, :_LEFT_PAD] = 0
  return ids, mask, np.maximum(np.cumsum(mask, -1) - 1, 0)


def _torch_outputs(model, ids, mask, pos, **kwargs):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos), **kwargs)


def _load(path, config, task="causal_lm"):
  spec = decoder.spec_from_hf(config.to_dict())
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no unused-weight warning for the checkpoint's own task
    params = decoder.params_from_hf(checkpoints.read_state_dict(path), spec, task)
  return spec, params


def _max_diff(ours, theirs, real):
  return float(np.abs(np.asarray(ours)[real] - np.asarray(theirs)[real]).max())


def test_parity_with_transformers(case):
  """Logits, every hidden state and attention probs match at real positions (fused and explicit paths)."""
  name, config, model, path = case
  ids, mask, pos = _batch()
  ref = _torch_outputs(model, ids, mask, pos, output_hidden_states=True, output_attentions=True)
  spec, params = _load(path, config)
  module = decoder.Decoder(spec)
  want = frozenset({"logits", "hidden_states", "attention_probs", "attention_scores", "values"})
  apply = jax.jit(module.apply, static_argnames="want")  # one compile per program, not op by op
  ours = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), want=want)
  fused = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))  # default positions
  real = mask.astype(bool)
  diffs = {"logits": _max_diff(ours["logits"], ref.logits, real),
           "fused_logits": _max_diff(fused["logits"], ref.logits, real)}
  assert ours["hidden_states"].shape == (spec.num_layers + 1, B, T, spec.hidden_size)
  diffs["hidden"] = max(_max_diff(ours["hidden_states"][i], h, real) for i, h in enumerate(ref.hidden_states))
  probs_LxBxTxNxS = np.asarray(ours["attention_probs"]).transpose(0, 1, 3, 2, 4)
  diffs["probs"] = max(_max_diff(probs_LxBxTxNxS[i], a.numpy().transpose(0, 2, 1, 3), real)
                       for i, a in enumerate(ref.attentions))
  print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
  assert max(diffs.values()) < TOL, diffs
  np.testing.assert_allclose(ours["last_hidden"][real], ref.hidden_states[-1].numpy()[real], atol=TOL)
  # The scores' softmax over the allowed keys is the probs; masked keys sit at MASKED_SCORE.
  scores = np.asarray(ours["attention_scores"])
  assert scores.shape == (spec.num_layers, B, spec.num_heads, T, T)
  assert np.all(scores[np.asarray(ours["attention_probs"]) == 0] == layers.MASKED_SCORE)
  assert ours["values"].shape == (spec.num_layers, B, T, spec.num_kv_heads * spec.head_dim)


# Per case, spec changes that undo its non-default features: each must move the logits, so the
# parity above is evidence about those features (not about a model they do not affect).
_UNDONE = {
    "llama_llama3_gqa_tied": {"ropes": (decoder.RopeSpec(1e5),)},
    "llama_linear_bias_untied": {"ropes": (decoder.RopeSpec(5e4),)},
    "llama_dynamic_past_max_positions": {"ropes": (decoder.RopeSpec(2e4),)},
    "mistral_sliding8": {"layer_windows": (None, None)},
    "qwen2_bias_sliding": {"layer_windows": (None, None)},
    "qwen3_qknorm_head_dim": {"ropes": (decoder.RopeSpec(1e4),)},
    "qwen3_sliding_layers": {"layer_windows": (None,) * 3},
    "gemma_head_dim_bias": {"norm_eps": 1e-6, "ropes": (decoder.RopeSpec(1e4),)},
    "gemma2_softcaps_sliding8": {"attn_softcap": None, "final_softcap": None, "attention_scale": 0.25,
                                 "layer_windows": (None,) * 3},
    "gemma3_local_global_rope": {"layer_rope": (0, 0, 0), "final_softcap": None, "attention_scale": 0.25,
                                 "layer_windows": (None,) * 3},
    "smollm3_no_rope_layers": {"layer_rope": (0, 0, 0)},
    "gpt2": {"norm_eps": 1e-5},
}


def test_the_non_default_features_matter(case):
  name, config, model, path = case
  ids, mask, _ = _batch()
  spec, params = _load(path, config)
  real = mask.astype(bool)
  logits = jax.jit(decoder.Decoder(spec).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))["logits"]
  for field, value in _UNDONE[name].items():
    undone = decoder.Decoder(dataclasses.replace(spec, **{field: value}))
    other = jax.jit(undone.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))["logits"]
    assert _max_diff(other, logits, real) > 10 * TOL, field


def test_base_model_parity_and_cross_loading(case):
  """A causal-LM checkpoint loads as "encoder" (head unused) and matches the HF base model."""
  name, config, model, path = case
  ids, mask, pos = _batch()
  base = model.model if hasattr(model, "model") else model.transformer
  with torch.no_grad():
    ref = base(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  spec = decoder.spec_from_hf(config.to_dict())
  state = checkpoints.read_state_dict(path)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    params = decoder.params_from_hf(state, spec, "encoder")
  unused = [str(w.message) for w in caught if "unused" in str(w.message)]
  assert bool(unused) == ("lm_head.weight" in state), unused
  module = decoder.Decoder(spec, task="encoder")
  ours = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), want=frozenset())
  assert "logits" not in ours
  assert _max_diff(ours["last_hidden"], ref.last_hidden_state, mask.astype(bool)) < TOL
  with pytest.raises(ValueError, match="needs task 'causal_lm'"):
    module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  # Unprefixed base-model names load too, as the causal LM where the head is tied.
  base_state = decoder.params_to_hf(params, spec, "encoder")
  assert not any(k.startswith(("model.", "transformer.")) for k in base_state)
  if spec.tie_word_embeddings:
    lm = decoder.params_from_hf(base_state, spec, "causal_lm")
    assert jax.tree.all(jax.tree.map(np.array_equal, lm, params))
  else:
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) .*: lm_head.weight$"):
      decoder.params_from_hf(base_state, spec, "causal_lm")


def test_params_to_hf_is_the_exact_inverse(case):
  name, config, model, path = case
  spec, params = _load(path, config)
  state = {k: v for k, v in checkpoints.read_state_dict(path).items()}
  exported = decoder.params_to_hf(params, spec, "causal_lm")
  assert sorted(exported) == sorted(state)
  for key, value in exported.items():
    assert value.dtype == np.float32 and value.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(value, state[key], err_msg=key)
  arch = decoder.hf_architecture(spec, "causal_lm")
  assert arch == type(model).__name__
  assert decoder.hf_architecture(spec, "encoder") == type(model.base_model).__name__


@pytest.mark.parametrize("name", ["gpt2", "gemma2_softcaps_sliding8", "llama_linear_bias_untied"])
def test_exported_checkpoint_loads_in_pytorch(name, tmp_path):
  """`params_to_hf` + config.json load with `from_pretrained` (no missing keys) and give equal logits."""
  config = CASES[name]()
  spec = decoder.spec_from_hf(config.to_dict())
  module = decoder.Decoder(spec)
  ids, mask, pos = _batch()
  @jax.jit  # one compile, not an eager init and a normal draw per leaf shape
  def perturbed_init(ids, mask):
    params = nn.meta.unbox(module.init(jax.random.key(1), ids, mask)["params"])
    leaves, tree = jax.tree.flatten(params)  # perturbed: biases and norm scales off their init too
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noise = [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(tree, [x + e for x, e in zip(leaves, noise)])

  params = perturbed_init(jnp.asarray(ids), jnp.asarray(mask))
  safetensors.numpy.save_file(decoder.params_to_hf(params, spec, "causal_lm"), tmp_path / "model.safetensors",
                              metadata={"format": "pt"})
  config.architectures = [decoder.hf_architecture(spec, "causal_lm")]
  config.save_pretrained(tmp_path)
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ours = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  ref = _torch_outputs(loaded.eval(), ids, mask, pos)
  assert _max_diff(ours["logits"], ref.logits, mask.astype(bool)) < TOL


def test_fresh_init_matches_checkpoint_tree(case):
  """`Decoder.init` gives the tree `params_from_hf` gives: normal(0.02) kernels, zero biases, unit norms."""
  name, config, model, path = case
  spec, loaded = _load(path, config)
  ids = jnp.ones((1, 8), jnp.int32)
  boxed = jax.jit(decoder.Decoder(spec).init)(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
  fresh = nn.meta.unbox(boxed)
  assert jax.tree.structure(fresh) == jax.tree.structure(loaded)
  for (key, value), (_, ref) in zip(sorted(flatten_dict(fresh).items()), sorted(flatten_dict(loaded).items())):
    assert value.shape == ref.shape and value.dtype == jnp.float32, key
    if key[-1] in ("kernel", "embedding"):
      assert 0.015 < float(np.std(value)) < 0.025, key
    elif key[-1] == "bias":
      assert not np.any(value), key
    else:  # norm scales: the identity (Gemma's 1 + w norms start at w = 0)
      np.testing.assert_array_equal(value, 0.0 if spec.norm_offset else 1.0, err_msg=str(key))
  axes = flatten_dict(nn.get_partition_spec(boxed))
  assert all(spec_axes[0] == "layers" for key, spec_axes in axes.items() if key[0] == "layers")
  assert "lm_head" not in fresh if spec.tie_word_embeddings else fresh["lm_head"]["kernel"].shape == (
      spec.hidden_size, spec.vocab_size)


def test_missing_and_misshapen_weights_are_all_listed(tmp_path):
  config = CASES["qwen2_bias_sliding"]()
  model = _perturbed_model(config)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  spec = decoder.spec_from_hf(config.to_dict())
  broken = {k: v for k, v in state.items() if k not in ("model.layers.1.self_attn.q_proj.bias", "model.norm.weight")}
  with pytest.raises(ValueError) as err:
    decoder.params_from_hf(broken, spec, "causal_lm")
  message = str(err.value)
  assert "\n" not in message
  assert message == ("checkpoint: lacks 2 weight(s) the qwen2 model needs: model.layers.1.self_attn.q_proj.bias, "
                     "model.norm.weight")
  misshapen = dict(state, **{"model.layers.0.mlp.up_proj.weight": np.zeros((3, 32), np.float32)})
  with pytest.raises(ValueError, match=r"wrong shape .*layers.0.mlp.up_proj.weight \(3, 32\) \(needs \(64, 32\)\)"):
    decoder.params_from_hf(misshapen, spec, "causal_lm")
  extra = dict(state, **{"model.layers.0.extra.weight": np.zeros(3, np.float32),
                         "model.rotary_emb.inv_freq": np.zeros(4, np.float32)})
  with pytest.warns(UserWarning, match=r"1 weight\(s\) unused by the qwen2 model: model.layers.0.extra.weight$"):
    decoder.params_from_hf(extra, spec, "causal_lm")


def test_raw_4x_config_json_gives_the_same_spec():
  """A hub-style config.json (4.x `rope_theta` + `rope_scaling`, fields left to defaults) works."""
  raw = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": V, "max_position_embeddings": 128,
         "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 1e5, "pretraining_tp": 1,
         "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}}
  assert decoder.spec_from_hf(raw) == decoder.spec_from_hf(CASES["llama_llama3_gqa_tied"]().to_dict())
  gemma3 = {"model_type": "gemma3_text", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_hidden_layers": 3, "intermediate_size": 64, "vocab_size": V,
            "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
            "sliding_window_pattern": 2, "query_pre_attn_scalar": 10}
  spec = decoder.spec_from_hf(gemma3)
  assert spec.ropes == (decoder.RopeSpec(1e6, "linear", 4.0), decoder.RopeSpec(1e4))
  assert spec.layer_rope == (1, 0, 1) and spec.layer_windows == (4096, None, 4096)
  qwen2 = decoder.spec_from_hf({"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": False})
  assert qwen2.layer_windows == (None,) * 4 and qwen2.qkv_bias and not qwen2.out_bias
  assert decoder.spec_from_hf({"model_type": "smollm3", "num_hidden_layers": 8}).layer_rope == (0, 0, 0, -1) * 2
  assert decoder.spec_from_hf(CASES["qwen3_sliding_layers"]().to_dict()).layer_windows == (None, 8, 8)


def test_every_family_is_one_registered_traits_record():
  """The registry is the family list; its HF class names exist; a name is registered once."""
  assert decoder.FAMILIES == tuple(decoder_spec.REGISTRY)
  for family, traits in decoder_spec.REGISTRY.items():
    assert traits.model_type == family
    assert hasattr(transformers, traits.causal_lm_class) and hasattr(transformers, traits.base_class), family
    hash(traits)
  with pytest.raises(ValueError, match="^model_type: 'llama' is registered already$"):
    decoder_spec.register(decoder_spec.REGISTRY["llama"])
  spec = decoder.spec_from_hf(CASES["gemma_head_dim_bias"]().to_dict())
  assert (spec.norm_offset, spec.embedding_scale, spec.sandwich_norms, spec.is_gpt2) == (True, True, False, False)


@pytest.mark.parametrize("config, message", [
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 1024}},
     "config.rope_scaling: rope_type 'yarn' is not implemented; allowed: default, linear, dynamic, llama3"),
    ({"model_type": "qwen2", "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 64,
                                              "long_factor": [1.0] * 64, "original_max_position_embeddings": 1024}},
     "config.rope_scaling: rope_type 'longrope' is not implemented; allowed: default, linear, dynamic, llama3"),
    ({"model_type": "llama", "partial_rotary_factor": 0.5},
     "config.rope_parameters.partial_rotary_factor: 0.5 is not implemented; allowed: 1.0"),
    ({"model_type": "gpt2", "reorder_and_upcast_attn": True},
     "config.reorder_and_upcast_attn: True is not implemented; allowed: False"),
    ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True},
     "config.scale_attn_by_inverse_layer_idx: True is not implemented; allowed: False"),
    ({"model_type": "gpt2", "scale_attn_weights": False},
     "config.scale_attn_weights: False is not implemented; allowed: True"),
    ({"model_type": "gpt2", "activation_function": "quick_gelu"},
     "config.activation_function: activation 'quick_gelu' is not implemented; allowed: "
     + ", ".join(layers.ACTIVATIONS)),
    ({"model_type": "llama", "hidden_act": "mish"},
     "config.hidden_act: activation 'mish' is not implemented; allowed: " + ", ".join(layers.ACTIVATIONS)),
    ({"model_type": "gemma2", "use_bidirectional_attention": True},
     "config.use_bidirectional_attention: True is not implemented; allowed: False"),
    ({"model_type": "qwen3", "layer_types": ["full_attention", "chunked_attention"], "num_hidden_layers": 2},
     "config.layer_types: 'chunked_attention' is not implemented; allowed: full_attention, sliding_attention"),
    ({"model_type": "gemma3"}, "config.model_type: 'gemma3' is not a decoder family; allowed: "
     + ", ".join(decoder.FAMILIES)),
])
def test_unsupported_config_features_are_refused(config, message):
  with pytest.raises(ValueError) as err:
    decoder.spec_from_hf(config)
  assert str(err.value) == message


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_logits_and_grads(remat):
  spec = decoder.spec_from_hf(CASES["gemma2_softcaps_sliding8"]().to_dict())
  ids, mask, _ = _batch()
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  params = nn.meta.unbox(jax.jit(decoder.Decoder(spec).init)(jax.random.key(0), ids, mask)["params"])

  def loss_and_logits(module, p):
    logits = module.apply({"params": p}, ids, mask)["logits"]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7] * mask), logits

  # Jitted: one compile each instead of op-by-op dispatch of the layer scan.
  (ref_loss, ref_logits), ref_grads = jax.jit(jax.value_and_grad(
      lambda p: loss_and_logits(decoder.Decoder(spec), p), has_aux=True))(params)
  (loss, logits), grads = jax.jit(jax.value_and_grad(
      lambda p: loss_and_logits(decoder.Decoder(spec, remat=remat), p), has_aux=True))(params)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), grads, ref_grads)


def test_dropout_follows_the_rng():
  """GPT-2's default dropouts (embedding, attention probs, residual) are on only when not deterministic."""
  config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_head=4, n_layer=2, n_positions=64)
  spec = decoder.spec_from_hf(config.to_dict())
  assert (spec.embedding_dropout, spec.attention_dropout, spec.residual_dropout) == (0.1, 0.1, 0.1)
  ids, mask, _ = _batch()
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  module = decoder.Decoder(spec)
  params = jax.jit(module.init)(jax.random.key(0), ids, mask)["params"]

  @jax.jit  # one compile for every seed, not op by op
  def dropped(key):
    return module.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": key})["logits"]

  def run(seed):
    return dropped(jax.random.key(seed))

  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  assert not np.allclose(run(1), jax.jit(module.apply)({"params": params}, ids, mask)["logits"])


def test_config_json_round_trip_of_the_spec(tmp_path):
  """`spec_from_hf` of a saved config.json (what a checkpoint dir holds) equals that of the config."""
  config = CASES["gemma3_local_global_rope"]()
  config.save_pretrained(tmp_path)
  raw = json.loads((tmp_path / "config.json").read_text())
  assert decoder.spec_from_hf(raw) == decoder.spec_from_hf(config.to_dict())
  hash(decoder.spec_from_hf(raw))
