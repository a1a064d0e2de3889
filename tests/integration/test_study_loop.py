"""The study loop on a real Ax search with a fake objective (an ``evaluate=`` function or a small command):
the baseline first, failures, resume, parameterizations, checkpoints, listeners. Each test here runs Ax's
generation for real, which is why they are not in tests/unit (``make test-fast`` runs the unit tests
without a real study); the slowest, which fit Ax's model a dozen times, are marked slow."""

import json
import sys

import pytest
from conftest import fake_loss

from loratune import resume_optimization, run_optimization
from loratune.checkpoint import load as load_checkpoint
from loratune.checkpoint import save as save_checkpoint
from loratune.config import StudyConfig
from loratune.errors import LoratuneError, StudyAborted
from loratune.optimizer import Optimizer
from loratune.trial import TrialState

SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128], "learning_rate": [1e-5, 5e-4],
         "batch_size": [1, 2, 4]}
TRAIN = ("import json, sys\n"
         "print(json.dumps({'loss': 0.5 + abs(float(sys.argv[1]) - 3e-4) * 1000 + int(sys.argv[2]) / 1000}))\n")


def optimize(tmp_path, trials=6, **kwargs):
    kwargs.setdefault("evaluate", fake_loss)
    kwargs.setdefault("search_space", SPACE)
    return run_optimization(num_trials=trials, output_dir=tmp_path / "study", seed=kwargs.pop("seed", 0),
                            quiet=True, report=False, **kwargs)


def test_baseline_first_best_tracking_and_return_value(tmp_path):
    results = optimize(tmp_path)
    trials = results["trials"]
    assert len(trials) == 6 and all(t["state"] == "completed" for t in trials)
    assert trials[0]["baseline"] and trials[0]["params"] == {"lora_rank": 16, "lora_alpha": 32,
                                                             "learning_rate": 2e-4, "batch_size": 1}
    losses = [t["metrics"]["loss"] for t in trials]
    assert results["best_loss"] == min(losses)
    assert results["best_params"] == trials[losses.index(min(losses))]["params"]
    assert results["best_loss"] == pytest.approx(fake_loss(results["best_params"]))
    assert results["improvement"]["baseline"] == losses[0]
    written = json.loads((tmp_path / "study" / "optimization_results.json").read_text())
    assert written["best_params"] == results["best_params"] and len(written["trials"]) == 6
    # the evaluation here is instant, so Ax's set-up and suggestions are most of the wall time
    assert 0 < results["optimizer_time_s"] <= results["wall_time_s"]


def test_a_study_that_spends_its_budget_says_nothing_about_ax_stalling(tmp_path, capsys):
    run_optimization(num_trials=3, output_dir=tmp_path / "study", seed=0, report=False, evaluate=fake_loss,
                     search_space=SPACE)
    out = capsys.readouterr().out
    assert "Trial 3/3" in out and "proposes no further trials" not in out


def test_a_seed_makes_the_search_reproducible(tmp_path):
    a = optimize(tmp_path / "a", seed=3)["trials"]
    b = optimize(tmp_path / "b", seed=3)["trials"]
    assert [t["params"] for t in a] == [t["params"] for t in b]


def test_failures_are_recorded_and_the_study_goes_on(tmp_path):
    def evaluate(params):
        if params["batch_size"] == 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if params["lora_alpha"] == 128:
            return float("nan")
        return fake_loss(params)

    cfg = StudyConfig(max_failures_in_a_row=8)
    results = optimize(tmp_path, trials=8, evaluate=evaluate, config=cfg, search_space={**SPACE, "batch_size": [1, 4]})
    states = {t["index"]: t["state"] for t in results["trials"]}
    oom = [t for t in results["trials"] if t["state"] == "out_of_memory"]
    nan = [t for t in results["trials"] if t["params"]["lora_alpha"] == 128 and t["params"]["batch_size"] != 4]
    assert oom and all("out of memory" in t["reason"] for t in oom)
    assert all(t["state"] == "failed" and "non-finite" in t["reason"] for t in nan)
    assert len(states) == 8 and results["best_params"]["batch_size"] == 1
    # an out-of-memory point is abandoned: never proposed again
    points = [tuple(sorted(t["params"].items())) for t in results["trials"]]
    for t in oom:
        assert points.count(tuple(sorted(t["params"].items()))) == 1


def test_repeated_failures_stop_the_study_with_everything_saved(tmp_path):
    def evaluate(params):
        raise ValueError("broken training code")

    with pytest.raises(StudyAborted, match="stopped after 3 failed trials in a row; last failure: ValueError: broken"):
        optimize(tmp_path, trials=10, evaluate=evaluate)
    saved = json.loads((tmp_path / "study" / "optimization_results.json").read_text())
    assert [t["state"] for t in saved["trials"]] == ["failed"] * 3


@pytest.mark.slow  # a dozen fits of Ax's model
def test_resume_with_more_trials_equals_an_uninterrupted_run(tmp_path):
    whole = optimize(tmp_path / "whole", trials=8)
    part = optimize(tmp_path / "part", trials=5)
    resumed = resume_optimization(tmp_path / "part" / "study" / "optimization_checkpoint.json", additional_trials=3,
                                  evaluate=fake_loss, quiet=True)
    # the same points, up to float round-off in the model fit after the JSON round trip
    assert len(resumed["trials"]) == len(whole["trials"]) == 8
    for r, w in zip(resumed["trials"], whole["trials"], strict=True):
        assert r["params"].keys() == w["params"].keys()
        for name, value in r["params"].items():
            assert value == pytest.approx(w["params"][name], rel=1e-2)
    assert resumed["best_loss"] == pytest.approx(whole["best_loss"], rel=1e-3)
    assert resumed["optimizer_time_s"] > part["optimizer_time_s"]  # the sessions' Ax time adds up


@pytest.mark.slow  # a dozen fits of Ax's model
@pytest.mark.parametrize("parameterization", ["lora", "raw"])
def test_a_study_under_either_parameterization_runs_and_resumes_in_the_users_parameters(tmp_path, parameterization):
    seen = []

    def evaluate(params):
        seen.append(params)
        return fake_loss(params)

    constraints = ["lora_rank * batch_size <= 32"]
    optimize(tmp_path, trials=7, evaluate=evaluate, constraints=constraints, parameterization=parameterization)
    resumed = resume_optimization(tmp_path / "study", additional_trials=2, evaluate=evaluate, quiet=True)
    assert resumed["parameterization"] == parameterization and len(seen) == len(resumed["trials"]) == 9
    assert seen[0] == {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1}  # the baseline, exactly
    space = load_checkpoint(tmp_path / "study")[1].space
    for params, trial in zip(seen, resumed["trials"], strict=True):
        assert space.contains(params) and trial["params"] == params  # bounds, choices and the product constraint


def test_a_checkpoint_from_before_the_lora_parameterization_resumes_as_it_searched(tmp_path):
    optimize(tmp_path, trials=3, parameterization="raw")
    checkpoint = tmp_path / "study" / "optimization_checkpoint.json"
    data = json.loads(checkpoint.read_text())
    del data["config"]["parameterization"]  # as a study saved before the field existed
    checkpoint.write_text(json.dumps(data))
    assert resume_optimization(checkpoint, additional_trials=1, evaluate=fake_loss, quiet=True)["parameterization"] == "raw"


def test_a_space_the_lora_parameterization_cannot_search_says_why_and_runs_as_written(tmp_path, capsys):
    results = run_optimization(num_trials=2, output_dir=tmp_path / "study", seed=0, report=False, evaluate=fake_loss,
                               search_space={"lora_rank": [8, 12, 16], "learning_rate": [1e-5, 5e-4]},
                               parameterization="lora")
    assert results["parameterization"] == "raw"
    assert "note: the learning rate is searched as written, not as LoRA's effective step: lora_rank is a choice of " \
           "values that are not powers of two" in " ".join(capsys.readouterr().out.split())


def test_more_interrupted_trials_than_workers_wait_their_turn(tmp_path):
    """Two trials were running when a 2-worker study died; it resumes with one worker: they run one after
    the other, queued in the checkpoint until each starts (each once handed to a slot that was not free)."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    command = f"{sys.executable} {script} {{learning_rate}} {{lora_rank}}"
    space = {"learning_rate": [1e-4, 5e-4], "lora_rank": [8, 16]}
    run_optimization(num_trials=2, output_dir=tmp_path / "study", command=command, search_space=space, quiet=True,
                     report=False, workers=2)
    checkpoint = tmp_path / "study" / "optimization_checkpoint.json"
    data = json.loads(checkpoint.read_text())
    opt = Optimizer.restore(data["ax"], load_checkpoint(checkpoint)[1].space, 0)
    for index, params in opt.ask(2).items():  # what a kill -9 with both slots busy leaves
        data["records"].append({**data["records"][-1], "index": index, "params": params, "state": "running",
                                "metrics": {}, "baseline": False, "restarts": 0})
    data["ax"] = opt.snapshot()
    checkpoint.write_text(json.dumps(data))
    results = resume_optimization(checkpoint, quiet=True, workers=1)
    assert [t["state"] for t in results["trials"]] == ["completed"] * 4
    assert [t["restarts"] for t in results["trials"]] == [0, 0, 1, 1]


def test_a_trial_running_at_a_crash_is_run_again_and_resume_says_so(tmp_path, capsys):
    optimize(tmp_path, trials=3)
    checkpoint = tmp_path / "study" / "optimization_checkpoint.json"
    data = json.loads(checkpoint.read_text())
    # what a kill -9 during trial 2 leaves: its record still running, Ax's trial still RUNNING
    opt = Optimizer.restore(data["ax"], load_checkpoint(checkpoint)[1].space, 0)
    (index, params), = opt.ask(1).items()
    data["ax"] = opt.snapshot()
    data["records"].append({**data["records"][-1], "index": index, "params": params, "state": "running",
                            "metrics": {}, "baseline": False, "restarts": 0})
    checkpoint.write_text(json.dumps(data))
    capsys.readouterr()
    results = resume_optimization(checkpoint, evaluate=fake_loss, report=False)
    assert f"note: trial {index} was running when the earlier session ended: it runs again from the start, as the " \
           "same Ax trial" in " ".join(capsys.readouterr().out.split())
    rerun = results["trials"][3]
    assert rerun["index"] == index and rerun["state"] == "completed" and rerun["restarts"] == 1
    assert [t["state"] for t in results["trials"]] == ["completed"] * 4


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    optimize(tmp_path, trials=2)
    checkpoint = tmp_path / "study" / "optimization_checkpoint.json"
    before = checkpoint.read_text()
    paths, stored = load_checkpoint(checkpoint)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError):
        save_checkpoint(stored, paths)
    assert checkpoint.read_text() == before  # the old checkpoint is intact, no temporary left behind
    assert sorted(p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")) == [".loratune.lock"]


def test_an_existing_study_is_never_overwritten(tmp_path):
    optimize(tmp_path, trials=2)
    before = (tmp_path / "study" / "optimization_results.json").read_text()
    with pytest.raises(LoratuneError, match="already holds a study"):
        optimize(tmp_path, trials=2)
    assert (tmp_path / "study" / "optimization_results.json").read_text() == before


def test_callable_evaluation_needs_the_callable_to_resume(tmp_path):
    optimize(tmp_path, trials=2)
    with pytest.raises(LoratuneError, match="pass the same evaluate= to resume it"):
        resume_optimization(tmp_path / "study")


def test_external_command_evaluator_fills_placeholders_without_a_shell(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import json, sys\n"
        "args = dict(a.split('=', 1) for a in sys.argv[1:])\n"
        "print('training...')\n"
        "loss = 0.5 + abs(float(args['--lr']) - 3e-4) * 1000 + int(args['--rank']) / 1000\n"
        "print(json.dumps({'loss': loss, 'seen': args['--tag']}))\n")
    command = f"{sys.executable} {script} --lr={{learning_rate}} --rank={{lora_rank}} '--tag=$(touch {tmp_path}/pwned)'"
    results = run_optimization(num_trials=3, output_dir=tmp_path / "study", evaluate=None, command=command,
                               search_space={"learning_rate": [1e-4, 5e-4], "lora_rank": [8, 16]}, quiet=True, report=False)
    assert [t["state"] for t in results["trials"]] == ["completed"] * 3
    first = results["trials"][0]
    assert first["metrics"]["loss"] == pytest.approx(0.5 + abs(first["params"]["learning_rate"] - 3e-4) * 1000
                                                     + first["params"]["lora_rank"] / 1000)
    assert not (tmp_path / "pwned").exists()
    assert results["best_config"] is None  # no fine-tune config: the command is the user's own training


def test_external_command_failures(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import sys\nprint('no metrics here')\nsys.exit(int(sys.argv[1]) % 2)\n")
    with pytest.raises(StudyAborted, match="no trial completed"):  # a study with no result is a failed study
        run_optimization(num_trials=2, output_dir=tmp_path / "study", command=f"{sys.executable} {script} {{lora_rank}}",
                         search_space={"lora_rank": [8, 9]}, quiet=True, seed=0, report=False)
    results = json.loads((tmp_path / "study" / "optimization_results.json").read_text())
    reasons = sorted(t["reason"] for t in results["trials"])
    assert reasons == ["command exited with code 1: no metrics here",
                       "command printed no JSON line with metrics (nor reported an evaluation through LoratuneCallback)"]
    assert all(t["state"] == TrialState.FAILED.value for t in results["trials"])


def test_overwrite_leaves_nothing_of_the_old_study(tmp_path):
    optimize(tmp_path, trials=2)
    study = tmp_path / "study"
    (study / "comparison.json").write_text('{"study_id": "0123456789ab"}')  # what `loratune compare` leaves
    (study / "plots").mkdir()
    (study / "plots" / "trace.png").write_bytes(b"old")
    optimize(tmp_path, trials=2, overwrite=True)
    assert not (study / "comparison.json").exists() and not (study / "plots").exists()
    assert len(json.loads((study / "optimization_results.json").read_text())["trials"]) == 2


def test_a_config_file_that_writes_alpha_runs(tmp_path):
    """`lora: {alpha: 32}` in YAML is the float 32.0: the baseline must still reach Ax as the int 32."""
    config = tmp_path / "c.yaml"
    config.write_text("lora: {rank: 16, alpha: 32}\n")
    results = optimize(tmp_path, trials=2, config=str(config))
    assert [t["state"] for t in results["trials"]] == ["completed", "completed"]
    assert results["trials"][0]["params"]["lora_alpha"] == 32 and type(results["trials"][0]["params"]["lora_alpha"]) is int


def test_a_users_listener_hears_the_study_and_one_that_raises_is_dropped_not_the_study(tmp_path, capsys):
    from loratune import StudyListener, run_optimization

    heard = []

    class Recorder(StudyListener):
        def study_started(self, stored, paths):
            heard.append("study_started")

        def trial_started(self, record):
            heard.append(f"started {record.index}")

        def trial_ended(self, record, records):
            heard.append(f"ended {record.index} {record.state.value} of {len(records)}")

        def study_ended(self, paths, result, report):
            heard.append(f"study_ended {len(result['trials'])}")

    class Broken:
        def trial_ended(self, record, records):
            raise ValueError("my dashboard is down")

    results = run_optimization(num_trials=3, output_dir=tmp_path, evaluate=fake_loss, search_space=SPACE, report=False,
                               listeners=[Broken(), Recorder()])
    assert len(results["trials"]) == 3
    assert heard == ["study_started", "started 0", "ended 0 completed of 1", "started 1", "ended 1 completed of 2",
                     "started 2", "ended 2 completed of 3", "study_ended 3"]
    out = capsys.readouterr().out
    assert out.count("listener Broken.trial_ended raised ValueError: my dashboard is down") == 1
