from pathlib import Path

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
    cfg = FinetuneConfig()
    assert cfg.model.name == "builtin:tiny-qwen2"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.training.learning_rate, cfg.training.batch_size) == (16, 32, 2e-4, 1)
    assert (cfg.training.warmup_ratio, cfg.training.weight_decay, cfg.training.optimizer) == (0.1, 0.01, "adamw")


def test_load_reads_nested_fields_and_yaml_1_1_floats(tmp_path):
    cfg = load_finetune_config(write(tmp_path, "lora: {rank: 8}\ntraining:\n  learning_rate: 3e-4\n  epochs: 0.5\n"))
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
    import dataclasses
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
    for cls in (config.StudyConfig, config.ModelConfig, config.LoraConfig, config.DataConfig, config.TrainingConfig,
                config.EarlyStoppingConfig, config.FinetuneConfig):
        docs = config.field_docs(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None) and f.name not in SECTIONS_AND_RULE:
                assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
                assert f"| `{f.name}` |" in section


SECTIONS_AND_RULE = ("model", "lora", "data", "training", "early_stopping", "scoring")


def test_the_resume_policy_is_each_fields_own_and_every_command_follows_it(capsys):
    """How trials run may change on resume, what they measure may not: each study field says which, and
    `loratune resume`, `ax_optimization.py --resume` and `resume_optimization` all ask the same function."""
    import dataclasses
    import typing

    import ax_optimization
    from loratune.cli import build_parser, study_flags
    from loratune.config import StudyConfig
    from loratune.settings import may_change_on_resume

    for f in dataclasses.fields(StudyConfig):
        assert may_change_on_resume(f.name) == bool(f.metadata.get("resume")), f.name
        if dataclasses.is_dataclass(StudyConfig.__dataclass_fields__[f.name].default_factory()
                                    if f.default_factory is not dataclasses.MISSING else None):
            assert not may_change_on_resume(f.name) and not may_change_on_resume(f"{f.name}.anything")
    assert may_change_on_resume("executor") and may_change_on_resume("ray_address")  # where trials run, not what
    assert not may_change_on_resume("seed") and not may_change_on_resume("command")
    resume = next(a for a in build_parser()._subparsers._group_actions[0].choices["resume"]._actions if a.dest == "workers")
    offered = {a.option_strings[0] for a in build_parser()._subparsers._group_actions[0].choices["resume"]._actions
               if a.option_strings and a.dest not in ("help", "trials", "assignments", "quiet")}
    assert resume and offered == {f.metadata["flag"] for f in study_flags(resuming=True)}
    for f in study_flags():
        if not f.metadata["resume"] and f.name != "trials":
            tp = typing.get_type_hints(StudyConfig)[f.name]
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
            value = [] if f.metadata["flag"].startswith("--no-") else [str(choices[0])] if choices else ["1"]
            assert ax_optimization.main(["--resume", "nowhere.json", f.metadata["flag"], *value]) == 2
            assert f"error: {f.metadata['flag']}: cannot change when a study resumes" in capsys.readouterr().err
