"""Tests for distill_jax.evaluation.report: the tables, the files and the curves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill_jax.evaluation import report as rp

BEFORE = {"accuracy": 0.5, "macro_f1": 0.4, "top1_agreement": 0.6,
          "kl_teacher_student": 0.9, "teacher_accuracy": 0.9, "teacher_macro_f1": 0.88,
          "num_examples": 200.0}
AFTER = {"accuracy": 0.8, "macro_f1": 0.75, "top1_agreement": 0.85,
         "kl_teacher_student": 0.2, "teacher_accuracy": 0.9, "teacher_macro_f1": 0.88,
         "num_examples": 200.0}
EFFICIENCY = {"device": "cpu", "teacher_params": 110_000_000, "student_params": 55_000_000,
              "teacher_disk_bytes": 440_000_000, "student_disk_bytes": 200_000_000,
              "teacher_examples_per_s": 100.0, "student_examples_per_s": 250.0,
              "teacher_tokens_per_s": 12_800.0, "student_tokens_per_s": np.float32(32_000.0)}
HISTORY = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 11)] + [
    {"step": 5, "eval_accuracy": 0.7}, {"step": 10, "eval_accuracy": 0.8}]


@pytest.fixture
def report():
  return rp.build_report(BEFORE, AFTER, EFFICIENCY, teacher_name="bert-base",
                         student_name="bert-6L")


def test_improvement_follows_metric_direction(report):
  rows = {r["name"]: r for r in report["metrics"]}
  assert list(rows) == ["accuracy", "macro_f1", "top1_agreement", "kl_teacher_student"]
  assert rows["accuracy"]["improvement"] == pytest.approx(0.3)
  assert rows["macro_f1"]["improvement"] == pytest.approx(0.35)
  assert rows["kl_teacher_student"]["improvement"] == pytest.approx(0.7)  # lower is better
  assert rows["accuracy"]["teacher"] == 0.9 and rows["macro_f1"]["teacher"] == 0.88
  assert rows["top1_agreement"]["teacher"] is None
  assert rows["accuracy"]["undistilled"] == 0.5 and rows["accuracy"]["distilled"] == 0.8


def test_efficiency_ratios(report):
  eff = report["efficiency"]
  assert eff["param_ratio"] == pytest.approx(2.0)
  assert eff["disk_ratio"] == pytest.approx(2.2)
  assert eff["speedup"] == pytest.approx(2.5)
  assert eff["token_speedup"] == pytest.approx(2.5)
  partial = rp.build_report(BEFORE, AFTER, {"teacher_params": 10, "student_params": 0},
                            teacher_name="t", student_name="s")["efficiency"]
  assert partial["param_ratio"] is None and partial["speedup"] is None
  assert "—" in rp.format_table(rp.build_report(BEFORE, AFTER, {}, teacher_name="t",
                                                student_name="s"))


def test_perplexity_lower_is_better_and_nan_becomes_none():
  report = rp.build_report({"perplexity": 50.0, "similarity_spearman": float("nan")},
                           {"perplexity": 20.0, "teacher_perplexity": 12.5,
                            "similarity_spearman": 0.9, "custom": 1.0},
                           {}, teacher_name="t", student_name="s")
  rows = {r["name"]: r for r in report["metrics"]}
  assert rows["perplexity"]["improvement"] == 30.0
  assert rows["perplexity"]["teacher"] == 12.5
  assert rows["similarity_spearman"]["undistilled"] is None
  assert rows["similarity_spearman"]["improvement"] is None
  assert rows["custom"]["improvement"] is None and rows["custom"]["distilled"] == 1.0


def test_terminal_table_contains_the_numbers(report):
  table = rp.format_table(report)
  for text in ["bert-base", "bert-6L", "0.5000", "0.8000", "0.9000", "+0.3000", "+0.7000",
               "2.00×", "2.20×", "2.50×", "110.00 M", "55.00 M", "440.00 MB", "100.0", "250.0",
               "32,000.0"]:
    assert text in table, text
  accuracy_line = next(line for line in table.splitlines() if line.startswith("accuracy"))
  assert accuracy_line.split() == ["accuracy", "0.5000", "0.8000", "0.9000", "+0.3000"]


def test_write_report_files_exist_and_parse(tmp_path, report):
  paths = rp.write_report(tmp_path / "run", report, HISTORY)
  loaded = json.loads((tmp_path / "run" / "report.json").read_text())
  assert loaded == json.loads(json.dumps(report))
  assert loaded["efficiency"]["speedup"] == pytest.approx(2.5)
  md = (tmp_path / "run" / "report.md").read_text()
  assert "| metric | undistilled student | distilled student | teacher | improvement |" in md
  assert "| accuracy | 0.5000 | 0.8000 | 0.9000 | +0.3000 |" in md
  assert "2.50× faster" in md and "2.00× smaller" in md
  png = (tmp_path / "run" / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
  assert paths == {"json": str(tmp_path / "run" / "report.json"),
                   "markdown": str(tmp_path / "run" / "report.md"),
                   "png": str(tmp_path / "run" / "curves.png")}


def test_plot_history_empty_still_writes_png(tmp_path):
  path = rp.plot_history([], tmp_path / "empty.png")
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_read_history_round_trip_and_truncated_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in HISTORY) + '{"step": 11, "lo')
  assert rp.read_history(path) == HISTORY
  assert rp.read_history(tmp_path / "missing.jsonl") == []
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    rp.read_history(path)


# What the trainer logs: train rows every step, eval rows at eval_every and the last step.
TRAINER_HISTORY = [
    {"step": s, "train/loss": 3.0 / s, "train/forward_kl": 2.0 / s, "train/grad_norm": 1.0,
     "train/nonfinite": 0.0, "train/unused_term": 0.0, "train/tokens_per_s": 900.0 + s}
    for s in range(1, 41)] + [
    {"step": 20, "eval/loss": 1.5, "eval/forward_kl": 1.0, "eval/top1_agreement": 0.7},
    {"step": 40, "eval/loss": 1.2, "eval/forward_kl": 0.8}]


def _lines(ax):
  return {line.get_label(): line for line in ax.get_lines()}


def test_curves_one_axis_per_metric_with_train_and_eval_together(report):
  fig = rp.curves_figure(TRAINER_HISTORY, report)
  titles = [ax.get_title() for ax in fig.axes]
  # loss first; the report's metrics become eval curves; all-zero series have no panel.
  assert titles == ["loss", "accuracy", "forward_kl", "grad_norm", "kl_teacher_student",
                    "macro_f1", "tokens_per_s", "top1_agreement"]
  axes = dict(zip(titles, fig.axes))
  assert list(_lines(axes["loss"])) == ["train/loss", "eval/loss"]
  assert list(_lines(axes["forward_kl"])) == ["train/forward_kl", "eval/forward_kl"]
  assert list(_lines(axes["grad_norm"])) == ["train/grad_norm"]
  assert all(ax.get_xlabel() == "step" for ax in fig.axes)
  eval_loss = _lines(axes["loss"])["eval/loss"]
  assert list(eval_loss.get_xdata()) == [20, 40] and list(eval_loss.get_ydata()) == [1.5, 1.2]
  assert eval_loss.get_marker() == "o"  # sparse eval series are visible as points
  assert eval_loss.get_color() == "C1" and _lines(axes["loss"])["train/loss"].get_color() == "C0"
  assert _lines(axes["loss"])["train/loss"].get_marker() == "None"  # 40 points: a plain line


def test_eval_curves_start_at_the_undistilled_step_0_point(report):
  axes = {ax.get_title(): ax for ax in rp.curves_figure(TRAINER_HISTORY, report).axes}
  accuracy = _lines(axes["accuracy"])["eval/accuracy"]
  assert list(accuracy.get_xdata()) == [0, 40]  # undistilled at step 0, distilled at the end
  assert list(accuracy.get_ydata()) == [0.5, 0.8]
  # A metric also logged during training gets the step-0 point before its history points.
  agreement = _lines(axes["top1_agreement"])["eval/top1_agreement"]
  assert list(agreement.get_xdata()) == [0, 20, 40]
  assert list(agreement.get_ydata()) == [0.6, 0.7, 0.85]
  # A step-0 eval row in the history is the eval line's first point too.
  history = [{"step": 0, "eval/loss": 2.5}, *TRAINER_HISTORY]
  axes = {ax.get_title(): ax for ax in rp.curves_figure(history).axes}
  assert list(_lines(axes["loss"])["eval/loss"].get_xdata()) == [0, 20, 40]


def test_curves_drop_all_zero_metrics_and_keep_nonfinite_when_it_fired():
  titles = [ax.get_title() for ax in rp.curves_figure(TRAINER_HISTORY).axes]
  assert "nonfinite" not in titles and "unused_term" not in titles
  history = [dict(row) for row in TRAINER_HISTORY]
  history[3]["train/nonfinite"] = 1.0
  titles = [ax.get_title() for ax in rp.curves_figure(history).axes]
  assert "nonfinite" in titles and "unused_term" not in titles


def test_curves_max_panels_and_empty_history():
  assert len(rp.curves_figure(TRAINER_HISTORY, max_panels=2).axes) == 2
  (ax,) = rp.curves_figure([], None).axes
  assert [t.get_text() for t in ax.texts] == ["no history logged"]


def test_plot_history_writes_png_atomically(tmp_path, report):
  path = rp.plot_history(TRAINER_HISTORY, tmp_path / "curves.png", report=report)
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no .tmp left behind
