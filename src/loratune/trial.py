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
from .schema import Origin, build


class TrialState(enum.StrEnum):
    QUEUED = "queued"  # known to Ax, waiting for a free slot (the baseline, an interrupted session's trials)
    RUNNING = "running"
    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    FAILED = "failed"  # crash, non-finite loss or timeout: Ax may try the point again
    OUT_OF_MEMORY = "out_of_memory"  # deterministic: the point is abandoned, never proposed again

    @property
    def is_failure(self) -> bool:
        return self in (TrialState.FAILED, TrialState.OUT_OF_MEMORY)


class Evaluation(enum.StrEnum):
    """How a study's trials are evaluated."""

    FINETUNE = "finetune"  # loratune's own fine-tune (a worker process, locally or on Ray)
    COMMAND = "command"  # a user's training command: its last JSON line, or what its LoratuneCallback reported
    CALLABLE = "callable"  # a Python function given to run_optimization(evaluate=...)

    @classmethod
    def of(cls, evaluate: Any, command: str | None) -> Evaluation:
        return cls.CALLABLE if evaluate is not None else cls.COMMAND if command else cls.FINETUNE


@dataclass
class TrialResult:
    """How one trial ended, as its process (or thread) reports it."""

    state: TrialState
    metrics: dict[str, Any] = field(default_factory=dict)  # as reported; the study checks them (check_metrics)
    curve: list[dict[str, int | float | None]] = field(default_factory=list)  # [{step, progress, val_loss, ...}]
    reason: str | None = None  # why it failed or stopped
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (tokens/s, ...)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TrialResult:
        """A result as a worker wrote it (``result.json``, a Ray actor's reply), checked by the builder
        that checks a config; errors named ``where: field``. A field this version does not know is left out."""
        return _read(cls, data, where)


@dataclass
class TrialRecord:
    """Everything a study knows about one trial; a row of ``optimization_results.json``."""

    index: int  # Ax's trial index; the baseline is 0
    params: dict[str, Any]  # the searched parameters, in their own types
    state: TrialState = TrialState.RUNNING
    baseline: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, int | float | None]] = field(default_factory=list)  # validation points: {step, progress, val_loss, loss, ...}
    reason: str | None = None  # why it failed or stopped
    directory: str = ""  # its files, relative to the study directory
    started_at: str | None = None  # ISO 8601, UTC
    ended_at: str | None = None
    duration_s: float | None = None  # wall time of its last run
    restarts: int = 0  # times it was run again: after the study was interrupted, or its pack ran out of memory
    extra: dict[str, Any] = field(default_factory=dict)  # steps, tokens, device, ...
    training_saved: float | None = None  # early-stopped: share of its training not spent
    stop_requested_at: float | None = None  # progress at which early stopping asked it to stop

    @property
    def finished(self) -> bool:
        return self.state not in (TrialState.QUEUED, TrialState.RUNNING)

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
        """A record read from a checkpoint or results file, checked by the builder that checks a config
        (``schema.build``: names, types, numbers finite), errors named ``where: field``. A null is the
        field's default (a metric's null, how a non-finite number is stored, is no metric); a field this
        version does not know is left out."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None}
            if isinstance(data.get("metrics"), dict):
                data["metrics"] = {k: v for k, v in data["metrics"].items() if v is not None}
        record = _read(cls, data, where)
        if record.index < 0:  # the one value rule beyond types, as the settings' rules sit beside their builder
            raise LoratuneError(f"{where}: index: expected a non-negative integer, got {record.index}")
        return record


def _read(cls: type, data: Any, where: str) -> Any:
    """``cls`` built from what loratune wrote: every field checked, ``state`` required (a record without
    one was not written by loratune), fields of a later version left out."""
    if not isinstance(data, dict):
        raise LoratuneError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    return build(cls, {k: v for k, v in data.items() if k in known}, Origin(where), require=("state",))


def with_loss(point: dict) -> dict:
    """A curve point (changed in place) under the objective's name too: ``loss`` is the validation loss,
    ``val_loss``, wherever a point is read (the study, the threshold rule, Ax's curve)."""
    if "loss" not in point and "val_loss" in point:
        point["loss"] = point["val_loss"]
    return point


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


def failure_message(exc: BaseException) -> str:
    """What went wrong in a fine-tune, as one line with what to change (the trial's reason, see
    ``result_from_exception``)."""
    result = result_from_exception(exc)
    if result.state is TrialState.OUT_OF_MEMORY:
        return (f"{result.reason}; lower training.batch_size or data.max_length, or set "
                "model.gradient_checkpointing: true or model.quantization: 4bit")
    if result.reason.startswith("non-finite loss"):
        return f"{result.reason}: training diverged; lower training.learning_rate"
    return result.reason


def result_from_exit(code: int | None, log_text: str, what: str = "worker process", *, started: bool = True,
                     oom_killed: bool = False) -> TrialResult:
    """A process that ended without reporting a result: out of memory when it was killed by SIGKILL while
    the kernel's out-of-memory killer struck (``oom_killed``: its count rose meanwhile) or its log says so,
    else failed. ``started``: whether it had taken the trial."""
    killed = code is not None and code == -signal.SIGKILL
    oom_killed = oom_killed and killed  # that killer sends SIGKILL and nothing else
    if code is not None and code < 0:
        how = f"was killed by {_signal_name(-code)}"
        if oom_killed:
            how = "was killed by the kernel's out-of-memory killer"
        elif killed:
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


def check_metrics(metrics: dict[str, Any], objectives: list[str]) -> TrialResult:
    """A completed result with the finite numeric metrics (what Ax and the JSON files take), or a failed
    one when an objective is missing, not a number, or not finite."""
    numbers = {str(k): n for k, v in metrics.items() if (n := as_number(v)) is not None}
    finite = {k: n for k, n in numbers.items() if math.isfinite(n)}
    for name in objectives:
        if name not in metrics:
            return TrialResult(TrialState.FAILED, finite, reason=f"metric '{name}' missing (got {sorted(metrics)})")
        if name not in numbers:
            return TrialResult(TrialState.FAILED, finite, reason=f"metric '{name}' is not a number: {metrics[name]!r}"[:300])
        if name not in finite:
            return TrialResult(TrialState.FAILED, finite, reason=f"non-finite loss: {name} = {numbers[name]}")
    return TrialResult(TrialState.COMPLETED, finite)
