"""What a trial is and how it ends: its states, the result a trial returns, the record a study keeps,
and the one place where exceptions, exits and metric values become states."""

from __future__ import annotations

import enum
import math
import numbers
import signal
import traceback
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import LoratuneError, first_line


class TrialState(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    FAILED = "failed"  # crash, non-finite loss or timeout: Ax may try the point again
    OUT_OF_MEMORY = "out_of_memory"  # deterministic: the point is abandoned, never proposed again

    @property
    def is_failure(self) -> bool:
        return self in (TrialState.FAILED, TrialState.OUT_OF_MEMORY)


@dataclass
class TrialResult:
    """How one trial ended, as its process (or thread) reports it."""

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


@dataclass
class TrialRecord:
    """Everything a study knows about one trial; a row of ``optimization_results.json``."""

    index: int  # Ax's trial index; the baseline is 0
    params: dict[str, Any]  # the searched parameters, in their own types
    state: TrialState = TrialState.RUNNING
    baseline: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # validation points: {step, progress, val_loss, loss, ...}
    reason: str | None = None  # why it failed or stopped
    directory: str = ""  # its files, relative to the study directory
    started_at: str | None = None  # ISO 8601, UTC
    ended_at: str | None = None
    duration_s: float | None = None  # wall time of its last run
    restarts: int = 0  # times it was run again after the study was interrupted
    extra: dict[str, Any] = field(default_factory=dict)  # steps, tokens, device, ...
    training_saved: float | None = None  # early-stopped: share of its training not spent
    stop_requested_at: float | None = None  # progress at which early stopping asked it to stop

    @property
    def finished(self) -> bool:
        return self.state is not TrialState.RUNNING

    def objective_values(self, objectives: list[str]) -> list[float] | None:
        """The objective values of a completed trial with all of them finite, else None."""
        if self.state is not TrialState.COMPLETED:
            return None
        values = [self.metrics.get(o) for o in objectives]
        if any(not isinstance(v, int | float) or not math.isfinite(v) for v in values):
            return None
        return [float(v) for v in values]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TrialRecord:
        """A record read from a checkpoint or results file, checked as strictly as a config."""
        if not isinstance(data, dict):
            raise LoratuneError(f"{where}: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        for key in ("index", "params", "state"):
            if key not in data:
                raise LoratuneError(f"{where}: missing '{key}'")
        index, params, state = data["index"], data["params"], data["state"]
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise LoratuneError(f"{where}: index must be a non-negative integer, got {index!r}")
        if not isinstance(params, dict):
            raise LoratuneError(f"{where}: params must be a mapping, got {params!r}")
        if state not in TrialState._value2member_map_:
            raise LoratuneError(f"{where}: unknown state {state!r} (known: {', '.join(s.value for s in TrialState)})")
        checks = {"metrics": dict, "curve": list, "extra": dict, "baseline": bool, "restarts": int}
        for key, kind in checks.items():
            if key in data and data[key] is not None and not isinstance(data[key], kind):
                raise LoratuneError(f"{where}: {key} must be a {kind.__name__}, got {data[key]!r}")
        values = {k: v for k, v in data.items() if k in known and v is not None}
        values["state"] = TrialState(state)
        return cls(**values)


def is_out_of_memory(error: BaseException | str) -> bool:
    """An exception, or the text a dead process left in its log, that says memory ran out."""
    if isinstance(error, BaseException):
        if type(error).__name__ == "OutOfMemoryError" or isinstance(error, MemoryError):
            return True
        error = str(error)
    return "out of memory" in error.lower()


def result_from_exception(exc: BaseException) -> TrialResult:
    """The single mapping from what went wrong inside a trial to its recorded state."""
    line = first_line(str(exc), 300)
    reason = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    if is_out_of_memory(exc):
        return TrialResult(TrialState.OUT_OF_MEMORY, reason=reason)
    if isinstance(exc, FloatingPointError):
        return TrialResult(TrialState.FAILED, reason=f"non-finite loss: {line}")
    return TrialResult(TrialState.FAILED, reason=reason, extra={"traceback": traceback.format_exc()[-4000:]})


HINTS = {  # what to change after a failed fine-tune, by how it failed
    TrialState.OUT_OF_MEMORY: "lower training.batch_size or data.max_length, or set model.gradient_checkpointing: "
                              "true or model.quantization: 4bit",
}


def failure_message(exc: BaseException) -> str:
    """What went wrong in a fine-tune, as one line with what to change (the trial's reason, see
    ``result_from_exception``)."""
    result = result_from_exception(exc)
    if result.reason.startswith("non-finite loss"):
        return f"{result.reason}: training diverged; lower training.learning_rate"
    hint = HINTS.get(result.state)
    return f"{result.reason}; {hint}" if hint else result.reason


def result_from_exit(code: int | None, log_text: str, what: str = "worker process", *, started: bool = True,
                     oom_killed: bool = False) -> TrialResult:
    """A process that ended without reporting a result: out of memory when the kernel's out-of-memory killer
    ended it (``oom_killed``) or its log says so, else failed. ``started``: whether it had taken the trial."""
    if code is not None and code < 0:
        how = f"was killed by {_signal_name(-code)}"
        if oom_killed:
            how = "was killed by the kernel's out-of-memory killer"
        elif -code == signal.SIGKILL:
            how += " (the kernel's out-of-memory killer, or a kill from outside)"
    else:
        how = f"exited with code {code}"
    reason = f"{what} {how}" + ("" if started else " before it started the trial")
    tail = first_line("\n".join(reversed(log_text.strip().splitlines())))
    if tail and (what != "worker process" or not started):  # a worker's own last line means little mid-trial
        reason += f": {tail}"
    out_of_memory = oom_killed or is_out_of_memory(log_text)
    return TrialResult(TrialState.OUT_OF_MEMORY if out_of_memory else TrialState.FAILED, reason=reason)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def as_number(value: Any) -> float | None:
    """``value`` as a float when it is a real number of any kind (Python, numpy, a 0-d tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        inner = item()
        return float(inner) if isinstance(inner, numbers.Real) and not isinstance(inner, bool) else None
    return None


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are real numbers, as floats (what Ax and the JSON files take)."""
    return {str(k): n for k, v in metrics.items() if (n := as_number(v)) is not None}


def check_metrics(metrics: dict[str, Any], objectives: list[str]) -> TrialResult:
    """A completed result with the numeric metrics, or a failed one when an objective is missing, not a
    number, or not finite."""
    numeric = numeric_metrics(metrics)
    for name in objectives:
        if name not in metrics:
            return TrialResult(TrialState.FAILED, numeric, reason=f"metric '{name}' missing (got {sorted(metrics)})")
        if name not in numeric:
            return TrialResult(TrialState.FAILED, numeric, reason=f"metric '{name}' is not a number: {metrics[name]!r}"[:300])
        if not math.isfinite(numeric[name]):
            return TrialResult(TrialState.FAILED, numeric, reason=f"non-finite loss: {name} = {numeric[name]}")
    return TrialResult(TrialState.COMPLETED, numeric)
