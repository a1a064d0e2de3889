"""The one exception type that users see as a single line, and its exit code."""

from __future__ import annotations

USAGE_EXIT_CODE = 2


class LoratuneError(Exception):
    """A problem with the user's input (config, data, model, search space, output directory).

    The CLI prints it as one line, ``error: <message>``, and exits with code 2. The message names
    the problem and where it is: a file, a field, a row.
    """


def where(source: str | None, field: str) -> str:
    """``"cfg.yaml: training.learning_rate"`` or just the field when there is no file."""
    return f"{source}: {field}" if source else field


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or of a text), at most ``limit`` characters;
    the exception's type name when it has no message. Library errors are often pages long: the
    one-line errors and trial reasons show this much of them."""
    text = exc if isinstance(exc, str) else str(exc)
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    if not line and not isinstance(exc, str):
        return type(exc).__name__
    return line[:limit]
