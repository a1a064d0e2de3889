"""Data: load rows, render them with the model's chat template, tokenize with response-only labels,
split, and batch with as little padding as the batch needs (length-grouped batching)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .errors import LoratuneError, first_line

IGNORE = -100  # label value that the loss skips
FORMAT_FIELDS = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens: the loss is on the response only

    def __len__(self) -> int:
        return len(self.input_ids)


def resolve_data_path(path: str, field: str) -> Path:
    if path.startswith("builtin:"):
        from .demo import dataset

        builtin = dataset.HERE / f"{path.removeprefix('builtin:')}.jsonl"
        if not builtin.is_file():
            known = sorted(p.stem for p in dataset.HERE.glob("*.jsonl"))
            raise LoratuneError(f"{field}: unknown built-in dataset '{path}' (known: {', '.join(known)})")
        return builtin
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise LoratuneError(f"{field}: dataset file not found: {path}")
    return resolved


def load_rows(path: str, field: str) -> list[dict]:
    """Read a .jsonl/.json/.csv file with ``datasets`` into a list of rows."""
    import datasets

    file = resolve_data_path(path, field)
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(file.suffix.lower())
    if kind is None:
        raise LoratuneError(f"{field}: unsupported file type '{file.suffix}' for {path} (use .jsonl, .json or .csv)")
    if file.stat().st_size == 0:
        raise LoratuneError(f"{field}: dataset {path} is empty")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        rows = datasets.load_dataset(kind, data_files=str(file), split="train").to_list()
    except Exception as exc:  # datasets raises many types for unreadable files
        reason = first_line(exc)
        raise LoratuneError(f"{field}: cannot read {path}: {reason}") from None
    if not rows:
        raise LoratuneError(f"{field}: dataset {path} is empty")
    return rows


def detect_format(rows: list[dict], fmt: str, path: str) -> str:
    if fmt != "auto":
        return fmt
    columns = set(rows[0])
    for name, needed in FORMAT_FIELDS.items():
        if set(needed) <= columns:
            return name
    raise LoratuneError(
        f"{path}: cannot tell the data format from columns {sorted(columns)}; expected 'messages', "
        "'instruction'/'output' or 'prompt'/'completion'"
    )


def split_row(row: dict, fmt: str, system_prompt: str | None) -> tuple[list[dict], str]:
    """Return (prompt messages, response text). Raises KeyError/TypeError on a malformed row."""
    if fmt == "chat":
        messages = row["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise KeyError("the last message must have role 'assistant'")
        return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if fmt == "instruction":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return system + [{"role": "user", "content": user}], row["output"]
    return system + [{"role": "user", "content": row["prompt"]}], row["completion"]


def render(tokenizer, prompt: list[dict], response: str) -> tuple[str, str]:
    """Prompt and response text: the chat template where the model has one, plain text otherwise."""
    if tokenizer.chat_template:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt_text):
            return prompt_text, full[len(prompt_text):]
        return prompt_text, response + (tokenizer.eos_token or "")
    prompt_text = "".join(f"{m['content']}\n\n" for m in prompt)
    return prompt_text, response + (tokenizer.eos_token or "")


def tokenize_rows(tokenizer, rows: list[dict], cfg: DataConfig, path: str) -> list[Example]:
    fmt = detect_format(rows, cfg.format, path)
    examples = []
    for i, row in enumerate(rows):
        try:
            prompt, response = split_row(row, fmt, cfg.system_prompt)
            prompt_text, response_text = render(tokenizer, prompt, str(response))
        except (KeyError, TypeError, IndexError) as exc:
            raise LoratuneError(f"{path}: row {i + 1}: not in {fmt} form ({exc})") from None
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) >= cfg.max_length:
            raise LoratuneError(
                f"data.max_length: {cfg.max_length} tokens is shorter than the prompt of {path} row {i + 1} "
                f"({len(prompt_ids)} tokens)"
            )
        ids = (prompt_ids + response_ids)[: cfg.max_length]
        labels = ([IGNORE] * len(prompt_ids) + response_ids)[: cfg.max_length]
        examples.append(Example(ids, labels))
    return examples


def load_examples(tokenizer, cfg: DataConfig, seed: int) -> tuple[list[Example], list[Example]]:
    """Tokenized (train, validation) examples; the split is drawn from ``seed`` when there is no file."""
    rows = load_rows(cfg.path, "data.path")
    train = tokenize_rows(tokenizer, rows, cfg, cfg.path)
    if cfg.validation_path:
        val_rows = load_rows(cfg.validation_path, "data.validation_path")
        return train, tokenize_rows(tokenizer, val_rows, cfg, cfg.validation_path)
    n_val = int(cfg.validation_size) if cfg.validation_size >= 1 else round(cfg.validation_size * len(train))
    if n_val < 1 or n_val >= len(train):
        raise LoratuneError(
            f"data.validation_size: {cfg.validation_size} of {len(train)} examples leaves "
            f"{'no validation' if n_val < 1 else 'no training'} examples"
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)]


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
