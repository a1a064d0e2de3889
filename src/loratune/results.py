"""Plain computations over trial records: the best trial, the Pareto front, the improvement over
the baseline, the marks of a finished trial. Used by the study loop, the report and the API alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .trial import TrialRecord, TrialState


def _signed(values: list[float], minimize: list[bool]) -> list[float]:
    """Flip maximized objectives so that smaller is better everywhere."""
    return [v if m else -v for v, m in zip(values, minimize, strict=True)]


def pareto_front(records: list[TrialRecord], objectives: list[str], minimize: list[bool]) -> list[TrialRecord]:
    """Completed records that no other completed record dominates, best first objective first."""
    scored = [(r, _signed(v, minimize)) for r in records if (v := r.objective_values(objectives)) is not None]
    front = [r for r, a in scored
             if not any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for _, b in scored)]
    return sorted(front, key=lambda r: _signed(r.objective_values(objectives), minimize)[0])


def best_record(records: list[TrialRecord], objectives: list[str], minimize: list[bool]) -> TrialRecord | None:
    """Single objective: the best completed trial. Several: the knee of the Pareto front, the point
    closest to the ideal corner once each objective is scaled to [0, 1] over the front."""
    front = pareto_front(records, objectives, minimize)
    if len(front) <= 1 or len(objectives) == 1:
        return front[0] if front else None
    points = [_signed(r.objective_values(objectives), minimize) for r in front]
    lows = [min(p[i] for p in points) for i in range(len(objectives))]
    spans = [(max(p[i] for p in points) - lows[i]) or 1.0 for i in range(len(objectives))]
    return min(front, key=lambda r: math.dist([0.0] * len(objectives), [
        (v - lo) / s for v, lo, s in zip(_signed(r.objective_values(objectives), minimize), lows, spans, strict=True)]))


def baseline_record(records: list[TrialRecord]) -> TrialRecord | None:
    return next((r for r in records if r.baseline), None)


@dataclass(frozen=True)
class Gain:
    """The best trial against the baseline on one metric. ``absolute`` is positive when the best is better
    (lower, for a minimized metric); ``relative`` is ``absolute / |baseline|``, None against a baseline of 0,
    where no relative change exists (``text`` gives the absolute one there). The one definition of the gain:
    the study's results, the console, the report, the final test, MLflow and the API all read it."""

    best: float
    baseline: float
    minimize: bool = True

    @property
    def absolute(self) -> float:
        return (self.baseline - self.best) if self.minimize else (self.best - self.baseline)

    @property
    def relative(self) -> float | None:
        return self.absolute / abs(self.baseline) if self.baseline else None

    def text(self) -> str:
        """``0.6523 vs 0.8850 (26.3% better)``; against a baseline of 0 ``... (0.5000 worse, absolute)``."""
        if self.absolute == 0:
            change = "no change"
        else:
            word = "better" if self.absolute > 0 else "worse"
            change = f"{abs(self.absolute):.4f} {word}, absolute" if self.relative is None else \
                f"{abs(self.relative):.1%} {word}"
        return f"{self.best:.4f} vs {self.baseline:.4f} ({change})"

    def held_on(self, test: Gain) -> float | None:
        """The share of this (validation) gain that held on ``test`` (1: all of it; 0 or less: none): the ratio
        of the relative gains, the figures ``text`` prints beside each other (the two splits' baselines differ,
        so their absolute gains are on different scales); the absolute ratio where a baseline is 0. None when
        this gain is no gain."""
        if self.absolute <= 0:
            return None
        if self.relative is None or test.relative is None:
            return test.absolute / self.absolute
        return test.relative / self.relative

    def to_dict(self) -> dict:
        return {"best": self.best, "baseline": self.baseline, "absolute": self.absolute, "relative": self.relative,
                "minimize": self.minimize}

    @classmethod
    def from_dict(cls, data: dict) -> Gain:
        """From ``to_dict``; a dict saved without ``minimize`` tells it by the sign of its ``absolute``."""
        best, baseline = float(data["best"]), float(data["baseline"])
        minimize = data.get("minimize")
        if minimize is None:
            absolute = float(data.get("absolute", baseline - best))
            minimize = abs((baseline - best) - absolute) <= abs((best - baseline) - absolute)
        return cls(best, baseline, bool(minimize))


def improvement(records: list[TrialRecord], objectives: list[str], minimize: list[bool]) -> Gain | None:
    """The best trial (``best_record``: the one ``best_config.yaml`` holds, the knee of the Pareto front with
    several objectives) against the baseline, on the first objective; None without both."""
    base, best = baseline_record(records), best_record(records, objectives, minimize)
    if base is None or best is None or base.objective_values(objectives[:1]) is None:
        return None
    return Gain(best.metrics[objectives[0]], base.metrics[objectives[0]], minimize[0])


def trial_marks(record: TrialRecord, records_before: list[TrialRecord], objective: str, minimize: bool) -> str:
    """The marks of the study's trial lines: how a finished trial compares with the baseline and
    with the best before it (``✓ IMPROVED``, ``✗ WORSE``, ``★ BEST``)."""
    if record.baseline:
        return "(baseline)"
    if record.state is not TrialState.COMPLETED:
        return record.state.value.upper().replace("_", " ")
    value = record.metrics.get(objective)
    better = (lambda a, b: a < b) if minimize else (lambda a, b: a > b)
    prior = [r.metrics[objective] for r in records_before if r.objective_values([objective]) is not None]
    base = baseline_record(records_before)
    marks = []
    if base is not None and base.objective_values([objective]) is not None:
        marks.append("✓ IMPROVED" if better(value, base.metrics[objective]) else "✗ WORSE")
    if prior and all(better(value, p) for p in prior):
        marks.append("★ BEST")
    return " ".join(marks)


def early_stopping_savings(records: list[TrialRecord]) -> dict:
    """How much training early stopping saved, in whole-trial equivalents and as a share of what
    the completed and stopped trials would have cost if all had run to the end."""
    stopped = [r for r in records if r.state is TrialState.EARLY_STOPPED]
    ran = [r for r in records if r.state in (TrialState.COMPLETED, TrialState.EARLY_STOPPED)]
    saved = sum(r.training_saved or 0.0 for r in stopped)
    return {"stopped": len(stopped), "trials_saved": round(saved, 4),
            "share_saved": round(saved / len(ran), 4) if ran else 0.0}


SHORT_NAMES = {"lora_rank": "rank", "lora_alpha": "alpha", "learning_rate": "lr", "batch_size": "bs"}


def format_params(params: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{SHORT_NAMES.get(k, k)}={fmt(v)}" for k, v in params.items())


def ranked(records: list[TrialRecord], objective: str, minimize: bool) -> list[TrialRecord]:
    done = [r for r in records if r.objective_values([objective]) is not None]
    return sorted(done, key=lambda r: r.metrics[objective] * (1 if minimize else -1))
