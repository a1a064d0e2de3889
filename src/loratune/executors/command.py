"""A user's own training command as the evaluation (``--command``): its placeholders, the check made
before a study starts, and the metrics it prints."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from ..errors import LoratuneError

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
