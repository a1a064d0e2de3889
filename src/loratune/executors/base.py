"""What the study loop drives: an executor starts trials, reports their progress and their end, and
stops one early (gracefully) or cancels it (at once). No Ax below this line: executors see only
parameters, training configs and directories."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..trial import TrialResult
from ..trial_dir import EVAL, STEP, TrialSpec


@dataclass
class Event:
    index: int
    point: dict | None = None  # a validation point: {step, progress, val_loss, train_loss, subset}
    tick: dict | None = None  # training progress: {step, steps, elapsed_s, train_loss}
    result: TrialResult | None = None  # set when the trial has ended


def progress_events(index: int, events: list[dict]) -> list[Event]:
    """A trial's ``progress.jsonl`` events (see trial_dir.py) as loop events: its validation points and
    training ticks (its ``started`` line is for whoever runs the worker)."""
    out = []
    for e in events:
        kind = e.pop("kind", EVAL)  # files written before steps were streamed hold points only
        if kind == STEP:
            out.append(Event(index, tick=e))
        elif kind == EVAL:
            out.append(Event(index, point=e))
    return out


class Executor(Protocol):
    slots: int  # trials it runs at once

    def submit(self, spec: TrialSpec) -> None:
        """Start the trial; its events come from ``poll``."""

    def together(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the trials submitted start together at its end (a pack's, on one worker);
        an executor that never packs trials starts each as it is submitted."""

    def poll(self, timeout: float) -> list[Event]:
        """Events since the last call, waiting up to ``timeout`` seconds for the first one."""

    def stop(self, index: int) -> None:
        """Ask a trial to stop early: one that awaits verdicts ends at the curve point just judged, any
        other at its next optimizer step; it ends as early-stopped."""

    def go_on(self, index: int) -> None:
        """The verdict on a trial's latest curve point, when it is not to stop: a trial that awaits
        verdicts trains on (``TrialSpec.await_verdict``)."""

    def cancel(self, index: int, reason: str) -> None:
        """End a trial now and free what it holds; it ends as failed with ``reason``."""

    def shutdown(self) -> None:
        """End every trial and worker process; safe to call more than once."""

    def limit_pack(self, size: int) -> None:
        """Train at most ``size`` trials together from now on (a pack ran out of memory); ``slots`` shrinks to
        match. An executor whose workers never pack trials has nothing to change."""


def run_to_end(executor: Executor, specs: list[TrialSpec],
               on_submit: Callable[[TrialSpec], None] | None = None) -> Iterator[tuple[TrialSpec, TrialResult]]:
    """Run jobs that no search waits on (the final test, a comparison's retrains) on ``executor``, as many at
    once as it has slots, in order; yield each job with its result as it ends. Each job has an index of its
    own. A caller that stops reading (a job failed) leaves the rest to ``executor.shutdown``."""
    waiting, by_index, running = list(specs), {s.index: s for s in specs}, 0
    while waiting or running:
        while waiting and running < executor.slots:
            spec = waiting.pop(0)
            if on_submit is not None:
                on_submit(spec)
            executor.submit(spec)
            running += 1
        for event in executor.poll(1.0):
            if event.result is not None:
                running -= 1
                yield by_index[event.index], event.result
