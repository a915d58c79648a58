"""Cross-tokenizer alignment on the host: spans of student and teacher tokens covering the same text.

A *span* is a group of consecutive student tokens and consecutive teacher tokens that cover
the same stretch of text.  Spans are found from the two tokenizations' character offsets
(fast tokenizers give offsets into the original text, whatever their normalization:
WordPiece lower-casing and accent stripping, SentencePiece's leading ``▁``, byte-level BPE's
``Ġ`` and multi-byte characters split over several tokens that all carry the character's
offsets):

1. A *cut* is a character position that no token of either side strictly straddles.
2. Between consecutive cuts lies an interval; every token with text lies inside one.
3. Intervals are grouped in order until a group has tokens on both sides: that group is a
   span.  Text covered by one side only (whitespace tokens of byte-level BPE that WordPiece
   drops) thus joins the following span; a one-sided tail joins the span before it.
4. Tokens without text (special tokens: ``[CLS]``, ``<s>``, EOS, offsets ``(0, 0)``) sit at
   the end of the text before them; the k-th special at a common cut on one side pairs with
   the k-th special at the same cut on the other side as a span of their own.  An unpaired
   special belongs to no span (id ``-1``).

The alignment is monotone: span ids increase along both token sequences.  Everything here
is NumPy on the host and a pure function of the tokenizations; :func:`span_tensors` turns
one aligned row into the fixed-shape arrays the jitted step reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from distill_jax.data.pipeline import Examples
from distill_jax.models.vocab_map import check_fast, shared_vocab, token_bytes

__all__ = ["Tokenized", "tokenize_with_offsets", "align_spans", "span_tensors", "align_texts", "SPAN_KEYS",
           "shared_vocab", "token_bytes", "check_fast", "aligned_causal_rows",
           "aligned_examples", "TEACHER_INPUTS", "teacher_batch", "on_teacher_tokens"]

#: Per-row arrays :func:`span_tensors` produces (prefix ``teacher_`` marks teacher-length axes).
SPAN_KEYS = ("student_span", "student_span_end", "teacher_index", "teacher_span", "teacher_span_end")

#: The model inputs of a cross-tokenizer teacher -> the batch keys that hold them.
TEACHER_INPUTS = {"input_ids": "teacher_input_ids", "attention_mask": "teacher_attention_mask"}


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenized:
  """One text's tokens with character offsets into it.

  Attributes:
    ids: ``[N]`` int32 token ids.
    offsets: ``[N, 2]`` int64 ``(start, end)`` character offsets; ``start == end`` for tokens
      without text (special tokens).
  """

  ids: np.ndarray
  offsets: np.ndarray


def tokenize_with_offsets(tokenizer: Any, texts: Sequence[str], *, field: str = "tokenizer",
                          add_special_tokens: bool = False) -> list[Tokenized]:
  """Tokenizes ``texts`` with a Hugging Face fast tokenizer, keeping character offsets.

  Args:
    tokenizer: a ``PreTrainedTokenizerFast`` (a slow tokenizer has no offsets: one-line error).
    texts: the texts.
    field: the config field naming the tokenizer, for the error message.
    add_special_tokens: add the tokenizer's special tokens (``[CLS]``/``[SEP]``, BOS).

  Returns:
    one :class:`Tokenized` per text.
  """
  check_fast(tokenizer, field)
  enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
  return [Tokenized(np.asarray(ids, np.int32), np.asarray(off, np.int64).reshape(-1, 2))
          for ids, off in zip(enc["input_ids"], enc["offset_mapping"])]


def _positions(offsets_Nx2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Whether each token has text, and each token's anchor: its start, or for a token
  without text the end of the text before it (its offsets, often ``(0, 0)``, say nothing)."""
  has_text = offsets_Nx2[:, 1] > offsets_Nx2[:, 0]
  ends = np.where(has_text, offsets_Nx2[:, 1], 0)
  before = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]]) if len(ends) else ends
  return has_text, np.where(has_text, offsets_Nx2[:, 0], before)


def align_spans(student_offsets: np.ndarray, teacher_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """Monotone span alignment of two tokenizations of the same text (see the module docstring).

  Args:
    student_offsets: `[Ns, 2]` character offsets of the student's tokens.
    teacher_offsets: `[Nt, 2]` character offsets of the teacher's tokens.

  Returns:
    ``(student_span [Ns], teacher_span [Nt], num_spans)``: int32 span ids ``0..num_spans-1``,
    non-decreasing along each sequence where ``>= 0``; ``-1``: the token is in no span.
  """
  sides = [np.asarray(student_offsets, np.int64).reshape(-1, 2), np.asarray(teacher_offsets, np.int64).reshape(-1, 2)]
  length = int(max([0] + [int(o[:, 1].max()) for o in sides if len(o)]))
  blocked = np.zeros(length + 2, np.int64)
  for off in sides:  # a cut at p is blocked by a token with start < p < end (difference array)
    text = off[off[:, 1] > off[:, 0]]
    np.add.at(blocked, text[:, 0] + 1, 1)
    np.add.at(blocked, text[:, 1], -1)
  cuts = np.flatnonzero(np.cumsum(blocked)[:length + 1] == 0)
  # Events in text order: ("text", interval, side, token) and ("special", cut, side, token).
  events: list[tuple[int, int, int, int, int]] = []  # (position, kind 0=special 1=text, side, rank, token)
  for side, off in enumerate(sides):
    has_text, anchor = _positions(off)
    for tok in range(len(off)):
      if has_text[tok]:
        interval = int(np.searchsorted(cuts, anchor[tok], side="right")) - 1
        events.append((int(cuts[interval]), 1, side, tok, tok))
      elif anchor[tok] in set(cuts.tolist()) or int(anchor[tok]) == length:
        events.append((int(anchor[tok]), 0, side, tok, tok))
  spans = [np.full(len(o), -1, np.int32) for o in sides]
  events.sort(key=lambda e: (e[0], e[1], e[3]))
  num_spans = 0
  pending: list[tuple[int, int]] = []  # (side, token) of the group being built
  last_text_span = -1  # the span a one-sided tail may join (none after a special pair)

  def close(group: list[tuple[int, int]], span: int) -> None:
    for side, tok in group:
      spans[side][tok] = span

  i = 0
  while i < len(events):
    pos, kind = events[i][0], events[i][1]
    j = i
    while j < len(events) and events[j][:2] == (pos, kind):
      j += 1
    block = events[i:j]
    if kind == 0:  # specials at a cut: pair k-th with k-th
      if pending and last_text_span >= 0:
        close(pending, last_text_span)
      pending, last_text_span = [], -1
      per_side = [[e[4] for e in block if e[2] == s] for s in (0, 1)]
      for a, b in zip(*per_side):
        close([(0, a), (1, b)], num_spans)
        num_spans += 1
    else:  # one interval's text tokens
      pending += [(e[2], e[4]) for e in block]
      if {s for s, _ in pending} == {0, 1}:
        close(pending, num_spans)
        last_text_span, pending = num_spans, []
        num_spans += 1
    i = j
  if pending and last_text_span >= 0:
    close(pending, last_text_span)
  return spans[0], spans[1], num_spans


def span_tensors(student_span: np.ndarray, teacher_span: np.ndarray, *, student_length: int,
                 teacher_length: int, student_start: int = 0, teacher_start: int = 0,
                 sizes: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Fixed-shape span arrays of one row: windows of both aligned sequences, padded.

  A span counts only if all its student and all its teacher tokens lie inside the windows
  ``[student_start, student_start + student_length)`` and ``[teacher_start, ...)``.

  Args:
    student_span: `[Ns]` span ids from :func:`align_spans` over the whole sequence.
    teacher_span: `[Nt]` span ids likewise.
    student_length: the student row length `Ls`.
    teacher_length: the teacher row length `Lt`.
    student_start: the window's first student token.
    teacher_start: the window's first teacher token.
    sizes: optional ``(student, teacher)`` token counts per span id (``np.bincount`` of the
      ids ``>= 0``, of equal length), precomputed once when a long stream is cut into many rows.

  Returns:
    int32 arrays keyed by :data:`SPAN_KEYS`: ``student_span [Ls]`` / ``teacher_span [Lt]``
    (row-local span ids, ``-1`` outside any complete span or on padding),
    ``student_span_end [Ls]`` / ``teacher_span_end [Lt]`` (1 at a span's last token),
    ``teacher_index [Ls]`` (at a student span end: the teacher row position of the same
    span's last token; 0 elsewhere).
  """
  s_all = np.asarray(student_span, np.int64)
  t_all = np.asarray(teacher_span, np.int64)
  s_win = s_all[student_start:student_start + student_length]
  t_win = t_all[teacher_start:teacher_start + teacher_length]
  if sizes is None:
    num = int(max(s_all.max(initial=-1), t_all.max(initial=-1))) + 1
    sizes = tuple(np.bincount(a[a >= 0], minlength=num) for a in (s_all, t_all))
  # Only the span ids the windows hold matter: shift them to 0.. (O(window), not O(stream)).
  present = np.concatenate([s_win[s_win >= 0], t_win[t_win >= 0]])
  base = int(present.min()) if len(present) else 0
  num = int(present.max()) + 1 - base if len(present) else 1
  total = [np.pad(np.asarray(x)[base:base + num], (0, max(0, base + num - len(x)))) for x in sizes]
  s_win = np.where(s_win >= 0, s_win - base, -1)
  t_win = np.where(t_win >= 0, t_win - base, -1)
  inside = [np.bincount(a[a >= 0], minlength=num) for a in (s_win, t_win)]
  complete = (total[0] == inside[0]) & (total[1] == inside[1]) & (inside[0] > 0) & (inside[1] > 0)
  local = np.cumsum(complete) - 1  # row-local ids in order
  out = {}
  for name, win, length in (("student", s_win, student_length), ("teacher", t_win, teacher_length)):
    ok = (win >= 0) & complete[np.maximum(win, 0)]
    ids = np.where(ok, local[np.maximum(win, 0)], -1)
    span = np.full(length, -1, np.int32)
    span[:len(ids)] = ids
    end = np.zeros(length, np.int32)
    nxt = np.append(span[1:], -1)
    end[:] = (span >= 0) & (nxt != span)
    out[f"{name}_span"], out[f"{name}_span_end"] = span, end
  teacher_last = np.zeros(int(complete.sum()), np.int32)
  t_end = np.flatnonzero(out["teacher_span_end"])
  teacher_last[out["teacher_span"][t_end]] = t_end
  s_end = out["student_span_end"].astype(bool)
  index = np.zeros(student_length, np.int32)
  index[s_end] = teacher_last[out["student_span"][s_end]]
  out["teacher_index"] = index
  return {k: out[k] for k in SPAN_KEYS}


def align_texts(student_tokenizer: Any, teacher_tokenizer: Any, texts: Sequence[str], *,
                student_field: str = "student.tokenizer", teacher_field: str = "teacher.tokenizer",
                add_special_tokens: bool = False) -> list[tuple[Tokenized, Tokenized, np.ndarray, np.ndarray, int]]:
  """Tokenizes ``texts`` with both tokenizers and aligns each pair.

  Args:
    student_tokenizer: the student's fast tokenizer.
    teacher_tokenizer: the teacher's fast tokenizer.
    texts: the texts.
    student_field: the config field of the student's tokenizer (error messages).
    teacher_field: the config field of the teacher's tokenizer.
    add_special_tokens: let both tokenizers add their special tokens.

  Returns:
    per text ``(student Tokenized, teacher Tokenized, student_span, teacher_span, num_spans)``.
  """
  check_fast(student_tokenizer, student_field)
  check_fast(teacher_tokenizer, teacher_field)
  s_tok = tokenize_with_offsets(student_tokenizer, texts, field=student_field, add_special_tokens=add_special_tokens)
  t_tok = tokenize_with_offsets(teacher_tokenizer, texts, field=teacher_field, add_special_tokens=add_special_tokens)
  return [(s, t, *align_spans(s.offsets, t.offsets)) for s, t in zip(s_tok, t_tok)]


def aligned_causal_rows(texts: Sequence[str], student_tokenizer: Any, teacher_tokenizer: Any, *,
                        student_length: int, teacher_length: int, student_field: str = "student.tokenizer",
                        teacher_field: str = "teacher.tokenizer") -> dict[str, np.ndarray]:
  """Packed causal-LM rows of the student with the teacher's tokens of the same text beside them.

  Each document is tokenized by both tokenizers and followed by each one's EOS (the two EOS
  form a span of their own); the student's stream is cut into rows of ``student_length``
  exactly as the same-tokenizer packing does.  Teacher row ``r`` starts at the first teacher
  token of the first span whose student tokens all lie in student row ``r`` and holds
  ``teacher_length`` teacher tokens; spans cut by either row's edge belong to no span.

  Args:
    texts: the documents.
    student_tokenizer: the student's fast tokenizer (with an EOS or SEP token).
    teacher_tokenizer: the teacher's fast tokenizer (with an EOS or SEP token).
    student_length: student row length `Ls`.
    teacher_length: teacher row length `Lt` (a teacher that needs more tokens for the same
      text loses the spans past its row's end).
    student_field: the config field of the student's tokenizer (error messages).
    teacher_field: the config field of the teacher's tokenizer.

  Returns:
    int32 arrays with ``R`` rows: ``input_ids``, ``attention_mask``, ``labels``, ``loss_mask``
    ``[R, Ls]`` (the student's batch contract), ``teacher_input_ids``,
    ``teacher_attention_mask`` ``[R, Lt]``, and the :data:`SPAN_KEYS` arrays of
    :func:`span_tensors` (``[R, Ls]`` / ``[R, Lt]``).
  """
  eos = []
  for tok, field in ((student_tokenizer, student_field), (teacher_tokenizer, teacher_field)):
    check_fast(tok, field)
    e = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if e is None:
      raise ValueError(f"{field}: causal_lm packing needs an eos_token (or sep_token) as separator")
    eos.append(int(e))
  s_tok = tokenize_with_offsets(student_tokenizer, texts, field=student_field)
  t_tok = tokenize_with_offsets(teacher_tokenizer, texts, field=teacher_field)
  streams: list[list[np.ndarray]] = [[], [], [], []]  # student ids, teacher ids, student spans, teacher spans
  doc_end = []
  base = 0
  for text, s, t in zip(texts, s_tok, t_tok):
    end = np.array([[len(text), len(text)]], np.int64)
    s_span, t_span, num = align_spans(np.concatenate([s.offsets, end]), np.concatenate([t.offsets, end]))
    streams[0].append(np.append(s.ids, eos[0]))
    streams[1].append(np.append(t.ids, eos[1]))
    streams[2].append(np.where(s_span >= 0, s_span + base, -1))
    streams[3].append(np.where(t_span >= 0, t_span + base, -1))
    doc_end.append(len(s.ids) + 1)
    base += num
  s_ids, t_ids, s_span, t_span = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in streams)
  n = len(s_ids)
  labels = np.zeros(n, np.int64)
  labels[:-1] = s_ids[1:]
  loss_mask = np.ones(n, np.int64)
  loss_mask[np.cumsum(doc_end) - 1] = 0  # an EOS's label is the next document's first token
  rows = -(-n // student_length)
  ls, lt = student_length, teacher_length
  out = {k: np.zeros((rows, ls), np.int32) for k in ("input_ids", "attention_mask", "labels", "loss_mask")}
  out.update({k: np.zeros((rows, lt), np.int32) for k in ("teacher_input_ids", "teacher_attention_mask")})
  spans = {k: [] for k in SPAN_KEYS}
  # The first teacher token of each span, and the last student token of each span.
  num_spans = int(max(s_span.max(initial=-1), t_span.max(initial=-1))) + 1
  t_first = np.full(num_spans + 1, len(t_ids), np.int64)
  np.minimum.at(t_first, t_span[t_span >= 0], np.flatnonzero(t_span >= 0))
  s_first = np.full(num_spans + 1, n, np.int64)
  np.minimum.at(s_first, s_span[s_span >= 0], np.flatnonzero(s_span >= 0))
  sizes = tuple(np.bincount(a[a >= 0], minlength=num_spans) for a in (s_span, t_span))
  for r in range(rows):
    lo, hi = r * ls, min((r + 1) * ls, n)
    ids = s_span[lo:hi]
    starts_inside = ids[(ids >= 0) & (s_first[np.maximum(ids, 0)] >= lo)]
    t0 = int(t_first[starts_inside.min()]) if len(starts_inside) else len(t_ids)
    out["input_ids"][r, :hi - lo] = s_ids[lo:hi]
    out["attention_mask"][r, :hi - lo] = 1
    out["labels"][r, :hi - lo] = labels[lo:hi]
    out["loss_mask"][r, :hi - lo] = loss_mask[lo:hi]
    t_hi = min(t0 + lt, len(t_ids))
    out["teacher_input_ids"][r, :t_hi - t0] = t_ids[t0:t_hi]
    out["teacher_attention_mask"][r, :t_hi - t0] = 1
    row = span_tensors(s_span, t_span, student_length=ls, teacher_length=lt, student_start=lo, teacher_start=t0,
                       sizes=sizes)
    for k in SPAN_KEYS:
      spans[k].append(row[k])
  for k, v in spans.items():
    width = lt if k in ("teacher_span", "teacher_span_end") else ls
    out[k] = np.stack(v).astype(np.int32) if v else np.zeros((0, width), np.int32)
  return out


def aligned_examples(texts: Sequence[str], student_tokenizer: Any, teacher_tokenizer: Any, *, student_length: int,
                     teacher_length: int, student_field: str = "student.tokenizer",
                     teacher_field: str = "teacher.tokenizer") -> Examples:
  """:func:`aligned_causal_rows` as pipeline ``Examples``: the student's rows as usual, the
  teacher's ids and the span tensors as ``row_arrays`` that every batch carries beside them.

  Args:
    texts, student_tokenizer, teacher_tokenizer, student_length, teacher_length, student_field,
      teacher_field: as for :func:`aligned_causal_rows`.

  Returns:
    causal_lm ``Examples`` (one bucket, ``student_length``) whose batches hold, besides the
    student's contract, ``teacher_input_ids``, ``teacher_attention_mask`` and :data:`SPAN_KEYS`.
  """
  rows = aligned_causal_rows(texts, student_tokenizer, teacher_tokenizer, student_length=student_length,
                             teacher_length=teacher_length, student_field=student_field,
                             teacher_field=teacher_field)
  lengths = rows["attention_mask"].sum(axis=1).astype(np.int32)
  pad = next((i for i in (student_tokenizer.pad_token_id, student_tokenizer.eos_token_id) if i is not None), 0)
  return Examples(task="causal_lm", max_length=student_length,
                  offsets=np.arange(len(lengths), dtype=np.int64) * student_length, lengths=lengths,
                  tokens={k: rows[k].reshape(-1) for k in ("input_ids", "labels", "loss_mask")}, labels=None,
                  buckets=(student_length,), pad_id=int(pad),
                  special_ids=tuple(sorted({int(i) for i in student_tokenizer.all_special_ids})),
                  row_arrays={k: rows[k] for k in ("teacher_input_ids", "teacher_attention_mask") + SPAN_KEYS})


def teacher_batch(batch: Any) -> dict[str, Any]:
  """The inputs a cross-tokenizer teacher runs on: its own ids and mask (:data:`TEACHER_INPUTS`).

  Args:
    batch: a batch of :func:`aligned_examples` rows.

  Returns:
    ``{"input_ids": [B, Lt], "attention_mask": [B, Lt]}`` (the student's positions do not apply).
  """
  return {k: batch[v] for k, v in TEACHER_INPUTS.items()}


def on_teacher_tokens(apply: Any, params: Any, batch: Any, **kwargs: Any) -> Any:
  """``apply(params, teacher_batch(batch), **kwargs)``: a teacher's apply, bound with
  ``functools.partial(on_teacher_tokens, apply)``, that reads the teacher's side of the batch.

  Args:
    apply: the teacher's ``(params, batch, *, outputs, ...) -> ModelOutputs``.
    params: its params.
    batch: a batch of :func:`aligned_examples` rows.
    **kwargs: forwarded to ``apply``.

  Returns:
    the teacher's outputs over its own tokens (``[B, Lt, ...]``).
  """
  return apply(params, teacher_batch(batch), **kwargs)
