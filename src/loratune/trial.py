"""What a trial is and how it ends: states, results, and the one place exceptions become states."""

from __future__ import annotations

import enum
import math
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import first_line


class TrialState(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    FAILED = "failed"  # crash or non-finite loss: Ax may try the point again
    OUT_OF_MEMORY = "out_of_memory"  # deterministic: the point is abandoned, never proposed again


@dataclass
class TrialResult:
    state: TrialState
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # [{step, progress, val_loss, ...}]
    reason: str | None = None  # why it failed or stopped
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (tokens/s, ...)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrialResult:
        return cls(TrialState(d["state"]), d.get("metrics") or {}, d.get("curve") or [], d.get("reason"), d.get("extra") or {})


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    text = str(exc).lower()
    return name == "OutOfMemoryError" or "out of memory" in text or (isinstance(exc, MemoryError))


def result_from_exception(exc: BaseException) -> TrialResult:
    """The single mapping from what went wrong inside a trial to its recorded state."""
    line = first_line(str(exc), 300)
    reason = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    if is_out_of_memory(exc):
        return TrialResult(TrialState.OUT_OF_MEMORY, reason=reason)
    if isinstance(exc, FloatingPointError):
        return TrialResult(TrialState.FAILED, reason=f"non-finite loss: {line}")
    return TrialResult(TrialState.FAILED, reason=reason, extra={"traceback": traceback.format_exc()[-4000:]})


def check_metrics(metrics: dict[str, Any], objectives: list[str]) -> TrialResult | None:
    """A failed result when an objective is missing or not a finite number, else None."""
    for name in objectives:
        value = metrics.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            return TrialResult(TrialState.FAILED, metrics=_numeric(metrics), reason=f"metric '{name}' missing or not a number")
        if not math.isfinite(value):
            return TrialResult(TrialState.FAILED, metrics=_numeric(metrics), reason=f"non-finite loss: {name} = {value}")
    return None


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
