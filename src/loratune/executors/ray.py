"""Trials on a Ray cluster. The Ax client stays in the driver (Ray Tune's AxSearch is built on Ax's
removed AxClient); each slot is a Ray actor holding the GPUs and CPUs a trial needs, on whichever node
Ray places it. The actor runs trials with the same worker process as the local executor: a serving
worker that keeps the base model loaded (``reuse_model``), or a fresh one per trial.

Progress events travel back through a Ray queue, stop requests through a small actor, and a trial's
files either stay on a path every node shares (``shared_dir``) or come back to the driver's output
directory packed in the trial's result. Actors belong to the driver's job: Ray ends them, and their
worker processes with them, when the driver ends, however it ends.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

from ..errors import LoratuneError, first_line
from ..storage import atomic_write_json
from ..trial import TrialResult, TrialState
from .base import Event, TrialSpec, progress_events


def _ray():
    try:
        import ray
    except ImportError:
        raise LoratuneError("--executor ray needs Ray: pip install 'loratune[ray]'") from None
    return ray


class _SlotActor:
    """One slot on some node: runs its trials one at a time in a worker process of its own."""

    def __init__(self, reuse: bool, trials_per_worker: int, threads: int):
        self.reuse, self.trials_per_worker, self.threads = reuse, trials_per_worker, threads
        self.worker, self.key, self.trials = None, None, 0

    def run(self, payload: dict, shared_dir: str | None, progress, flags) -> dict:
        import json
        import shutil
        import subprocess
        import sys
        import tempfile

        from loratune.processes import TrialLock, die_with_parent, signal_group
        from loratune.worker import (
            LOG_FILE,
            RESULT_FILE,
            SPEC_FILE,
            STOP_FILE,
            ProgressReader,
            base_key,
            worker_env,
        )

        base = Path(shared_dir) if shared_dir else Path(tempfile.mkdtemp(prefix="loratune-trial-"))
        trial_dir = base / str(payload["index"])
        TrialLock.clear(trial_dir)
        shutil.rmtree(trial_dir, ignore_errors=True)
        trial_dir.mkdir(parents=True)
        config = dict(payload["config"], output_dir=str(trial_dir))
        (trial_dir / SPEC_FILE).write_text(json.dumps({**payload, "config": config}))
        env = worker_env(self.threads)  # Ray has set CUDA_VISIBLE_DEVICES to this actor's GPUs
        key = base_key(config)
        if self.reuse:
            alive = self.worker is not None and self.worker.poll() is None
            if not (alive and self.key == key and self.trials < self.trials_per_worker):
                if self.worker is not None:
                    signal_group(self.worker.pid, 9)
                    self.worker.wait()
                with open(trial_dir / LOG_FILE, "a") as log:
                    self.worker = subprocess.Popen([sys.executable, "-m", "loratune.worker", "--serve"], stdin=subprocess.PIPE,
                                                   stdout=log, stderr=subprocess.STDOUT, env=env, text=True,
                                                   start_new_session=True, preexec_fn=die_with_parent())
                self.key, self.trials = key, 0
            proc = self.worker
            proc.stdin.write(f"{trial_dir}\n")
            proc.stdin.flush()
            self.trials += 1
        else:
            with open(trial_dir / LOG_FILE, "a") as log:
                proc = subprocess.Popen([sys.executable, "-m", "loratune.worker", str(trial_dir)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True, preexec_fn=die_with_parent())
        import ray

        reader, last_flag_check = ProgressReader(trial_dir), 0.0
        while not (trial_dir / RESULT_FILE).exists() and proc.poll() is None:
            for event in reader.read():
                progress.put((payload["index"], event))
            if time.monotonic() - last_flag_check > 0.5:
                last_flag_check = time.monotonic()
                if ray.get(flags.is_set.remote(payload["index"])):
                    (trial_dir / STOP_FILE).touch()
            time.sleep(0.1)
        for event in reader.read():
            progress.put((payload["index"], event))
        if (trial_dir / RESULT_FILE).exists():
            result = json.loads((trial_dir / RESULT_FILE).read_text())
        else:
            from loratune.trial import result_from_exit

            result = result_from_exit(proc.wait(), (trial_dir / LOG_FILE).read_text(errors="replace")).to_dict()
        if proc is not self.worker:
            proc.wait()
        packed = None
        if not shared_dir:  # bring the files home to the driver
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                tar.add(trial_dir, arcname=".")
            packed = buffer.getvalue()
            shutil.rmtree(base, ignore_errors=True)
        return {"result": result, "files": packed}


class _StopFlags:
    """A Ray actor holding which trials should stop."""

    def __init__(self):
        self.stopped: set[int] = set()

    def set(self, index: int) -> None:
        self.stopped.add(index)

    def is_set(self, index: int) -> bool:
        return index in self.stopped


class RayExecutor:
    """Up to ``slots`` trials at once, each on an actor with ``gpus_per_trial`` GPUs and ``cpus_per_trial`` CPUs."""

    def __init__(self, slots: int, address: str | None = None, gpus_per_trial: float = 0,
                 cpus_per_trial: float | None = None, shared_dir: str | None = None, reuse_model: bool = True,
                 trials_per_worker: int = 50):
        ray = _ray()
        from ray.util.queue import Queue

        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, ignore_reinit_error=True)
            except Exception as exc:
                raise LoratuneError(f"--ray-address: cannot connect to Ray at {address or 'a new local instance'}: "
                                    f"{first_line(exc, 160)}") from None
        self.ray, self.slots, self.shared_dir = ray, slots, shared_dir
        if not ray.cluster_resources().get("GPU"):
            gpus_per_trial = 0  # a CPU-only cluster: a GPU request would never be scheduled
        if cpus_per_trial is None:  # divide this cluster's CPUs between the concurrent trials
            cpus_per_trial = max(1, int(ray.cluster_resources().get("CPU", 1) // slots))
        self.progress = Queue()
        self.flags = ray.remote(_StopFlags).options(num_cpus=0).remote()
        self.actor_class = ray.remote(_SlotActor).options(num_gpus=gpus_per_trial, num_cpus=cpus_per_trial,
                                                          max_restarts=0)
        self.actor_args = (reuse_model, trials_per_worker, int(cpus_per_trial))
        self.actors: list = [None] * slots
        self.running: dict[int, tuple[TrialSpec, object, int]] = {}  # index -> (spec, result ref, slot)
        self.cancelled: dict[int, str] = {}

    def submit(self, spec: TrialSpec) -> None:
        busy = {slot for _, _, slot in self.running.values()}
        slot = next(i for i in range(self.slots) if i not in busy)
        if self.actors[slot] is None:
            self.actors[slot] = self.actor_class.remote(*self.actor_args)
        payload = {"index": spec.index, "params": spec.params, "config": spec.config,
                   "measure_inference": spec.measure_inference}
        ref = self.actors[slot].run.remote(payload, self.shared_dir, self.progress, self.flags)
        self.running[spec.index] = (spec, ref, slot)

    def poll(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            events = []
            while not self.progress.empty():
                index, event = self.progress.get_nowait()
                if index in self.running:
                    events += progress_events(index, [event])
            refs = {ref: index for index, (_, ref, _) in self.running.items()}
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
            for ref in ready:
                spec, _, slot = self.running.pop(refs[ref])
                events.append(Event(spec.index, result=self._collect(spec, ref, slot)))
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(0.1)

    def _collect(self, spec: TrialSpec, ref, slot: int) -> TrialResult:
        if spec.index in self.cancelled:
            return TrialResult(TrialState.FAILED, reason=self.cancelled.pop(spec.index))
        try:
            out = self.ray.get(ref)
        except Exception as exc:  # the node or the actor died: the trial failed, the study goes on
            self.actors[slot] = None
            return TrialResult(TrialState.FAILED, reason=f"Ray actor lost: {first_line(exc)}")
        if out["files"]:
            spec.directory.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(out["files"]), mode="r:gz") as tar:
                tar.extractall(spec.directory, filter="data")
        elif self.shared_dir:
            atomic_write_json(spec.directory / "location.json", {"shared_dir": str(Path(self.shared_dir) / str(spec.index))})
        return TrialResult.from_dict(out["result"])

    def stop(self, index: int) -> None:
        self.flags.set.remote(index)

    def cancel(self, index: int, reason: str) -> None:
        if index in self.running and index not in self.cancelled:
            self.cancelled[index] = reason
            slot = self.running[index][2]
            self.ray.kill(self.actors[slot])  # its worker process dies with it
            self.actors[slot] = None

    def shutdown(self) -> None:
        for actor in self.actors:
            if actor is not None:
                self.ray.kill(actor)
        self.actors = [None] * self.slots
        self.running.clear()
