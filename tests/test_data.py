import json

import pytest
from conftest import write_jsonl

from loratune.config import DataConfig
from loratune.data import (
    IGNORE,
    length_grouped_batches,
    load_examples,
    padding_fraction,
    tokenize_rows,
)
from loratune.demo import dataset
from loratune.errors import LoratuneError

CHAT = {"messages": [{"role": "user", "content": "A lone man says goodbye."},
                     {"role": "assistant", "content": "Framing: a single close-up."}]}
INSTRUCTION = {"instruction": "A lone man says goodbye.", "input": "", "output": "Framing: a single close-up."}
COMPLETION = {"prompt": "A lone man says goodbye.", "completion": "Framing: a single close-up."}


def response_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])


@pytest.mark.parametrize("row", [CHAT, INSTRUCTION, COMPLETION], ids=["chat", "instruction", "completion"])
def test_each_format_masks_everything_but_the_response(tokenizer, tmp_path, row):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (ex,) = tokenize_rows(tokenizer, [row], DataConfig(path=str(path)), str(path))
    # the loss sees exactly the assistant's answer and the end-of-turn token, nothing of the prompt
    assert response_text(tokenizer, ex) == "Framing: a single close-up.<|im_end|>\n"
    n_prompt = ex.labels.index(next(label for label in ex.labels if label != IGNORE))
    prompt = tokenizer.decode(ex.input_ids[:n_prompt])
    assert prompt.endswith("<|im_start|>assistant\n") and "A lone man says goodbye." in prompt


def test_json_and_csv_files_load(tokenizer, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([COMPLETION] * 5))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "hello,world\n" * 5)
    for name in ("d.json", "d.csv"):
        train, val = load_examples(tokenizer, DataConfig(path=str(tmp_path / name), validation_path=None,
                                                         validation_size=0.2), seed=0)
        assert (len(train), len(val)) == (4, 1)


def test_validation_split_is_deterministic_from_the_seed(tokenizer, tmp_path):
    rows = [{"prompt": f"scene {i}", "completion": f"plan {i}"} for i in range(30)]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), validation_path=None, validation_size=6)
    a, b, c = (load_examples(tokenizer, cfg, seed) for seed in (1, 1, 2))
    assert [e.input_ids for e in a[1]] == [e.input_ids for e in b[1]]
    assert [e.input_ids for e in a[1]] != [e.input_ids for e in c[1]]
    assert len(a[0]) == 24 and len(a[1]) == 6


@pytest.mark.parametrize(("setup", "message"), [
    (lambda p: None, "data.path: dataset file not found"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: write_jsonl(p, [{"text": "x"}]), "cannot tell the data format from columns ['text']"),
    (lambda p: p.write_text("{not json\n"), "data.path: cannot read"),
])
def test_bad_datasets(tokenizer, tmp_path, setup, message):
    path = tmp_path / "d.jsonl"
    setup(path)
    with pytest.raises(LoratuneError, match=None) as err:
        load_examples(tokenizer, DataConfig(path=str(path), validation_path=None), seed=0)
    assert message in str(err.value)


def test_row_without_expected_fields_is_named(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(LoratuneError, match=r"d.jsonl: row 2: not in chat form"):
        load_examples(tokenizer, DataConfig(path=str(path), validation_path=None, validation_size=1), seed=0)


def test_split_that_leaves_no_validation_examples(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [COMPLETION] * 3)
    with pytest.raises(LoratuneError, match="data.validation_size: 0.1 of 3 examples leaves no validation examples"):
        load_examples(tokenizer, DataConfig(path=str(path), validation_path=None, validation_size=0.1), seed=0)


def test_max_length_shorter_than_the_prompt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [COMPLETION] * 3)
    with pytest.raises(LoratuneError, match=r"data.max_length: 8 tokens is shorter than the prompt of .*row 1"):
        load_examples(tokenizer, DataConfig(path=str(path), validation_path=None, validation_size=1, max_length=8), seed=0)


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    import random

    lengths = [random.Random(i).randint(20, 300) for i in range(200)]
    batches = length_grouped_batches(lengths, batch_size=4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    order = list(range(200))
    random.Random(0).shuffle(order)
    plain = [order[i:i + 4] for i in range(0, 200, 4)]
    assert padding_fraction(batches, lengths) < padding_fraction(plain, lengths) / 3


def test_shipped_demo_data_is_what_the_generator_makes():
    train, validation = dataset.generate()
    assert (len(train), len(validation)) == (148, 37)
    assert dataset.TRAIN_FILE.read_text() == "".join(json.dumps(r) + "\n" for r in train)
    assert dataset.VALIDATION_FILE.read_text() == "".join(json.dumps(r) + "\n" for r in validation)
