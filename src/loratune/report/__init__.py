"""The study report: data first (data.py), then drawing (plots.py, Ax's HTML), then Markdown."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoratuneError
from ..storage import atomic_write_text, read_json

REPORT_NAME = "OPTIMIZATION_RESULTS.md"
DEFAULT_CONTOURS = [("lora_rank", "learning_rate")]


def _load_summary(directory: Path) -> dict:
    """The results file, or what a crashed study left in its checkpoint."""
    for name in ("optimization_results.json", "optimization_checkpoint.json"):
        if (directory / name).exists():
            data = read_json(directory / name, "study file")
            if name.endswith("checkpoint.json"):
                cfg = data.get("config") or {}
                data = {"trials": data.get("records") or [], **{k: cfg.get(k) for k in
                        ("objectives", "minimize", "search_space", "constraints", "seed")}}
            if not isinstance(data, dict) or "trials" not in data:
                raise LoratuneError(f"{directory / name}: not a loratune study file")
            return data
    raise LoratuneError(f"{directory}: holds no loratune study (no optimization_results.json or checkpoint)")


def write_report(study_dir: str | Path, contours: list[tuple[str, str]] | None = None, interactive: bool = True) -> Path:
    """Write OPTIMIZATION_RESULTS.md and its plots for the study in ``study_dir``, at any time:
    after it finished, while it runs, or after a crash.

    >>> from loratune.report import write_report
    >>> write_report("configs/")  # doctest: +SKIP
    """
    from . import data as D
    from . import markdown, plots

    directory = Path(study_dir)
    if not directory.is_dir():
        raise LoratuneError(f"{directory}: no such directory")
    summary = _load_summary(directory)
    data = D.compute(summary)
    names = list(summary.get("search_space") or {})
    objectives = summary.get("objectives") or ["loss"]
    pairs = [p for p in (contours or DEFAULT_CONTOURS) if p[0] in names and p[1] in names]
    out = directory / "plots"
    drawn = {
        "trace": plots.plot_trace(data, out / "trace.png"),
        "curves": plots.plot_curves(data, out / "learning_curves.png"),
        "parallel": plots.plot_parallel(data, names, out / "parallel_coordinates.png"),
        "pareto": plots.plot_pareto(data, objectives, out / "pareto_front.png"),
    }
    for x, y in pairs:
        drawn[f"contour_{x}__{y}"] = plots.plot_contour(data, x, y, out / f"contour_{x}_{y}.png")
    html, importance, errors = {}, None, []
    if interactive and (directory / "optimization_checkpoint.json").exists() and data.completed:
        html, importance, errors = _ax_outputs(directory, objectives, pairs)
    drawn["importance"] = plots.plot_importance(importance or {}, out / "importance.png")
    images = {k: str(v.relative_to(directory)) for k, v in drawn.items() if v}
    comparison_file = directory / "comparison.json"
    comparison = read_json(comparison_file, "comparison") if comparison_file.exists() else None
    text = markdown.render(data, summary, images, html, importance, errors, comparison)
    path = directory / REPORT_NAME
    atomic_write_text(path, text)
    return path


def _ax_outputs(directory: Path, objectives: list[str], pairs):
    from ..optimizer import analyses
    from ..study import Study

    try:
        study = Study.load(directory, quiet=True, read_only=True)
    except LoratuneError as exc:
        return {}, None, [f"checkpoint: {exc}"]
    figures, importance, errors = analyses(study.opt, objectives, pairs)
    html = {}
    for name, fig in figures.items():
        path = directory / "plots" / f"{name}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.write_html(str(path), include_plotlyjs="directory")  # one plotly.min.js beside them: opens offline
        html[name] = str(path.relative_to(directory))
    return html, importance, errors
