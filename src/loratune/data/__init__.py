"""Data: rows as users have them (``sources``) -> conversations and their tokens (``chat``) -> the three
splits a study keeps apart: training (trials learn), validation (the search chooses), test (only the final
test reads it) -> batches (``batching``).
"""

from __future__ import annotations

import random

from ..config import DEMO_TEST, DEMO_TRAIN, DEMO_VALIDATION, DataConfig
from ..errors import LoratuneError
from .chat import Example, detect_format, rename_columns, tokenize_by_row, tokenize_rows
from .sources import load_rows


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
