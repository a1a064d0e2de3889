import argparse
import copy
import dataclasses
import re
import typing
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from loratune.config import FinetuneConfig, StudyConfig
from loratune.errors import LoratuneError
from loratune.settings import load_finetune_config, load_study_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_demo():
    """With nothing set, a fine-tune is the shipped demo's (configs/demo_finetune.yaml: the offline tiny model on the
    AI Director data, validated on the demo's own split) with Module 4's hand-picked baseline hyperparameters
    (configs/baseline_qwen2.5-7b.yaml)."""
    from loratune.data import _validation_path, test_source

    default = FinetuneConfig()
    demo = load_finetune_config(ROOT / "configs" / "demo_finetune.yaml")[0]
    assert (default.model, default.lora, default.training) == (demo.model, demo.lora, demo.training)
    assert replace(demo.data, validation_path=None) == default.data  # the demo file names the split the default finds
    assert _validation_path(default.data) == demo.data.validation_path == "builtin:ai_director_validation"
    assert test_source(default.data) == "builtin:ai_director_test"
    module4 = load_finetune_config(ROOT / "configs" / "baseline_qwen2.5-7b.yaml")[0]
    hyperparameters = lambda c: (c.lora.rank, c.lora.alpha, c.training.learning_rate, c.training.batch_size)  # noqa: E731
    assert hyperparameters(default) == hyperparameters(module4)


def test_load_reads_nested_fields_and_yaml_1_1_floats(tmp_path):
    cfg = load_finetune_config(write(tmp_path, "lora: {rank: 8}\ntraining:\n  learning_rate: 3e-4\n  epochs: 0.5\n"))[0]
    assert cfg.lora.rank == 8
    assert cfg.training.learning_rate == pytest.approx(3e-4)  # YAML reads "3e-4" as a string
    assert cfg.training.epochs == 0.5


@pytest.mark.parametrize(("text", "message"), [
    ("lora: {rnak: 8}\n", "cfg.yaml: lora: unknown field 'rnak' (did you mean 'rank'?)"),
    ("trainig: {epochs: 1}\n", "unknown field 'trainig' (did you mean 'training'?)"),
    ("lora: {rank: eight}\n", "cfg.yaml: lora.rank: expected an integer, got 'eight'"),
    ("training: {learning_rate: 0}\n", "cfg.yaml: training.learning_rate: must be > 0, got 0.0"),
    ("lora: {rank: 0}\n", "cfg.yaml: lora.rank: must be a positive integer, got 0"),
    ("model: {quantization: 3bit}\n", "model.quantization: expected 'none' or '4bit' or '8bit', got '3bit'"),
    ("training: {gradient_accumulation: some}\n", "training.gradient_accumulation: expected an integer or 'auto'"),
    ("lora: [1, 2]\n", "cfg.yaml: lora: expected a mapping, got list"),
    ("lora: {target_modules: [q_proj, 7]}\n", "cfg.yaml: lora.target_modules[1]: expected a string, got 7"),
    ("- just\n- a list\n", "expected a mapping of settings at the top level"),
    ("lora: {rank: 8\n", "cfg.yaml:2:1: invalid YAML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(LoratuneError) as err:
        load_finetune_config(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(LoratuneError, match="nope.yaml: config file not found"):
        load_finetune_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "message"), [
    ("trials: 0\n", "trials: must be at least 1"),
    ("objectives: [loss, speed]\nminimize: [true, true]\n", "unknown field 'speed'"),
    ("objectives: [loss, inference_time]\nminimize: [true]\n", "minimize: needs one flag per objective (2)"),
    ("early_stopping: {check_at: 1.5}\n", "early_stopping.check_at: must be in (0, 1]"),
    ("early_stopping: {treshold: 0.7}\n", "did you mean 'threshold'"),
    ("early_stopping: {threshold: basline}\n", "early_stopping.threshold: expected a finite number or 'baseline'"),
    ("baseline: false\nearly_stopping: {threshold: baseline}\n", "'baseline' compares with the baseline trial"),
])
def test_bad_study_config(tmp_path, text, message):
    with pytest.raises(LoratuneError) as err:
        load_study_config(write(tmp_path, text))[0]
    assert message in str(err.value)


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python "), f"{path.name} must begin with the command that runs it"
        if "optimization" in path.name:
            load_study_config(path)[0]
        else:
            load_finetune_config(path)


def test_shipped_optimization_config_is_the_embedded_default():
    shipped = load_study_config(ROOT / "configs" / "optimization_config.yaml")[0]
    assert shipped == StudyConfig()


def test_the_docs_config_reference_and_options_are_the_schema():
    """Every field of every section, with its default and docstring, and every option: generated into the
    documentation pages (docs/config.md, docs/commands.md), so never out of date."""
    import sys

    sys.path.insert(0, str(ROOT / "docs"))
    from config_reference import CONFIG_PAGE, END, OPTIONS_END, OPTIONS_PAGE, OPTIONS_START, START

    from loratune import config
    from loratune.cli import options_markdown

    assert CONFIG_PAGE == ROOT / "docs" / "config.md" and OPTIONS_PAGE == ROOT / "docs" / "commands.md"
    section = CONFIG_PAGE.read_text().split(START)[1].split(END)[0].strip()
    assert section == config.reference_markdown().strip(), "run `make docs`"
    options = OPTIONS_PAGE.read_text().split(OPTIONS_START)[1].split(OPTIONS_END)[0].strip()
    assert options == options_markdown().strip(), "run `make docs`"
    sections = {}
    for cls in (config.StudyConfig, config.ModelConfig, config.LoraConfig, config.DataConfig, config.TrainingConfig,
                config.EarlyStoppingConfig, config.ScoringConfig, config.FinetuneConfig):
        docs, hints = config.field_docs(cls), typing.get_type_hints(cls)  # the types, not the strings of annotations
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                sections.setdefault(cls.__name__, []).append(f.name)  # a section: a table of its own, not a row
                assert re.search(rf"^\*\*`{f.name}`(\*\*| \()", section, re.M), f"{cls.__name__}.{f.name} has no table"
            else:
                assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
                assert f"| `{f.name}` |" in section, f"{cls.__name__}.{f.name} is not in the reference"
    assert sections == {"StudyConfig": ["early_stopping", "scoring", "model", "lora", "data", "training"],
                        "FinetuneConfig": ["model", "lora", "data", "training"]}


RESUMABLE = {"workers", "gpus_per_trial", "gpus", "executor", "ray_address", "shared_dir", "reuse_model", "pack",
             "trials_per_worker", "max_failures_in_a_row", "keep_adapters", "retrain_epochs", "report", "tracking",
             "tracking_uri", "tracking_experiment", "trial_timeout"}  # how trials run and where their results go
RESUME_FLAGS = {"--workers", "--gpus-per-trial", "--gpus", "--executor", "--ray-address", "--shared-dir",
                "--no-reuse-model", "--pack", "--no-report", "--tracking", "--tracking-uri", "--trial-timeout"}
FIXED_FLAGS = {"--seed": "1", "--parameterization": "lora", "--warm-start": "runs/v1", "--command": "python t.py"}


def resume_options() -> set[str]:
    from loratune.cli import build_parser

    parser = build_parser()._subparsers._group_actions[0].choices["resume"]
    return {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


def test_the_resume_policy_is_each_fields_own_and_every_command_follows_it(capsys, monkeypatch):
    """How trials run may change on resume, what they measure may not: each study field says which, and
    `loratune resume`, `ax_optimization.py --resume` and `resume_optimization` all ask the same function."""
    import ax_optimization
    from loratune.rules import may_change_on_resume

    assert {f.name for f in dataclasses.fields(StudyConfig) if may_change_on_resume(f.name)} == RESUMABLE
    for fixed in ("trials", "seed", "command", "objectives", "search_space", "warm_start", "model", "model.name",
                  "training.learning_rate", "early_stopping.threshold", "scoring.scores", "no_such_field"):
        assert not may_change_on_resume(fixed), fixed
    assert may_change_on_resume("executor") and may_change_on_resume("ray_address")  # where trials run, not what
    assert resume_options() == RESUME_FLAGS | {"--trials", "--set", "--quiet"}  # --trials: the additional ones
    for flag, value in FIXED_FLAGS.items():
        assert ax_optimization.main(["--resume", "nowhere.json", flag, value]) == 2
        assert f"error: {flag}: cannot change when a study resumes" in capsys.readouterr().err
    assert ax_optimization.main(["--resume", "nowhere.json", "--workers", "2"]) == 2  # taken: on to the checkpoint
    assert capsys.readouterr().err.strip() == "error: nowhere.json: checkpoint not found"

    # the field's own word is the whole policy: a field that said otherwise would be followed by every command
    seed = StudyConfig.__dataclass_fields__["seed"]
    changed = copy.copy(seed)
    changed.metadata = MappingProxyType({**seed.metadata, "resume": True})
    monkeypatch.setitem(StudyConfig.__dataclass_fields__, "seed", changed)
    assert may_change_on_resume("seed") and "--seed" in resume_options()
    assert ax_optimization.main(["--resume", "nowhere.json", "--seed", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: nowhere.json: checkpoint not found"


def test_a_flags_help_is_its_fields_own_words():
    """--help, the options table and the config reference say the same of each flag (a switch that turns a
    true default off says what the switch does): a help line written beside the docstring would drift."""
    import dataclasses

    from loratune.cli import add_optimize_arguments
    from loratune.config import StudyConfig, field_docs

    parser = argparse.ArgumentParser()
    add_optimize_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    docs = field_docs(StudyConfig)
    flagged = [f for f in dataclasses.fields(StudyConfig) if f.metadata.get("flag")]
    assert len(flagged) > 10
    for f in flagged:
        if f.metadata["flag"].startswith("--no-"):
            assert f.metadata["help"] and helps[f.name] == f.metadata["help"]
            continue
        words = docs[f.name].replace("``", "")
        assert words.lower().startswith(helps[f.name].lower()), (f.name, helps[f.name], words)


def test_a_record_is_checked_by_the_builder_of_the_settings_naming_the_value_inside():
    from loratune.trial import TrialRecord, TrialState

    ok = {"index": 3, "params": {"lr": 1e-4}, "state": "completed", "metrics": {"loss": 1, "bleu": None},
          "curve": [{"step": 2, "progress": 0.5, "val_loss": 1.25}], "from_a_later_version": 1}
    record = TrialRecord.from_dict(ok, "f.json: records[3]")
    assert (record.state, record.metrics) == (TrialState.COMPLETED, {"loss": 1.0})  # a null metric is no metric
    assert [type(v) for v in record.curve[0].values()] == [int, float, float]  # each number keeps its type
    for edit, message in [
        ({"index": -1}, "index: expected a non-negative integer, got -1"),
        ({"index": True}, "index: expected an integer, got True"),
        ({"state": "done"}, "state: expected 'queued' or 'running' or 'completed'"),
        ({"metrics": {"loss": "low"}}, "metrics.loss: expected a finite number, got 'low'"),
        ({"curve": [{"step": 1}, {"val_loss": "nan"}]}, "curve[1].val_loss: expected an integer or a finite number, got 'nan'"),
        ({"duration_s": float("inf")}, "duration_s: expected a finite number, got inf"),
    ]:
        with pytest.raises(LoratuneError) as err:
            TrialRecord.from_dict({**ok, **edit}, "f.json: records[3]")
        assert str(err.value).startswith(f"f.json: records[3]: {message}"), err.value
    with pytest.raises(LoratuneError, match=r"^f.json: records\[3\]: missing 'params'$"):
        TrialRecord.from_dict({"index": 3, "state": "completed"}, "f.json: records[3]")


def test_a_trial_result_is_checked_by_the_builder_and_names_its_file():
    """A worker's ``result.json`` is read through the settings' builder, as a record is: a missing
    ``state`` or a wrong value inside says which, in which file; a field of a later version is left out."""
    from loratune.trial import TrialResult, TrialState

    where = "trials/3/result.json"
    with pytest.raises(LoratuneError, match=r"^trials/3/result.json: missing 'state'$"):
        TrialResult.from_dict({"metrics": {"loss": 0.5}}, where)
    with pytest.raises(LoratuneError, match=r"^trials/3/result.json: curve\[0\]\.val_loss: expected .*got 'x'$"):
        TrialResult.from_dict({"state": "completed", "curve": [{"val_loss": "x"}]}, where)
    with pytest.raises(LoratuneError, match=r"^trials/3/result.json: state: expected 'queued' or .*got 'done'$"):
        TrialResult.from_dict({"state": "done"}, where)
    result = TrialResult.from_dict({"state": "completed", "metrics": {"loss": None}, "later": 1}, where)
    assert result.state is TrialState.COMPLETED and result.metrics == {"loss": None}  # a non-finite loss, as stored
