"""Trials as Ray tasks, for clusters. The Ax client stays in the driver (Ray Tune's AxSearch is
built on Ax's removed AxClient); each trial is a plain task that asks Ray for the GPUs and CPUs it
needs and runs the same worker process as the local executor, on whichever node Ray picks.

Progress points travel back through a Ray queue, stop requests through a small actor, and the
trial's files either stay on a path every node shares (``shared_dir``) or come back to the
driver's output directory packed in the task's result.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

from ..errors import LoratuneError, first_line
from ..storage import atomic_write_json
from ..trial import TrialResult, TrialState
from .base import Event, TrialSpec


def _ray():
    try:
        import ray
    except ImportError:
        raise LoratuneError("--executor ray needs Ray: pip install 'loratune[ray]'") from None
    return ray


def _run_on_node(spec: dict, shared_dir: str | None, progress, flags) -> dict:
    """Runs inside a Ray worker: the trial's own process, with progress and stop relayed."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from loratune.processes import die_with_parent
    from loratune.worker import PROGRESS_FILE, RESULT_FILE, SPEC_FILE, STOP_FILE

    base = Path(shared_dir) if shared_dir else Path(tempfile.mkdtemp(prefix="loratune-trial-"))
    trial_dir = base / str(spec["index"])
    shutil.rmtree(trial_dir, ignore_errors=True)
    trial_dir.mkdir(parents=True)
    config = dict(spec["config"], output_dir=str(trial_dir))
    (trial_dir / SPEC_FILE).write_text(json.dumps({**spec, "config": config}))
    import os

    threads = str(max(1, int(spec["cpus"])))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    with open(trial_dir / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "loratune.worker", str(trial_dir)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=die_with_parent())  # a cancelled task takes its trial along
        offset, last_flag_check = 0, 0.0
        while proc.poll() is None or offset < _size(trial_dir / PROGRESS_FILE):
            offset = _relay(trial_dir / PROGRESS_FILE, offset, spec["index"], progress)
            if time.monotonic() - last_flag_check > 0.5:
                last_flag_check = time.monotonic()
                import ray

                if ray.get(flags.is_set.remote(spec["index"])):
                    (trial_dir / STOP_FILE).touch()
            time.sleep(0.1)
    result = json.loads((trial_dir / RESULT_FILE).read_text()) if (trial_dir / RESULT_FILE).exists() else {
        "state": "failed", "reason": f"worker process exited with code {proc.returncode}"}
    packed = None
    if not shared_dir:  # bring the files home to the driver
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(trial_dir, arcname=".")
        packed = buffer.getvalue()
        shutil.rmtree(base, ignore_errors=True)
    return {"result": result, "files": packed}


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _relay(path: Path, offset: int, index: int, progress) -> int:
    if not path.exists():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.decode().splitlines():
        if line.strip():
            progress.put((index, json.loads(line)))
    return offset + len(complete)


class RayExecutor:
    """Up to ``slots`` trials at once as Ray tasks with ``gpus_per_trial`` GPUs and ``cpus_per_trial`` CPUs."""

    def __init__(self, slots: int, address: str | None = None, gpus_per_trial: float = 0,
                 cpus_per_trial: float | None = None, shared_dir: str | None = None, measure_inference: bool = True):
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
        self.measure_inference = measure_inference
        if not ray.cluster_resources().get("GPU"):
            gpus_per_trial = 0  # a CPU-only cluster: a GPU request would never be scheduled
        if cpus_per_trial is None:  # divide this cluster's CPUs between the concurrent trials
            cpus_per_trial = max(1, int(ray.cluster_resources().get("CPU", 1) // slots))
        self.cpus = cpus_per_trial
        self.progress = Queue()
        self.flags = ray.remote(_StopFlags).options(num_cpus=0).remote()
        self.task = ray.remote(_run_on_node).options(num_gpus=gpus_per_trial, num_cpus=cpus_per_trial, max_retries=0)
        self.running: dict[int, tuple[TrialSpec, object]] = {}

    def submit(self, spec: TrialSpec) -> None:
        payload = {"index": spec.index, "params": spec.params, "config": spec.config,
                   "measure_inference": self.measure_inference, "cpus": self.cpus}
        ref = self.task.remote(payload, self.shared_dir, self.progress, self.flags)
        self.running[spec.index] = (spec, ref)

    def poll(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            events = []
            while not self.progress.empty():
                index, point = self.progress.get_nowait()
                events.append(Event(index, point=point))
            refs = {ref: index for index, (_, ref) in self.running.items()}
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
            for ref in ready:
                spec, _ = self.running.pop(refs[ref])
                events.append(Event(spec.index, result=self._collect(spec, ref)))
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(0.1)

    def _collect(self, spec: TrialSpec, ref) -> TrialResult:
        try:
            out = self.ray.get(ref)
        except Exception as exc:  # the node or the worker died: the trial failed, the study goes on
            return TrialResult(TrialState.FAILED, reason=f"Ray task lost: {first_line(exc)}")
        if out["files"]:
            spec.directory.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(out["files"]), mode="r:gz") as tar:
                tar.extractall(spec.directory, filter="data")
        elif self.shared_dir:
            atomic_write_json(spec.directory / "location.json", {"shared_dir": str(Path(self.shared_dir) / str(spec.index))})
        return TrialResult.from_dict(out["result"])

    def stop(self, index: int) -> None:
        self.flags.set.remote(index)

    def shutdown(self) -> None:
        for _, ref in self.running.values():
            self.ray.cancel(ref, force=True)
        self.running.clear()


class _StopFlags:
    """A Ray actor holding which trials should stop."""

    def __init__(self):
        self.stopped: set[int] = set()

    def set(self, index: int) -> None:
        self.stopped.add(index)

    def is_set(self, index: int) -> bool:
        return index in self.stopped
