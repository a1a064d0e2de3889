"""Trials as child processes on this machine, one slot per concurrent trial. Each slot has its GPU
set (``CUDA_VISIBLE_DEVICES``) and its share of the CPU threads.

With ``reuse_model`` a slot keeps one worker process that loads the base model once and runs trial
after trial on it (``python -m loratune.worker --serve``); the worker is replaced after a failed trial,
after ``trials_per_worker`` trials, or when a trial needs another base model. Without it, every
trial is a fresh ``python -m loratune.worker TRIAL_DIR``. A user's ``--command`` runs under a guard
that takes its whole process group down with the study.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..processes import TrialLock, die_with_parent, signal_group
from ..storage import atomic_write_json
from ..trial import TrialResult, TrialState, check_metrics, result_from_exit
from ..worker import LOG_FILE, RESULT_FILE, SPEC_FILE, STOP_FILE, ProgressReader, base_key, worker_env
from .base import Event, TrialSpec, progress_events
from .command import command_argv, last_json_metrics


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
    spec: TrialSpec
    proc: subprocess.Popen  # the trial's own process, or its slot's serving worker
    log: IO | None  # our handle on the log the process writes, when we opened it
    reader: ProgressReader
    stop_sent: bool = False
    cancelled: str | None = None  # why the trial was ended from here (a timeout)


@dataclass
class _Slot:
    gpus: list[str] | None  # None: no GPUs on this machine
    worker: subprocess.Popen | None = None  # the serving worker (reuse_model)
    key: str | None = None  # the base model it holds
    trials: int = 0  # trials it has run
    running: _Running | None = None


class LocalExecutor:
    def __init__(self, slots: int = 1, objectives: list[str] | None = None, command: str | None = None,
                 gpus: list[str] | None = None, gpus_per_trial: int = 1, reuse_model: bool = True,
                 trials_per_worker: int = 50):
        self.objectives = objectives or ["loss"]
        self.command, self.trials_per_worker = command, trials_per_worker
        self.reuse = reuse_model and not command
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
        self._slots = [_Slot(s) for s in sets]
        self.running: dict[int, _Running] = {}

    # -- starting -----------------------------------------------------------------------------

    def submit(self, spec: TrialSpec) -> None:
        key = base_key(spec.config or {}) if self.reuse else None
        free = [s for s in self._slots if s.running is None]
        slot = next((s for s in free if s.worker is not None and s.key == key), free[0])
        d = spec.directory
        TrialLock.clear(d)  # a process of an earlier, killed study still on this trial ends first
        if d.exists():  # a re-run after an interruption starts clean
            shutil.rmtree(d)
        d.mkdir(parents=True)
        env = worker_env(self.threads, slot.gpus)
        if self.command:
            argv = command_argv(self.command, spec.params)
            proc, log = self._start([sys.executable, "-m", "loratune.processes", str(d), "--", *argv], d, env, argv)
        else:
            atomic_write_json(d / SPEC_FILE, {"index": spec.index, "params": spec.params, "config": spec.config,
                                              "measure_inference": spec.measure_inference})
            if self.reuse:
                proc, log = self._serving_worker(slot, key, d, env), None
                proc.stdin.write(f"{d}\n")
                proc.stdin.flush()
                slot.trials += 1
            else:
                argv = [sys.executable, "-m", "loratune.worker", str(d)]
                proc, log = self._start(argv, d, env, argv)
        slot.running = self.running[spec.index] = _Running(spec, proc, log, ProgressReader(d))

    def _start(self, argv: list[str], trial_dir: Path, env: dict, shown: list[str], stdin=subprocess.DEVNULL):
        log = open(trial_dir / LOG_FILE, "a")
        log.write(f"$ {shlex.join(shown)}\n")
        log.flush()
        # its own session, so that a stop or a shutdown reaches the trial's children too; and it dies
        # with this process, however this one ends
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=stdin, env=env,
                                start_new_session=True, preexec_fn=die_with_parent(), text=True)
        return proc, log

    def _serving_worker(self, slot: _Slot, key: str, trial_dir: Path, env: dict) -> subprocess.Popen:
        """The slot's worker, started afresh when it has none, holds another base or has run its share."""
        alive = slot.worker is not None and slot.worker.poll() is None
        if alive and slot.key == key and slot.trials < self.trials_per_worker:
            return slot.worker
        self._retire(slot)
        argv = [sys.executable, "-m", "loratune.worker", "--serve"]
        slot.worker, log = self._start(argv, trial_dir, env, argv, stdin=subprocess.PIPE)
        log.close()  # the worker writes each trial's log itself
        slot.key, slot.trials = key, 0
        return slot.worker

    def _retire(self, slot: _Slot) -> None:
        if slot.worker is not None:
            signal_group(slot.worker.pid, signal.SIGKILL)
            slot.worker.wait()
            slot.worker.stdin.close()
        slot.worker, slot.key = None, None

    # -- hearing back -------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            events = []
            for index, r in list(self.running.items()):
                events += progress_events(index, r.reader.read())
                result = self._result(r)
                if result is not None:
                    events += progress_events(index, r.reader.read())
                    events.append(Event(index, result=result))
                    self._release(r)
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _result(self, r: _Running) -> TrialResult | None:
        """The trial's result once it has ended, else None."""
        done = r.proc.poll() is not None
        path = r.spec.directory / RESULT_FILE
        if r.cancelled:
            return TrialResult(TrialState.FAILED, reason=r.cancelled) if done else None
        if self.command:
            return self._command_result(r) if done else None
        if path.exists():
            return TrialResult.from_dict(json.loads(path.read_text()))
        if not done:
            return None
        log = (r.spec.directory / LOG_FILE).read_text(errors="replace")
        return result_from_exit(r.proc.returncode, log)

    def _command_result(self, r: _Running) -> TrialResult:
        log = (r.spec.directory / LOG_FILE).read_text(errors="replace")
        if r.stop_sent:
            return TrialResult(TrialState.EARLY_STOPPED, reason="early-stopped")
        if r.proc.returncode != 0:
            return result_from_exit(r.proc.returncode, log, what="command")
        metrics = last_json_metrics(log)
        if metrics is None:
            return TrialResult(TrialState.FAILED, reason="command printed no JSON line with metrics")
        return check_metrics(metrics, self.objectives)

    def _release(self, r: _Running) -> None:
        del self.running[r.spec.index]
        slot = next(s for s in self._slots if s.running is r)
        slot.running = None
        if r.proc is not slot.worker:
            signal_group(r.proc.pid, signal.SIGKILL)  # whatever the trial left running in its group
            r.proc.wait()
        elif r.proc.poll() is not None:  # the serving worker ended itself (after a failed trial)
            self._retire(slot)
        if r.log is not None:
            r.log.close()

    # -- ending -------------------------------------------------------------------------------

    def stop(self, index: int) -> None:
        r = self.running.get(index)
        if r is None or r.stop_sent:
            return
        r.stop_sent = True
        if self.command:
            signal_group(r.proc.pid, signal.SIGTERM)
        else:
            (r.spec.directory / STOP_FILE).touch()  # the worker stops after its next optimizer step

    def cancel(self, index: int, reason: str) -> None:
        r = self.running.get(index)
        if r is None or r.cancelled:
            return
        r.cancelled = reason
        signal_group(r.proc.pid, signal.SIGKILL)  # a serving worker goes too: its memory is freed with it

    def shutdown(self) -> None:
        for r in list(self.running.values()):
            signal_group(r.proc.pid, signal.SIGKILL)
            r.proc.wait()
            if r.log is not None:
                r.log.close()
        self.running.clear()
        for slot in self._slots:
            slot.running = None
            self._retire(slot)
