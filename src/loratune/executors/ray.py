"""Trials on a Ray cluster. The Ax client stays in the driver (Ray Tune's AxSearch is built on Ax's
removed AxClient); each slot is a Ray actor holding the GPUs and CPUs a trial needs, on whichever node
Ray places it. The actor runs trials with the same ``ServingWorker`` as the local executor: a worker
process that keeps the base model loaded (``reuse_model``), or a fresh one per trial, with the same
rules for every way that process can end.

Progress events travel back through a Ray queue, stop requests through a small actor, and a trial's
files either stay on a path every node shares (``shared_dir``) or come back to the driver's output
directory packed in the trial's result. Actors belong to the driver's job: Ray ends them, and their
worker processes with them, when the driver ends, however it ends.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoratuneError, first_line
from ..storage import atomic_write_json
from ..trial import TrialResult, TrialState
from ..trial_dir import STARTED, pack_key
from .base import Event, TrialSpec, progress_events
from .serving import WORKER_COMMAND


def _ray():
    try:
        import ray
    except ImportError:
        raise LoratuneError("--executor ray needs Ray: pip install 'loratune[ray]'") from None
    return ray


TRIAL_DIR_PREFIX = "loratune-trial-"  # + the actor's pid: a node's trial folders without a shared_dir
CANCEL_GRACE_S = 10.0  # a cancelled trial's actor has this long to end it and send its files, else it is killed


class _SlotActor:
    """One slot on some node: runs up to ``pack`` trials at once (a threaded actor, one ``run`` call a trial)
    on a ``ServingWorker`` of its own, which owns every way the worker process can end (see serving.py) and
    trains them together. The calls share the worker under one lock; a trial's result, read by whichever
    call polled, waits in ``ended`` for its own."""

    def __init__(self, reuse: bool, trials_per_worker: int, threads: int, worker_command: list[str], pack: int = 1):
        import threading

        from loratune.executors.serving import ServingWorker
        from loratune.trial_dir import worker_env

        # Ray has set CUDA_VISIBLE_DEVICES to this actor's GPUs
        self.worker = ServingWorker(worker_env(threads), reuse, trials_per_worker, worker_command, pack)
        self.lock, self.ended = threading.Lock(), {}
        _remove_orphaned_trial_dirs()

    def limit_pack(self, size: int) -> None:
        with self.lock:
            self.worker.limit_pack(size)

    def _result(self, trial_dir: Path):
        """The trial's result once it has ended, else None (the others' results that come meanwhile are kept)."""
        with self.lock:
            self.ended.update(self.worker.poll())
            return self.ended.pop(trial_dir, None)

    def _start_when_free(self, trial_dir: Path, config: dict) -> None:
        """Hand the trial to the worker once it can take it (a free place in its pack, or an ending worker gone)."""
        while True:
            with self.lock:
                self.ended.update(self.worker.poll())
                if self.worker.free > 0 and self.worker.can_take(config):
                    self.worker.start(trial_dir, config)
                    return
            time.sleep(0.05)

    def _call(self, method: str, *args) -> None:
        with self.lock:
            getattr(self.worker, method)(*args)

    def run(self, payload: dict, shared_dir: str | None, progress, signals) -> dict:
        import os
        import shutil
        import tempfile

        import ray

        from loratune.processes import fresh_trial_dir
        from loratune.trial_dir import (
            EVAL,
            VERDICT_POLL_S,
            ProgressReader,
            TrialSpec,
            awaits_verdict,
        )

        base = Path(shared_dir) if shared_dir else Path(tempfile.mkdtemp(prefix=f"{TRIAL_DIR_PREFIX}{os.getpid()}-"))
        trial_dir = fresh_trial_dir(base / str(payload["index"]))
        spec = TrialSpec.from_payload(payload, trial_dir)
        spec.config = dict(spec.config, output_dir=str(trial_dir))  # the adapter is saved where the trial runs
        spec.write()
        self._start_when_free(trial_dir, spec.config)
        reader, last_check, points, went_on = ProgressReader(trial_dir), 0.0, 0, 0
        while (result := self._result(trial_dir)) is None:
            for event in reader.read():  # the first, "started", tells the driver the trial was taken
                progress.put((spec.index, event))
                points += event.get("kind") == EVAL and awaits_verdict(event)
            awaiting = spec.await_verdict and went_on < points  # the trial waits on this loop
            if awaiting or time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                asked, go = ray.get(signals.asked.remote(spec.index))
                if asked is not None and asked[0] == "cancel":
                    self._call("cancel", trial_dir, asked[1])
                elif asked is not None:
                    self._call("stop", trial_dir)
                for _ in range(go - went_on):
                    self._call("go_on", trial_dir)
                went_on = max(went_on, go)
            time.sleep(VERDICT_POLL_S if awaiting else 0.1)
        for event in reader.read():
            progress.put((spec.index, event))
        packed = None
        if not shared_dir:  # bring the files home to the driver
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                tar.add(trial_dir, arcname=".")
            packed = buffer.getvalue()
            shutil.rmtree(base, ignore_errors=True)
        return {"result": result.to_dict(), "files": packed}


def _remove_orphaned_trial_dirs() -> None:
    """Trial folders on this node whose actor is gone (killed with its trial): nobody will send them home."""
    import os
    import shutil
    import tempfile

    for folder in Path(tempfile.gettempdir()).glob(f"{TRIAL_DIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(TRIAL_DIR_PREFIX).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
            shutil.rmtree(folder, ignore_errors=True)


class _Signals:
    """A Ray actor holding what the driver asks of running trials: stop early, or cancel (with a reason),
    and how many of a trial's curve points it let go on (for trials that await verdicts)."""

    def __init__(self):
        self.asks: dict[int, tuple[str, str]] = {}
        self.go: dict[int, int] = {}

    def ask(self, index: int, what: str, reason: str = "") -> None:
        if self.asks.get(index, ("",))[0] != "cancel":  # a cancel is never taken back by a stop
            self.asks[index] = (what, reason)

    def go_on(self, index: int) -> None:
        self.go[index] = self.go.get(index, 0) + 1

    def asked(self, index: int) -> tuple[tuple[str, str] | None, int]:
        return self.asks.get(index), self.go.get(index, 0)


@dataclass
class _Call:
    """A trial sent to a slot's actor."""

    spec: TrialSpec
    ref: object  # the actor call's result
    slot: int
    fresh_actor: bool  # the actor was created for this trial
    started: bool = False  # the driver heard that a worker took it


class RayExecutor:
    """``actors`` actors, each with ``gpus_per_trial`` GPUs and ``cpus_per_trial`` CPUs, each training up to
    ``pack`` trials together (the same base, data and seed): ``slots`` = actors x pack trials at once.

    An actor that dies (its node lost, its process killed) fails the trials it was running, with the
    reason; a trial whose actor died before a worker took it runs again on a fresh actor."""

    def __init__(self, actors: int, address: str | None = None, gpus_per_trial: float = 0,
                 cpus_per_trial: float | None = None, shared_dir: str | None = None, reuse_model: bool = True,
                 trials_per_worker: int = 50, worker_command: list[str] | tuple[str, ...] = WORKER_COMMAND,
                 pack: int = 1):
        ray = _ray()
        from ray.util.queue import Queue

        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, ignore_reinit_error=True)
            except Exception as exc:
                raise LoratuneError(f"--ray-address: cannot connect to Ray at {address or 'a new local instance'}: "
                                    f"{first_line(exc, 160)}") from None
        self.ray, self.shared_dir = ray, shared_dir
        self.pack = max(1, pack) if reuse_model else 1
        self.slots = actors * self.pack
        if not ray.cluster_resources().get("GPU"):
            gpus_per_trial = 0  # a CPU-only cluster: a GPU request would never be scheduled
        if cpus_per_trial is None:  # divide this cluster's CPUs between the concurrent actors
            cpus_per_trial = max(1, int(ray.cluster_resources().get("CPU", 1) // actors))
        self.progress = Queue()
        self.signals = ray.remote(_Signals).options(num_cpus=0).remote()
        self.actor_class = ray.remote(_SlotActor).options(num_gpus=gpus_per_trial, num_cpus=cpus_per_trial,
                                                          max_restarts=0, max_concurrency=self.pack)
        self.actor_args = (reuse_model, trials_per_worker, int(cpus_per_trial), list(worker_command))
        self.actors: list = [None] * actors
        self.running: dict[int, _Call] = {}
        self.waiting: list[TrialSpec] = []  # submitted while no actor could take them (another base or data)
        self.cancelled: dict[int, tuple[str, float]] = {}  # index -> (reason, when the cancel was asked)
        self._events: list[Event] = []  # heard from the queue, not yet returned

    def submit(self, spec: TrialSpec) -> None:
        """Send the trial to an actor packing trials of its base, data and seed with room left, else to one
        that runs nothing; else it waits for one."""
        key = pack_key(spec.config or {})
        on = {i: [c for c in self.running.values() if c.slot == i] for i in range(len(self.actors))}
        takers = [i for i, calls in on.items() if len(calls) < self.pack and all(pack_key(c.spec.config or {}) == key
                                                                               for c in calls)]
        if not takers:
            self.waiting.append(spec)
            return
        self._send(spec, max(takers, key=lambda i: len(on[i])))  # fill a pack before starting another

    def _send(self, spec: TrialSpec, slot: int) -> None:
        fresh = self.actors[slot] is None
        if fresh:
            self.actors[slot] = self.actor_class.remote(*self.actor_args, self.pack)
        ref = self.actors[slot].run.remote(spec.payload(), self.shared_dir, self.progress, self.signals)
        self.running[spec.index] = _Call(spec, ref, slot, fresh)

    def _hear(self) -> None:
        """Progress sent by the actors so far."""
        while not self.progress.empty():
            index, event = self.progress.get_nowait()
            if index in self.running:
                if event.get("kind") == STARTED:
                    self.running[index].started = True
                self._events += progress_events(index, [event])

    def poll(self, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            self._hear()
            refs = {call.ref: index for index, call in self.running.items()}
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
            if ready:
                self._hear()  # what an actor sent before it ended comes before its end
            for ref in ready:
                result = self._collect(self.running.pop(refs[ref]))
                if result is not None:
                    self._events.append(Event(refs[ref], result=result))
            self._kill_overdue_cancels()
            waiting, self.waiting = self.waiting, []
            for spec in waiting:
                self.submit(spec)
            if self._events or time.monotonic() >= deadline:
                events, self._events = self._events, []
                return events
            time.sleep(0.1)

    def _kill_overdue_cancels(self) -> None:
        """A cancelled trial whose actor did not end it in time (the actor itself stuck) goes with its actor."""
        for index, (_, when) in self.cancelled.items():
            call = self.running.get(index)
            if call is not None and self.actors[call.slot] is not None and time.monotonic() - when > CANCEL_GRACE_S:
                self.ray.kill(self.actors[call.slot])  # its worker process dies with it
                self.actors[call.slot] = None

    def _collect(self, call: _Call) -> TrialResult | None:
        """The trial's result; None when it was sent again, to a fresh actor."""
        from ray.exceptions import RayActorError

        spec = call.spec
        cancelled = self.cancelled.pop(spec.index, None)
        try:
            out = self.ray.get(call.ref)
        except RayActorError as exc:  # the node or the actor died
            self.actors[call.slot] = None
            if cancelled is not None:
                return TrialResult(TrialState.FAILED, reason=cancelled[0])
            if not call.started and not call.fresh_actor:  # sent to an actor that was ending: never started
                self._send(spec, call.slot)
                return None
            when = "" if call.started else " before a worker took the trial"
            return TrialResult(TrialState.FAILED, reason=f"Ray actor lost{when}: {first_line(exc)}")
        except Exception as exc:  # the actor's own code failed (a full disk, a folder it could not clear)
            self.ray.kill(self.actors[call.slot])
            self.actors[call.slot] = None
            return TrialResult(TrialState.FAILED, reason=f"Ray actor failed: {first_line(exc.__cause__ or exc)}")
        if out["files"]:
            spec.directory.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(out["files"]), mode="r:gz") as tar:
                tar.extractall(spec.directory, filter="data")
        elif self.shared_dir:
            atomic_write_json(spec.directory / "location.json", {"shared_dir": str(Path(self.shared_dir) / str(spec.index))})
        try:
            return TrialResult.from_dict(out["result"], f"trial {spec.index}: the Ray actor's result")
        except LoratuneError as exc:
            return TrialResult(TrialState.FAILED, reason=str(exc))

    def stop(self, index: int) -> None:
        self.signals.ask.remote(index, "stop")

    def go_on(self, index: int) -> None:
        self.signals.go_on.remote(index)

    def cancel(self, index: int, reason: str) -> None:
        """The actor ends the trial (its worker with it) and sends its files home, log included; an actor
        that does not within ``CANCEL_GRACE_S`` is killed."""
        if index in self.running and index not in self.cancelled:
            self.cancelled[index] = (reason, time.monotonic())
            self.signals.ask.remote(index, "cancel", reason)
        self.waiting = [s for s in self.waiting if s.index != index]  # never started: nothing to end

    def together(self) -> contextlib.AbstractContextManager[None]:
        # each trial is its own actor call: an actor's pack takes what reached it between two rounds
        return contextlib.nullcontext()

    def limit_pack(self, size: int) -> None:
        """Train at most ``size`` trials together on an actor from now on (a pack ran out of memory)."""
        self.pack = max(1, min(self.pack, size))
        self.slots = len(self.actors) * self.pack
        for actor in self.actors:
            if actor is not None:
                actor.limit_pack.remote(self.pack)

    def shutdown(self) -> None:
        for actor in self.actors:
            if actor is not None:
                self.ray.kill(actor)
        self.actors = [None] * len(self.actors)
        self.running.clear()
        self.waiting.clear()
