"""Bad input, as a careless user gives it, and the situations of public bug reports: each ends in one
`error:` line naming the problem and where (exit code 2, or a LoratuneError from the API), before
anything is deleted or started; every good input is run exactly as written."""

import errno
import json
import os
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, cli, fake_loss

from loratune import resume_optimization, run_optimization
from loratune.errors import LoratuneError, StudyAborted

SPACE = {"lora_rank": [8, 16, 32, 64], "learning_rate": [1e-5, 5e-4]}


def one_line(proc, *fragments, code=2):
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("[INFO")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def optimize_cli(tmp_path, *args, config_text=None):
    if config_text is not None:
        (tmp_path / "c.yaml").write_text(config_text)
        args = ("--config", str(tmp_path / "c.yaml"), *args)
    return cli(str(ROOT / "ax_optimization.py"), "--trials", "2", "--output", str(tmp_path / "study"), "--quiet",
                   *args, cwd=tmp_path)


@pytest.fixture
def earlier_study(tmp_path):
    """A finished study in tmp_path/study: whatever comes next must not lose it."""
    run_optimization(num_trials=2, output_dir=tmp_path / "study", evaluate=fake_loss, search_space=SPACE,
                     quiet=True, report=False)
    results = tmp_path / "study" / "optimization_results.json"
    return results, results.read_text(), listing(tmp_path / "study")


def listing(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns) for p in directory.rglob("*"))


# ---------------------------------------------------------------------------------------------
# Checks come before --overwrite deletes anything and before any trial starts


@pytest.mark.parametrize(("args", "config_text", "fragments"), [
    (["--seed", "-1"], None, ["--seed: must be in [0, 2**32)"]),
    (["--command", "/no/such/binary {lora_rank}"], None, ["--command: /no/such/binary: no such executable file"]),
    (["--command", "no-such-program-anywhere"], None, ["--command: no-such-program-anywhere: not found on PATH"]),
    (["--command", ""], None, ["--command: must be a command or null, not empty"]),
    ([], "search_space:\n  lora_rank: [8, 8.0, 16]\n", ["search_space.lora_rank: choice values repeat"]),
    ([], "search_space:\n  lora_rank: {low: 8.2, high: 8.7}\n", ["lora.rank is an integer, and 8.2 is not"]),
    ([], "search_space:\n  lora_rank: [8, 16.5]\n", ["search_space.lora_rank: lora.rank is an integer, and 16.5 is not"]),
    ([], "training: {epochs: .inf}\n", ["c.yaml: training.epochs: expected a finite number, got inf"]),
    ([], "lora: {alpha: .inf}\n", ["c.yaml: lora.alpha: expected a finite number"]),
    ([], "search_space:\n  learning_rate: [1.0e-5, .inf]\n", ["search_space.learning_rate: range bounds must be finite"]),
    ([], "trials: 3\ntrials: 5\n", ["c.yaml:2:1: invalid YAML: 'trials' is given twice"]),
    (["--gpus", "abc"], None, ["--gpus: must list GPU indices"]),
    (["--set", "training.learning_rate=abc"], None, ["--set: training.learning_rate: expected a finite number, got 'abc'"]),
    (["--set", "training.lerning_rate=1e-4"], None, ["did you mean 'training.learning_rate'"]),
    (["--set", "nonsense"], None, ["--set: expected section.field=value, got 'nonsense'"]),
    (["--set", "trials=0"], None, ["--set: trials: must be at least 1, got 0"]),
    (["--command", "true {lora_rank}", "--set", "model.name=Qwen/Qwen2.5-7B-Instruct"], None,
     ["--set: model.name: a --command study trains what its command trains, so this setting would not reach it"]),
    (["--command", "true {lora_rank}", "--data", "d.jsonl"], None, ["--data: data.path: a --command study trains"]),
])
def test_bad_input_ends_before_the_earlier_study_is_touched(tmp_path, earlier_study, args, config_text, fragments):
    results, before, files = earlier_study
    one_line(optimize_cli(tmp_path, "--overwrite", *args, config_text=config_text), *fragments)
    assert results.read_text() == before and listing(tmp_path / "study") == files  # --overwrite touched nothing


def test_a_config_of_binary_garbage(tmp_path):
    (tmp_path / "c.yaml").write_bytes(os.urandom(200) + b"\xff\xfe")
    one_line(optimize_cli(tmp_path, "--config", str(tmp_path / "c.yaml")), "c.yaml: not a text file")


@pytest.mark.parametrize(("setup", "fragment"), [
    (lambda d: (d / "afile").write_text("x") and d / "afile" / "r.json", "afile is a file"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "is an existing file that is not a results file"),
    (lambda d: (d / "r.json").mkdir() or d / "r.json", "r.json is a directory, not a results file"),
])
def test_output_paths_that_cannot_hold_a_study(tmp_path, setup, fragment):
    output = setup(tmp_path)
    proc = cli(str(ROOT / "ax_optimization.py"), "--trials", "2", "--output", str(output), cwd=tmp_path)
    one_line(proc, "--output: ", fragment)


@pytest.mark.parametrize(("text", "fragment"), [
    ("lora: {target_modules: [query, value]}\n", "c.yaml: lora.target_modules: no module named 'query' in the model"),
    ("lora: {target_modules: [q_proj, v_prj]}\n", "no module named 'v_prj' in the model; did you mean 'v_proj'?"),
    ("lora: {target_modules: 'attn_.*'}\n", "the pattern 'attn_.*' matches no module"),
])
def test_target_modules_are_checked_against_the_model_before_any_trial(tiny_model, tmp_path, text, fragment):
    started = time.monotonic()
    one_line(optimize_cli(tmp_path, config_text=text), fragment)
    assert not (tmp_path / "study").exists() and time.monotonic() - started < 60


def test_an_unknown_hub_model_offline_is_one_line_at_once(tmp_path):
    started = time.monotonic()
    one_line(optimize_cli(tmp_path, "--model", "no-such-org/no-such-model"),
             "model.name: cannot load 'no-such-org/no-such-model': not a local directory, nor a model found in")
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------------------
# Resume: what may change and what may not


def test_resume_refuses_what_would_change_what_the_study_measures(tmp_path, earlier_study):
    checkpoint = str(tmp_path / "study" / "optimization_checkpoint.json")
    for args, flag in ((["--config", "x.yaml"], "--config"), (["--seed", "3"], "--seed"), (["--model", "m"], "--model"),
                       (["--data", "nowhere.jsonl"], "--data"), (["--command", "true"], "--command")):
        proc = cli(str(ROOT / "ax_optimization.py"), "--resume", checkpoint, *args, cwd=tmp_path)
        one_line(proc, f"{flag}: cannot change when a study resumes")
    proc = cli("-m", "loratune.cli", "resume", checkpoint, "--set", "training.epochs=2", cwd=tmp_path)
    one_line(proc, "--set: training.epochs: cannot change when a study resumes")
    with pytest.raises(LoratuneError, match="seed: cannot change when a study resumes"):
        resume_optimization(checkpoint, evaluate=fake_loss, seed=3)
    # how trials run may change
    results = resume_optimization(checkpoint, additional_trials=1, evaluate=fake_loss, workers=2, trial_timeout=60,
                                  quiet=True)
    assert len(results["trials"]) == 3


# ---------------------------------------------------------------------------------------------
# A checkpoint edited by hand or by another tool is checked as strictly as a config


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda c: c["records"].__setitem__(0, "trial zero"), "records[0]: expected a mapping, got str"),
    (lambda c: c["records"][1].pop("state"), "records[1]: missing 'state'"),
    (lambda c: c["records"][1].__setitem__("state", "bogus"), "records[1]: state: expected 'queued' or 'running' or 'completed'"),
    (lambda c: c["records"][1].__setitem__("index", 0), "records[1]: trial 0 is recorded twice"),
    (lambda c: c["records"][1].__setitem__("params", [16]), "records[1]: params: expected a mapping, got [16]"),
    (lambda c: c.pop("ax"), "checkpoint is incomplete ('ax' missing"),
    (lambda c: c["config"].__setitem__("trials", "many"), "config.trials: expected an integer"),
])
def test_an_edited_checkpoint_is_one_line_and_stays_as_it_was(tmp_path, earlier_study, edit, fragment):
    path = tmp_path / "study" / "optimization_checkpoint.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    before = path.read_text()
    one_line(cli("-m", "loratune.cli", "resume", str(tmp_path / "study"), cwd=tmp_path), fragment)
    assert path.read_text() == before


# ---------------------------------------------------------------------------------------------
# The Python API's arguments go through the same checks as YAML


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"workers": "4"}, "workers: expected an integer, got '4'"),
    ({"max_failures_in_a_row": "3"}, "max_failures_in_a_row: expected an integer, got '3'"),
    ({"gpus_per_trial": "2"}, "gpus_per_trial: expected an integer, got '2'"),
    ({"minimize": True}, "minimize: expected a list of true or false, got True"),
    ({"evaluate": 5}, "evaluate: expected a function of the parameters, got int 5"),
    ({"wokers": 2}, "run_optimization: unknown argument 'wokers'"),
    ({"training": {"epochs": "x"}}, "training: training.epochs: expected a finite number, got 'x'"),
    ({"search_space": [1, 2]}, "search_space: expected a mapping"),
    ({"config": 5}, "config: expected a YAML path or a StudyConfig, got int"),
    ({"model_name": "Qwen/Qwen2.5-7B-Instruct"}, "model_name: model.name: evaluate= trains what the function trains, "
                                                 "so this setting would not reach it"),
    ({"training": {"epochs": 2}}, "training: training.epochs: evaluate= trains what the function trains"),
])
def test_api_arguments_are_validated_like_yaml(tmp_path, kwargs, message):
    kwargs.setdefault("evaluate", fake_loss)
    with pytest.raises(LoratuneError) as err:
        run_optimization(num_trials=2, output_dir=tmp_path / "study", quiet=True, **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "study").exists()


# ---------------------------------------------------------------------------------------------
# A custom objective: any real number is a metric; however it ends, the trial gets a recorded state


@pytest.mark.parametrize("value", [np.float32(0.5), np.int64(1), np.array(0.25), 2])
def test_any_finite_real_number_is_a_metric(tmp_path, value):
    results = run_optimization(num_trials=2, output_dir=tmp_path, evaluate=lambda p: value, search_space=SPACE,
                               quiet=True, report=False)
    assert [t["state"] for t in results["trials"]] == ["completed"] * 2
    assert results["best_loss"] == float(value) and type(results["best_loss"]) is float


def test_every_way_an_objective_can_end_is_recorded(tmp_path):
    def evaluate(params):
        if params["lora_rank"] == 16:  # the baseline
            return 0.5
        kind = {8: "raise", 32: "string", 64: "hang"}[params["lora_rank"]]
        if kind == "raise":
            raise KeyError("no such column")
        if kind == "string":
            return {"loss": "0.4"}
        time.sleep(30)
        return 0.1

    results = run_optimization(num_trials=6, output_dir=tmp_path, evaluate=evaluate, search_space={"lora_rank": [8, 16, 32, 64]},
                               trial_timeout=2, max_failures_in_a_row=10, quiet=True, report=False)
    reasons = {t["params"]["lora_rank"]: (t["state"], t["reason"]) for t in results["trials"]}
    assert reasons[16] == ("completed", None)
    assert reasons[8] == ("failed", "KeyError: 'no such column'")
    assert reasons[32] == ("failed", "metric 'loss' is not a number: '0.4'")
    assert reasons[64] == ("failed", "timeout: still running after 2 s (trial_timeout)")
    assert len(results["trials"]) == 6


# ---------------------------------------------------------------------------------------------
# Outcomes reported as they are


def test_a_study_in_which_no_trial_completed_exits_non_zero(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('CUDA error: no kernel image is available')\n")
    proc = cli(str(ROOT / "ax_optimization.py"), "--trials", "3", "--output", str(tmp_path / "study"),
               "--command", f"{sys.executable} {script} {{lora_rank}}", "--quiet", cwd=tmp_path)
    one_line(proc, "no trial completed", "CUDA error: no kernel image is available", code=1)


def test_failures_that_end_the_budget_are_not_an_abort(tmp_path):
    def evaluate(params):
        if params["lora_rank"] != 16:
            raise RuntimeError("diverged")
        return 0.5

    results = run_optimization(num_trials=4, output_dir=tmp_path, evaluate=evaluate, search_space={"lora_rank": [8, 16, 32, 64]},
                               max_failures_in_a_row=3, quiet=True, report=False)
    assert [t["state"] for t in results["trials"]] == ["completed", "failed", "failed", "failed"]


def test_a_callable_studys_failure_names_no_trial_directory_nor_the_cli(tmp_path):
    with pytest.raises(StudyAborted) as err:
        run_optimization(num_trials=5, output_dir=tmp_path, evaluate=lambda p: 1 / 0, search_space=SPACE, quiet=True,
                         report=False)
    assert "trials" not in str(err.value).replace("failed trials in a row", "")
    assert "loratune resume" not in str(err.value) and "resume_optimization(" in str(err.value)


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_holds(tmp_path, monkeypatch):
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 9:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("loratune.storage.os.fsync", fsync)
    with pytest.raises(StudyAborted) as err:
        run_optimization(num_trials=6, output_dir=tmp_path, evaluate=fake_loss, search_space=SPACE, quiet=True,
                         report=False)
    assert "No space left on device; the last checkpoint is intact" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.undo()
    assert len(resume_optimization(tmp_path, evaluate=fake_loss, quiet=True)["trials"]) == 6


def test_restarts_count_every_interrupted_run(tmp_path, monkeypatch):
    """Each session that starts an interrupted trial again counts it, even if killed before its first round."""
    from loratune.executors.callable import CallableExecutor

    run_optimization(num_trials=2, output_dir=tmp_path, evaluate=fake_loss, search_space=SPACE, quiet=True, report=False)
    path = tmp_path / "optimization_checkpoint.json"
    data = json.loads(path.read_text())
    data["records"][1]["state"] = "running"
    path.write_text(json.dumps(data))

    def killed(self, spec):
        raise KeyboardInterrupt  # the process dies as the trial starts

    monkeypatch.setattr(CallableExecutor, "submit", killed)
    for _ in range(5):
        with pytest.raises(KeyboardInterrupt):
            resume_optimization(tmp_path, evaluate=fake_loss, quiet=True)
    monkeypatch.undo()
    results = resume_optimization(tmp_path, evaluate=fake_loss, quiet=True)
    assert results["trials"][1]["restarts"] == 6 and results["trials"][1]["state"] == "completed"


def test_a_searched_setting_given_to_a_command_study_is_its_baseline(tmp_path):
    """The one fine-tune setting that reaches a --command study: a searched one, whose value is trial 0's."""
    script = tmp_path / "train.py"
    script.write_text("import json, sys\nprint(json.dumps({'loss': 1 / int(sys.argv[1])}))\n")
    proc = optimize_cli(tmp_path, "--command", f"{sys.executable} {script} {{lora_rank}}", "--set", "lora.rank=8",
                        "--set", 'search_space={"lora_rank": [8, 16, 32]}', "--no-report")
    assert proc.returncode == 0, proc.stderr
    trials = json.loads((tmp_path / "study" / "optimization_results.json").read_text())["trials"]
    assert trials[0]["baseline"] and trials[0]["params"] == {"lora_rank": 8}


def test_a_shell_script_command_gets_its_values_quoted(tmp_path):
    from loratune.executors.command import command_argv

    argv = command_argv("sh -c 'python train.py --note {note} --lr {lr}'", {"note": "a b; touch pwned", "lr": 1e-4})
    assert argv == ["sh", "-c", "python train.py --note 'a b; touch pwned' --lr 0.0001"]
    assert command_argv("python train.py --note {note}", {"note": "a b; x"}) == ["python", "train.py", "--note", "a b; x"]


@pytest.mark.slow
def test_the_worker_log_starts_clean(tiny_model, tmp_path):
    results = run_optimization(num_trials=1, output_dir=tmp_path, quiet=True, report=False,
                               training={"epochs": 0.05, "eval_points": 1})
    log = (tmp_path / "trials" / "0" / "log.txt").read_text()
    assert results["trials"][0]["state"] == "completed"
    assert "RuntimeWarning" not in log and "Warning" not in log, log
    assert len(log.strip().splitlines()) == 1 and log.startswith("$ "), log  # the worker's command line, nothing else
