"""The objective: term validation, binding to models, padding-free metrics, recipes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_jax as dj
import tiny
from distill_jax.config import root as config_lib
from distill_jax.data import pipeline as data
from distill_jax.objective import objective as objective_lib
from distill_jax.objective import terms as terms_lib
from distill_jax.training import state as state_lib
from distill_jax.training import step as step_lib
from test_step import deterministic, make_batch

# The recipes of the literature, as term lists (configs/*.yaml write the same lists).
RECIPES: dict[str, tuple[dict, ...]] = {
    # Sanh et al. 2019: soft targets at T=2, MLM loss, cosine of the last hidden states.
    "distilbert": ({"loss": "forward_kl", "weight": 5.0, "temperature": 2.0},
                   {"loss": "cross_entropy", "weight": 2.0, "positions": "labels"},
                   {"loss": "hidden_cosine", "weight": 1.0, "layers": "last"}),
    # Jiao et al. 2020: embedding + hidden MSE (projected), attention MSE, prediction layer.
    "tinybert": ({"loss": "hidden_mse", "layers": "uniform", "include_embeddings": True, "projection": "linear"},
                 {"loss": "attention_mse", "layers": "uniform"},
                 {"loss": "forward_kl", "temperature": 1.0}),
    # Wang et al. 2020: last-layer attention distributions and value relations.
    "minilm": ({"loss": "attention_kl", "layers": "last"}, {"loss": "value_relation", "layers": "last"}),
    # The reference text's feature example: MSE on the CLS hidden state (BERT -> DistilBERT).
    "reference_cls": ({"loss": "cls_mse", "projection": "linear"},),
    # Plain logit distillation of a causal LM.
    "logit_kd": ({"loss": "forward_kl", "temperature": 1.0},),
    # Agarwal et al. 2024 (GKD): generalized JSD.
    "gkd": ({"loss": "generalized_jsd", "beta": 0.5, "temperature": 1.0},),
}


@pytest.mark.parametrize("terms, match", [
    ([{"loss": "kl"}], r"terms\[0\]\.loss: unknown loss 'kl'; allowed: attention_kl, .*forward_kl"),
    ([{"loss": "forward_kl", "beta": 0.5}], r"terms\[0\]\.beta: not an option of forward_kl"),
    ([{"loss": "forward_kl", "temperature": -1.0}], r"terms\[0\]\.temperature: Input should be greater than 0, got -1.0"),
    ([{"loss": "forward_kl"}, {"loss": "generalized_jsd", "beta": 1.5}], r"terms\[1\]\.beta: Input should be less than or equal to 1, got 1.5"),
    ([{"loss": "forward_kl", "weight": 0.0}, {"loss": "hidden_mse", "weight": 0}], r"objective\.terms: all weights are zero"),
    ([{"loss": "forward_kl", "weight": -1}], r"terms\[0\]\.weight"),
    ([{"loss": "ensemble_kl"}], r"terms\[0\]\.teacher: ensemble_kl needs a list"),
    ([{"loss": "forward_kl", "teacher": ["a", "b"]}], r"terms\[0\]\.teacher"),
    ([{"loss": "hidden_mse", "layers": "every"}], r"terms\[0\]\.layers"),
    ([{"loss": "hidden_mse", "projection": "mlp"}], r"terms\[0\]\.projection: Input should be 'none' or 'linear', got 'mlp'"),
    ([{"loss": "forward_kl", "temperature_schedule": {"kind": "step"}}], r"temperature_schedule\.kind"),
    ([{"loss": "forward_kl", "weight_schedule": {"steps": 0}}], r"weight_schedule\.steps"),
    ([], r"objective\.terms must list at least one term"),
])
def test_validate_terms_errors(terms, match):
  with pytest.raises(ValueError, match=match) as info:
    objective_lib.validate_terms(terms)
  assert "\n" not in str(info.value)


def test_validate_terms_names_and_recipes():
  terms = objective_lib.validate_terms([{"loss": "forward_kl"}, {"loss": "forward_kl", "temperature": 2}])
  assert [t.name for t in terms] == ["forward_kl", "forward_kl_2"]
  assert [t.temperature for t in terms] == [1.0, 2.0] and terms[0].teacher == "teacher"  # defaults filled in
  assert objective_lib.validate_terms(terms) == terms  # Terms are accepted as they are
  with pytest.raises(ValueError, match=r"^config: objective\.terms\[1\]\.name: 'a' is used by an earlier term$"):
    objective_lib.validate_terms([{"loss": "forward_kl", "name": "a"}, {"loss": "reverse_kl", "name": "a"}])
  for name, recipe in RECIPES.items():
    assert objective_lib.validate_terms(recipe), name


def test_term_schema_is_the_configs():
  assert objective_lib.Term is config_lib.TermConfig and terms_lib.ScheduleConfig is config_lib.ScheduleConfig
  cfg = config_lib.load_config(None, ["objective.terms[0].weight_schedule={kind: linear, end: 0.0}"])
  terms = objective_lib.validate_terms(cfg.resolved_terms())
  assert terms == cfg.resolved_terms() and terms[0].weight_schedule.steps == cfg.train.steps
  assert objective_lib.validate_terms(cfg.objective_terms()) == terms  # the same terms as mappings


def test_schedules():
  lin = terms_lib.ScheduleConfig("linear", 1.0, 3.0, 10)
  cos = terms_lib.ScheduleConfig("cosine", 1.0, 3.0, 10)
  at = jax.jit(terms_lib.schedule_value, static_argnums=0)  # data in, a pure function of the step
  np.testing.assert_allclose([at(lin, 0), at(lin, 5), at(lin, 20)], [1.0, 2.0, 3.0], rtol=1e-6)
  np.testing.assert_allclose([at(cos, 0), at(cos, 5), at(cos, 10)], [1.0, 2.0, 3.0], rtol=1e-6)
  term = terms_lib.validate_terms([{"loss": "forward_kl", "weight_schedule": {"kind": "linear", "start": 0.0,
                                                                              "end": 2.0, "steps": 4}}])[0]
  np.testing.assert_allclose(terms_lib.weight_at(term, 2), 1.0)
  assert terms_lib.temperature_at(term, 2) == 1.0  # no temperature schedule: the static value


def test_every_input_kind_has_a_handler():
  kinds = {spec.inputs for spec in terms_lib.LOSSES.values()}
  assert kinds == set(objective_lib._HANDLERS)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  bert = dj.load_model(tiny.make_checkpoint(root / "bert", "bert", "masked_lm", num_hidden_layers=2), "masked_lm")
  gpt2 = dj.load_model(tiny.make_checkpoint(root / "gpt2", "gpt2", "causal_lm", num_hidden_layers=2), "causal_lm")
  return {"bert": bert, "bert_small": dj.init_student(bert, num_layers=1),
          "bert_narrow": dj.init_student(bert, num_layers=1, hidden_size=16), "gpt2": gpt2,
          "gpt2_small": dj.init_student(gpt2, num_layers=1)}


def test_build_errors(models, tmp_path):
  bert, narrow = models["bert"], models["bert_narrow"]
  teachers = {"teacher": bert}
  cases = [
      ([{"loss": "forward_kl", "teacher": "big"}], narrow, r"terms\[0\]\.teacher: unknown teacher 'big'"),
      ([{"loss": "hidden_mse"}], narrow, r"terms\[0\]\.projection: student hidden size 16 != teacher 32"),
      ([{"loss": "hidden_mse", "layers": [[1, 5]], "projection": "linear"}], narrow, r"terms\[0\]\.layers"),
      ([{"loss": "attention_mse", "layers": [[0, 0]]}], narrow, r"terms\[0\]\.layers: .*out of range"),
      ([{"loss": "forward_kl"}], models["gpt2_small"], r"terms\[0\]\.teacher"),
  ]
  for terms, student, match in cases:
    with pytest.raises(ValueError, match=match) as info:
      objective_lib.build_objective(terms, student=student, teachers=teachers)
    assert "\n" not in str(info.value)
  base = dj.load_model(tiny.make_checkpoint(tmp_path / "base", "gpt2", "encoder"), "encoder")
  with pytest.raises(ValueError, match=r"terms\[0\]\.loss: forward_kl needs logits .*gpt2"):
    objective_lib.build_objective([{"loss": "forward_kl"}], student=base, teachers={"teacher": base})


def test_outputs_for_only_what_terms_need(models):
  bert, narrow = models["bert"], models["bert_narrow"]
  obj = objective_lib.build_objective([{"loss": "forward_kl"}], student=narrow, teachers={"teacher": bert})
  assert obj.outputs_for("student") == ("logits",) and obj.outputs_for("teacher") == ("logits",)
  obj = objective_lib.build_objective([{"loss": "cross_entropy"}, {"loss": "attention_kl", "teacher": "b"}],
                                      student=narrow, teachers={"teacher": bert, "b": bert})
  assert obj.outputs_for("student") == ("attention_probs", "logits")
  assert obj.outputs_for("b") == ("attention_probs",) and obj.teacher_names == ("b",)


def _metrics(obj, student, teacher, batch, proj):
  @jax.jit
  def run(s_params, t_params, batch, proj):
    s = student.apply(s_params, batch, outputs=obj.outputs_for("student"))
    t = teacher.apply(t_params, batch, outputs=obj.outputs_for("teacher"))
    return obj(s, {"teacher": t}, batch, proj, jnp.zeros((), jnp.int32))
  return run(student.params, teacher.params, batch, proj)


def test_metrics_are_padding_free(models):
  bert, narrow = models["bert"], models["bert_narrow"]
  terms = [{"loss": "forward_kl", "temperature": 2.0}, {"loss": "hidden_mse", "layers": "all", "projection": "linear"},
           {"loss": "attention_mse"}, {"loss": "token_relation"}, {"loss": "similarity_preserving"},
           {"loss": "pooled_cosine", "projection": "linear"}]
  obj = objective_lib.build_objective(terms, student=narrow, teachers={"teacher": bert})
  proj = obj.init_projections(jax.random.PRNGKey(0))
  assert proj["hidden_mse"]["s1_t2"]["kernel"].shape == (16, 32) and "s0_t0" in proj["hidden_mse"]
  batch = make_batch(0, rows=4, length=8)
  padded = {k: np.pad(v, ((0, 0), (0, 4))) for k, v in batch.items()}
  loss, metrics = _metrics(obj, narrow, bert, batch, proj)
  loss_p, metrics_p = _metrics(obj, narrow, bert, padded, proj)
  np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
  for name in metrics:
    np.testing.assert_allclose(metrics_p[name], metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert float(metrics["forward_kl"][1]) == float(batch["attention_mask"].sum())


def test_ensemble_of_identical_teachers_is_forward_kl(models):
  bert, small = models["bert"], models["bert_small"]
  teachers = {"a": bert, "b": bert}
  batch = make_batch(1, rows=2, length=6)
  # The tiny random models' distributions are almost uniform (KL ~ 5e-7, all float32 noise):
  # sharpen both so the compared KL is of order 1.
  ens = objective_lib.build_objective([{"loss": "ensemble_kl", "teacher": ["a", "b"], "temperature": 2.0}],
                                      student=small, teachers=teachers)
  kl = objective_lib.build_objective([{"loss": "forward_kl", "teacher": "a", "temperature": 2.0}],
                                     student=small, teachers=teachers)

  @jax.jit  # one program (eager, every op of the models and the terms compiles on its own)
  def both(s_params, t_params, batch):
    s = small.apply(s_params, batch)
    s = s.replace(logits=s.logits * 300.0)
    t = bert.apply(t_params, batch)
    t = t.replace(logits=t.logits * 300.0)
    step = jnp.zeros((), jnp.int32)
    return kl(s, {"a": t}, batch, {}, step)[0], ens(s, {"a": t, "b": t}, batch, {}, step)[0]

  want, got = both(small.params, bert.params, batch)
  assert float(want) > 1e-3
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _mlm_transform(tokenizer):
  def transform(rng, batch):
    ids, labels, loss_mask = data.mask_tokens(rng, batch["input_ids"], batch["attention_mask"],
                                              mask_token_id=tokenizer.mask_token_id, vocab_size=tiny.VOCAB_SIZE,
                                              special_ids=tokenizer.all_special_ids, prob=0.3)
    return dict(batch, input_ids=ids, labels=labels, loss_mask=loss_mask)
  return transform


RECIPE_PAIRS = {"distilbert": ("bert", "bert_small"), "tinybert": ("bert", "bert_narrow"),
                "minilm": ("bert", "bert_narrow"), "reference_cls": ("bert", "bert_narrow"),
                "logit_kd": ("gpt2", "gpt2_small"), "gkd": ("gpt2", "gpt2_small")}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_loss_decreases(models, recipe):
  teacher, student = (models[n] for n in RECIPE_PAIRS[recipe])
  obj = objective_lib.build_objective(RECIPES[recipe], student=student, teachers={"teacher": teacher})
  optimizer = state_lib.make_optimizer("adamw", 3e-3, schedule="constant")
  state = state_lib.create_train_state(student.params, optimizer, projection_params=obj.init_projections(
      jax.random.PRNGKey(0)))
  transform = _mlm_transform(teacher.tokenizer) if recipe == "distilbert" else None
  step = functools.partial(step_lib.train_step, student_apply=deterministic(student),
                           teacher_applies={"teacher": deterministic(teacher)}, objective=obj, optimizer=optimizer,
                           batch_transform=transform)
  batch = make_batch(0, rows=4, length=8)

  @jax.jit
  def run(state, teacher_params):
    return jax.lax.scan(lambda s, _: step(s, teacher_params, batch), state, length=50)

  state, metrics = run(state, {"teacher": teacher.params})
  loss = np.asarray(metrics["loss"])
  assert np.all(np.isfinite(loss)) and int(metrics["nonfinite"].sum()) == 0
  assert loss[-5:].mean() < 0.9 * loss[:5].mean(), loss


def test_loss_from_sums_matches_the_step_loss_on_one_batch(models):
  """Summed (sum, count) totals give back the objective's loss (exact whole-set eval loss)."""
  bert, small = models["bert"], models["bert_small"]
  objective = objective_lib.build_objective(
      [{"loss": "hidden_mse", "weight": 2.0, "layers": "last"}, {"loss": "pooled_mse", "weight": 0.5}],
      student=small, teachers={"teacher": bert})
  batch = make_batch(0, rows=3, length=6)
  loss, metrics = _metrics(objective, small, bert, batch, {})
  np.testing.assert_allclose(objective.loss_from_sums(jax.device_get(metrics), 0), float(loss), rtol=1e-6)
