"""Rows as users have them: a JSONL, JSON, CSV, TSV or parquet file, a dataset saved with ``save_to_disk``,
or a Hugging Face hub dataset (its cache only, at once, when the hub is out of reach). Text files are read
as editors and spreadsheets save them (UTF-8 with or without a byte-order mark, LF or CRLF: see
``textfile``). Every file that cannot be read is one line naming its problem and, where a user would look,
its line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import LoratuneError, first_line
from ..textfile import NotUTF8, check_start, decode

FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
DELIMITERS = {".tsv": "\t"}  # a table's cell separator by suffix; else ","
SPREADSHEET_HINT = " (in Excel: Save As, CSV UTF-8)"  # Excel's "Unicode Text" is UTF-16


def load_rows(source: str, field: str, cfg: DataConfig, split: str | None = None,
              split_field: str = "data.split") -> list[dict]:
    """The rows of a file, a saved dataset directory, or a hub dataset (``split`` of it, named by ``split_field``)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read is our one error line
    split = split or cfg.split
    if source.startswith("builtin:"):
        rows = _read_file(_builtin(source, field), field)
    elif Path(source).expanduser().is_file():
        rows = _read_file(Path(source).expanduser(), field)
    elif Path(source).expanduser().is_dir():
        rows = _from_disk(Path(source).expanduser(), split, field, split_field)
    elif source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FILE_KINDS:
        raise LoratuneError(f"{field}: dataset file not found: {source}")
    else:
        rows = _from_hub(source, cfg.subset, split, field, split_field)
    if not rows:
        raise LoratuneError(f"{field}: dataset {source} is empty")
    return rows


def _builtin(source: str, field: str) -> Path:
    from ..demo import dataset

    builtin = dataset.HERE / f"{source.removeprefix('builtin:')}.jsonl"
    if not builtin.is_file():
        known = sorted(f"builtin:{p.stem}" for p in dataset.HERE.glob("*.jsonl"))
        raise LoratuneError(f"{field}: unknown built-in dataset '{source}' (known: {', '.join(known)})")
    return builtin


def _read_file(file: Path, field: str) -> list[dict]:
    import datasets

    kind = FILE_KINDS.get(file.suffix.lower())
    if kind is None:
        raise LoratuneError(f"{field}: unsupported file type '{file.suffix}' for {file} "
                            f"(use {', '.join(FILE_KINDS)}, a dataset directory or a hub dataset id)")
    if file.stat().st_size == 0:
        raise LoratuneError(f"{field}: dataset {file} is empty")
    options: dict[str, Any] = {}
    if kind != "parquet":  # a UTF-16 export would fail in datasets with a message about something else
        check_start(file, f"{field}: cannot read {file}", SPREADSHEET_HINT if kind == "csv" else "")
    if kind == "csv":  # every cell is text exactly as written: "NA", "None", "null" and "" are not missing values
        problem = _diagnose(file, kind)  # pandas would shift a row with a field too many into the wrong columns
        if problem:
            raise LoratuneError(f"{field}: cannot read {file}: {problem}")
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is no part of the first column's name
        options = {"keep_default_na": False, "na_values": [], "encoding": "utf-8-sig", "sep": _delimiter(file),
                   "features": datasets.Features({c: datasets.Value("string") for c in _csv_header(file, field)})}
    try:
        rows = datasets.load_dataset(kind, data_files=str(file), split="train", **options).to_list()
    except Exception as exc:  # datasets raises many types for unreadable files: find the line ourselves
        if _has_no_rows(file, kind):
            raise LoratuneError(f"{field}: {file} has no rows{' (only a header)' if kind == 'csv' else ''}") from None
        raise LoratuneError(f"{field}: cannot read {file}: {_diagnose(file, kind) or first_line(exc)}") from None
    return rows


def _has_no_rows(file: Path, kind: str) -> bool:
    """A file that parses and holds no row (datasets reports that as 'corresponds to no data')."""
    try:
        if kind == "parquet":
            import pyarrow.parquet

            return pyarrow.parquet.read_metadata(file).num_rows == 0
        text = decode(file.read_bytes())
        if kind == "csv":
            return not any(row for row in list(_csv_rows(text, file))[1:])
        if file.suffix.lower() == ".json":
            return json.loads(text) in ([], {})
        return not text.strip()
    except (OSError, ValueError, csv.Error, ImportError):  # NotUTF8 is a ValueError
        return False


def _delimiter(file: Path) -> str:
    return DELIMITERS.get(file.suffix.lower(), ",")


def _csv_rows(text: str, file: Path, strict: bool = False):
    """A CSV or TSV file's rows as Python's csv module reads them; line ends as written (LF, CRLF, CR),
    and a line break inside a quoted cell stays in its cell."""
    return csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(file), strict=strict)


def _csv_header(file: Path, field: str) -> list[str]:
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f, delimiter=_delimiter(file)), [])
    except UnicodeDecodeError:  # _diagnose found none in the whole file: only a race would see one
        raise LoratuneError(f"{field}: cannot read {file}: not UTF-8 text; save it as UTF-8") from None
    if not header:
        raise LoratuneError(f"{field}: {file} has no header row")
    return header


def _diagnose(file: Path, kind: str) -> str | None:
    """Where a JSON, JSONL or CSV file stops being valid, as a user would look for it."""
    if kind == "parquet":
        return None
    try:
        text = decode(file.read_bytes(), SPREADSHEET_HINT if kind == "csv" else "")
    except NotUTF8 as exc:
        return str(exc)
    if kind == "csv":
        reader = _csv_rows(text, file, strict=True)
        try:
            header = next(reader)
            for row in reader:
                if row and len(row) != len(header):  # a blank line is no row (pandas skips it too)
                    return f"line {reader.line_num}: {len(row)} fields where the header has {len(header)}"
        except csv.Error as exc:
            return f"line {reader.line_num}: {exc}"
        return None
    text = text.replace("\r\n", "\n")  # JSON has no raw line break inside a string: CRLF files get LF's columns
    if file.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}, column {exc.colno}: not valid JSON ({_json_problem(exc)})"
        if isinstance(value, list):
            bad = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
            if bad is not None:
                return f"element {bad + 1} of the list is {type(value[bad]).__name__}, not a JSON object (a row)"
        elif not isinstance(value, dict):
            return f"expected a list of rows (JSON objects), got {type(value).__name__}"
        return None
    for number, line in enumerate(text.split("\n"), 1):  # JSON Lines ends lines with \n (str.splitlines splits at more)
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number}, column {exc.colno}: not valid JSON ({_json_problem(exc)})"
            if not isinstance(value, dict):
                return f"line {number}: expected a JSON object, got {type(value).__name__}"
    return None


def _json_problem(exc: json.JSONDecodeError) -> str:
    """json's own message without its dangling position ("Unterminated string starting at")."""
    return exc.msg.removesuffix(" at").removesuffix(" starting").lower()


def _from_disk(directory: Path, split: str, field: str, split_field: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as exc:
        raise LoratuneError(f"{field}: {directory} is a directory but not a dataset saved with save_to_disk "
                            f"({first_line(exc, 120)})") from None
    return _split(loaded, split, split_field, str(directory)).to_list()


def _from_hub(name: str, subset: str | None, split: str, field: str, split_field: str) -> list[dict]:
    import datasets

    from .. import hub

    online = hub.use_hub()
    try:
        loaded = datasets.load_dataset(name, name=subset)
    except Exception as exc:
        text = first_line(exc, 160)
        if subset and ("config" in text.lower() or "subset" in text.lower()):
            raise LoratuneError(f"data.subset: '{subset}' is not a configuration of {name}: {text}") from None
        raise LoratuneError(f"{field}: '{name}' is not a local file or directory, and not a dataset found in "
                            f"{hub.where_looked(online)} ({text})") from None
    return _split(loaded, split, split_field, name).to_list()


def _split(loaded, split: str, split_field: str, source: str):
    """One split of a DatasetDict (a plain Dataset is its own only split)."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise LoratuneError(f"{split_field}: {source} has no split '{split}' (it has {', '.join(loaded)})")
    return loaded[split]


