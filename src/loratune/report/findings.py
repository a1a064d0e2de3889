"""What the report says, computed from the trial records before anything is drawn or written.

Every finding here is plain arithmetic over completed trials, so it can be tested, and each comes
with the evidence it rests on.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from .. import results
from .. import search_space as space_names
from ..trial import TrialRecord

# the parameters the insights read, by the names they are read under here; a study may name them
# otherwise (lora.rank, rank, training.learning_rate): ``by_role`` renames them by the field they set
LR, RANK, ALPHA, BS = "learning_rate", "lora_rank", "lora_alpha", "batch_size"
ROLES = {space_names.LR: LR, space_names.RANK: RANK, space_names.ALPHA: ALPHA, "training.batch_size": BS}


@dataclass
class GroupStat:
    value: object
    n: int
    mean: float
    best: float


@dataclass
class Insight:
    title: str
    finding: str
    groups: list[GroupStat] = field(default_factory=list)  # evidence: the objective by value
    correlation: float | None = None  # Spearman rank correlation of the parameter with the objective


@dataclass
class ReportData:
    objective: str
    minimize: bool
    records: list[TrialRecord]
    completed: list[TrialRecord]
    insights: list[Insight]
    best: TrialRecord | None
    baseline: TrialRecord | None
    improvement: results.Gain | None
    early_stopping: dict
    pareto: list[TrialRecord] | None
    running: int
    rslora: bool = False


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (``scipy.stats.spearmanr``; ties share their mean rank); None with fewer
    than 4 points or no spread."""
    from scipy.stats import spearmanr

    if len(xs) < 4 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def group_by(keys: list, values: list[float], minimize: bool) -> list[GroupStat]:
    """The values grouped by their keys: count, mean and best per key, in key order."""
    groups: dict = {}
    for k, v in zip(keys, values, strict=True):
        groups.setdefault(k, []).append(v)
    pick = min if minimize else max
    return [GroupStat(v, len(ys), statistics.fmean(ys), pick(ys)) for v, ys in sorted(groups.items())]


def effective_scale(params: dict, rslora: bool = False) -> float | None:
    """LoRA's update scale (``search_space.lora_scale``) at a trial's parameters, None without both."""
    if RANK not in params or ALPHA not in params:
        return None
    return space_names.lora_scale(params[ALPHA], params[RANK], rslora)


def by_role(records: list[TrialRecord], names: list[str]) -> list[TrialRecord]:
    """The records with each searched parameter under the name the insights read it by (``ROLES``)."""
    renamed = {n: ROLES[t] for n in names if (t := space_names.target_of(n)) in ROLES}
    if all(n == r for n, r in renamed.items()):
        return records
    return [dataclasses.replace(r, params={renamed.get(k, k): v for k, v in r.params.items()}) for r in records]


def _trend(objective: str, rho: float | None, what: str = "it") -> str:
    """A sentence on how the objective moves with a parameter (``what``), from Spearman's rho."""
    if rho is None:
        return f"Too few distinct trials to tell how {objective} moves with {what}."
    size = "strongly" if abs(rho) >= 0.6 else "moderately" if abs(rho) >= 0.3 else "hardly"
    return f"{objective.capitalize()} {size} {'rises' if rho > 0 else 'falls'} with {what} (Spearman {rho:+.2f})."


def _done_with(completed: list[TrialRecord], *names: str) -> list[TrialRecord]:
    return [r for r in completed if all(n in r.params for n in names)]


def discrete_insight(title: str, name: str, completed: list[TrialRecord], objective: str, minimize: bool) -> Insight | None:
    rows = _done_with(completed, name)
    if len({r.params[name] for r in rows}) < 2:
        return None
    groups = group_by([r.params[name] for r in rows], [r.metrics[objective] for r in rows], minimize)
    rho = spearman([float(r.params[name]) for r in rows], [r.metrics[objective] for r in rows])
    best = (min if minimize else max)(groups, key=lambda g: g.mean)
    finding = (f"{_trend(objective, rho)} The best mean {objective} is at {name} = {best.value} "
               f"({best.mean:.4f} over {best.n} trial{'s' * (best.n != 1)}).")
    return Insight(title, finding, groups, rho)


def learning_rate_insight(completed: list[TrialRecord], objective: str, minimize: bool, bounds: tuple | None) -> Insight | None:
    rows = _done_with(completed, LR)
    if len(rows) < 2:
        return None
    ranked = sorted(rows, key=lambda r: r.metrics[objective] * (1 if minimize else -1))
    top = ranked[: max(2, len(ranked) // 4)]
    low, high = min(r.params[LR] for r in top), max(r.params[LR] for r in top)
    best_lr = ranked[0].params[LR]
    edge = ""
    if bounds and best_lr >= bounds[1] * 0.95:
        edge = f" The best trial sits at the top of the range ({bounds[1]:.2g}): a wider range may find more."
    elif bounds and best_lr <= bounds[0] * 1.05:
        edge = f" The best trial sits at the bottom of the range ({bounds[0]:.2g}): a wider range may find more."
    decades = [math.floor(math.log10(r.params[LR]) * 2) / 2 for r in rows]  # half-decade bins
    groups = group_by([(round(10 ** d, 12), round(10 ** (d + 0.5), 12)) for d in decades],
                      [r.metrics[objective] for r in rows], minimize)
    rho = spearman([math.log(r.params[LR]) for r in rows], [r.metrics[objective] for r in rows])
    span = f"all used {low:.2g}" if f"{low:.2g}" == f"{high:.2g}" else f"used learning rates from {low:.2g} to {high:.2g}"
    finding = (f"The best {len(top)} trials {span}; the best one {best_lr:.2g}. "
               f"{_trend(objective, rho, 'the learning rate (on a log scale)')}{edge}")
    return Insight("Learning-rate sweet spot", finding, groups, rho)


def alpha_ratio_insight(completed: list[TrialRecord], objective: str, minimize: bool, rslora: bool) -> Insight | None:
    rows = _done_with(completed, RANK, ALPHA)
    if len(rows) < 2:
        return None
    scales = [effective_scale(r.params, rslora) for r in rows]
    ys = [r.metrics[objective] for r in rows]
    rho = spearman([math.log(s) for s in scales], ys)
    what = "alpha/sqrt(rank)" if rslora else "alpha/rank"
    groups = group_by([round(s, 3) for s in scales], ys, minimize)
    if rho is None:
        finding = _trend(objective, rho, f"the effective scale {what}")
    elif abs(rho) < 0.3:
        finding = f"The effective scale {what} hardly matters here (Spearman {rho:+.2f})."
    else:
        finding = f"The effective scale {what} matters: {_trend(objective, rho)}"
    if LR in rows[0].params:
        eff = spearman([math.log(s * r.params[LR]) for s, r in zip(scales, rows, strict=True)], ys)
        if eff is not None:
            finding += (f" Scale x learning rate, the step the adapter actually takes (LoRA paper, 4.1), "
                        f"correlates at {eff:+.2f}.")
    return Insight("Alpha/rank ratio", finding, groups, rho)


def compute(summary: dict) -> ReportData:
    """Everything the report shows, from ``optimization_results.json`` (or a partial one)."""
    records = [TrialRecord.from_dict(r, f"trials[{i}]") for i, r in enumerate(summary.get("trials") or [])]
    objectives, minimize = summary.get("objectives") or ["loss"], summary.get("minimize") or [True]
    objective, mini = objectives[0], minimize[0]
    space = summary.get("search_space") or {}
    completed = by_role([r for r in records if r.objective_values([objective]) is not None], list(space))
    lr_spec = next((spec for name, spec in space.items() if space_names.target_of(name) == space_names.LR), None)
    bounds = tuple(lr_spec) if isinstance(lr_spec, list) and len(lr_spec) == 2 else \
        (lr_spec.get("low"), lr_spec.get("high")) if isinstance(lr_spec, dict) and "low" in lr_spec else None
    rslora = bool(summary.get("rslora"))
    insights = [
        discrete_insight("LoRA rank vs loss", RANK, completed, objective, mini),
        learning_rate_insight(completed, objective, mini, bounds),
        discrete_insight("Batch size impact", BS, completed, objective, mini),
        alpha_ratio_insight(completed, objective, mini, rslora),
    ]
    front = results.pareto_front(records, objectives, minimize) if len(objectives) > 1 else None
    return ReportData(
        objective=objective, minimize=mini, records=records, completed=completed,
        insights=[i for i in insights if i is not None],
        best=results.best_record(records, objectives, minimize), baseline=results.baseline_record(records),
        improvement=results.improvement(records, objectives, minimize), early_stopping=results.early_stopping_savings(records),
        pareto=front, running=sum(not r.finished for r in records), rslora=rslora,
    )


def trace(records: list[TrialRecord], objective: str, minimize: bool) -> list[tuple[int, float | None, float | None]]:
    """(trial index, its value, best so far) in trial order, for the optimization trace."""
    out, best = [], None
    pick = min if minimize else max
    for r in sorted(records, key=lambda r: r.index):
        v = r.metrics.get(objective) if r.objective_values([objective]) is not None else None
        if v is not None:
            best = v if best is None else pick(best, v)
        out.append((r.index, v, best))
    return out
