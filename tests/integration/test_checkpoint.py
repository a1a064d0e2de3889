"""What is on disk is never damaged: a checkpoint is read and checked whole before anything is written,
``--overwrite`` replaces a study and nothing else, and every refused command leaves a study's directory
exactly as it was. The studies on disk are real ones (Ax and, for the module's study, the demo model's
fine-tunes), which is why this is not in tests/unit."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import fake_loss

from loratune import export_config, finetune, resume_optimization, run_optimization
from loratune.cli import main
from loratune.errors import LoratuneError

SPACE = {"lora_rank": [8, 16, 32, 64], "learning_rate": [1e-5, 5e-4]}


def fingerprint(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with a hash of its content."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, tiny_model) -> Path:
    """A finished fine-tune study (2 short trials on the demo model), copied by each test that edits it."""
    out = tmp_path_factory.mktemp("finished") / "study"
    run_optimization(num_trials=2, output_dir=out, quiet=True, search_space=SPACE, seed=0,
                     training={"epochs": 0.1, "eval_points": 1}, keep_adapters="all")
    return out


def edited_copy(study: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    data = json.loads((copy / "optimization_checkpoint.json").read_text())
    edit(data)
    (copy / "optimization_checkpoint.json").write_text(json.dumps(data))
    return copy


def refused(argv: list[str], capsys, code: int = 2) -> str:
    try:
        assert main(argv) == code
    except SystemExit as exit:  # refused by the argument parser
        assert exit.code == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["records"][0]["params"].update(lora_rank="banana"),
     "records[0].params: 'banana' is not one of lora_rank's values [8, 16, 32, 64]"),
    (lambda d: d["records"][1]["metrics"].update(loss="lots"), "records[1]: metrics.loss: expected a finite number, got 'lots'"),
    (lambda d: d["records"][1]["params"].update(lora_rank=8 if d["records"][1]["params"]["lora_rank"] != 8 else 64),
     "records[1]: trial 1 has parameters"),
    (lambda d: d["records"][0]["params"].update(dropout=0.1), "records[0].params: dropout is not a searched parameter"),
    (lambda d: d["records"][0].update(curve=[{"step": "one"}]), "records[0]: curve[0].step: expected an integer or a finite number, got 'one'"),
    (lambda d: d["records"].append(dict(d["records"][0])), "records[2]: trial 0 is recorded twice"),
    (lambda d: d.update(pack_limit=0), "pack_limit must be a positive integer or null, got 0"),
], ids=["param", "metric", "params-differ-from-ax", "unknown-param", "curve", "twice", "pack-limit"])
def test_a_hand_edited_checkpoint_is_refused_naming_the_file_and_record_before_anything_is_written(
        finished_study, tmp_path, capsys, edit, message):
    copy = edited_copy(finished_study, tmp_path, edit)
    before = fingerprint(copy)
    err = refused(["resume", str(copy), "--trials", "1", "--quiet"], capsys)
    assert err.startswith(f"error: {copy / 'optimization_checkpoint.json'}: ") and message in err, err
    assert fingerprint(copy) == before  # nothing rewritten: not the results, not the checkpoint


def test_every_refused_command_leaves_the_study_as_it_was(finished_study, tmp_path, capsys):
    study = tmp_path / "study"
    shutil.copytree(finished_study, study)
    (tmp_path / "bad.yaml").write_text("trials: 2\nlora: {rnak: 8}\n")
    (tmp_path / "exists.yaml").write_text("mine: true\n")
    before = fingerprint(study)
    for argv in [
        ["optimize", "--output", str(study), "--trials", "2"],  # holds a study
        ["optimize", "--output", str(study), "--overwrite", "--config", str(tmp_path / "bad.yaml")],
        ["optimize", "--output", str(study), "--overwrite", "--set", "lora.rank=1000000000000"],
        ["resume", str(study), "--set", "seed=5"],
        ["resume", str(study), "--set", "workers=0"],
        ["finetune", "--config", str(study / "best_config.yaml"), "--output-dir", str(study / "trials" / "0")],
        ["finetune", "--config", str(study / "best_config.yaml"), "--set", "training.learning_rate=-1"],
        ["report", str(study), "--contour", "lora_rank"],
        ["compare", str(study), "--epochs", "-1"],
        ["export", str(study), "--trial", "99", "--output", str(tmp_path / "other.yaml")],
        ["export", str(study), "--trial", "0", "--output", str(tmp_path / "exists.yaml")],
    ]:
        refused(argv, capsys)
        assert fingerprint(study) == before, argv
    assert (tmp_path / "exists.yaml").read_text() == "mine: true\n"
    assert refused(["resume", str(study), "--set", "seed=5"], capsys).startswith(
        "error: --set: seed: cannot change when a study resumes")


def test_overwrite_replaces_a_study_but_never_files_no_study_wrote(tmp_path, capsys):
    own = tmp_path / "own"
    own.mkdir()
    (own / "optimization_results.json").write_text('{"my": "results"}\n')
    (own / "best_config.yaml").write_text("learning_rate: 1\n")
    before = fingerprint(own)
    err = refused(["optimize", "--output", str(own), "--overwrite", "--trials", "1"], capsys)
    assert err == (f"error: --output: {own} holds optimization_results.json, best_config.yaml, which no loratune study "
                   "wrote, and a study would replace them (--overwrite too); move them, or choose another --output")
    assert fingerprint(own) == before
    # a study's own files, and its folders, are replaced
    study = tmp_path / "study"
    run_optimization(num_trials=2, output_dir=study, evaluate=fake_loss, search_space=SPACE, quiet=True)
    (study / "best_model").mkdir()  # a retrained model is the user's: it stays
    again = run_optimization(num_trials=3, output_dir=study, evaluate=fake_loss, search_space=SPACE, quiet=True,
                             overwrite=True)
    assert len(again["trials"]) == 3 and (study / "best_model").is_dir()


@pytest.mark.parametrize(("call", "message"), [
    (lambda: run_optimization(num_trials=1, output_dir=12345, evaluate=fake_loss),
     "output_dir: expected a path (a string or os.PathLike), got int 12345"),
    (lambda: run_optimization(num_trials=1, evaluate=fake_loss, quiet="yes"), "quiet: expected True or False, got str 'yes'"),
    (lambda: run_optimization(num_trials=1, evaluate=fake_loss, overwrite=1), "overwrite: expected True or False, got int 1"),
    (lambda: resume_optimization(checkpoint=None), "checkpoint: expected a path (a string or os.PathLike), got NoneType"),
    (lambda: finetune(42), "config: expected a path (a string or os.PathLike), got int 42"),
    (lambda: export_config("configs", trial="3", path="x.yaml"), "trial: expected a trial index (an integer), got '3'"),
])
def test_every_argument_of_the_api_is_checked_like_its_yaml_field(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoratuneError) as err:
        call()
    assert str(err.value).startswith(message)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.csv", "prompt,completion\n", "d.csv has no rows (only a header)"),
    ("d.jsonl", "\n  \n", "d.jsonl has no rows"),
    ("d.json", "[]", "d.json has no rows"),
    ("d.json", '[{"prompt": "a", "completion": "b"}, 5]', "element 2 of the list is int, not a JSON object (a row)"),
])
def test_data_without_rows_is_said_in_the_users_words(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    err = refused(["optimize", "--output", str(tmp_path / "study"), "--data", str(tmp_path / name)], capsys)
    assert message in err and "Instruction" not in err and not (tmp_path / "study").exists()


@pytest.mark.parametrize(("config", "message"), [
    ("", "c.yaml: holds no settings (the file is empty or only comments)"),
    ("# nothing here\n", "c.yaml: holds no settings"),
    ("lora: {rank: 1000000000000}\n", "c.yaml: lora.rank: 1000000000000 is above the model's hidden size (128)"),
    ("search_space: {lora_rank: [8, 256]}\n", "c.yaml: search_space.lora_rank: 256 is above the model's hidden size"),
    ("data: {max_length: 100000}\n", "c.yaml: data.max_length: 100000 tokens is longer than the model's positions reach (1024"),
    ("constraints: ['lora_rank * batch_size <= 1']\n",
     "c.yaml: constraints[0]: 'lora_rank * batch_size <= 1': no point of the search space satisfies it"),
])
def test_empty_or_absurd_configs_are_refused(tiny_model, tmp_path, capsys, config, message):
    (tmp_path / "c.yaml").write_text(config)
    err = refused(["optimize", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "study")], capsys)
    assert message in err, err
    assert not (tmp_path / "study").exists()
