"""The one exception type that users see as a single line, and its exit code."""

from __future__ import annotations

USAGE_EXIT_CODE = 2
STUDY_FAILED_EXIT_CODE = 1


class LoratuneError(Exception):
    """A problem with the user's input (config, data, model, search space, output directory).

    The CLI prints it as one line, ``error: <message>``, and exits with ``exit_code`` (2). The message
    names the problem and where it is: a file, a field, a row.
    """

    exit_code = USAGE_EXIT_CODE


class StudyAborted(LoratuneError):
    """The study ended without the result it was run for (too many failures in a row, or no trial
    completed), with everything saved: the CLI prints it as one line and exits with code 1."""

    exit_code = STUDY_FAILED_EXIT_CODE


class TrainingFailed(LoratuneError):
    """A fine-tune (``loratune finetune``, a retrain) that ran and failed: a non-finite loss, out of
    memory, a crash. One line with what to change, exit code 1."""

    exit_code = STUDY_FAILED_EXIT_CODE


def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or of a text), at most ``limit`` characters;
    the exception's type name when it has no message. Library errors are often pages long: the
    one-line errors and trial reasons show this much of them."""
    text = exc if isinstance(exc, str) else str(exc)
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    if not line and not isinstance(exc, str):
        return type(exc).__name__
    return line[:limit]
