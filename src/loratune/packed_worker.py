"""A worker process that trains up to K trials at once on one loaded base: ``python -m loratune.worker
--serve --pack K``.

Trial directories arrive on stdin as with ``--serve``, and each trial speaks the same files
(``trial_dir.py``): its ``started`` line, curve points and steps in its ``progress.jsonl``, its verdicts,
``STOP``, ``metrics.json``, adapter and ``result.json``. What differs is that up to K of them train
together in one pack (``pack.py``): a trial joins between two rounds as soon as it arrives and a place is
free, and leaves as soon as it ends, the others going on. A trial that waits for the study's verdict
sits out the rounds until it comes.

- A failure of a trial's own (a non-finite loss, an error in its ending) ends that trial only.
- A failure of the pack's shared passes (out of memory) ends each of its trials with that failure and
  the reason says how many trials shared the pack; the process then takes no other trial (whoever
  runs it replaces it once its trials have ended, as after any failure).
- ``CANCEL`` in a trial's directory (a timeout) ends that trial as failed with the file's reason.
- A test job (the final test), or a trial of another base or data, waits until the pack is empty
  and then runs alone, as ``--serve`` runs it.

The process's output goes to the logs of the trials running when it is written.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

from .processes import TrialLock, kill_own_group
from .storage import atomic_write_json
from .trial import TrialResult, TrialState, result_from_exception
from .trial_dir import (
    CANCEL_FILE,
    EVAL,
    LOG_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    SPEC_FILE,
    STARTED,
    STEP,
    STEP_INTERVAL_S,
    STOP_FILE,
    VERDICT_POLL_S,
    TrialSpec,
    awaits_verdict,
    pack_key,
    verdict,
)


class _Tee:
    """The process's stdout and stderr, copied to the logs of the trials running as it is written."""

    SYNC = b"\x00loratune-tee-sync\x00"  # written through the pipe: all before it has been copied once it is read

    def __init__(self):
        self.logs: dict[Path, IO] = {}
        self.lock = threading.Lock()
        self.synced = threading.Semaphore(0)
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        threading.Thread(target=self._copy, args=(read,), name="loratune-tee", daemon=True).start()

    def _copy(self, fd: int) -> None:
        held = b""  # the end of a read that may be the start of SYNC
        while chunk := os.read(fd, 65536):
            data = held + chunk
            syncs = data.count(self.SYNC)
            data = data.replace(self.SYNC, b"")
            keep = next((k for k in range(len(self.SYNC) - 1, 0, -1) if data.endswith(self.SYNC[:k])), 0)
            data, held = (data[:-keep], data[-keep:]) if keep else (data, b"")
            with self.lock:
                for log in self.logs.values():
                    log.write(data.decode(errors="replace"))
                    log.flush()
            for _ in range(syncs):
                self.synced.release()

    def open(self, trial_dir: Path) -> None:
        with self.lock:
            self.logs[trial_dir] = open(trial_dir / LOG_FILE, "a")

    def write(self, trial_dir: Path, text: str) -> None:
        """A line for one trial's log only."""
        sys.stdout.flush()
        sys.stderr.flush()
        with self.lock:
            self.logs[trial_dir].write(text)
            self.logs[trial_dir].flush()

    def close(self, trial_dir: Path) -> None:
        """Stop copying to the trial's log once what was written before it ended has reached it."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, self.SYNC)
        self.synced.acquire(timeout=5.0)  # the copy thread lives as long as the process: it answers
        with self.lock:
            log = self.logs.pop(trial_dir, None)
        if log is not None:
            log.close()


class _Hooks:
    """A trial's side of the files (trial_dir.py), as its pack calls it."""


    def __init__(self, trial_dir: Path, await_verdicts: bool):
        self.dir, self.await_verdicts = trial_dir, await_verdicts
        self.progress = open(trial_dir / PROGRESS_FILE, "a")
        self.judged = 0  # curve points before the last that the study was asked to judge
        self.last_step = 0.0

    def write(self, event: dict) -> None:
        self.progress.write(json.dumps(event) + "\n")
        self.progress.flush()

    def on_point(self, point) -> bool:
        self.write({"kind": EVAL, **asdict(point)})
        if not self.await_verdicts or not awaits_verdict(asdict(point)):
            return False
        self.judged += 1
        return True

    def verdict(self) -> bool | None:
        return verdict(self.dir, self.judged)

    def on_last_point(self, point) -> None:
        self.write({"kind": EVAL, **asdict(point)})

    def on_step(self, step: int, steps: int, elapsed_s: float, train_loss: float) -> None:
        if time.monotonic() - self.last_step >= STEP_INTERVAL_S or step == steps:
            self.last_step = time.monotonic()
            self.write({"kind": STEP, "step": step, "steps": steps, "elapsed_s": round(elapsed_s, 3),
                        "train_loss": train_loss})

    def stop_requested(self) -> bool:
        return (self.dir / STOP_FILE).exists()


@dataclass
class _Running:
    dir: Path
    spec: TrialSpec
    lock: TrialLock
    hooks: _Hooks
    trial: Any  # pack.PackTrial
    started: float
    load_s: float
    startup_s: float | None


class PackedWorker:
    """Up to ``capacity`` trials training together on the base they share (see the module's docstring)."""

    def __init__(self, capacity: int, cache, run_alone, process_start: float, imported_at: float | None = None):
        """``cache``: the worker's ``Cache`` (the base and data it keeps); ``run_alone(trial_dir, cache,
        process_start)``: how it runs a trial by itself (``worker.run_trial``)."""
        # the first trial's start-up: the process's start to the end of its imports (before it arrived, when
        # the worker preloaded them)
        self.capacity, self.process_start, self.imported_at = capacity, process_start, imported_at
        self.cache, self.run_alone = cache, run_alone
        self.pack = None  # pack.Pack over the cached base and data
        self.key: str | None = None  # pack_key of the trials in the pack
        self.running: dict[Path, _Running] = {}
        self.waiting: deque[Path] = deque()  # arrived, for a free place (or an empty pack)
        self.failed = False  # the shared passes failed: take no other trial
        self.first = True
        self.tee = _Tee()

    def serve(self, commands: queue.Queue) -> None:
        """Run trials as their directories arrive on ``commands`` (lists of directories, each what one
        write of the study handed over; None: stdin closed) until it closes and every trial has ended."""
        closed = False
        while not (closed and not self.running and not self.waiting):
            block = not self.running and not self.waiting and not closed
            # what arrived while trials joined joins too: a pack handed over together trains from its first
            # round together, so its trials end together and answer in one batch
            while (arrived := self._receive(commands, block)) is not None:
                closed, block = closed or arrived, False
                self._admit()
            self._admit()  # a trial that waited for the pack to empty (a test job, another base or data)
            if self.running:
                self._round()
            elif self.waiting and self.failed:
                break  # whoever runs it starts a fresh worker for the ones left

    def _receive(self, commands: queue.Queue, block: bool) -> bool | None:
        """Queue the trials that arrived (waiting for the first when ``block``): None when none did, else
        whether stdin closed (the study is gone: so are the trials running)."""
        closed, arrived = False, False
        try:
            while True:
                command = commands.get(block=block and not arrived)
                arrived = True
                if command is None:
                    closed = True
                    if self.running:
                        kill_own_group()
                else:  # the trials of one hand-over, in order
                    self.waiting.extend(Path(d) for d in command)
        except queue.Empty:
            pass
        return closed if arrived else None

    # -- trials joining -----------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.capacity and not self.failed:
            trial_dir = self.waiting[0]
            try:
                spec = TrialSpec.read(trial_dir)
            except (OSError, ValueError, TypeError):
                spec = None  # run alone, where the worker records what is wrong with it
            key = pack_key(spec.config or {}) if spec else ""
            alone = spec is None or spec.test or not spec.config
            if self.running and (alone or key != self.key):
                return  # it runs once the pack is empty
            self.waiting.popleft()
            if alone:
                self._run_alone(trial_dir)
            else:
                self._join(trial_dir, spec, key)

    def _run_alone(self, trial_dir: Path) -> None:
        self.pack = self.key = None
        self.tee.open(trial_dir)
        try:
            self._write_started(trial_dir)
            lock = TrialLock(trial_dir).acquire()
            try:
                result = self.run_alone(trial_dir, self.cache, self._startup())
                atomic_write_json(trial_dir / RESULT_FILE, result.to_dict())
            finally:
                lock.release()
        finally:
            self.tee.close(trial_dir)

    def _join(self, trial_dir: Path, spec: TrialSpec, key: str) -> None:
        from .model import import_libraries
        from .pack import Pack
        from .settings import finetune_config_from_dict

        lock = TrialLock(trial_dir).acquire()
        self.tee.open(trial_dir)
        self._write_started(trial_dir)
        startup = self._startup()
        try:
            import_libraries(quantized=spec.quantized)
            started = time.time()
            cfg = finetune_config_from_dict(spec.config, str(trial_dir / SPEC_FILE))
            load_s = self._load(spec, cfg)
            if self.pack is None or self.key != key:
                self.pack, self.key = Pack(*self.cache.base_and_data()), key
            hooks = _Hooks(trial_dir, spec.await_verdict)
            trial = self.pack.add(f"trial_{spec.index}", cfg, hooks)
        except BaseException as exc:  # noqa: BLE001 - every way a trial can end becomes a recorded state
            self._end_unjoined(trial_dir, lock, result_from_exception(exc))
            return
        self.running[trial_dir] = _Running(trial_dir, spec, lock, hooks, trial, started, load_s,
                                           None if startup is None else (self.imported_at or started) - startup)

    def _load(self, spec: TrialSpec, cfg) -> float:
        """The base and data for this trial, from the cache or loaded now; the seconds loading took."""
        from .trial_dir import base_key

        load_s = self.cache.load_base(cfg, base_key(spec.config))
        self.cache.load_data(cfg)
        return load_s

    def _startup(self) -> float | None:
        """The process's start, for its first trial only (which pays for the imports)."""
        first, self.first = self.first, False
        return self.process_start if first else None

    @staticmethod
    def _write_started(trial_dir: Path) -> None:
        with open(trial_dir / PROGRESS_FILE, "a") as progress:
            progress.write(json.dumps({"kind": STARTED, "pid": os.getpid()}) + "\n")

    # -- rounds and endings -------------------------------------------------------------------

    def _round(self) -> None:
        from .training import Ending, finish, memory_after_trial

        self._cancel_asked()
        try:
            if not self.pack.round():
                time.sleep(VERDICT_POLL_S)  # every trial waits for its verdict
        except BaseException as exc:  # noqa: BLE001 - the shared passes failed: every trial of the pack with them
            result, size = result_from_exception(exc), len(self.running)
            if result.reason and size > 1:
                result.reason += f" (in a pack of {size} trials)"
            self.failed = True
            for r in list(self.running.values()):  # the pack's size: an out-of-memory reruns in smaller packs
                self._end(r, TrialResult(result.state, reason=result.reason, extra={**result.extra, "pack": size}))
            return
        for r in [r for r in self.running.values() if r.trial.error is not None]:
            self._end(r, _result_of(r.trial.error))
        ended = [r for r in self.running.values() if r.trial.done]
        if not ended:
            return
        endings = [(r.trial, Ending(r.spec.measure_inference, r.spec.answer, r.spec.max_new_tokens)) for r in ended]
        try:
            metrics = finish(self.pack, endings)
        except BaseException as exc:  # noqa: BLE001 - their endings failed together (answers, saving)
            size = len(self.running)
            for r in ended:
                result = _result_of(exc)
                self._end(r, replace(result, extra={**result.extra, "pack": size}))
            return
        size = len(self.running)
        for r in ended:  # their adapters off first: what the worker holds after them is measured once
            self.pack.remove(r.trial)
        memory = memory_after_trial()
        for r, m in zip(ended, metrics, strict=True):
            self._end(r, self._completed(r, m, size, memory))

    def _completed(self, r: _Running, m, size: int, memory: dict) -> TrialResult:
        from .training import write_metrics

        m.wall_time_s = time.time() - r.started
        write_metrics(r.trial.cfg, m)
        timings = {"load_s": r.load_s, "data_s": 0.0, "train_s": m.train_time_s, "eval_s": m.eval_time_s,
                   "inference_s": m.inference_measure_s, "trial_s": time.time() - r.started}
        if r.startup_s is not None:
            timings["startup_s"] = r.startup_s
        extra = {"steps": m.steps, "planned_steps": m.planned_steps, "tokens_seen": m.tokens_seen, "device": m.device,
                 "precision": m.precision, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
                 "pack": size, "timings": timings, "memory_after": memory}
        if m.answers is not None:  # scored in the study's process, by its scorers
            extra["answers"] = m.answers
        return TrialResult(m.state, m.objective_metrics(), m.curve,
                           reason="early-stopped" if m.state is TrialState.EARLY_STOPPED else None, extra=extra)

    def _cancel_asked(self) -> None:
        for r in list(self.running.values()):
            cancel = r.dir / CANCEL_FILE
            if cancel.exists():
                reason = cancel.read_text().strip() or "cancelled"
                self._end(r, TrialResult(TrialState.FAILED, reason=reason))

    def _end(self, r: _Running, result: TrialResult) -> None:
        """The trial leaves the pack; its result is written last, once its log holds everything."""
        del self.running[r.dir]
        self.pack.remove(r.trial)
        r.hooks.progress.close()
        self._end_unjoined(r.dir, r.lock, result)

    def _end_unjoined(self, trial_dir: Path, lock: TrialLock, result: TrialResult) -> None:
        try:
            if result.state.is_failure:
                self.tee.write(trial_dir, f"trial ended: {result.state.value}: {result.reason}\n"
                                          f"{result.extra.get('traceback', '')}\n")
            atomic_write_json(trial_dir / RESULT_FILE, result.to_dict())
        finally:
            lock.release()
            self.tee.close(trial_dir)


def _result_of(error: BaseException) -> TrialResult:
    try:
        raise error
    except BaseException as exc:  # noqa: BLE001 - with its traceback
        return result_from_exception(exc)
