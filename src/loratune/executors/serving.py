"""A worker process, and what each way it can end makes of the trials in its hands (one, or a pack).

The local executor keeps ``ServingWorker``s, a Ray actor one of its own, so these rules are written
once (docs/failures.md lists them for users):

- The worker reports the trial's end (``result.json``): the trial ends as reported. After a failure
  (an exception, a non-finite loss, out of memory) the worker is replaced before the next trial: the
  memory of a process after an out-of-memory or a crash is not trusted.
- The worker dies while it runs the trial (a crash, ``kill -9``, the kernel's out-of-memory killer): the
  trial failed, with the exit code or signal as its reason (out of memory when the kernel's
  out-of-memory killer ended it or its log says so).
- The worker dies before it took the trial (it was handed over to a worker that was ending): the
  trial runs on a fresh worker. A fresh worker that dies before taking it fails it, with its reason.
- The trial is cancelled (``trial_timeout``): it failed with the cancel's reason, and its worker goes
  with it; in a pack, the worker drops it and the others go on.
- In a pack, a failure of one trial lets the others end as they would; the worker takes no new trial
  and is replaced once they have.
- Between trials the worker is replaced when it has run ``trials_per_worker`` trials, holds another base
  model, or has died; the next trial is handed to a fresh one.

With ``reuse=False`` every trial gets a fresh process and the same rules hold.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoratuneError
from ..processes import die_with_parent, oom_kill_count, signal_group
from ..storage import read_json
from ..trial import TrialResult, TrialState, result_from_exit
from ..trial_dir import CANCEL_FILE, LOG_FILE, RESULT_FILE, STOP_FILE, base_key, go_on, pack_key, started

WORKER_COMMAND = (sys.executable, "-m", "loratune.worker")  # + ``--serve`` or a trial directory


@dataclass
class _Held:
    """A trial in a worker's hands."""

    fresh: bool  # the process was started for it
    oom_kills: int  # the kernel's count when it was handed over
    cancelled: str | None = None


class ServingWorker:
    """Hands trials to a worker process (``python -m loratune.worker``), up to ``pack`` at once, and turns
    every way that process can end into each trial's ``TrialResult``.

    ``env``: the worker's environment (``trial_dir.worker_env``). ``reuse``: keep one process that loads
    the base model once for trial after trial (``--serve``), else a fresh process per trial. ``pack``:
    trials it trains together (``--serve --pack K``, packed_worker.py); more than one needs ``reuse``.
    ``command``: the worker's command line without its last argument (the worker module, or a test's
    stand-in for it).
    """

    def __init__(self, env: dict[str, str], reuse: bool = True, trials_per_worker: int = 50,
                 command: list[str] | tuple[str, ...] = WORKER_COMMAND, pack: int = 1):
        self.env, self.reuse, self.trials_per_worker, self.command = env, reuse, trials_per_worker, list(command)
        self.pack = pack if reuse else 1
        self.process: subprocess.Popen | None = None
        self.key: str | None = None  # the base model the process holds (``trial_dir.base_key``)
        self.packed: str | None = None  # what its trials share (``trial_dir.pack_key``), while it holds any
        self.trials = 0  # trials handed to this process
        self.held: dict[Path, _Held] = {}  # the trials in its hands
        self.unsent: list[Path] = []  # handed over, not yet written to the process
        self.holding = False  # keep what is handed over for one ``send`` (``LocalExecutor.together``)
        self.draining = False  # one of its trials failed: it takes no other, and goes once its trials end

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def free(self) -> int:
        """Trials it can take now."""
        return 0 if self.draining else self.pack - len(self.held)

    def limit_pack(self, size: int) -> None:
        """Take at most ``size`` trials at once from now on; a process started for more keeps running."""
        self.pack = max(1, min(self.pack, size))

    def holds(self, config: dict) -> bool:
        """Whether the next trial of this training config would run on the process kept from the last one
        (packed with the trials it runs, if any: same base, data and seed)."""
        if self.held and self.packed != pack_key(config):
            return False
        return (self.reuse and self.process is not None and self.process.poll() is None
                and self.key == base_key(config) and self.trials < self.trials_per_worker and self.free > 0)

    def can_take(self, config: dict) -> bool:
        """Whether ``start`` may be given this trial now: packed with the ones it runs, or it runs none."""
        return not self.held or self.holds(config)

    def start(self, trial_dir: Path, config: dict) -> None:
        """Hand over the trial in ``trial_dir`` (its ``trial.json`` written): to the kept process when
        the rules allow, else to a fresh one (only when it holds no trial: see ``can_take``)."""
        held = _Held(fresh=False, oom_kills=oom_kill_count())
        kept = self.holds(config)
        if kept and self.trials == 0:  # its first trial, on a worker started before it
            with open(trial_dir / LOG_FILE, "a") as log:  # before the worker writes there: which command
                log.write(f"$ {shlex.join(self.process.args)}\n")
        self.packed = pack_key(config)
        self.held[trial_dir] = held
        if kept:
            self.unsent.append(trial_dir)
            self.trials += 1
        else:
            self._start_fresh(base_key(config))
        if not self.holding:
            self.send()

    def prestart(self, config: dict, quantized: bool) -> None:
        """Start a kept worker now, before it has a trial, so that its imports overlap the study's set-up;
        the first trial with this key goes to it. Its output until then is dropped: one that dies before
        taking its trial hands it to a fresh worker, which writes into the trial's log."""
        if not self.reuse or self.process is not None:
            return
        argv = [*self.command, "--serve", "--preload", *(["--quantized"] if quantized else []), *self._pack_args()]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
                                        text=True, stdin=subprocess.PIPE, start_new_session=True,
                                        preexec_fn=die_with_parent())
        self.key, self.trials, self.draining = base_key(config), 0, False

    def _pack_args(self) -> list[str]:
        return ["--pack", str(self.pack)] if self.pack > 1 else []

    def send(self) -> None:
        """Write the trials handed over and not yet sent, in one write, which the worker reads as one
        command: a pack's trials start training together, whatever the scheduling (``--seed``)."""
        if self.unsent and not self._write():  # the pipe broke: it ended since it was last seen
            self._start_fresh(self.key)  # its trials go to a fresh one (one that dies at once too, poll sees)
            if self.unsent:
                self._write()

    def _write(self) -> bool:
        lines, self.unsent = "".join(f"{d}\n" for d in self.unsent), []
        try:
            self.process.stdin.write(lines)
            self.process.stdin.flush()
            return True
        except OSError:
            return False

    def _start_fresh(self, key: str) -> None:
        """A fresh process for the trials held (those handed to one that ended before taking them)."""
        self.close(keep=True)
        first = next(iter(self.held))
        argv = [*self.command, "--serve", *self._pack_args()] if self.reuse else [*self.command, str(first)]
        with open(first / LOG_FILE, "a") as log:  # until it takes a trial, its output is the first one's
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            # its own session, so that a cancel or a shutdown reaches what it started too; and it dies
            # with this process, however this one ends
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, text=True,
                                            stdin=subprocess.PIPE if self.reuse else subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent())
        self.key, self.trials, self.draining = key, len(self.held), False
        self.unsent = list(self.held) if self.reuse else []
        for held in self.held.values():
            held.fresh = True

    def poll(self) -> dict[Path, TrialResult]:
        """The results of the trials that have ended since the last call (none for one that starts again,
        on a fresh worker)."""
        code = self.process.poll() if self.process is not None else None  # before the results: one written
        ended, again = {}, []                                               # before the exit is seen
        for trial_dir, held in self.held.items():
            result = self._result(trial_dir, held, code)
            if result is _AGAIN:
                again.append(trial_dir)
            elif result is not None:
                ended[trial_dir] = result
        size = len(self.held)
        for trial_dir, result in ended.items():
            del self.held[trial_dir]
            result.extra.setdefault("pack", size)  # trials in the worker's hands as it ended
            if result.state.is_failure:  # a process that failed a trial is not trusted with another
                self.draining = True
        if again and len(again) == len(self.held):  # the others' endings first
            self._start_fresh(self.key)
            self.send()
        if not self.held and (not self.reuse or self.draining):  # whatever a trial's process left goes with it
            self.close()
        return ended

    def _result(self, trial_dir: Path, held: _Held, code: int | None):
        if held.cancelled is not None and len(self.held) == 1:
            return TrialResult(TrialState.FAILED, reason=held.cancelled) if code is not None else None
        result = trial_dir / RESULT_FILE
        if result.exists():
            try:  # written by our own worker; one that does not read back fails its trial, not the study
                return TrialResult.from_dict(read_json(result, "trial result"), str(result))
            except LoratuneError as exc:
                return TrialResult(TrialState.FAILED, reason=str(exc))
        if code is None:
            return None
        took = started(trial_dir)
        if not took and not held.fresh:  # handed to a worker that was ending: it never started
            return _AGAIN
        if held.cancelled is not None:
            return TrialResult(TrialState.FAILED, reason=held.cancelled)
        log = trial_dir / LOG_FILE
        text = log.read_text(errors="replace") if log.exists() else ""
        return result_from_exit(code, text, started=took, oom_killed=oom_kill_count() > held.oom_kills)

    def stop(self, trial_dir: Path) -> None:
        """Ask the trial to stop early, as early-stopped: at the curve point just judged when it awaits
        verdicts, else after its next optimizer step."""
        if trial_dir in self.held:
            (trial_dir / STOP_FILE).touch()

    def go_on(self, trial_dir: Path) -> None:
        """Let a trial that awaits verdicts train on past the curve point just judged."""
        if trial_dir in self.held:
            go_on(trial_dir)

    def cancel(self, trial_dir: Path, reason: str) -> None:
        """End the trial now; it ends as failed with ``reason``. Alone on its worker, the worker goes with it
        (its memory is freed); in a pack, the worker drops it and goes on with the others."""
        held = self.held.get(trial_dir)
        if held is None or held.cancelled is not None:
            return
        held.cancelled = reason
        if len(self.held) == 1:
            signal_group(self.process.pid, signal.SIGKILL)
        else:
            (trial_dir / CANCEL_FILE).write_text(reason)

    def close(self, keep: bool = False) -> None:
        """End the worker process and everything it started; safe to call more than once. The trials it
        held are forgotten unless ``keep``."""
        if self.process is not None:
            signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
            if self.process.stdin is not None:
                try:
                    self.process.stdin.close()
                except OSError:  # a pipe whose reader is gone
                    pass
        self.process, self.key, self.draining, self.unsent = None, None, False, []
        if not keep:
            self.held.clear()


_AGAIN = object()  # a trial that never started: it runs on a fresh worker
