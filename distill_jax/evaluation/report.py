"""The end-of-run report: what distillation bought, how much smaller, how much faster.

:func:`build_report` joins the metrics of the undistilled student (its initialization),
the distilled student and the teacher (``teacher_*`` entries of the same dicts, from
:func:`distill_jax.evaluation.metrics.evaluate`) with the efficiency measurements of
:func:`distill_jax.evaluation.efficiency.measure_efficiency`.  :func:`write_report` writes
``report.json``, ``report.md`` and ``curves.png`` into the run directory;
:func:`format_table` is the terminal version.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:
  from matplotlib.figure import Figure

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CURVES_PNG = "curves.png"


@dataclasses.dataclass(frozen=True)
class MetricInfo:
  """How a metric is shown: its label, direction, and the teacher's counterpart."""

  label: str
  higher_is_better: Optional[bool]
  teacher_key: Optional[str] = None


# Row order of the report.  The agreement metrics compare with the teacher, so the
# teacher column has nothing to show for them.
METRICS: dict[str, MetricInfo] = {
    "accuracy": MetricInfo("accuracy", True, "teacher_accuracy"),
    "macro_f1": MetricInfo("macro-F1", True, "teacher_macro_f1"),
    "perplexity": MetricInfo("perplexity", False, "teacher_perplexity"),
    "nll": MetricInfo("NLL (nats/token)", False, "teacher_nll"),
    "top1_agreement": MetricInfo("top-1 agreement with teacher", True),
    "kl_teacher_student": MetricInfo("KL(teacher‖student), T=1", False),
    "embedding_cosine": MetricInfo("cosine to teacher embedding", True),
    "similarity_spearman": MetricInfo("pairwise-similarity Spearman", True),
}


def _ratio(numerator: Any, denominator: Any) -> Optional[float]:
  if numerator is None or denominator is None or not denominator:
    return None
  return float(numerator) / float(denominator)


def _finite_or_none(value: Any) -> Any:
  if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
    value = value.item()  # NumPy / JAX scalars -> Python numbers, for JSON
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def build_report(before: Mapping[str, float], after: Mapping[str, float],
                 efficiency: Mapping[str, Any], *, teacher_name: str,
                 student_name: str) -> dict[str, Any]:
  """Joins before/after metrics and efficiency into one JSON-ready dict.

  Args:
    before: :func:`~distill_jax.evaluation.metrics.evaluate` of the undistilled student.
    after: the same for the distilled student (its ``teacher_*`` entries fill the
      teacher column).
    efficiency: ``{"{teacher,student}_params", "{teacher,student}_disk_bytes",
      "{teacher,student}_examples_per_s", "{teacher,student}_tokens_per_s", "device",
      ...}`` (missing entries show as "—").
    teacher_name: shown in the title.
    student_name: shown in the title.

  Returns:
    ``{"teacher", "student", "metrics": [{"name", "label", "undistilled",
    "distilled", "teacher", "improvement", "higher_is_better"}], "efficiency",
    "eval"}`` where ``improvement`` is positive when distillation helped and the
    efficiency dict gains ``param_ratio`` (teacher / student parameters),
    ``disk_ratio``, ``speedup`` (student / teacher examples per second) and
    ``token_speedup``.
  """
  names = [n for n in METRICS if n in after or n in before]
  names += sorted(n for n in after if n not in METRICS and not n.startswith(("teacher_", "num_")))
  rows = []
  for name in names:
    info = METRICS.get(name, MetricInfo(name, None))
    undistilled, distilled = before.get(name), after.get(name)
    improvement = None
    if info.higher_is_better is not None and undistilled is not None and distilled is not None:
      improvement = distilled - undistilled if info.higher_is_better else undistilled - distilled
    rows.append({
        "name": name,
        "label": info.label,
        "undistilled": _finite_or_none(undistilled),
        "distilled": _finite_or_none(distilled),
        "teacher": _finite_or_none(after.get(info.teacher_key)) if info.teacher_key else None,
        "improvement": _finite_or_none(improvement),
        "higher_is_better": info.higher_is_better,
    })
  eff = {k: _finite_or_none(v) for k, v in efficiency.items()}
  eff["param_ratio"] = _ratio(eff.get("teacher_params"), eff.get("student_params"))
  eff["disk_ratio"] = _ratio(eff.get("teacher_disk_bytes"), eff.get("student_disk_bytes"))
  eff["speedup"] = _ratio(eff.get("student_examples_per_s"), eff.get("teacher_examples_per_s"))
  eff["token_speedup"] = _ratio(eff.get("student_tokens_per_s"), eff.get("teacher_tokens_per_s"))
  return {
      "teacher": teacher_name,
      "student": student_name,
      "metrics": rows,
      "efficiency": eff,
      "eval": {k: v for k, v in after.items() if k.startswith("num_")},
  }


# ------------------------------------------------------------------------ formatting


def format_number(value: Any) -> str:
  """How every number appears in the tables (``—`` for missing)."""
  if value is None:
    return "—"
  if isinstance(value, bool) or isinstance(value, int):
    return f"{value:,}"
  value = float(value)
  if not math.isfinite(value):
    return str(value)
  if abs(value) >= 1000:
    return f"{value:,.1f}"
  return f"{value:.4f}"


def _signed(value: Any) -> str:
  return "—" if value is None else ("+" if value >= 0 else "") + format_number(value)


def _human(count: Any, unit: str = "") -> str:
  if count is None:
    return "—"
  for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(count) >= factor:
      return f"{count / factor:.2f} {suffix}{unit}"
  return f"{count:g} {unit}".rstrip()


def _rate(value: Any) -> str:
  return "—" if value is None else f"{value:,.1f}"


def _times(ratio: Any) -> str:
  return "—" if ratio is None else f"{ratio:.2f}×"


def _metric_rows(report: Mapping[str, Any]) -> list[list[str]]:
  return [[row["label"], format_number(row["undistilled"]), format_number(row["distilled"]),
           format_number(row["teacher"]), _signed(row["improvement"])]
          for row in report["metrics"]]


def _efficiency_rows(report: Mapping[str, Any]) -> list[list[str]]:
  eff = report["efficiency"]
  return [
      ["parameters", _human(eff.get("teacher_params")), _human(eff.get("student_params")),
       _times(eff.get("param_ratio")) + " smaller"],
      ["on disk", _human(eff.get("teacher_disk_bytes"), "B"),
       _human(eff.get("student_disk_bytes"), "B"), _times(eff.get("disk_ratio")) + " smaller"],
      ["examples/s", _rate(eff.get("teacher_examples_per_s")),
       _rate(eff.get("student_examples_per_s")), _times(eff.get("speedup")) + " faster"],
      ["tokens/s", _rate(eff.get("teacher_tokens_per_s")),
       _rate(eff.get("student_tokens_per_s")),
       _times(eff.get("token_speedup")) + " faster"],
  ]


METRIC_HEADER = ["metric", "undistilled student", "distilled student", "teacher",
                 "improvement"]
EFFICIENCY_HEADER = ["", "teacher", "student", "ratio"]


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip()
  return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _title(report: Mapping[str, Any]) -> str:
  return f"Distillation report: {report['teacher']} → {report['student']}"


def _eval_line(report: Mapping[str, Any]) -> str:
  parts = [f"{_human(v)} {k[len('num_'):]}" for k, v in report.get("eval", {}).items()]
  device = report["efficiency"].get("device")
  line = "held-out eval: " + (", ".join(parts) if parts else "—")
  return line + (f"; throughput measured on {device}" if device else "")


def _nonfinite_line(report: Mapping[str, Any]) -> list[str]:
  steps = report.get("nonfinite_steps") or []
  if not steps:
    return []
  return [f"non-finite steps (updates skipped): {', '.join(str(s) for s in steps)}"]


def format_table(report: Mapping[str, Any]) -> str:
  """The report as plain-text tables for the terminal."""
  return "\n".join([
      _title(report), "",
      _text_table(METRIC_HEADER, _metric_rows(report)), "",
      _text_table(EFFICIENCY_HEADER, _efficiency_rows(report)), "",
      _eval_line(report), *_nonfinite_line(report),
  ])


def format_markdown(report: Mapping[str, Any]) -> str:
  """The report as a markdown document."""
  return "\n".join([
      f"# {_title(report)}", "",
      "## Quality (improvement > 0: distillation helped)", "",
      _markdown_table(METRIC_HEADER, _metric_rows(report)), "",
      "## Size and speed", "",
      _markdown_table(EFFICIENCY_HEADER, _efficiency_rows(report)), "",
      _eval_line(report), "", *(line + "\n" for line in _nonfinite_line(report)),
  ])


# --------------------------------------------------------------------------- writing


def _write_atomic(path: str, data: bytes) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def read_history(jsonl_path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a ``metrics.jsonl`` file; a missing file is empty history.

  A final line cut short (a run killed while writing) is skipped.
  """
  if not os.path.exists(jsonl_path):
    return []
  with open(jsonl_path, encoding="utf-8") as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{jsonl_path}: line {i + 1} is not JSON") from None
  return rows


_NOT_CURVES = ("step", "epoch", "time", "elapsed", "timestamp")
_PHASES = ("train/", "eval/")
_SPARSE = 30  # a line with fewer points gets markers


def _metric_of(key: str) -> str:
  """``train/loss`` and ``eval/loss`` -> ``loss``; an unprefixed key is its own metric."""
  for phase in _PHASES:
    if key.startswith(phase):
      return key[len(phase):]
  return key


def _curve_panels(history: Sequence[Mapping[str, Any]], report: Optional[Mapping[str, Any]]
                  ) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
  """The plotted data: ``{metric: {line label: (steps, values)}}``, panels and lines in order.

  The train and eval lines of a metric share its panel.  The report's undistilled
  (step 0) and distilled (last logged step) values join the ``eval/<name>`` line of their
  metric; a history row at the same step wins.  A metric whose values are all zero
  (e.g. ``train/nonfinite`` in a healthy run) gets no panel.
  """
  points: dict[str, dict[float, float]] = {}
  for i, row in enumerate(history):
    step = row.get("step", i)
    for key, value in row.items():
      if key in _NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      points.setdefault(key, {})[step] = value  # a key logged twice at a step: the last wins
  if history and report:
    last_step = max(row.get("step", i) for i, row in enumerate(history))
    for row in report.get("metrics", ()):
      for step, value in ((0, row.get("undistilled")), (last_step, row.get("distilled"))):
        if value is not None:
          points.setdefault(f"eval/{row['name']}", {}).setdefault(step, value)
  panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
  for key in sorted(points, key=lambda k: (k.startswith("eval/"), k)):  # train line first
    steps = sorted(points[key])
    panels.setdefault(_metric_of(key), {})[key] = (steps, [points[key][s] for s in steps])
  shown = [m for m, lines in panels.items() if any(v != 0 for _, ys in lines.values() for v in ys)]
  return {m: panels[m] for m in sorted(shown, key=lambda m: (m != "loss", "loss" not in m, m))}


def curves_figure(history: Sequence[Mapping[str, Any]], report: Optional[Mapping[str, Any]] = None,
                  *, max_panels: int = 12) -> Figure:
  """A matplotlib figure with one axis per metric: its train and eval curves against ``step``.

  Uses matplotlib's Agg canvas directly: no display and no global backend change.

  Args:
    history: rows ``{"step": int, "train/loss": float, "eval/<term>": float, ...}`` (the
      ``metrics.jsonl`` rows); a quantity logged only at eval steps is plotted at those.
    report: optional, from :func:`build_report`: each metric's undistilled value is its
      eval curve's step-0 point and its distilled value the point at the last step.
    max_panels: at most this many metrics are plotted (``loss`` first).

  Returns:
    The figure (on an Agg canvas); lines are labelled (and the legend names them) by their
    history key (``train/loss``, ``eval/loss``, ...), train lines in C0 and eval lines in C1,
    and lines of fewer than 30 points have markers.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = list(_curve_panels(history, report).items())[:max_panels]
  cols = min(3, max(len(panels), 1))
  rows = max(1, math.ceil(len(panels) / cols))
  fig = Figure(figsize=(4.5 * cols, 3.2 * rows), dpi=100)
  FigureCanvasAgg(fig)
  if not panels:
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, "no history logged", ha="center", va="center")
    ax.set_axis_off()
  for i, (metric, lines) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    for label, (xs, ys) in lines.items():
      ax.plot(xs, ys, label=label, color="C1" if label.startswith("eval/") else "C0",
              marker="o" if len(xs) < _SPARSE else None, markersize=3)
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def plot_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                 report: Optional[Mapping[str, Any]] = None, max_panels: int = 12) -> str:
  """Writes :func:`curves_figure` as a PNG, atomically.

  Args:
    history: the ``metrics.jsonl`` rows (see :func:`curves_figure`).
    path: the PNG to write.
    report: optional, from :func:`build_report` (adds the step-0 and final eval points).
    max_panels: at most this many metrics are plotted.

  Returns:
    ``path`` as a string.
  """
  png = io.BytesIO()
  curves_figure(history, report, max_panels=max_panels).savefig(png, format="png")
  path = os.fspath(path)
  _write_atomic(path, png.getvalue())
  return path


def write_report(run_dir: str | os.PathLike, report: Mapping[str, Any],
                 history: Sequence[Mapping[str, Any]] = ()) -> dict[str, str]:
  """Writes ``report.json``, ``report.md`` and ``curves.png`` into ``run_dir``.

  Args:
    run_dir: the run directory (created if missing).
    report: from :func:`build_report`.
    history: the training history rows (e.g. :func:`read_history` of
      ``metrics.jsonl``); ``curves.png`` plots them with the report's undistilled
      (step 0) and distilled eval points (see :func:`curves_figure`).

  Returns:
    ``{"json": path, "markdown": path, "png": path}``.
  """
  run_dir = os.fspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  paths = {"json": os.path.join(run_dir, REPORT_JSON),
           "markdown": os.path.join(run_dir, REPORT_MD),
           "png": os.path.join(run_dir, CURVES_PNG)}
  text = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False)
  _write_atomic(paths["json"], text.encode("utf-8"))
  _write_atomic(paths["markdown"], format_markdown(report).encode("utf-8"))
  plot_history(history, paths["png"], report=report)
  return paths
