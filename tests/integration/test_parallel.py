"""Several trials at once: local threads and processes, and a real local Ray instance."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
from conftest import fake_loss, run_cli

from loratune import run_optimization


def intervals(results):
    return [(datetime.fromisoformat(t["started_at"]), datetime.fromisoformat(t["ended_at"])) for t in results["trials"]]


def max_overlap(spans) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    best = level = 0
    for _, step in events:
        level += step
        best = max(best, level)
    return best


def test_workers_run_trials_at_once_and_pending_points_are_not_proposed_twice(tmp_path):
    def slow(params):
        time.sleep(0.6)
        return fake_loss(params)

    space = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128]}
    results = run_optimization(num_trials=8, output_dir=tmp_path, evaluate=slow, search_space=space, workers=4,
                               quiet=True, report=False, seed=0)
    assert max_overlap(intervals(results)) == 4
    points = [tuple(t["params"].values()) for t in results["trials"]]
    assert len(set(points)) == 8  # Ax knew which points were in flight


SLEEPER = """
import json, os, signal, sys, time
rank = int(sys.argv[1])
time.sleep(1.0)
if rank == 64:
    os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-trial
print(json.dumps({"loss": 1.0 / rank}))
"""


def test_process_workers_overlap_and_a_killed_worker_is_a_failed_trial(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SLEEPER)
    started = time.monotonic()
    results = run_optimization(num_trials=6, output_dir=tmp_path / "study", command=f"{sys.executable} {script} {{lora_rank}}",
                               search_space={"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32]}, workers=3,
                               quiet=True, report=False, seed=0)
    wall = time.monotonic() - started
    assert max_overlap(intervals(results)) == 3
    assert wall < 6 * 1.0 * 0.8  # clearly less than one after another
    states = {t["params"]["lora_rank"]: t["state"] for t in results["trials"]}
    killed = [t for t in results["trials"] if t["params"]["lora_rank"] == 64]
    assert killed and all(t["state"] == "failed" and "killed by SIGKILL" in t["reason"] for t in killed)
    assert len(results["trials"]) == 6 and "completed" in states.values()


def test_kill_with_several_trials_in_flight_then_resume(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SLEEPER.replace("if rank == 64:", "if False:"))
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "loratune.cli", "optimize", "--trials", "8", "--workers", "3", "--output", str(out),
           "--command", f"{sys.executable} {script} {{lora_rank}}", "--quiet", "--no-report"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True)
    checkpoint = out / "optimization_checkpoint.json"
    deadline, records = time.time() + 120, []
    while time.time() < deadline:
        if checkpoint.exists():
            records = json.loads(checkpoint.read_text())["records"]
            if sum(r["state"] == "completed" for r in records) >= 2 and sum(r["state"] == "running" for r in records) >= 2:
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    records = json.loads(checkpoint.read_text())["records"]
    in_flight = [r["index"] for r in records if r["state"] == "running"]
    completed = {r["index"]: r for r in records if r["state"] == "completed"}
    assert len(in_flight) >= 2 and completed
    resumed = run_cli("-m", "loratune.cli", "resume", str(out), "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads((out / "optimization_results.json").read_text())["trials"]
    assert len(final) == 8 and all(t["state"] == "completed" for t in final)
    for t in final:
        if t["index"] in completed:
            assert t["metrics"] == completed[t["index"]]["metrics"] and t["restarts"] == 0
        if t["index"] in in_flight:
            assert t["restarts"] == 1


def test_gpus_are_handed_out_one_set_per_trial():
    from loratune.executors.local import LocalExecutor

    executor = LocalExecutor(slots=8, gpus=["0", "1", "2", "3"], gpus_per_trial=2)
    assert executor.slots == 2  # never more concurrent trials than GPU sets
    assert LocalExecutor(slots=2, gpus=[]).threads == max(1, (os.cpu_count() or 1) // 2)


ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'loratune[ray]'")


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_small_study_on_local_ray_packs_on_an_actor_and_loses_what_its_trials_lose_alone(tiny_model, tmp_path,
                                                                                        local_ray):
    """One actor training packs of two: the trials train together on its one worker, their files come back
    to the driver, and each loses what it loses alone on this machine."""
    settings = dict(num_trials=2, quiet=True, report=False, seed=0, training={"epochs": 0.2})
    results = run_optimization(output_dir=tmp_path / "ray", executor="ray", pack=2, **settings)
    trials = results["trials"]
    assert [t["state"] for t in trials] == ["completed", "completed"]
    assert [t["extra"]["pack"] for t in trials] == [2, 2] and max_overlap(intervals(results)) == 2
    for t in trials:  # the trial's files came back from the Ray task to the driver's output directory
        assert (tmp_path / "ray" / "trials" / str(t["index"]) / "metrics.json").exists()
        assert t["curve"] and t["metrics"]["loss"] == t["curve"][-1]["val_loss"]
    best = results["best_trial"]
    assert (tmp_path / "ray" / "trials" / str(best) / "adapter" / "adapter_model.safetensors").exists()
    alone = run_optimization(output_dir=tmp_path / "alone", pack=1, scoring={"subset": 0}, **settings)["trials"]
    assert [t["params"] for t in trials] == [t["params"] for t in alone]
    for packed, single in zip(trials, alone, strict=True):
        assert packed["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-4)
