"""Trials as child processes on this machine: one process per trial, GPUs handed out one set per
trial through CUDA_VISIBLE_DEVICES, CPU threads divided between concurrent trials."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO

from ..processes import TrialLock, die_with_parent, signal_group
from ..storage import atomic_write_json
from ..trial import TrialResult, TrialState, check_metrics
from ..worker import PROGRESS_FILE, RESULT_FILE, SPEC_FILE, STOP_FILE
from .base import Event, TrialSpec, command_argv, last_json_metrics

LOG_FILE = "log.txt"


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
    proc: subprocess.Popen
    log: IO
    gpus: list[str]
    started_at: float
    offset: int = 0  # bytes of progress.jsonl already read
    stop_sent: bool = False
    points: list[dict] = field(default_factory=list)


class LocalExecutor:
    """Runs ``python -m loratune.worker`` per trial, or the user's command with ``{param}`` filled in."""

    def __init__(self, slots: int = 1, objectives: list[str] | None = None, command: str | None = None,
                 gpus: list[str] | None = None, gpus_per_trial: int = 1, measure_inference: bool = False):
        self.objectives = objectives or ["loss"]
        self.command, self.measure_inference = command, measure_inference
        self.free_gpus = list(visible_gpus() if gpus is None else gpus)
        self.gpus_per_trial = gpus_per_trial
        if self.free_gpus:  # never more concurrent trials than GPU sets
            slots = max(1, min(slots, len(self.free_gpus) // max(gpus_per_trial, 1)))
        self.slots = slots
        self.threads = max(1, (os.cpu_count() or 1) // slots)
        self.running: dict[int, _Running] = {}

    def submit(self, spec: TrialSpec) -> None:
        d = spec.directory
        TrialLock.clear(d)  # a process of an earlier, killed study still on this trial ends first
        if d.exists():  # a re-run after an interruption starts clean
            shutil.rmtree(d)
        d.mkdir(parents=True)
        if self.command:
            shown = argv = command_argv(self.command, spec.params)
            argv = [sys.executable, "-m", "loratune.processes", str(d), "--", *argv]
        else:
            atomic_write_json(d / SPEC_FILE, {"index": spec.index, "params": spec.params, "config": spec.config,
                                              "measure_inference": self.measure_inference})
            shown = argv = [sys.executable, "-m", "loratune.worker", str(d)]
        gpus = [self.free_gpus.pop(0) for _ in range(min(self.gpus_per_trial, len(self.free_gpus)))]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if self.free_gpus or gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        log = open(d / LOG_FILE, "w")
        log.write(f"$ {shlex.join(shown)}\n")
        log.flush()
        # its own session, so that a stop or a shutdown reaches the trial's children too; and it dies
        # with this process, however this one ends
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, preexec_fn=die_with_parent())
        self.running[spec.index] = _Running(spec, proc, log, gpus, time.time())

    def poll(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            events = []
            for index, r in list(self.running.items()):
                events += [Event(index, point=p, started_at=r.started_at) for p in self._new_points(r)]
                if r.proc.poll() is not None:
                    events += [Event(index, point=p) for p in self._new_points(r)]
                    events.append(Event(index, result=self._finish(r), started_at=r.started_at))
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _new_points(self, r: _Running) -> list[dict]:
        path = r.spec.directory / PROGRESS_FILE
        if not path.exists():
            return []
        with open(path) as f:
            f.seek(r.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits for the next poll
        r.offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def _finish(self, r: _Running) -> TrialResult:
        signal_group(r.proc.pid, signal.SIGKILL)  # whatever the trial left running in its group
        r.log.close()
        del self.running[r.spec.index]
        self.free_gpus += r.gpus
        code = r.proc.returncode
        log_text = (r.spec.directory / LOG_FILE).read_text(errors="replace")
        if self.command:
            return self._command_result(log_text, code, r.stop_sent)
        result_path = r.spec.directory / RESULT_FILE
        if result_path.exists():
            return TrialResult.from_dict(json.loads(result_path.read_text()))
        reason = f"worker process exited with code {code}" + (" (killed by a signal)" if code and code < 0 else "")
        state = TrialState.OUT_OF_MEMORY if "out of memory" in log_text.lower() else TrialState.FAILED
        return TrialResult(state, reason=reason)

    def _command_result(self, log_text: str, code: int, stopped: bool) -> TrialResult:
        if stopped:
            return TrialResult(TrialState.EARLY_STOPPED, reason="early-stopped")
        if code != 0:
            oom = "out of memory" in log_text.lower()
            tail = log_text.strip().splitlines()[-1][:200] if log_text.strip() else ""
            return TrialResult(TrialState.OUT_OF_MEMORY if oom else TrialState.FAILED,
                               reason=f"command exited with code {code}: {tail}")
        metrics = last_json_metrics(log_text)
        if metrics is None:
            return TrialResult(TrialState.FAILED, reason="command printed no JSON line with metrics")
        return check_metrics(metrics, self.objectives) or TrialResult(
            TrialState.COMPLETED, {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})

    def stop(self, index: int) -> None:
        r = self.running.get(index)
        if r is None or r.stop_sent:
            return
        r.stop_sent = True
        if self.command:
            signal_group(r.proc.pid, signal.SIGTERM)
        else:
            (r.spec.directory / STOP_FILE).touch()  # the worker stops at its next validation point

    def shutdown(self) -> None:
        for r in self.running.values():
            signal_group(r.proc.pid, signal.SIGKILL)
            r.proc.wait()
            r.log.close()
        self.running.clear()
