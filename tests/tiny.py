"""Tiny random Hugging Face checkpoints of every supported family, saved to disk.

Tests build models with transformers' PyTorch classes, `save_pretrained` them (safetensors,
the format the hub serves today) with a small real tokenizer, and load them back through
our real loader.  Nothing here touches the network.
"""

from __future__ import annotations

import functools
import os
import pathlib

import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

VOCAB_SIZE = 384

# Small dimensions shared by all families: width 32, 4 heads, 2 layers unless overridden.
_BASE = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64)

FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
            "gemma3_text", "smollm3")
ENCODER_FAMILIES = ("bert", "roberta", "distilbert")

_TASK_CLASSES = {
    "masked_lm": transformers.AutoModelForMaskedLM,
    "causal_lm": transformers.AutoModelForCausalLM,
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "encoder": transformers.AutoModel,
}


def _corpus_lines() -> list[str]:
  from pydoc_data.topics import topics

  return [line for key in sorted(topics) for line in topics[key].splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(kind: str) -> Tokenizer:
  """A deterministic WordPiece ('bert') or BPE ('gpt') tokenizer trained on pydoc text."""
  if kind == "bert":
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials)
  else:
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus_lines()[:4000], trainer=trainer)
  return tok


def tokenizer_for(family: str) -> transformers.PreTrainedTokenizerFast:
  if family in ENCODER_FAMILIES:
    from tokenizers import processors

    tok = _trained_tokenizer("bert")
    tok = Tokenizer.from_str(tok.to_str())
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])  # as BERT's own tokenizers
  tok = _trained_tokenizer("gpt")
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(tok.to_str()), pad_token="<pad>", unk_token="<unk>",
      bos_token="<s>", eos_token="</s>", model_max_length=128)


def config_for(family: str, **overrides) -> transformers.PretrainedConfig:
  """A tiny config of `family`; `overrides` use the HF names of `_BASE` (hidden_size, ...)."""
  dims = {**_BASE, **overrides}
  extra = {k: v for k, v in dims.items() if k not in _BASE}
  h, n, L, f = dims["hidden_size"], dims["num_attention_heads"], dims["num_hidden_layers"], dims["intermediate_size"]
  common = {"vocab_size": VOCAB_SIZE, **extra}  # a larger vocab_size = padded embedding
  if family in ("bert", "roberta"):
    cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
    ids = dict(pad_token_id=0) if family == "bert" else dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return cls(hidden_size=h, num_attention_heads=n, num_hidden_layers=L, intermediate_size=f,
               max_position_embeddings=160, **ids, **common)
  if family == "distilbert":
    return transformers.DistilBertConfig(dim=h, n_heads=n, n_layers=L, hidden_dim=f, pad_token_id=0,
                                         max_position_embeddings=128, **common)
  ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
  if family == "gpt2":
    return transformers.GPT2Config(n_embd=h, n_head=n, n_layer=L, n_inner=f, n_positions=128,
                                   layer_norm_epsilon=1e-4, **ids, **common)
  # Decoder LLMs: every numeric field away from its default (RoPE base, eps, GQA, windows
  # shorter than the test batches), so that a reader ignoring one of them fails parity.
  common.setdefault("num_key_value_heads", max(1, n // 2))
  common = dict(hidden_size=h, num_attention_heads=n, num_hidden_layers=L, intermediate_size=f,
                max_position_embeddings=128, rms_norm_eps=1e-5, **ids, **common)
  if family == "llama":
    common.setdefault("rope_theta", 1e5)
    return transformers.LlamaConfig(**common)
  if family == "mistral":
    common.setdefault("sliding_window", 6)
    common.setdefault("rope_theta", 1e6)
    return transformers.MistralConfig(**common)
  if family == "qwen2":
    common.setdefault("rope_theta", 1e6)
    return transformers.Qwen2Config(**common)
  if family == "qwen3":
    return transformers.Qwen3Config(head_dim=2 * h // n, rope_theta=1e6, **common)
  if family == "smollm3":
    common.setdefault("no_rope_layers", [int((i + 1) % 2 == 0) for i in range(L)])
    return transformers.SmolLM3Config(rope_theta=2e5, **common)
  gemma = dict(head_dim=h // n, **common)
  if family == "gemma":
    return transformers.GemmaConfig(rope_theta=5e4, **gemma)
  if family == "gemma2":
    return transformers.Gemma2Config(sliding_window=6, query_pre_attn_scalar=12, attn_logit_softcapping=20.0,
                                     final_logit_softcapping=15.0, rope_theta=3e4, **gemma)
  if family == "gemma3_text":
    return transformers.Gemma3TextConfig(sliding_window=6, query_pre_attn_scalar=12,
                                         layer_types=["sliding_attention", "full_attention"] * (L // 2)
                                         + ["sliding_attention"] * (L % 2), **gemma)
  raise ValueError(f"family: unknown {family!r}; allowed: {', '.join(FAMILIES)}")


def make_checkpoint(path: str | os.PathLike, family: str = "bert", task: str = "masked_lm", *,
                    seed: int = 0, safetensors: bool = True, **config_overrides) -> pathlib.Path:
  """Builds a tiny random PyTorch model of `family`/`task` and saves it (+ tokenizer) at `path`."""
  import torch

  torch.manual_seed(seed)
  config = config_for(family, **config_overrides)
  model = _TASK_CLASSES[task].from_config(config)
  model.eval()
  path = pathlib.Path(path)
  model.save_pretrained(path, safe_serialization=safetensors)
  tokenizer_for(family).save_pretrained(path)
  return path
