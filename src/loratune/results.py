"""Plain computations over trial records: the best trial, the Pareto front, the improvement over
the baseline, the rows of the summary. Used by the study loop, the report and the API alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

COMPLETED = "completed"


def objective_values(record: dict, objectives: list[str]) -> list[float] | None:
    """The record's objective values, or None when it did not complete with all of them finite."""
    if record.get("state") != COMPLETED:
        return None
    values = [record.get("metrics", {}).get(o) for o in objectives]
    if any(not isinstance(v, int | float) or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def _signed(values: list[float], minimize: list[bool]) -> list[float]:
    """Flip maximized objectives so that smaller is better everywhere."""
    return [v if m else -v for v, m in zip(values, minimize, strict=True)]


def pareto_front(records: list[dict], objectives: list[str], minimize: list[bool]) -> list[dict]:
    """Completed records that no other completed record dominates, best first objective first."""
    scored = [(r, _signed(v, minimize)) for r in records if (v := objective_values(r, objectives)) is not None]
    front = [r for r, a in scored
             if not any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for _, b in scored)]
    return sorted(front, key=lambda r: _signed(objective_values(r, objectives), minimize)[0])


def best_record(records: list[dict], objectives: list[str], minimize: list[bool]) -> dict | None:
    """Single objective: the best completed trial. Several: the knee of the Pareto front, the point
    closest to the ideal corner once each objective is scaled to [0, 1] over the front."""
    front = pareto_front(records, objectives, minimize)
    if len(front) <= 1 or len(objectives) == 1:
        return front[0] if front else None
    points = [_signed(objective_values(r, objectives), minimize) for r in front]
    lows = [min(p[i] for p in points) for i in range(len(objectives))]
    spans = [(max(p[i] for p in points) - lows[i]) or 1.0 for i in range(len(objectives))]
    return min(front, key=lambda r: math.dist([0.0] * len(objectives), [
        (v - lo) / s for v, lo, s in zip(_signed(objective_values(r, objectives), minimize), lows, spans, strict=True)]))


def baseline_record(records: list[dict]) -> dict | None:
    return next((r for r in records if r.get("baseline")), None)


@dataclass
class Improvement:
    baseline: float
    best: float
    absolute: float  # baseline - best, positive when the best is better (for a minimized objective)
    relative: float  # absolute / |baseline|


def improvement(records: list[dict], objective: str, minimize: bool) -> Improvement | None:
    base, best = baseline_record(records), best_record(records, [objective], [minimize])
    if base is None or best is None or objective_values(base, [objective]) is None:
        return None
    b, x = base["metrics"][objective], best["metrics"][objective]
    gain = (b - x) if minimize else (x - b)
    return Improvement(b, x, gain, gain / abs(b) if b else math.nan)


def verdict(record: dict, records_before: list[dict], objective: str, minimize: bool) -> str:
    """The seed's marks: how a finished trial compares with the baseline and the best before it."""
    if record.get("baseline"):
        return "(baseline)"
    if record.get("state") != COMPLETED:
        return record.get("state", "").upper().replace("_", " ")
    value = record["metrics"].get(objective)
    better = (lambda a, b: a < b) if minimize else (lambda a, b: a > b)
    prior = [r["metrics"][objective] for r in records_before if objective_values(r, [objective]) is not None]
    base = baseline_record(records_before)
    marks = []
    if base is not None and objective_values(base, [objective]) is not None:
        marks.append("✓ IMPROVED" if better(value, base["metrics"][objective]) else "✗ WORSE")
    if prior and all(better(value, p) for p in prior):
        marks.append("★ BEST")
    return " ".join(marks)


def early_stopping_savings(records: list[dict]) -> dict:
    """How much training early stopping saved, in whole-trial equivalents and as a share of what
    the completed and stopped trials would have cost if all had run to the end."""
    stopped = [r for r in records if r.get("state") == "early_stopped"]
    ran = [r for r in records if r.get("state") in (COMPLETED, "early_stopped")]
    saved = sum(r.get("training_saved", 0.0) for r in stopped)
    return {"stopped": len(stopped), "trials_saved": round(saved, 4),
            "share_saved": round(saved / len(ran), 4) if ran else 0.0}


SHORT_NAMES = {"lora_rank": "rank", "lora_alpha": "alpha", "learning_rate": "lr", "batch_size": "bs"}


def format_params(params: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{SHORT_NAMES.get(k, k)}={fmt(v)}" for k, v in params.items())


def ranked(records: list[dict], objective: str, minimize: bool) -> list[dict]:
    done = [r for r in records if objective_values(r, [objective]) is not None]
    return sorted(done, key=lambda r: r["metrics"][objective] * (1 if minimize else -1))
