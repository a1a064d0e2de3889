"""Process lifetimes: no trial process outlives the study that started it, and no two processes
ever run the same trial directory.

A study can end in ways where none of its own code runs (``kill -9``, the OOM killer, a closed
terminal), so the children see to it themselves: on Linux the kernel sends them a signal when their
parent dies (``PR_SET_PDEATHSIG``, armed between fork and exec); everywhere, a thread watches the
parent's pid. A user's training command gets a small guard process that does the same and takes the
command's whole process group down with it. Whoever runs a trial holds an exclusive lock on its
directory (``trials/N/.lock``, with its pid), so a re-run after a crash first ends any older process
still holding it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1
LOCK_NAME = ".lock"
_libc = None
_HELD: set[TrialLock] = set()


def _prctl_pdeathsig(sig: int) -> bool:
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this process dies.

    Armed in the child before it runs anything, so even a parent killed during the child's start-up
    takes the child along (it exits at once if the parent is already gone)."""
    parent = os.getpid()
    if sys.platform.startswith("linux"):
        _prctl_pdeathsig(0)  # load libc here: the child should only make the call

    def arm() -> None:
        _prctl_pdeathsig(sig)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def watch_parent(on_orphaned: Callable[[], None] | None = None, interval: float = 1.0) -> None:
    """End this process (and its process group, when it leads one) once its parent is gone.

    For platforms without a parent-death signal, and for a process whose signal was not armed."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        if on_orphaned is not None:
            on_orphaned()
        kill_own_group()

    threading.Thread(target=watch, name="loratune-parent-watch", daemon=True).start()


def kill_own_group() -> None:
    """SIGKILL this process's group when it leads one (a trial started in its own session), else itself."""
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def oom_kill_count() -> int:
    """Processes the kernel's out-of-memory killer has ended since boot (Linux's ``/proc/vmstat``), else 0.
    The count is the machine's, not one process's: a worker killed by SIGKILL while it rose was most likely
    the victim (another process's kill at the same moment would be taken for it)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group that ``pid`` leads; a group already gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class TrialLock:
    """The lock on a trial directory, held by whichever process runs the trial.

    ``acquire`` takes it for this process. ``clear(directory)`` is what a re-run calls first: when
    an older process still holds the lock, its process group is killed and the lock awaited.
    """

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self._file = None

    def acquire(self) -> TrialLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        _HELD.add(self)  # held until released or the process ends, even if the caller drops the object
        return self

    def release(self) -> None:
        _HELD.discard(self)
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @staticmethod
    def clear(directory: str | Path, timeout: float = 30.0) -> int | None:
        """Make sure no process holds ``directory``'s lock; return the pid that had to be killed."""
        path = Path(directory) / LOCK_NAME
        if not path.exists():
            return None
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                pass
            f.seek(0)
            text = f.read().strip()
            pid = int(text) if text.isdigit() else None
            if pid:
                signal_group(pid, signal.SIGKILL)
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return pid
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{path}: held by process {pid}, which did not end") from None
                    time.sleep(0.05)


def fresh_trial_dir(directory: str | Path) -> Path:
    """Make ``directory`` a fresh trial directory: a process of an earlier, killed study still on the trial
    ends first (``TrialLock.clear``), and what a last run left goes (a rerun starts clean) but its log, kept
    as ``previous_log.txt``: why it ran again (its pack out of memory, a killed study) stays readable."""
    import shutil

    from .trial_dir import LOG_FILE, PREVIOUS_LOG_FILE

    directory = Path(directory)
    TrialLock.clear(directory)
    try:
        log = (directory / LOG_FILE).read_bytes()
    except OSError:
        log = None
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    if log:
        (directory / PREVIOUS_LOG_FILE).write_bytes(log)
    return directory


def run_guarded(trial_dir: str, argv: list[str]) -> int:
    """Run a user's training command as a trial: hold the trial's lock, and take the command's whole
    process group down when the study dies. ``python -m loratune.processes TRIAL_DIR -- CMD ...``."""
    import subprocess

    TrialLock(trial_dir).acquire()
    signal.signal(signal.SIGHUP, lambda *_: kill_own_group())  # our parent-death signal
    signal.signal(signal.SIGTERM, lambda *_: None)  # a stop reaches the whole group: let the command end
    if not _prctl_pdeathsig(signal.SIGHUP):
        watch_parent()
    try:
        proc = subprocess.Popen(argv)
    except OSError as exc:
        print(f"error: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    code = proc.wait()
    if code < 0:  # end the way the command ended, so the study reads the same signal
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: python -m loratune.processes TRIAL_DIR -- COMMAND [ARG ...]")
    sys.exit(run_guarded(sys.argv[1], sys.argv[3:]))
