"""Trials as child processes on this machine, one slot per concurrent trial. Each slot has its GPU
set (``CUDA_VISIBLE_DEVICES``), its share of the CPU threads, and a runner that hands it trials: a
``ServingWorker`` for loratune's fine-tunes (a worker that keeps the base model loaded with
``reuse_model``, else a fresh process per trial; every way it can end is written there), or a
``CommandRunner`` for a user's ``--command``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from ..processes import TrialLock
from ..storage import atomic_write_json
from ..trial_dir import SPEC_FILE, VERDICT_POLL_S, ProgressReader, base_key, worker_env
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
class _Slot:
    runner: ServingWorker | CommandRunner
    spec: TrialSpec | None = None  # the trial it runs
    reader: ProgressReader | None = None


class LocalExecutor:
    def __init__(self, slots: int = 1, objectives: list[str] | None = None, command: str | None = None,
                 gpus: list[str] | None = None, gpus_per_trial: int = 1, reuse_model: bool = True,
                 trials_per_worker: int = 50, worker_command: list[str] | tuple[str, ...] = WORKER_COMMAND):
        objectives = objectives or ["loss"]
        self.command = command
        available = list(visible_gpus() if gpus is None else gpus)
        if available:  # never more concurrent trials than GPU sets
            slots = max(1, min(slots, len(available) // max(gpus_per_trial, 1)))
            sets = [available[i * gpus_per_trial:(i + 1) * gpus_per_trial] or available[:1] for i in range(slots)]
        else:
            sets = [None] * slots
        self.slots = slots
        self.threads = max(1, (os.cpu_count() or 1) // slots)
        limit = os.environ.get("OMP_NUM_THREADS", "")
        if limit.isdigit() and int(limit) > 0:  # the user's own thread limit holds for the trials too
            self.threads = min(self.threads, int(limit))

        def runner(gpus: list[str] | None) -> ServingWorker | CommandRunner:
            env = worker_env(self.threads, gpus)
            if command:
                return CommandRunner(command, env, objectives)
            return ServingWorker(env, reuse_model, trials_per_worker, worker_command)

        self._slots = [_Slot(runner(s)) for s in sets]
        self.running: dict[int, _Slot] = {}

    def prestart(self, config: dict) -> None:
        """Start the slots' kept workers for trials of this training config now (see ``ServingWorker.prestart``)."""
        quantized = (config.get("model") or {}).get("quantization", "none") != "none"
        for slot in self._slots:
            if isinstance(slot.runner, ServingWorker):
                slot.runner.prestart(base_key(config), quantized)

    def submit(self, spec: TrialSpec) -> None:
        key = base_key(spec.config or {})
        free = [s for s in self._slots if s.spec is None]
        slot = next((s for s in free if s.runner.holds(key)), free[0])  # a worker that holds this base already
        d = spec.directory
        TrialLock.clear(d)  # a process of an earlier, killed study still on this trial ends first
        if d.exists():  # a re-run after an interruption starts clean
            shutil.rmtree(d)
        d.mkdir(parents=True)
        if self.command:
            slot.runner.start(d, spec.params)
        else:
            atomic_write_json(d / SPEC_FILE, spec.payload())
            slot.runner.start(d, key)
        slot.spec, slot.reader = spec, ProgressReader(d)
        self.running[spec.index] = slot

    def poll(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            events = []
            for index, slot in list(self.running.items()):
                events += progress_events(index, slot.reader.read())
                result = slot.runner.poll()
                if result is not None:
                    events += progress_events(index, slot.reader.read())
                    events.append(Event(index, result=result))
                    slot.spec = slot.reader = None
                    del self.running[index]
            if events or time.monotonic() >= deadline:
                return events
            # a trial waiting for a verdict waits on this loop: look again soon
            interval = VERDICT_POLL_S if any(s.spec.await_verdict for s in self.running.values()) else 0.1
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def stop(self, index: int) -> None:
        if index in self.running:
            self.running[index].runner.stop()

    def go_on(self, index: int) -> None:
        if index in self.running and isinstance(self.running[index].runner, ServingWorker):
            self.running[index].runner.go_on()

    def cancel(self, index: int, reason: str) -> None:
        if index in self.running:
            self.running[index].runner.cancel(reason)

    def shutdown(self) -> None:
        for slot in self._slots:
            slot.runner.close()
            slot.spec = slot.reader = None
        self.running.clear()
