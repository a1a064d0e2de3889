"""One slot's worker process, and what each way it can end makes of the trial in its hands.

The local executor keeps one ``ServingWorker`` per slot, a Ray actor one of its own, so these rules are
written once (the README's "Failures" lists them for users):

- The worker reports the trial's end (``result.json``): the trial ends as reported. After a failure
  (an exception, a non-finite loss, out of memory) the worker is replaced before the next trial: the
  memory of a process after an out-of-memory or a crash is not trusted.
- The worker dies while it runs the trial (a crash, ``kill -9``, the kernel's out-of-memory killer): the
  trial failed, with the exit code or signal as its reason (out of memory when the kernel's
  out-of-memory killer ended it or its log says so).
- The worker dies before it took the trial (it was handed over to a worker that was ending): the
  trial runs on a fresh worker. A fresh worker that dies before taking it fails it, with its reason.
- The trial is cancelled (``trial_timeout``): it failed with the cancel's reason, and its worker goes
  with it.
- Between trials the worker is replaced when it has run ``trials_per_worker`` trials, holds another base
  model, or has died; the next trial is handed to a fresh one.

With ``reuse=False`` every trial gets a fresh process and the same rules hold.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from ..processes import die_with_parent, oom_kill_count, signal_group
from ..trial import TrialResult, TrialState, result_from_exit
from ..trial_dir import LOG_FILE, RESULT_FILE, STOP_FILE, go_on, started

WORKER_COMMAND = (sys.executable, "-m", "loratune.worker")  # + ``--serve`` or a trial directory


class ServingWorker:
    """Hands trials to a worker process (``python -m loratune.worker``), one at a time, and turns every
    way that process can end into the trial's ``TrialResult``.

    ``env``: the worker's environment (``trial_dir.worker_env``). ``reuse``: keep one process that loads
    the base model once for trial after trial (``--serve``), else a fresh process per trial.
    ``command``: the worker's command line without its last argument (the worker module, or a test's
    stand-in for it).
    """

    def __init__(self, env: dict[str, str], reuse: bool = True, trials_per_worker: int = 50,
                 command: list[str] | tuple[str, ...] = WORKER_COMMAND):
        self.env, self.reuse, self.trials_per_worker, self.command = env, reuse, trials_per_worker, list(command)
        self.process: subprocess.Popen | None = None
        self.key: str | None = None  # the base model the process holds (``trial_dir.base_key``)
        self.trials = 0  # trials handed to this process
        self.trial: Path | None = None  # the directory of the trial in its hands
        self.fresh = False  # the process was started for this trial
        self.cancelled: str | None = None
        self._oom_kills = 0  # the kernel's count when the trial was handed over

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def holds(self, key: str) -> bool:
        """Whether the next trial with this base would run on the process kept from the last one."""
        return (self.reuse and self.process is not None and self.process.poll() is None and self.key == key
                and self.trials < self.trials_per_worker)

    def start(self, trial_dir: Path, key: str) -> None:
        """Hand over the trial in ``trial_dir`` (its ``trial.json`` written): to the kept process when
        the rules allow, else to a fresh one."""
        self.trial, self.cancelled, self._oom_kills = trial_dir, None, oom_kill_count()
        if self.holds(key) and self.trials == 0:  # its first trial, on a worker started before it
            with open(trial_dir / LOG_FILE, "a") as log:  # before the worker writes there: which command
                log.write(f"$ {shlex.join(self.process.args)}\n")
        if self.holds(key) and self._send(trial_dir):
            self.fresh, self.trials = False, self.trials + 1
        else:
            self._start_fresh(key)

    def prestart(self, key: str, quantized: bool) -> None:
        """Start a kept worker now, before it has a trial, so that its imports overlap the study's set-up;
        the first trial with this base goes to it. Its output until then is dropped: one that dies before
        taking its trial hands it to a fresh worker, which writes into the trial's log."""
        if not self.reuse or self.process is not None:
            return
        argv = [*self.command, "--serve", "--preload", *(["--quantized"] if quantized else [])]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
                                        text=True, stdin=subprocess.PIPE, start_new_session=True,
                                        preexec_fn=die_with_parent())
        self.key, self.trials = key, 0

    def _send(self, trial_dir: Path) -> bool:
        try:
            self.process.stdin.write(f"{trial_dir}\n")
            self.process.stdin.flush()
            return True
        except OSError:  # the pipe broke: it ended since it was last seen
            return False

    def _start_fresh(self, key: str) -> None:
        self.close()
        argv = [*self.command, "--serve"] if self.reuse else [*self.command, str(self.trial)]
        with open(self.trial / LOG_FILE, "a") as log:  # until it takes the trial, its output is the trial's
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            # its own session, so that a cancel or a shutdown reaches what it started too; and it dies
            # with this process, however this one ends
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, text=True,
                                            stdin=subprocess.PIPE if self.reuse else subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent())
        self.key, self.trials, self.fresh = key, 1, True
        if self.reuse:
            self._send(self.trial)  # one that dies at once is seen by poll

    def poll(self) -> TrialResult | None:
        """The trial's result once it has ended, else None (also while it starts again on a fresh worker)."""
        if self.trial is None:
            return None
        code = self.process.poll()  # before looking for the result: a result written before the exit is seen
        if self.cancelled is not None:
            return self._end(TrialResult(TrialState.FAILED, reason=self.cancelled)) if code is not None else None
        result = self.trial / RESULT_FILE
        if result.exists():
            return self._end(TrialResult.from_dict(json.loads(result.read_text())))
        if code is None:
            return None
        took = started(self.trial)
        if not took and not self.fresh:  # handed to a worker that was ending: it never started
            self._start_fresh(self.key)
            return None
        log = self.trial / LOG_FILE
        text = log.read_text(errors="replace") if log.exists() else ""
        return self._end(result_from_exit(code, text, started=took, oom_killed=oom_kill_count() > self._oom_kills))

    def _end(self, result: TrialResult) -> TrialResult:
        self.trial = None
        if not self.reuse or result.state.is_failure:  # whatever a trial's process left goes with it
            self.close()
        return result

    def stop(self) -> None:
        """Ask the trial to stop early, as early-stopped: at the curve point just judged when it awaits
        verdicts, else after its next optimizer step."""
        if self.trial is not None:
            (self.trial / STOP_FILE).touch()

    def go_on(self) -> None:
        """Let a trial that awaits verdicts train on past the curve point just judged."""
        if self.trial is not None:
            go_on(self.trial)

    def cancel(self, reason: str) -> None:
        """End the trial now, its worker with it (its memory is freed); it ends as failed with ``reason``."""
        if self.trial is not None and self.cancelled is None:
            self.cancelled = reason
            signal_group(self.process.pid, signal.SIGKILL)

    def close(self) -> None:
        """End the worker process and everything it started; safe to call more than once."""
        if self.process is not None:
            signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
            if self.process.stdin is not None:
                try:
                    self.process.stdin.close()
                except OSError:  # a pipe whose reader is gone
                    pass
        self.process, self.key = None, None
