"""Evaluation during and after a run (the objective on the validation set, teacher
agreement), the export of the student and the final report.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterator, Optional, Sequence

import jax

from distill_jax import models
from distill_jax.config import root as config_lib
from distill_jax.training.run_dir import BEFORE_FILE
from distill_jax.training.run_log import echo, scalar
from distill_jax.training.run_setup import Run, place_batch, runtime_model, state_step
from distill_jax.data import pipeline as data
from distill_jax.evaluation import metrics as evaluate_lib
from distill_jax.checkpoint import manager as checkpoint
from distill_jax.evaluation import efficiency as efficiency_lib
from distill_jax.evaluation import report as report_lib


def eval_loss(run: Run, state: Any, max_batches: int) -> dict[str, float]:
  """The objective on the validation set (no update): per-term token means and ``eval/loss``.

  Per-term ``(sum, count)`` totals are accumulated over the whole set and the loss is
  formed from them once (`Objective.loss_from_sums`), so batches of different lengths
  weigh by their tokens, exactly as one big batch would.
  """
  it = data.eval_batches(run.eval_examples, global_batch_size=_eval_batch_size(run.config),
                         extras=run.batch_extras("validation"))
  per_batch = []
  for i, batch in enumerate(it):
    if max_batches and i >= max_batches:
      break
    metrics = run.step_fn.eval(state, run.teacher_params, place_batch(run, batch))
    per_batch.append({k: v for k, v in metrics.items() if isinstance(v, (tuple, list))})
  totals: dict[str, tuple[float, float]] = {}
  for metrics in jax.device_get(per_batch):  # one transfer at the end: the loop never waits
    for key, (s, c) in metrics.items():
      acc = totals.get(key, (0.0, 0.0))
      totals[key] = (acc[0] + scalar(s), acc[1] + scalar(c))
  out = {f"eval/{k}": (s / c if c else 0.0) for k, (s, c) in totals.items()}
  step = state_step(run, state)
  out["eval/loss"] = run.objective.loss_from_sums(totals, step) if totals else float("nan")
  return out


def eval_on_bar(run: Run, state: Any, bar: Any, step: int) -> dict[str, float]:
  """`eval_loss`, announced on the progress bar while it runs and shown there after."""
  if bar is not None:
    bar.set_postfix_str(f"evaluating step {step} ...", refresh=True)
  values = eval_loss(run, state, run.config.train.eval_batches)
  if bar is not None and "eval/loss" in values:
    bar.set_postfix(eval_loss=f"{values['eval/loss']:.4f}", refresh=True)
  return values


def _eval_batch_size(cfg: config_lib.Config) -> int:
  return cfg.data.eval_batch_size or cfg.data.global_batch_size


def _agreement_batches(run: Run) -> Iterator[dict]:
  """Validation batches for teacher agreement; MLM batches masked with a fixed key."""
  it = data.eval_batches(run.eval_examples, global_batch_size=_eval_batch_size(run.config), process_index=0,
                         process_count=1, extras=run.batch_extras("validation"))
  key = jax.random.PRNGKey(run.config.train.seed + 12345)
  for i, batch in enumerate(it):
    if run.batch_transform is not None:
      batch = jax.device_get(run.batch_transform(jax.random.fold_in(key, i), dict(batch)))
    yield batch


def _local(model: Any) -> Any:
  """`model` without activation constraints on the run's mesh: the report runs on process 0
  alone, and a constraint over every process's devices would wait for the others."""
  if isinstance(model, models.Model) and model.module.mesh is not None:
    return runtime_model(model, model.module.attention_impl, None)
  return model


def _agreement(run: Run, student_params: Any) -> dict[str, float]:
  teacher, student = _local(run.main_model), _local(run.student)
  t_params = getattr(teacher, "params", {})  # a teacher cache has none: it reads the batch
  max_batches = run.config.train.eval_batches or None
  # Host arrays, as the initial params are: the undistilled and the distilled student then
  # share one compiled eval step instead of one per input sharding.
  student_params = jax.device_get(student_params)
  if run.cross_tokenizer is not None and run.cross_tokenizer.teacher == run.main_teacher:
    # Its logits are over other tokens at other positions: the student's own metrics only.
    metrics = evaluate_lib.evaluate(student, student_params, student, student_params,
                                    _agreement_batches(run), max_batches=max_batches)
    return {k: v for k, v in metrics.items() if k in ("nll", "perplexity", "num_tokens", "num_examples")}
  metrics = evaluate_lib.evaluate(student, student_params, teacher, t_params, _agreement_batches(run),
                                  max_batches=max_batches, shared_vocab=run.shared_vocab)
  if run.main_teacher in run.caches:  # its own NLL would be of the tail-spread completion: not reported
    metrics = {k: v for k, v in metrics.items() if not k.startswith("teacher_")}
  return metrics


def undistilled_eval(run: Run, run_dir: pathlib.Path) -> dict[str, float]:
  """Agreement of the student's initialization, computed once per run and kept on disk."""
  path = run_dir / BEFORE_FILE
  if path.exists():
    return json.loads(path.read_text())
  echo("evaluating the undistilled student ...")
  before = _agreement(run, run.initial_student_params)
  run_dir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(before, indent=1))
  return before


def export(run: Run, params: Any, run_dir: pathlib.Path) -> str:
  out = run.config.export.dir or str(run_dir / "student")
  overwrite = run.config.export.overwrite or os.path.abspath(out) == os.path.abspath(run_dir / "student")
  checkpoint.export_student(run.student, jax.device_get(params), out, overwrite=overwrite)
  echo(f"exported the student to {out}")
  return out


def final_report(run: Run, params: Any, run_dir: pathlib.Path, before: Optional[dict], history: Sequence[dict],
                  export_dir: Optional[str]) -> dict:
  after = _agreement(run, params)
  before = before if before is not None else _agreement(run, run.initial_student_params)
  teacher = run.teachers.get(run.main_teacher)  # None when read from its cache: not timed
  sample = next(_agreement_batches(run))
  tc = run.config.teachers.get(run.main_teacher)
  teacher_dir = None
  if teacher is not None and tc is not None and tc.path != config_lib.SELF_TEACHER:
    resolved = config_lib.resolve_model_path(tc.path)
    teacher_dir = resolved if os.path.isdir(resolved) else None
  efficiency = efficiency_lib.measure_efficiency(_local(run.student), params, _local(teacher) if teacher else None, getattr(teacher, "params", None), sample,
                                               student_dir=export_dir, teacher_dir=teacher_dir,
                                               iters=run.config.eval.throughput_batches)
  rep = report_lib.build_report(before, after, efficiency, teacher_name=str(tc.path or tc.cache if tc else run.main_teacher),
                                student_name=f"{run.student.family} {run.student.num_layers} layers")
  rep["nonfinite_steps"] = [int(r["step"]) for r in history if r.get("train/nonfinite", 0) > 0]
  rep["steps"], rep["export_dir"] = run.config.train.steps, export_dir  # what a rerun checks (finished_run)
  report_lib.write_report(run_dir, rep, history)
  echo(report_lib.format_table(rep))
  return rep
