"""Data as users have it: parquet files, datasets saved with save_to_disk, hub datasets (from the local
cache, as an earlier online load leaves it), other column names."""

import json
import shutil
import time

import pytest

from loratune.config import DataConfig
from loratune.data import load_examples
from loratune.errors import LoratuneError

TRAIN = [{"question": f"Scene {i}: a lone man says goodbye.", "answer": f"Plan {i}: a single close-up."} for i in range(6)]
TEST = [{"question": "Scene 9: rain at night.", "answer": "Plan 9: low key light."}]
COLUMNS = {"prompt": "question", "completion": "answer"}


def decoded(tokenizer, examples) -> list[str]:
    return [tokenizer.decode(e.input_ids) for e in examples]


def cache_hub_dataset(cache, repo_id: str, splits: dict, config: str = "default"):
    """Write the datasets cache the way `load_dataset(repo_id)` leaves it after an online load."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, rows in splits.items():
        files[split] = str(cache / f"{split}.jsonl")
        (cache / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = repo_id.split("/")[-1]
    builder = Json(cache_dir=str(cache / "build"), dataset_name=name, config_name=config, data_files=files)
    builder.download_and_prepare()
    target = cache / repo_id.replace("/", "___") / config / "0.0.0" / "0123abcd"
    target.mkdir(parents=True)
    for f in (cache / "build").rglob("*"):
        if f.suffix == ".arrow" or f.name == "dataset_info.json":
            shutil.move(str(f), target / f.name)
    assert datasets.config.HF_HUB_OFFLINE  # the tests never reach the hub (conftest sets HF_HUB_OFFLINE)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf_datasets"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_a_parquet_file_with_its_own_column_names(tokenizer, tmp_path):
    import datasets

    path = tmp_path / "scenes.parquet"
    datasets.Dataset.from_list(TRAIN).to_parquet(str(path))
    train, val = load_examples(tokenizer, DataConfig(path=str(path), columns=COLUMNS, validation_size=2), seed=0)
    assert (len(train), len(val)) == (4, 2)
    assert any("Scene 0: a lone man says goodbye." in text and "Plan 0: a single close-up." in text
               for text in decoded(tokenizer, train + val))


def test_a_dataset_saved_to_disk_with_its_splits(tokenizer, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(TRAIN), "test": datasets.Dataset.from_list(TEST)}) \
        .save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(path=str(tmp_path / "saved"), columns=COLUMNS, validation_split="test")
    train, val = load_examples(tokenizer, cfg, seed=0)
    assert len(train) == 6 and len(val) == 1 and "rain at night" in decoded(tokenizer, val)[0]
    with pytest.raises(LoratuneError, match=r"data.split: .*saved has no split 'training' \(it has train, test\)"):
        load_examples(tokenizer, DataConfig(path=str(tmp_path / "saved"), columns=COLUMNS, split="training"), seed=0)


def test_a_hub_dataset_from_the_local_cache(tokenizer, hub_cache):
    cache_hub_dataset(hub_cache, "acme/scenes", {"train": TRAIN, "test": TEST})
    cfg = DataConfig(path="acme/scenes", columns=COLUMNS, validation_split="test")
    train, val = load_examples(tokenizer, cfg, seed=0)
    assert len(train) == 6 and "rain at night" in decoded(tokenizer, val)[0]


def test_a_hub_dataset_subset(tokenizer, hub_cache):
    cache_hub_dataset(hub_cache, "acme/scenes", {"train": TRAIN[:3]}, config="night")
    train, val = load_examples(tokenizer, DataConfig(path="acme/scenes", subset="night", columns=COLUMNS,
                                                     validation_size=1), seed=0)
    assert len(train) + len(val) == 3


@pytest.mark.parametrize(("cfg", "message"), [
    (DataConfig(path="acme/no-such-set"),
     "data.path: 'acme/no-such-set' is not a local file or directory, and not a dataset found in the local"),
    (DataConfig(path="acme/scenes", columns={"prompt": "question", "completion": "reply"}),
     "data.columns.completion: acme/scenes has no column 'reply' (it has question, answer)"),
    (DataConfig(path="acme/scenes", columns={"answer": "answer"}), "data.columns: 'answer' is not a column loratune reads"),
    (DataConfig(path="acme/scenes", columns=COLUMNS, validation_split="dev"), "data.validation_split: acme/scenes has no split 'dev'"),
])
def test_hub_dataset_mistakes_are_one_line_at_once(tokenizer, hub_cache, cfg, message):
    cache_hub_dataset(hub_cache, "acme/scenes", {"train": TRAIN, "test": TEST})
    started = time.monotonic()
    with pytest.raises(LoratuneError) as err:
        load_examples(tokenizer, cfg, seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - started < 30  # no minute of retries
