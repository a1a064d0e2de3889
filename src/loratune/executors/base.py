"""What the study loop needs from an executor: start trials, hear about their progress and end,
ask one to stop early. No Ax below this line: executors see only parameters and directories."""

from __future__ import annotations

import inspect
import json
import queue
import re
import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import LoratuneError
from ..trial import TrialResult, TrialState, result_from_exception


@dataclass
class TrialSpec:
    index: int
    params: dict[str, Any]
    directory: Path
    config: dict | None = None  # the resolved training config, for fine-tune trials


@dataclass
class Event:
    index: int
    point: dict | None = None  # a validation point: {step, progress, val_loss, ...}
    result: TrialResult | None = None  # set when the trial has ended
    started_at: float | None = None


class Executor(Protocol):
    slots: int

    def submit(self, spec: TrialSpec) -> None: ...
    def poll(self, timeout: float) -> list[Event]: ...
    def stop(self, index: int) -> None: ...
    def shutdown(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# A Python callable as the evaluation, run in threads of this process


class CallableExecutor:
    """Runs ``evaluate(params)`` (or ``evaluate(params, report)``) in worker threads.

    ``report(progress, metrics)`` lets the callable stream a learning curve; it returns True when
    the trial should stop. The callable returns a float (the first objective) or a dict of metrics.
    """

    def __init__(self, evaluate: Callable, objectives: list[str], slots: int = 1):
        self.evaluate, self.objectives, self.slots = evaluate, objectives, slots
        self._events: queue.Queue[Event] = queue.Queue()
        self._stop: dict[int, threading.Event] = {}
        self._acks: dict[int, threading.Event] = {}  # points awaiting the loop's decision
        self._returned: list[Event] = []
        try:
            self._wants_report = len(inspect.signature(evaluate).parameters) >= 2
        except (TypeError, ValueError):
            self._wants_report = False

    def submit(self, spec: TrialSpec) -> None:
        self._stop[spec.index] = threading.Event()
        threading.Thread(target=self._run, args=(spec,), daemon=True).start()

    def _run(self, spec: TrialSpec) -> None:
        stop = self._stop[spec.index]
        curve: list[dict] = []

        def report(progress: float, metrics: dict | float) -> bool:
            point = {"progress": float(progress), "step": len(curve) + 1, **_as_metrics(metrics, self.objectives)}
            curve.append(point)
            handled = threading.Event()
            self._acks[id(point)] = handled
            self._events.put(Event(spec.index, point=point))
            handled.wait(timeout=600)  # the study has decided on this point once it polls again
            return stop.is_set()

        try:
            value = self.evaluate(dict(spec.params), report) if self._wants_report else self.evaluate(dict(spec.params))
            metrics = _as_metrics(value, self.objectives)
            state = TrialState.EARLY_STOPPED if stop.is_set() else TrialState.COMPLETED
            result = TrialResult(state, metrics, curve, reason="early-stopped" if stop.is_set() else None)
        except Exception as exc:
            result = result_from_exception(exc)
            result.curve = curve
        self._events.put(Event(spec.index, result=result))

    def poll(self, timeout: float) -> list[Event]:
        for event in self._returned:  # the loop has handled every event returned before
            if event.point is not None and (ack := self._acks.pop(id(event.point), None)):
                ack.set()
        events = []
        try:
            events.append(self._events.get(timeout=timeout))
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        self._returned = events
        return events

    def stop(self, index: int) -> None:
        if index in self._stop:
            self._stop[index].set()

    def shutdown(self) -> None:
        for event in self._stop.values():
            event.set()
        for ack in self._acks.values():
            ack.set()


def _as_metrics(value: Any, objectives: list[str]) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    return {objectives[0]: value}


# ---------------------------------------------------------------------------------------------
# An external training command


PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


def command_argv(template: str, params: dict[str, Any]) -> list[str]:
    """Split the template once, then fill ``{name}`` inside each argument: values never reach a
    shell, so a value such as ``1; rm -rf ~`` stays one harmless argument."""
    def fill(arg: str) -> str:
        return PLACEHOLDER.sub(lambda m: _format_value(params[m.group(1)]) if m.group(1) in params else m.group(0), arg)

    return [fill(arg) for arg in shlex.split(template)]


def check_command(template: str, names: list[str]) -> None:
    try:
        args = shlex.split(template)
    except ValueError as exc:
        raise LoratuneError(f"--command: cannot split '{template}': {exc}") from None
    if not args:
        raise LoratuneError("--command: empty command")
    for arg in args:
        for name in PLACEHOLDER.findall(arg):
            if name not in names:
                raise LoratuneError(f"--command: placeholder {{{name}}} is not a searched parameter ({', '.join(names)})")


def _format_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def last_json_metrics(text: str) -> dict | None:
    """The metrics in the last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None
