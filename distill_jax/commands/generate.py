"""Sequence-level KD (Kim & Rush 2016): the teacher writes completions that the student learns.

``distill-jax generate CONFIG`` runs `write_completions`: the main teacher continues the
first ``generate.prompt_length`` tokens of every prompt of ``generate.source`` by up to
``generate.max_new_tokens`` tokens with the KV-cache `models.generate.generate` (greedy, or
sampled from ``generate.seed``), and writes one ``{"prompt": ..., "completion": ...}`` JSON
line per prompt to ``generate.output`` (atomically: a temporary file, then a rename).
Training then reads that file with ``data.text_columns: [prompt]`` and
``data.completion_column: completion``: one pair per row, the loss on the completion only.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np

from distill_jax.config import root as config_lib
from distill_jax.data import pipeline as data
from distill_jax.training import run_setup
from distill_jax.models import generate


def left_padded(prompts: Sequence[Sequence[int]], prompt_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `prompt_length` ids of each prompt, left-padded.

  Args:
    prompts: token ids per prompt (each non-empty).
    prompt_length: `P`.
    pad_id: the id of padded slots.

  Returns:
    ``(input_ids_BxP, attention_mask_BxP)`` int32.
  """
  ids_BxP = np.full((len(prompts), prompt_length), pad_id, np.int32)
  mask_BxP = np.zeros((len(prompts), prompt_length), np.int32)
  for row, ids in enumerate(prompts):
    ids = list(ids)[:prompt_length]
    ids_BxP[row, prompt_length - len(ids):] = ids
    mask_BxP[row, prompt_length - len(ids):] = 1
  return ids_BxP, mask_BxP


def completion_ids(tokens_S: np.ndarray, generated_S: np.ndarray, eos_ids: Sequence[int]) -> list[int]:
  """The generated ids of one row (`generate`'s ``tokens`` and ``generated_mask``), EOS dropped."""
  return [int(t) for t, g in zip(tokens_S, generated_S) if g and int(t) not in eos_ids]


def _eos_ids(tokenizer: Any) -> tuple[int, ...]:
  return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)


def write_completions(cfg: config_lib.Config) -> tuple[str, int]:
  """Writes the main teacher's completions of the ``generate`` prompts (see the module doc).

  Args:
    cfg: the run config (its main teacher and ``generate`` section).

  Returns:
    ``(output_path, number_of_lines)``.

  Raises:
    ValueError: one line naming the field (teacher path, task, prompt column, empty source).
  """
  g = cfg.generate
  main = run_setup.main_teacher(cfg)
  tc = cfg.teachers[main]
  if tc.task != "causal_lm":
    raise ValueError(f"teachers.{main}.task: generate needs a causal_lm teacher, got {tc.task!r}")
  prompts_ds = data.load_texts(g.source, split=g.split, text_columns=(g.prompt_column,), seed=cfg.train.seed,
                               cache_dir=cfg.data.cache_dir)
  texts = list(prompts_ds[g.prompt_column])[:g.max_prompts]
  tokenizer = run_setup.data_tokenizer(cfg, main)
  teacher = run_setup.load_teacher(main, tc)
  pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
  eos = _eos_ids(tokenizer)
  ids = [x for x in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if x]
  if not ids:
    raise ValueError(f"generate.source: no prompt of {g.source!r} ({g.prompt_column!r}) has a token")
  out = pathlib.Path(g.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  lines = 0
  with open(tmp, "w", encoding="utf-8") as f:
    for start in range(0, len(ids), g.batch_size):
      chunk = ids[start:start + g.batch_size]
      rows = len(chunk)
      chunk = chunk + [chunk[-1]] * (g.batch_size - rows)  # one shape: the last batch is filled up
      ids_BxP, mask_BxP = left_padded(chunk, g.prompt_length, pad_id)
      result = jax.device_get(generate.generate(
          teacher.module, teacher.params, ids_BxP, mask_BxP, max_new_tokens=g.max_new_tokens,
          rng=jax.random.fold_in(jax.random.key(g.seed), start), temperature=g.temperature, top_k=g.top_k,
          top_p=g.top_p, eos_token_id=eos or None, pad_token_id=pad_id))
      for row in range(rows):
        prompt = tokenizer.decode(ids_BxP[row][mask_BxP[row] == 1])
        completion = tokenizer.decode(completion_ids(result["tokens"][row], result["generated_mask"][row], eos))
        f.write(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False) + "\n")
        lines += 1
  os.replace(tmp, out)
  return str(out), lines


def main(cfg: config_lib.Config) -> int:
  out, lines = write_completions(cfg)
  print(f"wrote {lines} teacher completions to {out}")
  return 0
