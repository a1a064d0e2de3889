"""Data: rows as users have them (JSONL, JSON, CSV or parquet files, a dataset saved with
``save_to_disk``, a Hugging Face hub dataset) -> conversations -> tokens, with labels on the assistant's
tokens only -> batches with as little padding as each batch needs.

Chats are rendered with the model's own chat template. The loss covers each trained assistant
message up to and including its end-of-turn token (``<|im_end|>`` under ChatML), and nothing of the
system, user or tool messages nor of the template's text around them.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DEMO_TEST, DEMO_TRAIN, DEMO_VALIDATION, DataConfig
from .errors import LoratuneError, first_line

IGNORE = -100  # label value that the loss skips
FORMAT_FIELDS = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
}
STANDARD_COLUMNS = ("messages", "instruction", "input", "output", "prompt", "completion")
FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE everywhere but on the trained assistant tokens
    prompt: list[int] = field(default_factory=list)  # the last trained turn's generation prompt, tokenized alone
    reference: str = ""  # that turn's answer, as written: what a generated answer is scored against

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------
# Rows


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
    from .demo import dataset

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
    if kind == "csv":  # every cell is text exactly as written: "NA", "None", "null" and "" are not missing values
        problem = _diagnose(file, kind)  # pandas would shift a row with a field too many into the wrong columns
        if problem:
            raise LoratuneError(f"{field}: cannot read {file}: {problem}")
        options = {"keep_default_na": False, "na_values": [],
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
        text = file.read_text(encoding="utf-8")
        if kind == "csv":
            return not any(row for row in list(csv.reader(text.splitlines()))[1:])
        if file.suffix.lower() == ".json":
            return json.loads(text) in ([], {})
        return not text.strip()
    except (OSError, ValueError, csv.Error, ImportError):
        return False


def _csv_header(file: Path, field: str) -> list[str]:
    try:
        with open(file, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise LoratuneError(f"{field}: cannot read {file}: not UTF-8 text") from None
    if not header:
        raise LoratuneError(f"{field}: {file} has no header row")
    return header


def _diagnose(file: Path, kind: str) -> str | None:
    """Where a JSON, JSONL or CSV file stops being valid, as a user would look for it."""
    if kind == "parquet":
        return None
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.start})"
    if kind == "csv":
        reader = csv.reader(text.splitlines(keepends=True), strict=True)
        try:
            header = next(reader)
            for row in reader:
                if row and len(row) != len(header):  # a blank line is no row (pandas skips it too)
                    return f"line {reader.line_num}: {len(row)} fields where the header has {len(header)}"
        except csv.Error as exc:
            return f"line {reader.line_num}: {exc}"
        return None
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
    for number, line in enumerate(text.splitlines(), 1):
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

    from . import hub

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


# ---------------------------------------------------------------------------------------------
# Conversations


def detect_format(rows: list[dict], fmt: str, where: str) -> str:
    if fmt != "auto":
        return fmt
    columns = set(rows[0])
    for name, needed in FORMAT_FIELDS.items():
        if set(needed) <= columns:
            return name
    raise LoratuneError(
        f"{where}: cannot tell the data format from columns {sorted(columns)}; expected 'messages', "
        "'instruction'/'output' or 'prompt'/'completion' (or map yours with data.columns)"
    )


def rename_columns(rows: list[dict], columns: dict | None, where: str) -> list[dict]:
    """``data.columns`` maps loratune's names to the dataset's: ``{prompt: question, completion: answer}``."""
    if not columns:
        return rows
    for ours, theirs in columns.items():
        if ours not in STANDARD_COLUMNS:
            raise LoratuneError(f"data.columns: '{ours}' is not a column loratune reads ({', '.join(STANDARD_COLUMNS)})")
        if theirs not in rows[0]:
            raise LoratuneError(f"data.columns.{ours}: {where} has no column '{theirs}' (it has {', '.join(rows[0])})")
    return [{**row, **{ours: row.get(theirs) for ours, theirs in columns.items()}} for row in rows]


def _text(value: Any, what: str) -> str:
    """A message's content as text: a string, or a list of text parts joined; never null or empty."""
    if isinstance(value, list):  # [{"type": "text", "text": "..."}, ...]
        parts = [p.get("text") if isinstance(p, dict) else p for p in value]
        if not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{what} has parts that are not text")
        value = "".join(parts)
    if value is None:
        raise ValueError(f"{what} is null")
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not text")
    return value


def to_messages(row: dict, fmt: str, system_prompt: str | None) -> list[dict]:
    """The row as a conversation of text messages; raises ValueError on a malformed row."""
    if fmt == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' is not a list of messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i + 1} has no role")
            out.append({"role": m["role"], "content": _text(m.get("content"), f"message {i + 1}'s content")})
    else:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        if fmt == "instruction":
            extra = row.get("input")
            user = _text(row.get("instruction"), "'instruction'") + (f"\n\n{extra}" if isinstance(extra, str) and extra else "")
            answer = _text(row.get("output"), "'output'")
        else:
            user, answer = _text(row.get("prompt"), "'prompt'"), _text(row.get("completion"), "'completion'")
        out = [*system, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if out[-1]["role"] != "assistant":
        raise ValueError("the last message must have role 'assistant'")
    if not out[-1]["content"].strip():
        raise ValueError("the assistant's answer is empty")
    return out


# ---------------------------------------------------------------------------------------------
# Rendering and tokenizing
#
# A conversation is rendered with the chat template and tokenized at once, as generation and serving
# tokenize it; the loss mask comes from character ranges of the text. Tokenizing the prompt and the
# answer apart would train on other ids: a SentencePiece tokenizer (Metaspace, Llama 2, Mistral) puts a
# word-boundary marker at the start of every piece, so "[/INST]Paris" would be trained as "▁Paris"
# where the whole conversation holds "P", "aris".

Trained = list[tuple[int, int]]  # character ranges [start, end) of a text that the loss covers


@dataclass
class Rendered:
    """A conversation as the model is served it, and what of it the loss covers."""

    text: str
    trained: Trained
    prompt: str  # what generation of the last trained turn starts from (the template's generation prompt)
    reference: str  # that turn's answer


def rendered(tokenizer, messages: list[dict], train_on: str, where: str = "model.name") -> list[Rendered]:
    """The text(s) the model is served for this conversation, each with the ranges the loss covers: the
    whole conversation once; or, where the template renders a conversation differently from its
    beginning (a reasoning block kept only after the last user message, as Qwen3's), one text per
    trained assistant turn, as the template renders the conversation at that turn. Raises ValueError
    when the template refuses the conversation, LoratuneError when no end of an answer can be marked."""
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant_turn":
        trained = trained[-1:]
    if not tokenizer.chat_template:
        return [_plain(tokenizer, messages, set(trained), where)]
    full = _render(tokenizer, messages, False)
    ranges: Trained = []
    for i in trained:
        prompt, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1], False)
        if not (turn.startswith(prompt) and full.startswith(turn)):  # the template rewrites earlier turns
            return [_turn_alone(tokenizer, messages, j, where) for j in trained]
        ranges.append((len(prompt), len(prompt) + _turn_end(turn[len(prompt):], messages[i]["content"],
                                                            tokenizer.eos_token, where)))
    return [Rendered(full, ranges, _render(tokenizer, messages[:trained[-1]], True), messages[trained[-1]]["content"])]


def _turn_alone(tokenizer, messages: list[dict], i: int, where: str) -> Rendered:
    """Turn ``i`` as the conversation is rendered when it is the last turn (what the model is served then)."""
    prompt, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1], False)
    if not turn.startswith(prompt):
        raise ValueError("the chat template renders an assistant turn that does not begin with its own generation "
                         "prompt, so the assistant's tokens cannot be told apart")
    end = len(prompt) + _turn_end(turn[len(prompt):], messages[i]["content"], tokenizer.eos_token, where)
    return Rendered(turn, [(len(prompt), end)], prompt, messages[i]["content"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _turn_end(turn: str, content: str, eos: str | None, where: str) -> int:
    """Where an assistant turn's trained text ends: just after its end-of-turn token (ChatML's
    ``<|im_end|>``, the tokenizer's eos), not after the line break a template puts between turns; without
    an eos in the turn, after the last text the template puts there."""
    start = turn.find(content)
    after = start + len(content) if start >= 0 else 0
    if eos and (end := turn.find(eos, after)) >= 0:
        return end + len(eos)
    if len(turn.rstrip()) <= after:
        fix = "use a chat template that closes each turn" if eos else \
            "set eos_token in its tokenizer_config.json (the token that ends a turn), or use a chat template that closes each turn"
        raise LoratuneError(f"{where}: the chat template puts nothing after an assistant's answer "
                            f"({f'not even the eos_token {eos!r}' if eos else 'and the tokenizer has no eos_token'}), so "
                            f"the model could not learn where an answer ends; {fix}")
    return len(turn.rstrip())


def _plain(tokenizer, messages: list[dict], trained: set[int], where: str) -> Rendered:
    """Without a chat template: each message's text on its own paragraph, an answer ended by eos."""
    eos = tokenizer.eos_token
    if not eos:
        raise LoratuneError(f"{where}: the tokenizer has neither a chat template nor an eos_token, so the model could "
                            "not learn where an answer ends; set eos_token (or a chat_template) in its "
                            "tokenizer_config.json")
    text, ranges = "", []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            if i in trained:
                ranges.append((len(text), len(text) + len(m["content"]) + len(eos)))
            text += m["content"] + eos + ("\n\n" if i < len(messages) - 1 else "")
        else:
            text += f"{m['content']}\n\n"
    last = max(trained)
    return Rendered(text, ranges, text[:ranges[-1][0]], messages[last]["content"])


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an assistant's answer, where generation stops: the token the chat template puts
    after an answer (ChatML's ``<|im_end|>``), and the tokenizer's eos."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if tokenizer.chat_template:
        probe = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
        try:
            prompt, turn = _render(tokenizer, probe[:1], True), _render(tokenizer, probe, False)
        except Exception:  # a template that takes no such conversation: eos alone
            return ids
        after = turn[len(prompt):].split("Hi.", 1)[-1].strip()
        marker = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if marker and marker[0] not in ids:
            ids.append(marker[0])
    return ids


def _bos_to_add(tokenizer, text: str) -> int | None:
    """The BOS id to put before a text rendered without a chat template, when the tokenizer adds one
    (``tokenizer(text)`` at inference does); a chat template writes its own, as serving renders it."""
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer.chat_template or text.startswith(tokenizer.bos_token or "\0"):
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def trained_mask(tokenizer, text: str, trained: Trained) -> tuple[list[int], list[bool]]:
    """The ids of ``text`` tokenized at once (no special tokens added) and, for each, whether it overlaps
    a trained range: from the tokens' character offsets, or, for a tokenizer without offsets
    (SentencePiece in Python), from where the tokens of each range's boundary prefix part from the whole's."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        mask = [False] * len(ids)
        for begin, stop in trained:
            first, _ = _boundary(tokenizer, text, ids, begin)
            last, straddles = _boundary(tokenizer, text, ids, stop)
            mask[first:last + straddles] = [True] * (last + straddles - first)
        return ids, mask
    return list(enc["input_ids"]), [any(s < stop and e > begin for begin, stop in trained)
                                    for s, e in enc["offset_mapping"]]


def _boundary(tokenizer, text: str, ids: list[int], position: int) -> tuple[int, bool]:
    """How many of the whole text's tokens lie before ``position``, and whether the next one straddles it
    (the prefix's own tokens part from the whole's there)."""
    prefix = tokenizer(text[:position], add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(prefix), len(ids)) and prefix[k] == ids[k]:
        k += 1
    return k, k < len(prefix)


def encode(tokenizer, conversation: Rendered, max_length: int) -> Example:
    """The conversation's text tokenized at once, its tokens labelled where they overlap a trained range;
    its generation prompt tokenized alone, as serving tokenizes a prompt."""
    ids, mask = trained_mask(tokenizer, conversation.text, conversation.trained)
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    prompt = list(tokenizer(conversation.prompt, add_special_tokens=False)["input_ids"])
    bos = _bos_to_add(tokenizer, conversation.text)
    if bos is not None:
        ids, labels, prompt = [bos, *ids], [IGNORE, *labels], [bos, *prompt]
    return Example(ids[:max_length], labels[:max_length], prompt[:max_length], conversation.reference)


def tokenize_row(tokenizer, row: dict, fmt: str, cfg: DataConfig, at: str) -> list[Example]:
    """One row as the examples it trains: one, or one per assistant turn (see ``rendered``)."""
    import jinja2

    try:
        messages = to_messages(row, fmt, cfg.system_prompt)
        texts = rendered(tokenizer, messages, cfg.train_on)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoratuneError(f"{at}: not in {fmt} form: {first_line(exc)}") from None
    except jinja2.TemplateError as exc:
        hint = " (data.system_prompt adds a system message, which this template may not take)" \
            if cfg.system_prompt and fmt != "chat" else ""
        raise LoratuneError(f"{at}: the model's chat template refused it: {first_line(exc)}{hint}") from None
    examples = [encode(tokenizer, text, cfg.max_length) for text in texts]
    if any(all(label == IGNORE for label in e.labels) for e in examples):
        raise LoratuneError(f"data.max_length: {cfg.max_length} tokens is shorter than the prompt of {at} "
                            f"(no answer token is left to train on)")
    return examples


def tokenize_by_row(tokenizer, rows: list[dict], cfg: DataConfig, where: str,
                    numbers: list[int] | None = None) -> list[list[Example]]:
    """Each row's examples; ``numbers``: the rows' places in their file (0-based), for messages."""
    if not rows:
        return []
    rows = rename_columns(rows, cfg.columns, where)
    fmt = detect_format(rows, cfg.format, where)
    numbers = numbers or list(range(len(rows)))
    return [tokenize_row(tokenizer, row, fmt, cfg, f"{where}: row {k + 1}") for k, row in zip(numbers, rows, strict=True)]


def tokenize_rows(tokenizer, rows: list[dict], cfg: DataConfig, where: str) -> list[Example]:
    """Every row's examples, in order."""
    return [e for examples in tokenize_by_row(tokenizer, rows, cfg, where) for e in examples]


def load_examples(tokenizer, cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """Tokenized (train, validation) examples: from ``data.validation_split``, ``data.validation_path``, or
    ``data.validation_size`` of the training rows held out at random from ``seed`` (a row's examples
    stay on one side). The test split is never read here: rows held out for it (``data.test_size``) are
    left out untokenized, and ``data.test_path`` or ``data.test_split`` is not opened."""
    rows = load_rows(cfg.path, "data.path", cfg)
    detect_format(rename_columns(rows, cfg.columns, cfg.path), cfg.format, cfg.path)  # before any split is drawn
    validation_path = _validation_path(cfg)
    apart = bool(cfg.validation_split or validation_path)
    train_rows, validation_rows, _ = split_rows(len(rows), cfg, seed, not apart)
    train = _flat(tokenize_by_row(tokenizer, [rows[i] for i in train_rows], cfg, cfg.path, train_rows))
    if cfg.validation_split:
        rows = load_rows(cfg.path, "data.path", cfg, split=cfg.validation_split, split_field="data.validation_split")
        return train, tokenize_rows(tokenizer, rows, cfg, f"{cfg.path} [{cfg.validation_split}]")
    if validation_path:
        return train, tokenize_rows(tokenizer, load_rows(validation_path, "data.validation_path", cfg), cfg, validation_path)
    return train, _flat(tokenize_by_row(tokenizer, [rows[i] for i in validation_rows], cfg, cfg.path, validation_rows))


def load_test_examples(tokenizer, cfg: DataConfig, seed: int) -> tuple[list[Example], str] | None:
    """The test split the search never sees, tokenized, and where it comes from; None without one. Only the
    final evaluation of a study (and a comparison) reads it, never a trial."""
    source = test_source(cfg)
    if source is None:
        return None
    if cfg.test_size:
        rows = load_rows(cfg.path, "data.path", cfg)
        _, _, test_rows = split_rows(len(rows), cfg, seed, not (cfg.validation_split or _validation_path(cfg)))
        examples = _flat(tokenize_by_row(tokenizer, [rows[i] for i in test_rows], cfg, cfg.path, test_rows))
    elif cfg.test_split:
        rows = load_rows(cfg.path, "data.path", cfg, split=cfg.test_split, split_field="data.test_split")
        examples = tokenize_rows(tokenizer, rows, cfg, source)
    else:
        examples = tokenize_rows(tokenizer, load_rows(source, "data.test_path", cfg), cfg, source)
    return examples, source


def test_source(cfg: DataConfig) -> str | None:
    """A short description of the test split's source, or None without one."""
    if cfg.test_size:
        return f"{cfg.path} ({cfg.test_size:g} of its rows, held out)"
    if cfg.test_split:
        return f"{cfg.path} [{cfg.test_split}]"
    return cfg.test_path or (DEMO_TEST if cfg.path == DEMO_TRAIN else None)


def _validation_path(cfg: DataConfig) -> str | None:
    return cfg.validation_path or (DEMO_VALIDATION if cfg.path == DEMO_TRAIN else None)


def split_rows(n: int, cfg: DataConfig, seed: int, validation_from_rows: bool) -> tuple[list[int], list[int], list[int]]:
    """(training, validation, test) row indices of the training data: the rows shuffled once from ``seed``,
    validation taken from the front (``data.validation_size``, when no validation set is given apart) and
    test from the back (``data.test_size``), so that holding out a test split leaves the validation rows as
    they were."""
    def count(size: float, what: str, field: str) -> int:
        k = int(size) if size >= 1 else round(size * n)
        if size and k < 1:
            raise LoratuneError(f"{field}: {size} of {n} rows leaves no {what} rows")
        return k

    n_val = count(cfg.validation_size, "validation", "data.validation_size") if validation_from_rows else 0
    n_test = count(cfg.test_size, "test", "data.test_size")
    if n_val + n_test >= n:
        field = "data.test_size" if n_test else "data.validation_size"
        raise LoratuneError(f"{field}: {n_val} validation and {n_test} test of {n} rows leaves no training rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = sorted(order[n - n_test:]) if n_test else []
    return sorted(order[n_val:n - n_test]), sorted(order[:n_val]), test


def _flat(groups) -> list[Example]:
    return [e for group in groups for e in group]


# ---------------------------------------------------------------------------------------------
# Batching


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, group: int = 16) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of ``group`` batches: batches hold examples of
    similar length (little padding) while the order stays random from one epoch to the next."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """For evaluation: order does not matter, so sort fully by length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: list[Example], pad_id: int):
    """Pad to the longest example of this batch only."""
    import torch

    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the tokens in padded batches that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded if padded else 0.0
