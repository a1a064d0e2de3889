"""PNG figures for the Markdown report, drawn with matplotlib from the report's data.

(The interactive HTML versions come from Ax's analyses; see optimizer.analyses.)
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import results
from ..trial import TrialState
from .findings import ReportData, trace


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_trace(data: ReportData, path: Path) -> Path | None:
    points = trace(data.records, data.objective, data.minimize)
    if not any(v is not None for _, v, _ in points):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [i for i, v, _ in points if v is not None]
    ax.scatter(xs, [v for _, v, _ in points if v is not None], label=f"{data.objective} of the trial", zorder=3)
    ax.step([i for i, _, b in points if b is not None], [b for _, _, b in points if b is not None], where="post",
            color="tab:green", label="best so far")
    if data.baseline and data.baseline.index in xs:
        ax.axhline(data.baseline.metrics[data.objective], color="gray", linestyle="--", label="baseline")
    stopped = [r for r in data.records if r.state is TrialState.EARLY_STOPPED and r.curve]
    if stopped:
        ax.scatter([r.index for r in stopped], [r.curve[-1].get(data.objective, math.nan) for r in stopped],
                   marker="x", color="tab:red", label="early-stopped (last value)", zorder=3)
    ax.set(xlabel="trial", ylabel=data.objective, title="Optimization trace")
    ax.legend()
    return _save(fig, path)


def plot_contour(data: ReportData, x: str, y: str, path: Path) -> Path | None:
    rows = [r for r in data.completed if x in r.params and y in r.params]
    if len(rows) < 3:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [float(r.params[x]) for r in rows]
    ys = [float(r.params[y]) for r in rows]
    zs = [r.metrics[data.objective] for r in rows]
    lx, ly = [_axis(v) for v in (xs, ys)]
    dots = ax.scatter([lx(v) for v in xs], [ly(v) for v in ys], c=zs, cmap="viridis_r", edgecolors="black", zorder=3)
    try:  # a surface through the observed points, where they span an area
        ax.tricontourf([lx(v) for v in xs], [ly(v) for v in ys], zs, levels=12, cmap="viridis_r", alpha=0.6)
    except (ValueError, RuntimeError):
        pass
    fig.colorbar(dots, ax=ax, label=data.objective)
    if data.best and data.best in rows:
        ax.scatter([lx(float(data.best.params[x]))], [ly(float(data.best.params[y]))], marker="*", s=300,
                   color="gold", edgecolors="black", zorder=4, label="best")
        ax.legend(loc="best")
    ax.margins(0.08)
    _real_ticks(ax.set_xticks, xs, lx)
    _real_ticks(ax.set_yticks, ys, ly)
    ax.set(xlabel=x, ylabel=y, title=f"{data.objective} over {x} and {y} (observed trials)")
    return _save(fig, path)


def _axis(values: list[float]):
    """Log scale for positive values spanning a factor of 4 or more (learning rates, ranks)."""
    return math.log10 if min(values) > 0 and max(values) / min(values) >= 4 else (lambda v: v)


def _real_ticks(set_ticks, values: list[float], f) -> None:
    """Tick marks at a few of the values tried, labelled with the values themselves, not their logs."""
    distinct = sorted(set(values))
    if len(distinct) > 6:
        distinct = [distinct[round(i * (len(distinct) - 1) / 5)] for i in range(6)]
    set_ticks([f(v) for v in distinct], [f"{v:.2g}" for v in distinct])


def plot_curves(data: ReportData, path: Path) -> Path | None:
    rows = [r for r in data.records if r.curve]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        xs = [p["progress"] for p in r.curve]
        ys = [p.get(data.objective, p.get("val_loss")) for p in r.curve]
        stopped = r.state is TrialState.EARLY_STOPPED
        ax.plot(xs, ys, linestyle="--" if stopped else "-", alpha=0.8, color="tab:red" if stopped else None,
                label=None)
        if stopped:
            ax.scatter([xs[-1]], [ys[-1]], marker="x", color="tab:red")
    ax.plot([], [], color="tab:red", linestyle="--", label="early-stopped")
    ax.set(xlabel="share of training done", ylabel=f"validation {data.objective}", title="Learning curves of all trials")
    ax.legend()
    return _save(fig, path)


def plot_parallel(data: ReportData, names: list[str], path: Path) -> Path | None:
    rows = [r for r in data.completed if all(n in r.params for n in names)]
    if len(rows) < 2 or len(names) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    cols = []
    for n in names:
        vals = [float(r.params[n]) if not isinstance(r.params[n], str) else 0.0 for r in rows]
        f = _axis(vals)
        t = [f(v) for v in vals]
        lo, hi = min(t), max(t)
        cols.append([(v - lo) / (hi - lo) if hi > lo else 0.5 for v in t])
    zs = [r.metrics[data.objective] for r in rows]
    zlo, zhi = min(zs), max(zs)
    cmap = plt.get_cmap("viridis_r")
    for i, z in sorted(enumerate(zs), key=lambda p: -p[1] if data.minimize else p[1]):  # best drawn last
        ax.plot(range(len(names)), [c[i] for c in cols], color=cmap((z - zlo) / (zhi - zlo) if zhi > zlo else 0.5), alpha=0.85)
    ax.set_xticks(range(len(names)), [results.SHORT_NAMES.get(n, n) for n in names])
    ax.set_yticks([0, 1], ["low", "high"])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(zlo, zhi))
    fig.colorbar(sm, ax=ax, label=data.objective)
    ax.set(title="Parallel coordinates (each axis scaled to the values tried)")
    return _save(fig, path)


def plot_importance(importance: dict[str, float], path: Path) -> Path | None:
    if not importance:
        return None
    plt = _plt()
    items = sorted(importance.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(items) + 1.5))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set(xlabel="total Sobol sensitivity (Ax model)", title="Parameter importance")
    return _save(fig, path)


def plot_pareto(data: ReportData, objectives: list[str], path: Path) -> Path | None:
    if not data.pareto or len(objectives) < 2:
        return None
    a, b = objectives[:2]
    done = [r for r in data.records if r.objective_values([a, b]) is not None]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r.metrics[a] for r in done], [r.metrics[b] for r in done], color="lightgray", label="trials")
    front = sorted(data.pareto, key=lambda r: r.metrics[a])
    ax.plot([r.metrics[a] for r in front], [r.metrics[b] for r in front], "o-", color="tab:blue", label="Pareto front")
    if data.best:
        ax.scatter([data.best.metrics[a]], [data.best.metrics[b]], marker="*", s=300, color="gold",
                   edgecolors="black", zorder=4, label="best_config.yaml")
    ax.set(xlabel=a, ylabel=b, title="Pareto front")
    ax.legend()
    return _save(fig, path)
