"""Files that must never be half-written or shared: atomic writes and output-directory locks."""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import LoratuneError


def _jsonable(value: Any) -> Any:
    """NaN and inf are not JSON: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def check_creatable(path: str | Path, label: str, directory: bool = True) -> None:
    """``path`` (a directory, or a file) can be made or written: the nearest part of it that exists is a
    writable directory. Raises LoratuneError naming ``label`` and the part in the way."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None:
        return
    if existing == path and directory and not path.is_dir():
        raise LoratuneError(f"{label}: {path} is a file, not a directory")
    if existing == path and not directory and path.is_dir():
        raise LoratuneError(f"{label}: {path} is a directory, not a file")
    if existing != path and not existing.is_dir():
        raise LoratuneError(f"{label}: {existing} is a file, so {path} cannot be made")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LoratuneError(f"{label}: {folder} is not writable")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """JSON for people (indented) or for loratune alone (``indent=None``: compact)."""
    atomic_write_text(path, json.dumps(_jsonable(data), indent=indent, allow_nan=False, separators=None if indent
                                       else (",", ":")) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON file written by loratune; a missing or corrupted one is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise LoratuneError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoratuneError(f"{path}: {what} is corrupted ({exc})") from None


class DirectoryLock:
    """An exclusive, non-blocking lock on an output directory, released when the process ends
    (even by kill -9), so a second run on the same directory is refused instead of interleaved."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / ".loratune.lock"
        self._file = None

    def __enter__(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise LoratuneError(f"{self.path.parent}: another loratune run is using this output directory") from None
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
