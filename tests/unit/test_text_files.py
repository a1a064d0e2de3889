"""Files as people save them: UTF-8 with a byte-order mark and CRLF line ends (Excel's "CSV UTF-8", Notepad)
read as the same rows and settings as plain UTF-8; a UTF-16 export or a file that is not UTF-8 at all is
one line that names the file and says to save it as UTF-8."""

import json

import pytest
from conftest import cli, write_jsonl

from loratune.config import DataConfig
from loratune.data import load_examples
from loratune.data.sources import load_rows
from loratune.errors import LoratuneError
from loratune.settings import load_study_config

BOM = b"\xef\xbb\xbf"
# commas, quotes, a tab, a line break and text beyond ASCII inside cells: what a spreadsheet must quote
ROWS = [{"prompt": "Scene 1: rain, at night", "completion": 'Plan "one": a close-up.'},
        {"prompt": "Scène 2 — café", "completion": "Plan 2:\nwide, then close."},
        {"prompt": "Scene 3", "completion": "Plan 3."}]


def excel(text: str) -> bytes:
    """As Excel and Notepad save UTF-8: a byte-order mark, then CRLF line ends (a line break inside a
    quoted cell stays LF, as Excel writes it: ``text``'s lines are the file's lines)."""
    return BOM + "".join(line + "\r\n" for line in text.splitlines()).encode("utf-8")


def quoted(cell: str) -> str:
    return '"' + cell.replace('"', '""').replace("\n", "\0") + '"'  # \0: a line break inside the cell


def saved(tmp_path, suffix: str, rows: list[dict]):
    """The rows as an Excel/Notepad-style file of the kind ``suffix``: a BOM and CRLF."""
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        text = "\n".join([sep.join(rows[0]), *(sep.join(quoted(v) for v in row.values()) for row in rows)])
    elif suffix == ".json":
        text = json.dumps(rows, indent=2, ensure_ascii=False)
    else:
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path = tmp_path / f"scenes{suffix}"
    path.write_bytes(excel(text).replace(b"\0", b"\n"))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_a_file_with_a_bom_and_crlf_loads_as_the_same_rows_as_plain_jsonl(tokenizer, tmp_path, suffix):
    plain = write_jsonl(tmp_path / "plain.jsonl", ROWS)
    path = saved(tmp_path, suffix, ROWS)
    assert path.read_bytes().startswith(BOM) and b"\r\n" in path.read_bytes()
    assert load_rows(str(path), "data.path", DataConfig()) == load_rows(str(plain), "data.path", DataConfig()) == ROWS
    ours, theirs = (load_examples(tokenizer, DataConfig(path=str(p), validation_size=1), seed=0) for p in (path, plain))
    assert [[e.input_ids for e in split] for split in ours] == [[e.input_ids for e in split] for split in theirs]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.jsonl", excel('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n'),
     "d.jsonl: line 2, column 34: not valid JSON (expecting ',' delimiter)"),
    ("d.json", excel("[]\n"), "d.json has no rows"),
    ("d.csv", excel("prompt,completion\na,b\nc,d,e\n"), "d.csv: line 3: 3 fields where the header has 2"),
    ("d.tsv", excel("prompt\tcompletion\n"), "d.tsv has no rows (only a header)"),
])
def test_a_broken_file_with_a_bom_names_its_own_line(tmp_path, name, content, message):
    """The byte-order mark is not taken for the problem, nor counted as a line."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LoratuneError) as err:
        load_rows(str(tmp_path / name), "data.path", DataConfig())
    assert message in str(err.value) and "utf-8" not in str(err.value).lower()


UTF16 = "UTF-16 text, not UTF-8; save it as UTF-8"


@pytest.mark.parametrize(("name", "text", "message"), [
    ("d.csv", "prompt,completion\r\na,b\r\n", f"data.path: cannot read {{}}: {UTF16} (in Excel: Save As, CSV UTF-8)"),
    ("d.tsv", "prompt\tcompletion\r\na\tb\r\n", f"data.path: cannot read {{}}: {UTF16} (in Excel: Save As, CSV UTF-8)"),
    ("d.jsonl", '{"prompt": "a", "completion": "b"}\r\n', f"data.path: cannot read {{}}: {UTF16}"),
    ("d.json", '[{"prompt": "a", "completion": "b"}]\r\n', f"data.path: cannot read {{}}: {UTF16}"),
])
def test_a_utf16_data_file_is_one_line_saying_to_save_it_as_utf8(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-16"))  # with its byte-order mark, as Excel's "Unicode Text" saves it
    with pytest.raises(LoratuneError) as err:
        load_rows(str(path), "data.path", DataConfig())
    assert str(err.value) == message.format(path)


def test_a_data_file_that_is_not_utf8_names_its_line_and_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"prompt": "a", "completion": "b"}\n{"prompt": "scène", "completion": "b"}\n'.encode("latin-1"))
    with pytest.raises(LoratuneError) as err:
        load_rows(str(path), "data.path", DataConfig())
    assert str(err.value) == f"data.path: cannot read {path}: not UTF-8 text (line 2, byte 49: 0xe8); save it as UTF-8"


CONFIG = "trials: 3\nseed: 7\ndata:\n  system_prompt: 'Plan the shot — briefly.'\ntraining:\n  learning_rate: 3e-4\n"


def test_a_yaml_config_with_a_bom_and_crlf_reads_as_the_same_settings(tmp_path):
    plain, windows = tmp_path / "plain.yaml", tmp_path / "windows.yaml"
    plain.write_text(CONFIG, encoding="utf-8")
    windows.write_bytes(excel(CONFIG))
    ours, theirs = load_study_config(windows)[0], load_study_config(plain)[0]
    assert ours == theirs and ours.trials == 3 and ours.data.system_prompt == "Plan the shot — briefly."


def test_a_yaml_error_in_a_bom_and_crlf_config_names_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(excel("trials: 3\nseed: 7\ntrials: 4\n"))
    with pytest.raises(LoratuneError) as err:
        load_study_config(path)
    assert str(err.value) == f"{path}:3:1: invalid YAML: 'trials' is given twice in one mapping"


def test_a_utf16_or_latin1_yaml_config_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(CONFIG.replace("\n", "\r\n").encode("utf-16"))
    with pytest.raises(LoratuneError) as err:
        load_study_config(path)
    assert str(err.value) == f"{path}: {UTF16}"
    path.write_bytes("trials: 3\ndata:\n  system_prompt: 'café'\n".encode("latin-1"))
    with pytest.raises(LoratuneError) as err:
        load_study_config(path)
    assert str(err.value) == f"{path}: not UTF-8 text (line 3, byte 37: 0xe9); save it as UTF-8"


@pytest.mark.parametrize("kind", ["data", "config"])
def test_the_cli_refuses_a_utf16_file_in_one_line_and_exit_code_2(tmp_path, kind):
    path = tmp_path / ("scenes.csv" if kind == "data" else "c.yaml")
    path.write_bytes(("prompt,completion\r\na,b\r\n" if kind == "data" else CONFIG).encode("utf-16"))
    flag = "--data" if kind == "data" else "--config"
    proc = cli("-m", "loratune.cli", "optimize", flag, str(path), "--output", str(tmp_path / "study"), "--trials", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {'data.path: cannot read ' if kind == 'data' else ''}{path}: "
                                                f"{UTF16}{' (in Excel: Save As, CSV UTF-8)' if kind == 'data' else ''}"]
    assert not (tmp_path / "study").exists()
