"""uld / hybrid_uld terms: a causal teacher and student with different tokenizers through the objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import distill_jax as dj
import tiny
from distill_jax import losses
from distill_jax.config import root as config_lib
from distill_jax.data import alignment
from distill_jax.data import sources
from distill_jax.objective import objective as objective_lib


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """A tiny Llama teacher (byte-level BPE) and a tiny Llama student over a WordPiece vocabulary."""
  root = tmp_path_factory.mktemp("xtok")
  teacher = dj.load_model(tiny.make_checkpoint(root / "llama", "llama", "causal_lm"), "causal_lm")
  wordpiece = tiny.tokenizer_for("bert")
  config = tiny.config_for("llama", vocab_size=len(wordpiece))
  student = dj.models.model_from_config(config, "causal_lm", tokenizer=wordpiece, seed=3)
  texts = sources.pydoc_corpus("validation")["text"][:6]
  rows = alignment.aligned_causal_rows(texts, student.tokenizer, teacher.tokenizer, student_length=32,
                                       teacher_length=40)
  batch = {k: jnp.asarray(v[:2]) for k, v in rows.items()}
  return teacher, student, batch


def _outputs(teacher, student, batch):
  t_out = jax.jit(lambda p, b: teacher.apply(p, b, outputs=("logits",)))(
      teacher.params, {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]})
  s_out = jax.jit(lambda p, b: student.apply(p, b, outputs=("logits",)))(
      student.params, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
  return t_out, s_out


def test_uld_terms_match_the_losses_at_span_ends(pair):
  teacher, student, batch = pair
  obj = objective_lib.build_objective([{"loss": "uld", "temperature": 2.0}, {"loss": "hybrid_uld"}],
                                      student=student, teachers={"teacher": teacher},
                                      chunk_size=None)  # the logits path (chunked: test_cross_tokenizer_chunked)
  assert obj.outputs_for("teacher") == ("logits",)
  t_out, s_out = _outputs(teacher, student, batch)
  s_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

  @jax.jit
  def loss_and_grads(params):
    def f(p):
      return obj(student.apply(p, s_batch, outputs=("logits",)), {"teacher": t_out}, batch, {}, jnp.asarray(0))
    return jax.value_and_grad(f, has_aux=True)(params)

  (loss, metrics), grads = loss_and_grads(student.params)
  where = (batch["attention_mask"] == 1) & (batch["student_span_end"] == 1)
  t_logits = np.stack([np.asarray(t_out.logits)[b, np.asarray(batch["teacher_index"])[b]] for b in range(2)])
  s_ids, t_ids = alignment.shared_vocab(student.tokenizer, teacher.tokenizer)
  want = jax.jit(lambda s, t: {"uld": losses.uld(s, t, temperature=2.0, where=where),
                                "hybrid_uld": losses.hybrid_uld(s, t, student_shared_ids=s_ids,
                                                                teacher_shared_ids=t_ids, where=where)})(
      s_out.logits, t_logits)
  assert len(s_ids) > 50 and int(where.sum()) > 20
  total = 0.0
  for name, values in want.items():
    s, c = metrics[name]
    np.testing.assert_allclose(float(c), float(where.sum()))
    np.testing.assert_allclose(float(s), float(jnp.sum(values)), rtol=1e-5)
    total += float(s) / float(c)
  np.testing.assert_allclose(float(loss), total, rtol=1e-5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))  # NumPy: no per-leaf compiles


def test_same_vocabulary_terms_still_refuse_a_different_tokenizer(pair):
  teacher, student, _ = pair
  with pytest.raises(ValueError, match=r"^objective\.terms\[0\]\.teacher: .*tokenizers differ") as info:
    objective_lib.build_objective([{"loss": "forward_kl"}], student=student, teachers={"teacher": teacher})
  assert "\n" not in str(info.value)


def test_slow_tokenizer_and_non_causal_student_are_one_line_errors(pair, tmp_path):
  teacher, student, _ = pair
  import dataclasses

  slow = dataclasses.replace(student, tokenizer=transformers.ByT5Tokenizer())
  with pytest.raises(ValueError, match=r"^student\.path: cross-tokenizer alignment needs a fast tokenizer"):
    objective_lib.build_objective([{"loss": "uld"}], student=slow, teachers={"teacher": teacher})
  bert = dj.load_model(tiny.make_checkpoint(tmp_path / "bert", "bert", "masked_lm"), "masked_lm")
  with pytest.raises(ValueError, match=r"^objective\.terms\[0\]\.loss: uld compares next-token distributions"):
    objective_lib.build_objective([{"loss": "uld"}], student=bert, teachers={"teacher": bert})


def test_on_policy_across_tokenizers_is_refused_by_the_config():
  with pytest.raises(ValueError, match=r"objective\.on_policy: terms\[0\] \(hybrid_uld\) aligns the teacher's "
                                       r"tokenizer") as info:
    config_lib.load_config(None, ["objective.terms=[{loss: hybrid_uld}]", "objective.on_policy={lmbda: 0.5}"])
  assert "\n" not in str(info.value)
