"""KV-cache generation: greedy output equals transformers' `generate` token for token."""

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp
import flax.linen as nn

from distill_jax.models import checkpoints, decoder, generate as gen

V = 384
P, N = 10, 8
SCALE = 0.2  # perturbation of every torch param: varied (not repetitive) greedy text
PROMPT_LENGTHS = (10, 6, 3)  # left-padded rows


def _perturbed(config, seed=0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(SCALE * torch.randn_like(p))
  return model


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=64, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "mistral_sliding4": lambda: transformers.MistralConfig(  # window 4 < prompt + new tokens
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
        intermediate_size=64, max_position_embeddings=64, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5}, pad_token_id=0, bos_token_id=2, eos_token_id=3),
    # max_position_embeddings 12 < P + N: transformers' stateful base growth vs our per-call base
    "llama_dynamic": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=64, max_position_embeddings=12,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0},
        pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_head=4, n_layer=2, n_positions=64, pad_token_id=0, bos_token_id=2, eos_token_id=3),
}


def _build(name, tmp_path_factory):
  """(torch model, our module, our params) of one tiny checkpoint."""
  config = CONFIGS[name]()
  model = _perturbed(config)
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path)
  spec = decoder.spec_from_hf(config.to_dict())
  return model, decoder.Decoder(spec), decoder.params_from_hf(checkpoints.read_state_dict(path), spec, "causal_lm")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return _build("llama", tmp_path_factory)


def _prompts(seed=0, lengths=PROMPT_LENGTHS):
  ids = np.random.default_rng(seed).integers(4, V, (len(lengths), max(lengths)))
  mask = np.zeros_like(ids)
  for row, length in enumerate(lengths):
    mask[row, -length:] = 1
  return np.where(mask == 1, ids, 0), mask


def _hf_generate(model, ids, mask, eos):
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=N,
                         eos_token_id=eos, pad_token_id=0).numpy()
  # transformers stops once every row has ended: pad to the full length as ours is
  return np.pad(out, ((0, 0), (0, ids.shape[1] + N - out.shape[1])), constant_values=0)


def test_greedy_equals_transformers(family):
  model, module, params = family
  ids, mask = _prompts()
  ours = gen.generate(module, params, ids, mask, max_new_tokens=N)
  np.testing.assert_array_equal(ours["tokens"], _hf_generate(model, ids, mask, eos=None))
  np.testing.assert_array_equal(ours["attention_mask"], np.concatenate([mask, np.ones((3, N), int)], 1))
  np.testing.assert_array_equal(ours["generated_mask"], np.concatenate([np.zeros_like(mask), np.ones((3, N))], 1))
  # An EOS the first row meets at its 4th new token: the row then holds pads, masked out.
  eos = int(ours["tokens"][0, P + 3])
  ended = gen.generate(module, params, ids, mask, max_new_tokens=N, eos_token_id=[eos, V + 1], pad_token_id=0)
  tokens = np.asarray(ended["tokens"])
  np.testing.assert_array_equal(tokens, _hf_generate(model, ids, mask, eos=[eos, V + 1]))
  first = P + int(np.argmax(tokens[0, P:] == eos))
  assert first <= P + 3 and np.all(tokens[0, first + 1:] == 0)
  np.testing.assert_array_equal(ended["attention_mask"][0, P:], np.arange(P, P + N) <= first)
  np.testing.assert_array_equal(ended["generated_mask"][0], (np.arange(P + N) >= P) & (np.arange(P + N) <= first))


@pytest.mark.parametrize("case", ["gemma2", "gemma3_text", "smollm3"])
def test_cached_steps_equal_the_full_forward(case):
  """Prefill + one-token cached steps give the logits of one forward over the whole left-padded batch."""
  common = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                intermediate_size=64)
  config = {
      "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8, sliding_window=3, query_pre_attn_scalar=6,
                                                  attn_logit_softcapping=0.5, final_logit_softcapping=1.0),
      "gemma3_text": lambda: transformers.Gemma3TextConfig(
          **common, head_dim=8, sliding_window=3,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"],
          rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e3},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
      "smollm3": lambda: transformers.SmolLM3Config(**common, no_rope_layers=[1, 0, 1]),
  }[case]()
  spec = decoder.spec_from_hf(config.to_dict())
  module = decoder.Decoder(spec)
  ids, mask = _prompts(seed=1, lengths=(12, 9))
  total = 12 + 6
  full_ids = np.concatenate([ids, np.random.default_rng(2).integers(4, V, (2, 6))], 1)
  full_mask = np.concatenate([mask, np.ones((2, 6), int)], 1)
  params = nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(full_ids), jnp.asarray(full_mask))["params"])
  run = jax.jit(lambda ids, cache, slot: module.apply({"params": params}, ids, jnp.asarray(full_mask), cache=cache,
                                                     cache_index=slot))
  out = run(jnp.asarray(ids), decoder.init_cache(spec, 2, total), 0)
  steps = [out["logits"]]
  for slot in range(12, total):
    out = run(jnp.asarray(full_ids[:, slot:slot + 1]), out["cache"], slot)
    steps.append(out["logits"])
  reference = module.apply({"params": params}, jnp.asarray(full_ids), jnp.asarray(full_mask))["logits"]
  real = full_mask.astype(bool)
  np.testing.assert_allclose(np.concatenate(steps, 1)[real], np.asarray(reference)[real], atol=1e-5)


def test_sampling_is_deterministic_given_rng(llama):
  _, module, params = llama
  ids, mask = _prompts()
  greedy = gen.generate(module, params, ids, mask, max_new_tokens=N)["tokens"]

  def sample(seed, **kwargs):
    return gen.generate(module, params, ids, mask, max_new_tokens=N, rng=jax.random.key(seed),
                        **{"temperature": 1.0, **kwargs})["tokens"]

  np.testing.assert_array_equal(sample(1, top_k=20, top_p=0.9), sample(1, top_k=20, top_p=0.9))
  assert not np.array_equal(sample(1, temperature=2.0), sample(2, temperature=2.0))
  np.testing.assert_array_equal(sample(3, top_k=1), greedy)
  np.testing.assert_array_equal(sample(4, top_p=1e-6, temperature=0.7), greedy)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 12, 0.6), (1.0, 1000, 0.3)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
  logits[0, :3] = logits[0, 3]  # ties with the k-th logit stay
  warpers = [transformers.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(transformers.TopKLogitsWarper(top_k))
  if top_p < 1:
    warpers.append(transformers.TopPLogitsWarper(top_p))
  ref = torch.tensor(logits)
  for warper in warpers:
    ref = warper(None, ref)
  ours = np.asarray(gen.filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref.numpy()))
  np.testing.assert_allclose(ours[np.isfinite(ours)], ref.numpy()[np.isfinite(ours)], rtol=1e-6)


def test_compiles_once_per_shape(llama):
  _, module, params = llama
  before = gen._decode._cache_size()
  for seed in range(3):
    ids, mask = _prompts(seed)
    gen.generate(module, params, ids, mask, max_new_tokens=N, rng=jax.random.key(seed), temperature=0.5)
  assert gen._decode._cache_size() == before + 1
  ids, mask = _prompts(0, lengths=(4, 2))
  gen.generate(module, params, ids, mask, max_new_tokens=N, rng=jax.random.key(0), temperature=0.5)
  assert gen._decode._cache_size() == before + 2


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens: 0 must be >= 1"),
    ({"temperature": -0.1}, r"temperature: -0.1 must be >= 0 \(0 = greedy\)"),
    ({"top_k": -1}, r"top_k: -1 must be >= 0 \(0 = no top-k filter\)"),
    ({"top_p": 0.0}, r"top_p: 0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p: 1.5 must be in \(0, 1\]"),
    ({"temperature": 1.0}, r"rng: sampling \(temperature > 0\) needs a PRNG key"),
])
def test_bad_arguments_are_refused(kwargs, message):
  spec = decoder.spec_from_hf(CONFIGS["llama"]().to_dict())
  ids, mask = _prompts()
  with pytest.raises(ValueError, match=f"^{message}$"):
    gen.generate(decoder.Decoder(spec), {}, ids, mask, **{"max_new_tokens": N, **kwargs})
  with pytest.raises(ValueError, match="needs a causal_lm"):
    gen.generate(decoder.Decoder(spec, task="encoder"), {}, ids, mask, max_new_tokens=N)
