"""Sequence-level KD helpers: left-padded prompts and the completion ids of a generated row."""

from __future__ import annotations

import numpy as np
import pytest

from distill_jax.config import root as config_lib
from distill_jax.commands import generate as teacher_completions


def test_prompts_keep_their_first_tokens_left_padded():
  ids, mask = teacher_completions.left_padded([[5, 6, 7, 8], [9], [3, 4]], 3, pad_id=0)
  np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 9], [0, 3, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 1, 1]])


def test_completion_ids_are_the_generated_tokens_without_eos():
  tokens = np.array([0, 5, 6, 11, 2, 0])
  generated = np.array([0, 0, 1, 1, 1, 0])  # generated up to and including the EOS (2)
  assert teacher_completions.completion_ids(tokens, generated, (2,)) == [6, 11]
  assert teacher_completions.completion_ids(tokens, generated, ()) == [6, 11, 2]


def test_a_teacher_that_cannot_generate_is_a_one_line_error():
  cfg = config_lib.config_from_dict({"teacher": {"path": "bert-base-uncased", "task": "masked_lm"},
                                     "objective": {"terms": [{"loss": "forward_kl"}]}})
  with pytest.raises(ValueError, match=r"^teachers\.teacher\.task: generate needs a causal_lm teacher, got "
                                       r"'masked_lm'$"):
    teacher_completions.write_completions(cfg)
