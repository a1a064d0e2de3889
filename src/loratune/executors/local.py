"""Trials as child processes on this machine. Each worker has its GPU set (``CUDA_VISIBLE_DEVICES``),
its share of the CPU threads, and a runner that hands it trials: a ``ServingWorker`` for loratune's
fine-tunes (a worker that keeps the base model loaded with ``reuse_model`` and trains up to ``pack``
trials together, else a fresh process per trial; every way it can end is written there), or a
``CommandRunner`` for a user's ``--command``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..processes import fresh_trial_dir
from ..trial_dir import VERDICT_POLL_S, ProgressReader, worker_env
from .base import Event, TrialSpec, progress_events
from .command import CommandRunner
from .serving import WORKER_COMMAND, ServingWorker


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclass
class _Running:
    runner: ServingWorker | CommandRunner
    spec: TrialSpec
    reader: ProgressReader


class LocalExecutor:
    """Up to ``slots`` workers (one per GPU set, where there are GPUs), each running up to ``pack`` trials
    at once (loratune's own fine-tunes; a command runs one): ``slots`` x ``pack`` trials in all."""

    def __init__(self, slots: int = 1, objectives: list[str] | None = None, command: str | None = None,
                 gpus: list[str] | None = None, gpus_per_trial: int = 1, reuse_model: bool = True,
                 trials_per_worker: int = 50, worker_command: list[str] | tuple[str, ...] = WORKER_COMMAND,
                 pack: int = 1):
        objectives = objectives or ["loss"]
        self.command = command
        available = list(visible_gpus() if gpus is None else gpus)
        if available:  # never more concurrent workers than GPU sets
            slots = max(1, min(slots, len(available) // max(gpus_per_trial, 1)))
            sets = [available[i * gpus_per_trial:(i + 1) * gpus_per_trial] or available[:1] for i in range(slots)]
        else:
            sets = [None] * slots
        self.pack = 1 if command or not reuse_model else max(1, pack)
        self.slots = slots * self.pack
        self.threads = max(1, (os.cpu_count() or 1) // slots)
        limit = os.environ.get("OMP_NUM_THREADS", "")
        if limit.isdigit() and int(limit) > 0:  # the user's own thread limit holds for the trials too
            self.threads = min(self.threads, int(limit))

        def runner(gpus: list[str] | None) -> ServingWorker | CommandRunner:
            env = worker_env(self.threads, gpus)
            if command:
                return CommandRunner(command, env, objectives)
            return ServingWorker(env, reuse_model, trials_per_worker, worker_command, self.pack)

        self.runners = [runner(s) for s in sets]
        self.running: dict[int, _Running] = {}
        self.waiting: list[TrialSpec] = []  # submitted while no worker could take them (another base or data)

    def prestart(self, config: dict) -> None:
        """Start the kept workers for trials of this training config now (see ``ServingWorker.prestart``)."""
        quantized = (config.get("model") or {}).get("quantization", "none") != "none"
        for runner in self.runners:
            if isinstance(runner, ServingWorker):
                runner.prestart(config, quantized)

    def limit_pack(self, size: int) -> None:
        """Train at most ``size`` trials together from now on (a pack ran out of memory): ``slots`` shrinks."""
        self.pack = max(1, min(self.pack, size))
        self.slots = len(self.runners) * self.pack
        for runner in self.runners:
            if isinstance(runner, ServingWorker):
                runner.limit_pack(self.pack)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """The trials submitted inside reach each worker in one write at the end: a pack's trials train
        from its first round together, however late the worker is scheduled (``--seed``)."""
        serving = [r for r in self.runners if isinstance(r, ServingWorker)]
        for runner in serving:
            runner.holding = True
        try:
            yield
        finally:
            for runner in serving:
                runner.holding = False
                runner.send()

    def submit(self, spec: TrialSpec) -> None:
        """Start the trial on a worker that holds its base (packed with its trials, if any), else on one that
        runs nothing; else it waits for one (a trial of another base or data than every running one)."""
        config = spec.config or {}
        takers = [r for r in self.runners if r.free > 0 and r.can_take(config)]
        if not takers:
            self.waiting.append(spec)
            return
        runner = next((r for r in takers if r.holds(config)), takers[0])
        d = fresh_trial_dir(spec.directory)
        spec.write()  # a command's LoratuneCallback reads it too
        runner.start(d, spec.params if self.command else config)
        self.running[spec.index] = _Running(runner, spec, ProgressReader(d))

    def poll(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            events = []
            for index, r in list(self.running.items()):
                events += progress_events(index, r.reader.read())
            for runner in self.runners:
                for directory, result in runner.poll().items():
                    index = next(i for i, r in self.running.items() if r.spec.directory == directory)
                    events += progress_events(index, self.running[index].reader.read())
                    events.append(Event(index, result=result))
                    del self.running[index]
            with self.together():
                for spec in self._take_waiting():
                    self.submit(spec)
            if events or time.monotonic() >= deadline:
                return events
            # a trial waiting for a verdict waits on this loop: look again soon
            interval = VERDICT_POLL_S if any(r.spec.await_verdict for r in self.running.values()) else 0.1
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def _take_waiting(self) -> list[TrialSpec]:
        waiting, self.waiting = self.waiting, []
        return waiting

    def stop(self, index: int) -> None:
        if index in self.running:
            self.running[index].runner.stop(self.running[index].spec.directory)

    def go_on(self, index: int) -> None:
        if index in self.running:
            self.running[index].runner.go_on(self.running[index].spec.directory)

    def cancel(self, index: int, reason: str) -> None:
        if index in self.running:
            self.running[index].runner.cancel(self.running[index].spec.directory, reason)
        waiting = next((s for s in self.waiting if s.index == index), None)
        if waiting is not None:  # never started: nothing to end
            self.waiting.remove(waiting)

    def shutdown(self) -> None:
        for runner in self.runners:
            runner.close()
        self.running.clear()
        self.waiting.clear()
