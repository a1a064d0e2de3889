"""No trial process outlives its study, however the study ends, and a re-run never shares its
trial directory with an older process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, wait_for

from loratune.processes import TrialLock

# A training command that starts a child of its own, records both pids, and trains "forever" the
# first time; the re-run after a resume finishes at once.
TRAIN = """
import json, os, subprocess, sys, time
pids, marker = sys.argv[2], sys.argv[3]
first = not os.path.exists(marker)
open(marker, "a").close()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(pids, "a") as f:
    f.write(f"{os.getpid()} {child.pid}\\n")
if first:
    time.sleep(300)
child.kill()
print(json.dumps({"loss": 1.0 / int(sys.argv[1])}))
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead, only not yet reaped by its parent
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def start_study(tmp_path, *args) -> subprocess.Popen:
    # like a user's terminal: the study is the only process we kill, its trials are left to it
    return subprocess.Popen([sys.executable, "-m", "loratune.cli", "optimize", "--output", str(tmp_path / "study"),
                             "--quiet", "--no-report", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_kill_9_of_the_study_alone_ends_its_command_trial_and_the_trials_children(tmp_path):
    script, pids = tmp_path / "train.py", tmp_path / "pids"
    script.write_text(TRAIN)
    command = f"{sys.executable} {script} {{lora_rank}} {pids} {tmp_path / 'marker'}"
    study = start_study(tmp_path, "--trials", "2", "--command", command)
    trial_pids = [int(p) for p in wait_for(lambda: pids.exists() and pids.read_text().split(), "the trial", 60)]
    wait_for((tmp_path / "study" / "optimization_checkpoint.json").exists, "the first checkpoint", 60)
    lock_holder = int((tmp_path / "study" / "trials" / "0" / ".lock").read_text())
    study.send_signal(signal.SIGKILL)
    study.wait()
    wait_for(lambda: not any(alive(p) for p in [*trial_pids, lock_holder]), "the trial's processes to end", 10)

    resumed = run_cli("-m", "loratune.cli", "resume", str(tmp_path / "study"), "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    trials = json.loads((tmp_path / "study" / "optimization_results.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["completed", "completed"]
    assert trials[0]["restarts"] == 1 and trials[0]["metrics"]["loss"] == pytest.approx(1 / 16)


@pytest.mark.slow
def test_kill_9_of_the_study_alone_ends_its_fine_tune_worker(tiny_model, tmp_path):
    config = tmp_path / "slow.yaml"  # long enough to be killed while training
    config.write_text("trials: 2\ntraining: {epochs: 20}\n")
    study = start_study(tmp_path, "--config", str(config))
    lock = tmp_path / "study" / "trials" / "0" / ".lock"
    worker = int(wait_for(lambda: lock.exists() and lock.read_text().strip(), "the baseline's worker", 120))
    assert alive(worker)
    study.send_signal(signal.SIGKILL)
    study.wait()
    wait_for(lambda: not alive(worker), "the worker to end", 10)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, as pgrep sees them now."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return {d for child in map(int, found) for d in {child, *descendants(child)}}


@pytest.mark.parametrize("trials", ["command", pytest.param("finetune", marks=pytest.mark.slow)])
def test_sigterm_ends_the_study_as_ctrl_c_does_with_its_resume_line_and_no_process_left(tiny_model, tmp_path, trials):
    """As a scheduler or container runtime stops it: the study ends its trials, saves, says how to resume,
    and exits with 143 (128 + SIGTERM)."""
    script, pids = tmp_path / "train.py", tmp_path / "pids"
    script.write_text(TRAIN)
    (tmp_path / "slow.yaml").write_text("trials: 2\ntraining: {epochs: 20}\n")  # long enough to be stopped
    args = ["--command", f"{sys.executable} {script} {{lora_rank}} {pids} {tmp_path / 'marker'}"] \
        if trials == "command" else ["--config", str(tmp_path / "slow.yaml")]
    study = subprocess.Popen([sys.executable, "-m", "loratune.cli", "optimize", "--output", str(tmp_path / "study"),
                              "--no-report", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "study" / "trials" / "0" / ".lock"  # the trial's directory, held by what runs it
    wait_for(lambda: lock.exists() and lock.read_text().strip(), "the first trial to start", 120)
    if trials == "command":  # its script and the script's own child too
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, "the trial's child", 60)
    below = descendants(study.pid)
    assert int(lock.read_text()) in below
    study.send_signal(signal.SIGTERM)
    out, err = study.communicate(timeout=60)
    assert study.returncode == 143, err
    assert f"interrupted; resume with: loratune resume {tmp_path / 'study'}" in out and "Traceback" not in err
    wait_for(lambda: not any(alive(p) for p in below), "the trial's processes to end", 10)
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""
    saved = json.loads((tmp_path / "study" / "optimization_checkpoint.json").read_text())
    assert saved["records"][0]["state"] in ("running", "queued")


def test_a_rerun_first_ends_an_older_process_still_on_the_trial(tmp_path):
    trial = tmp_path / "trials" / "3"
    older = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom loratune.processes import TrialLock\n"
                              f"TrialLock({str(trial)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(300)"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert older.stdout.readline().strip() == "locked"
    assert TrialLock.clear(trial) == older.pid
    assert older.wait(timeout=10) == -signal.SIGKILL
    assert TrialLock.clear(trial) is None  # nothing holds it any more


def test_an_exception_in_the_loop_stops_the_running_trials(tmp_path, monkeypatch):
    """Through the Python API the caller's process lives on: the study must end its trials itself."""
    from loratune import run_optimization
    from loratune.executors.local import LocalExecutor

    script, pids = tmp_path / "train.py", tmp_path / "pids"
    script.write_text(TRAIN)

    def broken(self, timeout):
        wait_for(lambda: pids.exists() and pids.read_text().split(), "the trial", 60)
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(LocalExecutor, "poll", broken)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        run_optimization(num_trials=2, output_dir=tmp_path / "study", quiet=True, report=False,
                         command=f"{sys.executable} {script} {{lora_rank}} {pids} {tmp_path / 'marker'}")
    trial_pids = [int(p) for p in pids.read_text().split()]
    wait_for(lambda: not any(alive(p) for p in trial_pids), "the trial's processes to end", 10)


def test_a_trial_past_its_time_limit_is_stopped_with_its_children_and_the_study_goes_on(tmp_path):
    script, pids = tmp_path / "train.py", tmp_path / "pids"
    script.write_text(TRAIN.replace("if first:", "if int(sys.argv[1]) == 64:"))  # rank 64 hangs, the others finish
    from loratune import run_optimization

    results = run_optimization(num_trials=3, output_dir=tmp_path / "study", quiet=True, report=False, trial_timeout=3,
                               search_space={"lora_rank": [16, 64]}, max_failures_in_a_row=5,
                               command=f"{sys.executable} {script} {{lora_rank}} {pids} {tmp_path / 'marker'}")
    states = {t["params"]["lora_rank"]: (t["state"], t["reason"]) for t in results["trials"]}
    assert states[64] == ("failed", "timeout: still running after 3 s (trial_timeout)")
    assert states[16][0] == "completed" and len(results["trials"]) == 3
    every_pid = [int(p) for p in pids.read_text().split()]
    wait_for(lambda: not any(alive(p) for p in every_pid), "the timed-out trial's processes to end", 10)


@pytest.mark.slow
def test_a_cancelled_fine_tune_frees_its_worker_and_the_next_trial_runs(tiny_model, tmp_path):
    """What a trial_timeout does to a worker that keeps the model loaded: it goes, memory and all."""
    from loratune.config import FinetuneConfig, to_dict
    from loratune.executors.base import TrialSpec
    from loratune.executors.local import LocalExecutor

    def spec(index: int, epochs: float) -> TrialSpec:
        cfg = FinetuneConfig(output_dir=str(tmp_path / str(index)))
        cfg.training.epochs = epochs
        return TrialSpec(index, {}, tmp_path / str(index), to_dict(cfg))

    executor = LocalExecutor(reuse_model=True)
    try:
        executor.submit(spec(0, 30))
        worker = executor.running[0].runner.pid
        lock = tmp_path / "0" / ".lock"
        wait_for(lambda: (tmp_path / "0" / "progress.jsonl").exists(), "the trial to train", 120)
        executor.cancel(0, "timeout: still running after 25 s (trial_timeout)")
        events = []
        wait_for(lambda: events.extend(executor.poll(0.2)) or any(e.result for e in events), "the cancelled result", 30)
        result = next(e.result for e in events if e.result)
        assert result.state.value == "failed" and result.reason.startswith("timeout")
        wait_for(lambda: not alive(worker), "the worker to end", 10)
        assert TrialLock.clear(lock.parent) is None
        executor.submit(spec(1, 0.1))
        events = []
        wait_for(lambda: events.extend(executor.poll(0.5)) or any(e.result for e in events), "the next trial", 120)
        result = next(e.result for e in events if e.result)
        assert result.state.value == "completed" and result.extra["timings"]["load_s"] > 0  # a fresh worker
    finally:
        executor.shutdown()


def test_a_study_refused_after_its_worker_started_early_leaves_no_worker(tiny_model, tmp_path, monkeypatch):
    """The kept worker starts while Ax sets up (api._prestarted); a study that ends before its loop does
    not leave it behind in the caller's process."""
    from loratune import run_optimization
    from loratune.errors import LoratuneError
    from loratune.executors.serving import ServingWorker

    started = []
    prestart = ServingWorker.prestart

    def remember(self, key, quantized):
        prestart(self, key, quantized)
        started.append(self.pid)

    def refused(*args, **kwargs):
        raise LoratuneError("search space: Ax rejected it")

    monkeypatch.setattr(ServingWorker, "prestart", remember)
    monkeypatch.setattr("loratune.api.Optimizer.create", refused)
    with pytest.raises(LoratuneError, match="Ax rejected it"):
        run_optimization(num_trials=2, output_dir=tmp_path / "study", quiet=True, report=False)
    assert started and all(started)
    wait_for(lambda: not any(alive(p) for p in started), "the early worker to end", 10)


def test_a_warm_start_refused_starts_no_worker(tiny_model, tmp_path, monkeypatch):
    """Every input check, the earlier studies of a warm start included, comes before the early worker."""
    from loratune import run_optimization
    from loratune.errors import LoratuneError
    from loratune.executors.serving import ServingWorker

    started = []
    monkeypatch.setattr(ServingWorker, "prestart", lambda self, key, quantized: started.append(key))
    with pytest.raises(LoratuneError, match=r"warm_start\[0\]: .*nowhere does not exist"):
        run_optimization(num_trials=2, output_dir=tmp_path / "study", quiet=True, report=False,
                         warm_start=[str(tmp_path / "nowhere")])
    assert started == [] and not (tmp_path / "study").exists()


def test_a_rerun_starts_in_a_fresh_directory_that_keeps_its_last_runs_log(tmp_path):
    from loratune.processes import fresh_trial_dir
    from loratune.trial_dir import LOG_FILE, PREVIOUS_LOG_FILE

    trial = tmp_path / "trials" / "2"
    trial.mkdir(parents=True)
    (trial / LOG_FILE).write_text("RuntimeError: CUDA out of memory\n")
    (trial / "progress.jsonl").write_text('{"kind": "eval"}\n')
    assert fresh_trial_dir(trial) == trial
    assert sorted(p.name for p in trial.iterdir()) == [PREVIOUS_LOG_FILE]
    assert "out of memory" in (trial / PREVIOUS_LOG_FILE).read_text()
    assert sorted(p.name for p in fresh_trial_dir(tmp_path / "trials" / "3").iterdir()) == []  # a first run
