"""A study that can measure little says so before its first trial, one line each, and runs all the same:
a validation split of one or two examples; answers whose end of turn ``data.max_length`` cuts off."""

import json
import re

from conftest import cli, write_jsonl

from loratune import preflight
from loratune.data.chat import tokenize_rows
from loratune.model import load_tokenizer
from loratune.search_space import study_space
from loratune.settings import load_study_config

SHORT = [{"prompt": f"Scene {i}: a lone man says goodbye.", "completion": f"Plan {i}: a close-up."} for i in range(10)]
LONG = [{"prompt": f"Scene {i}: rain.", "completion": f"Plan {i}: " + "a slow push in, then a hold, " * 6 + "cut."}
        for i in range(10, 20)]


def warnings(tmp_path, rows, *sets, validation=None):
    """The warnings the checks before a study give for ``rows`` as data and ``sets`` as --set."""
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    overrides = [("data.path", str(data), "--data"), ("data.validation_path", None, "--data")]
    if validation is not None:
        overrides.append(("data.validation_path", str(write_jsonl(tmp_path / "v.jsonl", validation)), "--set"))
    for text in sets:
        name, value = text.split("=", 1)
        overrides.append((name, json.loads(value), "--set"))
    cfg, origin = load_study_config(None, overrides)
    return preflight.check_training_inputs(cfg.base(), study_space(cfg), origin)


def full_length(row) -> int:
    """The tokens of a row's conversation, none cut (its rendered text ends "<|im_end|>\\n")."""
    cfg, _ = load_study_config(None, [("data.max_length", 4096, "--set")])
    tokenizer = load_tokenizer(cfg.base())
    (example,) = tokenize_rows(tokenizer, [row], cfg.base().data, "row")
    return len(example)


def test_a_validation_split_of_one_or_two_examples_is_one_warning(tiny_model, tmp_path):
    assert warnings(tmp_path, SHORT, "data.validation_size=2") == [
        "--set: data.validation_size: the validation split holds 2 examples: a trial's validation loss rests on so "
        "few that trials can hardly be told apart; give it more rows"]
    assert warnings(tmp_path, SHORT, validation=SHORT[:1]) == [
        "--set: data.validation_path: the validation split holds 1 example: a trial's validation loss rests on so "
        "few that trials can hardly be told apart; give it more rows"]
    assert warnings(tmp_path, SHORT, "data.validation_size=3") == []


def test_a_single_fine_tune_is_warned_of_its_own_loss_not_of_trials(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", LONG[:6])
    cfg, origin = load_study_config(None, [("data.path", str(data), "--data"), ("data.validation_path", None, "--data"),
                                           ("data.validation_size", 2, "--set"), ("data.max_length", 40, "--set")])
    lines = preflight.data_warnings(cfg.base(), *preflight.load_checked_data(cfg.base()), origin=origin, study=False)
    assert lines[0] == ("--set: data.validation_size: the validation split holds 2 examples: the validation loss rests "
                        "on so few that it says little about the adapter; give it more rows")
    assert lines[1].endswith("so the model never learns where an answer ends; raise it to "
                             f"{max(full_length(r) for r in LONG[:6]) - 1} to keep every answer's end")
    assert not any("trial" in line for line in lines)


def test_answers_whose_end_max_length_cuts_off_are_one_warning_with_how_many(tiny_model, tmp_path):
    short, long = max(full_length(r) for r in SHORT), max(full_length(r) for r in LONG)
    assert short + 10 < long
    # the line break after the end of turn is not trained: cutting it alone cuts no answer's end
    assert warnings(tmp_path, SHORT + LONG, "data.validation_size=5", f"data.max_length={long - 1}") == []
    every = warnings(tmp_path, LONG, "data.validation_size=5", f"data.max_length={long - 2}")
    assert len(every) == 1 and every[0].startswith(f"--set: data.max_length: {long - 2} tokens cuts off the answer's "
                                                  "end (its end of turn) in ")
    assert every[0].endswith(f"so no trial learns where an answer ends; raise it to {long - 1} to keep every "
                             "answer's end")
    # the long half of the rows is cut; the short half keeps its end
    (some,) = warnings(tmp_path, SHORT + LONG, "data.validation_size=5", f"data.max_length={short + 2}")
    counts = re.search(r"in (\d+) of (\d+) training and (\d+) of (\d+) validation examples;", some)
    cut_train, n_train, cut_validation, n_validation = map(int, counts.groups())
    assert (cut_train + cut_validation, n_train, n_validation, "no trial learns" in some) == (10, 15, 5, False)
    # a searched max_length is checked at its smallest value, named where it is searched
    (searched,) = warnings(tmp_path, SHORT + LONG, "data.validation_size=5", f"data.max_length={long}",
                           f'search_space={{"max_length": [{short + 2}, {long}]}}')
    assert searched.startswith(f"--set: search_space.max_length: {short + 2} tokens cuts off the answer's end")


def test_the_cli_prints_both_warnings_before_the_first_trial_and_the_study_runs(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", LONG[:6])
    proc = cli("-m", "loratune.cli", "optimize", "--data", str(data), "--trials", "1", "--output", str(tmp_path / "study"),
               "--no-report", "--set", "data.validation_size=2", "--set", "data.max_length=40",
               "--set", "training.epochs=0.5", "--set", "scoring.subset=0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("warning: ")]
    assert [lines[i].split(":", 3)[2].strip() for i in warned] == ["data.validation_size", "data.max_length"]
    assert "4 of 4 training and 2 of 2 validation examples, so no trial learns where an answer ends" in lines[warned[1]]
    first_trial = next(i for i, line in enumerate(lines) if "trial #0" in line or line.startswith("Trial 1/1"))
    assert max(warned) < first_trial
    trials = json.loads((tmp_path / "study" / "optimization_results.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["completed"]


def test_the_raise_to_figure_stops_where_the_models_positions_reach(tiny_model, tmp_path, monkeypatch):
    long = max(full_length(r) for r in LONG)
    monkeypatch.setattr(preflight, "_context", lambda cfg: long - 4)  # a model whose positions end before the answers
    (below,) = warnings(tmp_path, LONG, "data.validation_size=5", f"data.max_length={long - 8}")
    assert below.endswith(f"; raise it to {long - 4}, as far as the model's positions reach, and shorten the examples "
                          f"whose answer ends beyond {long - 4} tokens (the longest at {long - 1})")
    (at_the_end,) = warnings(tmp_path, LONG, "data.validation_size=5", f"data.max_length={long - 4}")
    assert at_the_end.endswith(f"; the model's positions reach no further: shorten the examples whose answer ends "
                               f"beyond {long - 4} tokens (the longest at {long - 1})")


def test_a_finetune_prints_the_same_warnings_before_it_trains(tiny_model, tmp_path, capsys):
    from loratune import finetune

    data = write_jsonl(tmp_path / "d.jsonl", LONG[:6])
    config = tmp_path / "ft.yaml"
    config.write_text(f"data: {{path: {data}, validation_size: 2, max_length: 40}}\n"
                      f"training: {{epochs: 0.5}}\noutput_dir: {tmp_path / 'run'}\n")
    assert finetune(config, quiet=False)["steps"] > 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert [line.split(":", 3)[2].strip() for line in err] == ["data.validation_size", "data.max_length"]
    assert err[0].startswith(f"warning: {config}: data.validation_size: the validation split holds 2 examples")
    assert "4 of 4 training and 2 of 2 validation examples" in err[1]
