"""A user's own training command as the evaluation (``--command``): its placeholders, the check made
before a study starts, how it runs as a trial, and the metrics it prints."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import LoratuneError
from ..processes import die_with_parent, signal_group
from ..trial import TrialResult, TrialState, check_metrics, result_from_exit
from ..trial_dir import LAST_EVAL_FILE, LOG_FILE, PROGRESS_FILE, STOP_FILE, TRIAL_DIR_ENV, go_on

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "ash"}


def command_argv(template: str, params: dict[str, Any]) -> list[str]:
    """Split the template once, then fill ``{name}`` inside each argument. No shell sees the values,
    so a value stays one argument whatever it holds; where the command is itself a shell script
    (``sh -c '... {lr} ...'``), values are quoted for that shell."""
    args = shlex.split(template)
    script = _shell_script_index(args)

    def fill(i: int, arg: str) -> str:
        def value(m: re.Match) -> str:
            if m.group(1) not in params:
                return m.group(0)
            text = _format_value(params[m.group(1)])
            return shlex.quote(text) if i == script else text

        return PLACEHOLDER.sub(value, arg)

    return [fill(i, arg) for i, arg in enumerate(args)]


def _shell_script_index(args: list[str]) -> int | None:
    """The position of the script in ``sh -c SCRIPT ...``, else None."""
    if args and Path(args[0]).name in SHELLS and "-c" in args[1:]:
        i = args.index("-c", 1) + 1
        return i if i < len(args) else None
    return None


def check_command(template: str, names: list[str]) -> None:
    """Refuse, before anything starts, a command that cannot run: empty, unsplittable, a program
    that does not exist, or a placeholder that names no searched parameter."""
    try:
        args = shlex.split(template)
    except ValueError as exc:
        raise LoratuneError(f"--command: cannot split '{template}': {exc}") from None
    if not args:
        raise LoratuneError("--command: empty command")
    program = args[0]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise LoratuneError(f"--command: {program}: no such executable file")
    elif shutil.which(program) is None:
        raise LoratuneError(f"--command: {program}: not found on PATH")
    for arg in args:
        for name in PLACEHOLDER.findall(arg):
            if name not in names:
                raise LoratuneError(f"--command: placeholder {{{name}}} is not a searched parameter ({', '.join(names)})")


def _format_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def last_json_metrics(text: str) -> dict | None:
    """The metrics in the last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _last_evaluation(trial_dir: Path) -> dict | None:
    """The metrics of the command's last evaluation, as its ``LoratuneCallback`` wrote them."""
    try:
        value = json.loads((trial_dir / LAST_EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value else None


class CommandRunner:
    """Runs a slot's command trials, each a fresh process under a guard (``python -m loratune.processes``)
    that takes the command's whole process group down with the study. The same methods as
    ``serving.ServingWorker``, one trial at a time: ``start``, ``poll``, ``stop``, ``go_on``, ``cancel`` and
    ``close``.

    A command whose trainer has ``LoratuneCallback`` reports its curve in the trial's directory (named in
    ``LORATUNE_TRIAL_DIR``), waits there for verdicts and stops itself when told (a ``STOP`` file); any other
    command is stopped by SIGTERM to its group, and may end on its own terms. Either ends as early-stopped."""

    def __init__(self, template: str, env: dict[str, str], objectives: list[str]):
        self.template, self.env, self.objectives = template, env, objectives
        self.process: subprocess.Popen | None = None
        self.trial: Path | None = None
        self.stop_sent, self.cancelled = False, None

    def holds(self, config: dict) -> bool:
        return False  # nothing is kept from one trial to the next

    @property
    def free(self) -> int:
        return 1 if self.trial is None else 0

    def can_take(self, config: dict) -> bool:
        return self.trial is None

    def start(self, trial_dir: Path, params: dict[str, Any]) -> None:
        argv = command_argv(self.template, params)
        self.trial, self.stop_sent, self.cancelled = trial_dir, False, None
        env = {**self.env, TRIAL_DIR_ENV: str(trial_dir.resolve())}
        with open(trial_dir / LOG_FILE, "a") as log:
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            self.process = subprocess.Popen([sys.executable, "-m", "loratune.processes", str(trial_dir), "--", *argv],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True, preexec_fn=die_with_parent())

    def poll(self) -> dict[Path, TrialResult]:
        if self.trial is None or self.process.poll() is None:
            return {}
        log = (self.trial / LOG_FILE).read_text(errors="replace")
        if self.cancelled:
            result = TrialResult(TrialState.FAILED, reason=self.cancelled)
        elif self.stop_sent:
            result = TrialResult(TrialState.EARLY_STOPPED, reason="early-stopped")
        elif self.process.returncode != 0:
            result = result_from_exit(self.process.returncode, log, what="command")
        elif (metrics := last_json_metrics(log) or _last_evaluation(self.trial)) is None:
            result = TrialResult(TrialState.FAILED, reason="command printed no JSON line with metrics "
                                 "(nor reported an evaluation through LoratuneCallback)")
        else:
            result = check_metrics(metrics, self.objectives)
        trial, self.trial = self.trial, None
        self.close()  # whatever the command left running in its group
        return {trial: result}

    def stop(self, trial_dir: Path) -> None:
        if self.trial is not None and not self.stop_sent:
            self.stop_sent = True
            (trial_dir / STOP_FILE).touch()
            if not (trial_dir / PROGRESS_FILE).exists():  # no callback reads it: end the command's group
                signal_group(self.process.pid, signal.SIGTERM)

    def go_on(self, trial_dir: Path) -> None:
        """The verdict a command's ``LoratuneCallback`` waits for at a curve point: train on."""
        if self.trial is not None:
            go_on(trial_dir)

    def cancel(self, trial_dir: Path, reason: str) -> None:
        if self.trial is not None and self.cancelled is None:
            self.cancelled = reason
            signal_group(self.process.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.process is not None:
            signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
