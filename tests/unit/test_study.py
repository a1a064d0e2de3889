"""What a study refuses before its first trial: a checkpoint that is not one, a locked output directory, a
budget of no trials, a command's unknown placeholder. The study loop itself, on a real Ax search, is in
tests/integration/test_study_loop.py."""

import pytest
from conftest import fake_loss

from loratune import run_optimization
from loratune.checkpoint import load as load_checkpoint
from loratune.errors import LoratuneError

SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128], "learning_rate": [1e-5, 5e-4],
         "batch_size": [1, 2, 4]}


def optimize(tmp_path, trials=6, **kwargs):
    kwargs.setdefault("evaluate", fake_loss)
    kwargs.setdefault("search_space", SPACE)
    return run_optimization(num_trials=trials, output_dir=tmp_path / "study", seed=kwargs.pop("seed", 0),
                            quiet=True, report=False, **kwargs)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "checkpoint is corrupted"),
    ('{"format": "something-else"}', "not a loratune checkpoint"),
    ('{"format": "loratune-study", "version": 99}', "checkpoint version 99 is not supported"),
])
def test_corrupted_or_foreign_checkpoint(tmp_path, content, message):
    path = tmp_path / "optimization_checkpoint.json"
    path.write_text(content)
    with pytest.raises(LoratuneError, match=message):
        load_checkpoint(path)


def test_a_locked_output_directory_is_refused(tmp_path):
    from loratune.storage import DirectoryLock

    with DirectoryLock(tmp_path / "study"), pytest.raises(LoratuneError, match="another loratune run is using"):
        optimize(tmp_path, trials=2)
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == [".loratune.lock"]  # nothing of a study written


@pytest.mark.parametrize("trials", [0, -3])
def test_non_positive_trials(tmp_path, trials):
    with pytest.raises(LoratuneError, match="num_trials: trials: must be at least 1"):
        optimize(tmp_path, trials=trials)


def test_command_with_an_unknown_placeholder(tmp_path):
    with pytest.raises(LoratuneError, match=r"--command: placeholder \{lr\} is not a searched parameter"):
        run_optimization(num_trials=2, output_dir=tmp_path, command="python train.py --lr {lr}", quiet=True)
