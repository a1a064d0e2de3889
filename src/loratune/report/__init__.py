"""The study report: findings first (findings.py), then drawing (plots.py, Ax's HTML), then Markdown.

It reads what a study stored (``checkpoint.py``), so it can be written at any time: after a study
finished, while it runs, or after a crash.
"""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint
from ..checkpoint import COMPARISON_NAME, PLOTS_DIR, REPORT_NAME
from ..errors import LoratuneError
from ..storage import atomic_write_text, read_json

DEFAULT_CONTOURS = [("lora_rank", "learning_rate")]


def write_report(study_dir: str | Path, contours: list[tuple[str, str]] | None = None, interactive: bool = True) -> Path:
    """Write OPTIMIZATION_RESULTS.md and its plots for the study in ``study_dir``; return its path.

    >>> from loratune.report import write_report
    >>> write_report("configs/")  # doctest: +SKIP
    """
    from . import findings, markdown, plots

    directory = Path(study_dir)
    if not directory.is_dir():
        raise LoratuneError(f"{directory}: no such directory")
    summary = checkpoint.load_results(directory)
    data = findings.compute(summary)
    names = list(summary.get("search_space") or {})
    objectives = summary.get("objectives") or ["loss"]
    pairs = [p for p in (contours or DEFAULT_CONTOURS) if p[0] in names and p[1] in names]
    out = directory / PLOTS_DIR
    drawn = {
        "trace": plots.plot_trace(data, out / "trace.png"),
        "curves": plots.plot_curves(data, out / "learning_curves.png"),
        "parallel": plots.plot_parallel(data, names, out / "parallel_coordinates.png"),
        "pareto": plots.plot_pareto(data, objectives, out / "pareto_front.png"),
    }
    for x, y in pairs:
        drawn[f"contour_{x}__{y}"] = plots.plot_contour(data, x, y, out / f"contour_{x}_{y}.png")
    html, importance, errors = {}, None, []
    if interactive and (directory / checkpoint.CHECKPOINT_NAME).exists() and data.completed:
        html, importance, errors = _ax_outputs(directory, objectives, pairs)
    drawn["importance"] = plots.plot_importance(importance or {}, out / "importance.png")
    images = {k: str(v.relative_to(directory)) for k, v in drawn.items() if v}
    comparison, stale = _comparison(directory, summary)
    text = markdown.render(data, summary, images, html, importance, errors, comparison, stale)
    path = directory / REPORT_NAME
    atomic_write_text(path, text)
    return path


def _comparison(directory: Path, summary: dict) -> tuple[dict | None, str | None]:
    """The retrain comparison of this study's current best trial, or why the one found is not shown."""
    path = directory / COMPARISON_NAME
    if not path.exists():
        return None, None
    data = read_json(path, "comparison")
    if not isinstance(data, dict):
        return None, f"{COMPARISON_NAME} is not a comparison"
    if data.get("study_id") != summary.get("study_id"):
        return None, f"{COMPARISON_NAME} compares another study's trials"
    if data.get("best_trial") != summary.get("best_trial"):
        return None, (f"{COMPARISON_NAME} retrained trial #{data.get('best_trial')}, and the best trial is now "
                      f"#{summary.get('best_trial')}")
    return data, None


def _ax_outputs(directory: Path, objectives: list[str], pairs):
    from ..optimizer import Optimizer
    from ..optimizer.analyses import analyses

    try:
        _, stored = checkpoint.load(directory)
        opt = Optimizer.restore(stored.ax, stored.space, stored.config.seed)
    except LoratuneError as exc:
        return {}, None, [f"checkpoint: {exc}"]
    figures, importance, errors = analyses(opt, objectives, pairs)
    html = {}
    for name, fig in figures.items():
        path = directory / PLOTS_DIR / f"{name}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.write_html(str(path), include_plotlyjs="directory")  # one plotly.min.js beside them: opens offline
        html[name] = str(path.relative_to(directory))
    return html, importance, errors
