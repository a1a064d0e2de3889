"""A few real trials on the tiny demo model, by Module 4.5's commands, then the retrain."""

import json

import pytest
import yaml
from conftest import ROOT, cli, run_cli

from loratune.settings import load_finetune_config


@pytest.mark.slow
def test_module_commands_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "configs"
    proc = run_cli(str(ROOT / "ax_optimization.py"), "--trials", "3", "--output", str(out / "optimization_results.json"))
    assert proc.returncode == 0, proc.stderr
    assert "Trial 1/3 (#0): rank=16, alpha=32, lr=0.0002, bs=1 → loss=" in proc.stdout
    assert "(baseline)" in proc.stdout and "Top trials" in proc.stdout

    results = json.loads((out / "optimization_results.json").read_text())
    trials = results["trials"]
    assert [t["state"] for t in trials] == ["completed"] * 3
    for t in trials:  # every trial really trained: a curve that goes down, and its own process' metrics
        losses = [p["val_loss"] for p in t["curve"]]
        assert len(losses) == 5 and losses[-1] < losses[0]  # no early-stopping rule reads it: 5 points
        assert t["metrics"]["loss"] == losses[-1] and t["metrics"]["train_time"] > 0
        assert "inference_time" not in t["metrics"]  # measured only where an objective or a constraint uses it
    best = min(trials, key=lambda t: t["metrics"]["loss"])
    assert results["best_trial"] == best["index"] and results["best_loss"] == best["metrics"]["loss"]
    # only the best trial keeps its adapter
    kept = sorted(p.parent.parent.name for p in (out / "trials").glob("*/adapter/adapter_model.safetensors"))
    assert kept == [str(best["index"])]

    best_config = out / "best_config.yaml"
    cfg = yaml.safe_load(best_config.read_text())
    assert cfg["lora"]["rank"] == best["params"]["lora_rank"] and cfg["training"]["epochs"] == 3
    assert cfg["training"]["learning_rate"] == best["params"]["learning_rate"]

    other = next(t for t in trials if t["index"] != best["index"])  # any other trial, e.g. another Pareto point
    exported = cli("-m", "loratune.cli", "export", str(out), "--trial", str(other["index"]), "--output",
                       str(out / "other.yaml"))
    assert exported.returncode == 0, exported.stderr
    assert load_finetune_config(out / "other.yaml")[0].lora.rank == other["params"]["lora_rank"]

    retrain = run_cli(str(ROOT / "finetune_lora.py"), "--config", str(best_config), "--quiet")
    assert retrain.returncode == 0, retrain.stderr
    metrics = json.loads((out / "best_model" / "metrics.json").read_text())
    assert metrics["steps"] == load_finetune_config(best_config)[0].training.plan(148)[1] == 111  # 3 epochs of 148 at 4 per step
    assert metrics["val_loss"] < best["metrics"]["loss"]  # three epochs beat one
    assert (out / "best_model" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_retrain_and_compare_on_the_demo(tiny_model, tmp_path):
    out = tmp_path / "study"
    proc = cli(str(ROOT / "ax_optimization.py"), "--trials", "2", "--output", str(out), "--seed", "1", "--no-report",
               "--set", "training.epochs=0.5")
    assert proc.returncode == 0, proc.stderr
    compare = cli("-m", "loratune.cli", "compare", str(out), "--seeds", "2", "--epochs", "0.25", "--quiet")
    assert compare.returncode == 0, compare.stderr
    result = json.loads((out / "comparison.json").read_text())
    assert len(result["best"]) == len(result["baseline"]) == 2 and result["epochs"] == 0.25
    assert result["data"] == "test" and set(result["scores"]) == {"plan_accuracy"}  # the demo has a test split
    for name in ("best", "baseline"):  # the numbers are the retrains' own metrics, on the test split
        for seed, loss in enumerate(result[name]):
            metrics = json.loads((out / "comparison" / f"{name}_seed{seed}" / "metrics.json").read_text())
            assert metrics["test"]["loss"] == loss and metrics["config"]["training"]["seed"] == seed
            assert metrics["test"]["examples"] == 37 and metrics["val_loss"] != loss
    report = (out / "OPTIMIZATION_RESULTS.md").read_text()
    assert "## Best versus baseline, fully retrained" in report and f"{result['best_mean']:.4g}" in report
    assert result["verdict"] in report


@pytest.mark.slow
def test_same_seed_same_study_on_an_idle_and_a_loaded_machine(tiny_model, tmp_path, monkeypatch):
    """Every trial's parameters and loss, bit for bit, with nothing else running and beside a busy
    process on every core: nothing in the search or the training may depend on timing or load (one
    worker, no early stopping, no time limit: what "What --seed N guarantees" in docs/search.md promises)."""
    # one thread a trial, the same in both runs: two threads beside a busy core spin at every barrier (ten times slower)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import os
    import subprocess
    import sys

    from loratune import run_optimization
    from loratune.processes import die_with_parent

    def study(out):
        results = run_optimization(num_trials=3, output_dir=out, seed=4, quiet=True, report=False, init_trials=1,
                                   training={"epochs": 0.1}, scoring={"subset": 0})
        return [(t["index"], t["params"], t["metrics"].get("loss")) for t in results["trials"]]

    idle = study(tmp_path / "idle")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=die_with_parent())
            for _ in range(os.cpu_count() or 1)]
    try:
        loaded = study(tmp_path / "loaded")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert len(idle) == 3 and all(loss is not None for *_, loss in idle)
    assert loaded == idle


def test_a_stopped_trial_ends_at_the_point_judged_however_late_the_verdict(tiny_model, tmp_path):
    """The study's verdict on a curve point can come late (a slow listener, a loaded machine): a trial
    the study may stop waits for it, so it stops at the point judged, with that many steps trained, and
    never later. A listener here holds the verdict until the trial has trained past the point (which
    waiting makes impossible) or 2 s have passed."""
    import time

    from loratune import EarlyStoppingCallback, run_optimization
    from loratune.listeners import StudyListener
    from loratune.trial_dir import PROGRESS_FILE, RESULT_FILE

    check_at, trials = 0.3, tmp_path / "study" / "trials"

    class SlowVerdicts(StudyListener):
        def trial_progress(self, record, tick=None, point=None):
            if point is None or record.baseline or not point["progress"] >= check_at - 1e-9:
                return
            trial = trials / str(record.index)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not (trial / RESULT_FILE).exists() and \
                    (trial / PROGRESS_FILE).read_text().count('"kind": "eval"') <= len(record.curve):
                time.sleep(0.01)

    results = run_optimization(num_trials=3, output_dir=tmp_path / "study", seed=0, quiet=True, report=False,
                               init_trials=1, training={"epochs": 0.25}, scoring={"subset": 0},
                               early_stopping=EarlyStoppingCallback(threshold=0.0, check_at=check_at),
                               listeners=[SlowVerdicts()])
    stopped = [t for t in results["trials"] if not t["baseline"]]
    assert len(stopped) == 2 and all(t["state"] == "early_stopped" for t in stopped)
    for t in stopped:
        judged = next(p for p in t["curve"] if p["progress"] >= check_at - 1e-9)
        assert t["curve"][-1]["step"] == judged["step"] == t["extra"]["steps"]
