"""Tokenizer utilities for cross-tokenizer distillation: offsets needed, shared tokens by bytes.

`shared_vocab` maps the tokens two vocabularies share (same bytes, same word-start space) for
`distill_jax.losses.hybrid_uld`; it is built once per (student, teacher) pair on the host.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np

__all__ = ["check_fast", "token_bytes", "shared_vocab"]


def check_fast(tokenizer: Any, field: str) -> None:
  """One-line ``ValueError`` naming ``field`` unless ``tokenizer`` is a fast tokenizer (offsets)."""
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError(f"{field}: cross-tokenizer alignment needs a fast tokenizer (character offsets); "
                     f"got slow {type(tokenizer).__name__}")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
  """The GPT-2 byte-level alphabet, character -> byte."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer: Any) -> bool:
  decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
  kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
  return "ByteLevel" in kinds


def token_bytes(tokenizer: Any, *, field: str = "tokenizer") -> dict[bytes, int]:
  """Each token's text as UTF-8 bytes, with a leading space when it starts a word, -> its id.

  Byte-level BPE tokens map through the byte alphabet (so tokens holding part of a
  multi-byte character keep their bytes); other tokenizers decode the token after a
  one-token prefix (``"a"``) and drop the prefix's text, so WordPiece ``the`` is `` the``,
  ``##the`` is ``the`` and SentencePiece ``▁the`` is `` the``; a token decoding to U+FFFD
  (a byte-fallback fragment) is left out.  Special tokens map from ``b"\\0" + content``.
  Where several ids share bytes the lowest id is kept.

  Args:
    tokenizer: a fast tokenizer.
    field: the config field naming it (error messages).

  Returns:
    ``{bytes: id}``.
  """
  check_fast(tokenizer, field)
  vocab = tokenizer.get_vocab()
  special = {int(i): t for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}
  special.update({int(i): t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special})
  out: dict[bytes, int] = {}

  def put(key: bytes, idx: int) -> None:
    if key and (key not in out or idx < out[key]):
      out[key] = idx

  for idx, content in special.items():
    put(b"\0" + content.encode("utf-8"), idx)
  ids = sorted(i for i in vocab.values() if i not in special)
  if _is_byte_level(tokenizer):
    table = _byte_decoder()
    inverse = {i: t for t, i in vocab.items()}
    for idx in ids:
      chars = inverse[idx]
      if all(c in table for c in chars):
        put(bytes(table[c] for c in chars), idx)
    return out
  prefix = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
  head = tokenizer.decode(prefix, clean_up_tokenization_spaces=False)
  texts = tokenizer.batch_decode([prefix + [i] for i in ids], clean_up_tokenization_spaces=False)
  for idx, text in zip(ids, texts):
    if text.startswith(head) and "\ufffd" not in text:
      put(text[len(head):].encode("utf-8"), idx)
  return out


def shared_vocab(student_tokenizer: Any, teacher_tokenizer: Any, *, student_field: str = "student.tokenizer",
                 teacher_field: str = "teacher.tokenizer") -> tuple[np.ndarray, np.ndarray]:
  """The tokens both vocabularies share, matched by their bytes (see :func:`token_bytes`).

  Built once per (student, teacher) pair for :func:`distill_jax.losses.hybrid_uld`.

  Args:
    student_tokenizer: the student's fast tokenizer.
    teacher_tokenizer: the teacher's fast tokenizer.
    student_field: the config field of the student's tokenizer (error messages).
    teacher_field: the config field of the teacher's tokenizer.

  Returns:
    ``(student_ids [M], teacher_ids [M])`` int32, ordered by student id; each id appears once.
  """
  s_map = token_bytes(student_tokenizer, field=student_field)
  t_map = token_bytes(teacher_tokenizer, field=teacher_field)
  pairs = sorted((s_map[k], t_map[k]) for k in s_map.keys() & t_map.keys())
  arr = np.asarray(pairs, np.int32).reshape(-1, 2)
  return arr[:, 0].copy(), arr[:, 1].copy()

