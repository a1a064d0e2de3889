"""A Python function as the evaluation (``run_optimization(evaluate=...)``), run in worker threads of
this process."""

from __future__ import annotations

import contextlib
import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..trial import TrialResult, TrialState, result_from_exception
from .base import Event, TrialSpec


class CallableExecutor:
    """Runs ``evaluate(params)`` (or ``evaluate(params, report)``) in worker threads.

    ``report(progress, metrics)`` lets the function stream a learning curve; it returns True when
    the trial should stop. The function returns a number (the first objective) or a dict of metrics.
    A thread cannot be killed: a cancelled (timed-out) trial is recorded as failed at once and
    whatever its thread does afterwards is ignored.
    """

    def __init__(self, evaluate: Callable, objectives: list[str], slots: int = 1):
        self.evaluate, self.objectives, self.slots = evaluate, objectives, slots
        self._events: queue.Queue[Event] = queue.Queue()
        self._stop: dict[int, threading.Event] = {}
        self._acks: dict[int, threading.Event] = {}  # points awaiting the loop's decision
        self._returned: list[Event] = []
        self._ended: set[int] = set()  # trials whose result was given (a cancelled one's thread may go on)
        try:
            self._wants_report = len(inspect.signature(evaluate).parameters) >= 2
        except (TypeError, ValueError):
            self._wants_report = False

    def submit(self, spec: TrialSpec) -> None:
        self._stop[spec.index] = threading.Event()
        self._ended.discard(spec.index)
        threading.Thread(target=self._run, args=(spec,), name=f"loratune-trial-{spec.index}", daemon=True).start()

    def _run(self, spec: TrialSpec) -> None:
        stop = self._stop[spec.index]
        curve: list[dict] = []

        def report(progress: float, metrics: Any) -> bool:
            point = {"progress": float(progress), "step": len(curve) + 1, **_as_metrics(metrics, self.objectives)}
            curve.append(point)
            handled = threading.Event()
            self._acks[id(point)] = handled
            self._events.put(Event(spec.index, point=point))
            handled.wait(timeout=600)  # the study has decided on this point once it polls again
            return stop.is_set()

        try:
            value = self.evaluate(dict(spec.params), report) if self._wants_report else self.evaluate(dict(spec.params))
            state = TrialState.EARLY_STOPPED if stop.is_set() else TrialState.COMPLETED
            result = TrialResult(state, _as_metrics(value, self.objectives), curve,
                                 reason="early-stopped" if stop.is_set() else None)
        except BaseException as exc:  # noqa: BLE001  anything the function raises is the trial's end
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
        events = [e for e in events if e.index not in self._ended]
        self._ended.update(e.index for e in events if e.result is not None)
        self._returned = events
        return events

    def stop(self, index: int) -> None:
        if index in self._stop:
            self._stop[index].set()

    def go_on(self, index: int) -> None:
        """Nothing to send: a function's report waits until the loop has handled its point (see ``poll``)."""

    def cancel(self, index: int, reason: str) -> None:
        self.stop(index)
        self._events.put(Event(index, result=TrialResult(TrialState.FAILED, reason=reason)))

    def limit_pack(self, size: int) -> None:
        """Its trials never pack: nothing to limit."""

    def together(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # its trials never pack: each starts as submitted

    def shutdown(self) -> None:
        for event in self._stop.values():
            event.set()
        for ack in self._acks.values():
            ack.set()


def _as_metrics(value: Any, objectives: list[str]) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    return {objectives[0]: value}
