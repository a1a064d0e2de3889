"""Module 4.5's advanced features: early stopping, several objectives, parameter constraints."""

import os

import pytest
from conftest import fake_loss

from loratune import EarlyStoppingCallback, run_optimization
from loratune.checkpoint import load as load_checkpoint
from loratune.config import EarlyStoppingConfig, StudyConfig
from loratune.errors import LoratuneError
from loratune.optimizer import Optimizer, seam
from loratune.results import pareto_front
from loratune.trial import TrialRecord, TrialState

SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128], "learning_rate": [1e-5, 5e-4],
         "batch_size": [1, 2, 4]}
CHECKS = [round(0.1 * k, 1) for k in range(1, 11)]


def curve_loss(params, progress):
    """A learning curve that falls to fake_loss(params): poor configurations are poor early, too."""
    return fake_loss(params) + 0.6 * (1 - progress) * (fake_loss(params) - 0.4)


def with_curve(params, report):
    for p in CHECKS:
        if report(p, {"loss": curve_loss(params, p)}):
            return {"loss": curve_loss(params, p)}
    return {"loss": curve_loss(params, 1.0)}


def optimize(tmp_path, trials, **kwargs):
    kwargs.setdefault("search_space", SPACE)
    return run_optimization(num_trials=trials, output_dir=tmp_path / "study", seed=0, quiet=True, report=False,
                            evaluate=kwargs.pop("evaluate", with_curve), **kwargs)


def test_threshold_rule_stops_exactly_the_poor_trials_at_check_at(tmp_path):
    threshold, check_at = 0.65, 0.3
    results = optimize(tmp_path, 8, early_stopping=EarlyStoppingCallback(threshold=threshold, check_at=check_at))
    for t in results["trials"]:
        at_check = curve_loss(t["params"], check_at)
        if at_check > threshold:
            assert t["state"] == "early_stopped"
            assert t["curve"][-1]["progress"] == check_at  # stopped at the check, not later
            assert t["training_saved"] == pytest.approx(1 - check_at)
        else:
            assert t["state"] == "completed" and t["curve"][-1]["progress"] == 1.0
    stopped = [t for t in results["trials"] if t["state"] == "early_stopped"]
    assert stopped, "the test space must contain trials above the threshold"
    assert results["best_trial"] not in {t["index"] for t in stopped}
    assert results["early_stopping"]["stopped"] == len(stopped)
    assert results["early_stopping"]["trials_saved"] == pytest.approx(len(stopped) * (1 - check_at))


def test_threshold_baseline_stops_the_trials_worse_than_the_baseline_at_check_at(tmp_path):
    check_at = 0.2
    cfg = StudyConfig()
    cfg.lora.rank, cfg.lora.alpha, cfg.training.learning_rate = 8, 64, 1e-4  # a middling baseline
    results = optimize(tmp_path, 8, config=cfg,
                       early_stopping=EarlyStoppingCallback(threshold="baseline", check_at=check_at))
    baseline, *others = results["trials"]
    assert baseline["baseline"] and baseline["state"] == "completed"
    limit = curve_loss(baseline["params"], check_at)
    assert {t["index"] for t in others if t["state"] == "early_stopped"} == \
        {t["index"] for t in others if curve_loss(t["params"], check_at) > limit}
    assert any(t["state"] == "early_stopped" for t in others) and any(t["state"] == "completed" for t in others)


def test_threshold_baseline_reads_the_baseline_curve_between_its_points():
    rule = EarlyStoppingCallback(threshold="baseline", check_at=0.1)
    baseline = [{"progress": 0.1, "loss": 1.0}, {"progress": 0.3, "loss": 0.8}]
    assert rule._at(baseline, 0.2) == pytest.approx(0.9) and rule._at(baseline, 0.05) == 1.0
    assert rule._at(baseline, 0.4) is None  # the baseline has not got there yet: no decision
    assert rule.should_stop([{"progress": 0.2, "loss": 0.95}], baseline)
    assert not rule.should_stop([{"progress": 0.2, "loss": 0.85}], baseline)
    assert not rule.should_stop([{"progress": 0.4, "loss": 5.0}], baseline)
    assert not rule.should_stop([{"progress": 0.2, "loss": 5.0}], None)


def test_threshold_baseline_needs_the_baseline(tmp_path):
    with pytest.raises(LoratuneError, match="baseline"):
        optimize(tmp_path, 3, baseline=False, early_stopping=EarlyStoppingCallback(threshold="baseline"))
    with pytest.raises(LoratuneError, match="early_stopping.threshold"):
        run_optimization(config=StudyConfig(baseline=False, early_stopping=EarlyStoppingConfig(threshold="baseline")), quiet=True)


def test_ax_percentile_stopping_stops_poor_trials_once_enough_curves_exist(tmp_path):
    cfg = StudyConfig(init_trials=10)
    cfg.early_stopping.percentile, cfg.early_stopping.min_curves, cfg.early_stopping.min_progression = 50, 3, 0.2
    results = optimize(tmp_path, 12, config=cfg)
    trials = results["trials"]
    stopped = [t for t in trials if t["state"] == "early_stopped"]
    assert all(t["state"] == "completed" for t in trials[:3])  # nothing to compare with yet
    assert stopped, "with 50% and a spread of curves some trials must be stopped"
    for t in stopped:
        reached = t["curve"][-1]["progress"]
        assert reached >= 0.2
        # a stopped trial was worse, at the point it stopped, than the median of earlier finished curves
        earlier = [curve_loss(o["params"], reached) for o in trials if o["index"] < t["index"] and o["state"] == "completed"]
        assert curve_loss(t["params"], reached) > sorted(earlier)[len(earlier) // 2 - 1]
    assert results["best_trial"] not in {t["index"] for t in stopped}


def test_product_constraint_never_runs_a_violating_trial(tmp_path):
    seen = []

    def evaluate(params):
        seen.append(params)
        return fake_loss(params)

    cfg = StudyConfig(init_trials=4)  # the baseline, the centre and 3 Sobol points; then 2 from Bayesian optimization
    results = optimize(tmp_path, 7, evaluate=evaluate, constraints=["lora_rank * batch_size <= 32"], config=cfg)
    assert len(seen) == len(results["trials"]) == 7
    stored = load_checkpoint(tmp_path / "study")[1]
    experiment = seam.experiment(Optimizer.restore(stored.ax, stored.space, 0).client)
    assert [seam.node_name(experiment.trials[i].generator_runs[0]) for i in (5, 6)] == ["MBM", "MBM"]
    assert all(p["lora_rank"] * p["batch_size"] <= 32 for p in seen)
    assert {p["lora_rank"] for p in seen} <= {8, 16, 32}


def test_default_constraint_over_the_default_space(tmp_path):
    cfg = StudyConfig(init_trials=12)  # quasi-random points spread over the whole space
    results = optimize(tmp_path, 12, evaluate=fake_loss, constraints=["lora_rank * batch_size <= 128"], config=cfg)
    assert all(t["params"]["lora_rank"] * t["params"]["batch_size"] <= 128 for t in results["trials"])


def two_metrics(params):
    return {"loss": fake_loss(params), "inference_time": 1.0 + params["lora_rank"] / 16 + params["batch_size"] / 100}


def test_two_objectives_give_a_pareto_front_of_non_dominated_points(tmp_path):
    results = optimize(tmp_path, 7, evaluate=two_metrics, objectives=["loss", "inference_time"], minimize=[True, True])
    front = results["pareto_front"]
    done = [t for t in results["trials"] if t["state"] == "completed"]
    assert front and len(done) == 7

    def dominates(a, b):
        return all(a[m] <= b[m] for m in ("loss", "inference_time")) and a != b

    for p in front:  # nothing dominates a front point
        assert not any(dominates(t["metrics"], p["metrics"]) for t in done)
    front_ids = {p["index"] for p in front}
    for t in done:  # everything off the front is dominated by a front point
        if t["index"] not in front_ids:
            assert any(dominates(p["metrics"], t["metrics"]) for p in front)
    assert results["best_trial"] in front_ids


def test_pareto_front_with_a_maximized_objective():
    records = [TrialRecord(i, {}, TrialState.COMPLETED, metrics={"loss": loss, "acc": acc})
               for i, (loss, acc) in enumerate([(0.5, 0.9), (0.4, 0.8), (0.6, 0.7), (0.4, 0.95)])]
    assert [r.index for r in pareto_front(records, ["loss", "acc"], [True, False])] == [3]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"constraints": ["lora_rank * batch_size <= 2"]}, "no point of the search space satisfies it"),
    ({"constraints": ["rank * batch_size <= 128"]}, "unknown field 'rank'"),
    ({"constraints": ["lora_rank * batch_size =< 128"]}, "syntax error"),
    ({"objectives": ["loss", "speed"]}, "unknown field 'speed'"),
    ({"objectives": ["loss", "inference_time"], "minimize": [True]}, "minimize: needs one flag per objective (2)"),
    ({"outcome_constraints": ["peak_memory_gb < 15"]}, "is not 'metric <= number'"),
    ({"outcome_constraints": ["peak_memroy_gb <= 15"]}, "did you mean 'peak_memory_gb'"),
])
def test_bad_advanced_settings(tmp_path, kwargs, message):
    with pytest.raises(LoratuneError) as err:
        run_optimization(num_trials=2, output_dir=tmp_path, search_space=SPACE, quiet=True, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("check_at", [0, 1.5, -0.1])
def test_check_at_outside_the_unit_interval(check_at):
    with pytest.raises(LoratuneError, match=r"^EarlyStoppingCallback: check_at: must be in \(0, 1\]"):
        EarlyStoppingCallback(threshold=0.7, check_at=check_at)


STUDY_OF_TWO_OBJECTIVES = """
import math
from loratune import run_optimization
results = run_optimization(num_trials=8, output_dir={out!r}, objectives=["loss", "inference_time"],
                           search_space={{"lora_rank": [8, 16, 32, 64], "learning_rate": [1e-5, 5e-4]}},
                           evaluate=lambda p: {{"loss": abs(math.log10(p["learning_rate"]) + 3.5),
                                               "inference_time": p["lora_rank"] / 10}}, report=False, seed=0)
print("trials", len(results["trials"]))
"""


@pytest.mark.slow
def test_a_stale_lock_of_botorchs_kernel_build_does_not_hang_a_multi_objective_study(tmp_path):
    """A compile killed mid-way leaves `lock` behind; torch's loader would wait on it forever."""
    import subprocess
    import sys

    from loratune.processes import die_with_parent

    extensions = tmp_path / "torch_extensions"
    build = extensions / "logei_fused_ext"  # where torch builds it under TORCH_EXTENSIONS_DIR
    build.mkdir(parents=True)
    (build / "lock").write_text("")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = subprocess.run([sys.executable, "-c", STUDY_OF_TWO_OBJECTIVES.format(out=str(tmp_path / "study"))],
                          capture_output=True, text=True, env=env, timeout=300, preexec_fn=die_with_parent())
    assert proc.returncode == 0, proc.stderr
    assert "trials 8" in proc.stdout
    assert f"locked by {build / 'lock'}" in proc.stdout and "Delete that file" in proc.stdout
