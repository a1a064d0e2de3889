"""Every way a worker can end while a trial is handed to it gives that trial a clean outcome: run on a
fresh worker when it never started, recorded failed with its reason when it did; the next trial runs.

Each ending is made to happen on purpose (a scripted trial, a signal at a known moment; see
fault_worker.py), on the local executor and on Ray, with workers that keep the model loaded and with a
fresh process per trial.
"""

import fcntl
import json
import os
import signal
import struct
import sys
import termios
from pathlib import Path

import pytest
from conftest import wait_for

from loratune.executors.base import TrialSpec
from loratune.executors.local import LocalExecutor
from loratune.trial import TrialResult, TrialState, result_from_exit

FAULT_WORKER = [sys.executable, str(Path(__file__).with_name("fault_worker.py"))]
EXECUTORS = ["local", "ray"]


def alive(pid: int) -> bool:
    try:  # a zombie is dead, only not yet reaped by its parent
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def freeze(pid: int) -> None:
    """SIGSTOP a process and wait until every thread of it has stopped (the signal takes effect later)."""
    os.kill(pid, signal.SIGSTOP)
    tasks = Path(f"/proc/{pid}/task")
    wait_for(lambda: all((t / "stat").read_text().split(")")[-1].split()[0] == "T" for t in tasks.iterdir()),
             "the process to stop")


def bytes_waiting_on_stdin(pid: int) -> int:
    """What was written to a process's stdin pipe and not yet read (it is not consumed by looking)."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(fd)


class Trials:
    """Submits scripted trials to an executor and waits for their results."""

    def __init__(self, executor, tmp_path: Path):
        self.executor, self.tmp, self.results = executor, tmp_path, {}
        self.ticks: set[int] = set()
        self.points: dict[int, list[dict]] = {}

    def submit(self, index: int, act: str = "complete", model: str = "base-a", await_verdict: bool = False) -> Path:
        """Start trial ``index``; returns the file where its worker writes its pid."""
        pid_file = self.tmp / f"pid-{index}"
        config = {"model": {"name": model}, "training": {}}
        self.executor.submit(TrialSpec(index, {"act": act, "pid_file": str(pid_file)}, self.tmp / "trials" / str(index),
                                       config, await_verdict=await_verdict))
        return pid_file

    def _poll(self) -> None:
        for event in self.executor.poll(0.1):
            if event.tick is not None:
                self.ticks.add(event.index)
            if event.point is not None:
                self.points.setdefault(event.index, []).append(event.point)
            if event.result is not None:
                assert event.index not in self.results, "a trial ended twice"
                self.results[event.index] = event.result

    def result(self, index: int) -> TrialResult:
        wait_for(lambda: self._poll() or index in self.results, f"trial {index}'s result")
        return self.results[index]

    def point(self, index: int, n: int) -> dict:
        """Wait for the trial's ``n``-th validation point (from 1); the point."""
        wait_for(lambda: self._poll() or len(self.points.get(index, [])) >= n, f"trial {index}'s point {n}")
        return self.points[index][n - 1]

    def training(self, index: int, pid_file: Path) -> int:
        """Wait until the trial is being trained (its first step heard); its worker's pid."""
        wait_for(lambda: self._poll() or index in self.ticks, f"trial {index} to train")
        return int(pid_file.read_text())


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'loratune[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def make(request, tmp_path):
    """make(kind, reuse, ...) -> Trials on a fresh executor of that kind; shut down after the test."""
    made = []

    def build(kind: str, reuse: bool = True, trials_per_worker: int = 50, command=FAULT_WORKER) -> Trials:
        if kind == "ray":
            request.getfixturevalue("ray_cluster")
            from loratune.executors.ray import RayExecutor

            executor = RayExecutor(1, reuse_model=reuse, trials_per_worker=trials_per_worker, worker_command=command)
        else:
            executor = LocalExecutor(reuse_model=reuse, trials_per_worker=trials_per_worker, worker_command=command)
        made.append(executor)
        return Trials(executor, tmp_path)

    yield build
    for executor in made:
        executor.shutdown()


def pid_of(result: TrialResult) -> int:
    return result.extra["pid"]


@pytest.mark.parametrize("kind", EXECUTORS)
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "fresh"])
def test_a_reported_failure_is_recorded_and_the_next_trial_runs_on_a_fresh_worker(make, kind, reuse):
    t = make(kind, reuse)
    for index, act in enumerate(["fail", "oom", "complete", "complete"]):
        t.submit(index, act)
        t.result(index)
    states = [t.results[i].state for i in range(4)]
    assert states == [TrialState.FAILED, TrialState.OUT_OF_MEMORY, TrialState.COMPLETED, TrialState.COMPLETED]
    assert t.results[0].reason == "non-finite loss: validation loss is nan at step 1"
    pids = [pid_of(t.results[i]) for i in range(4)]
    assert len(set(pids[:3])) == 3  # after each failure a fresh worker: three trials, three workers
    assert (pids[2] == pids[3]) == reuse  # a worker that completed a trial is kept, when reused


@pytest.mark.parametrize("kind", EXECUTORS)
def test_a_result_that_does_not_read_back_fails_its_trial_and_the_study_goes_on(make, kind):
    """A kept worker's result file (a Ray actor's reply) whose curve holds a loss that is not a number:
    that trial fails with the reason and where, and the next trial completes."""
    t = make(kind)
    t.submit(0, "bad_result")
    bad = t.result(0)
    assert bad.state is TrialState.FAILED
    assert "val_loss" in bad.reason and ("result.json" in bad.reason or "Ray actor's result" in bad.reason), bad.reason
    t.submit(1)
    assert t.result(1).state is TrialState.COMPLETED


@pytest.mark.parametrize("kind", EXECUTORS)
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "fresh"])
@pytest.mark.parametrize("how", ["crash", "kill -9"])
def test_a_worker_that_dies_during_a_trial_fails_that_trial_only(make, kind, reuse, how):
    t = make(kind, reuse)
    pid_file = t.submit(0, "crash" if how == "crash" else "hang")
    if how == "kill -9":
        os.kill(t.training(0, pid_file), signal.SIGKILL)
    failed = t.result(0)
    assert failed.state is TrialState.FAILED
    expected = "exited with code 1" if how == "crash" else "was killed by SIGKILL"
    assert failed.reason.startswith(f"worker process {expected}"), failed.reason
    t.submit(1)
    assert t.result(1).state is TrialState.COMPLETED
    assert pid_of(t.results[1]) != int(pid_file.read_text())


@pytest.mark.parametrize("kind", EXECUTORS)
def test_a_trial_handed_to_a_worker_that_dies_before_taking_it_runs_on_a_fresh_one(make, kind):
    """The race of the issue: the next trial is handed to a kept worker that ends before it reads it
    (frozen with SIGSTOP so that it cannot take the trial, then killed)."""
    t = make(kind, reuse=True)
    pid_file = t.submit(0)
    assert t.result(0).state is TrialState.COMPLETED
    kept = int(pid_file.read_text())
    freeze(kept)  # it cannot read its stdin any more
    try:
        t.submit(1)  # (a Ray actor hands it over inside its own call, a moment later)
        wait_for(lambda: bytes_waiting_on_stdin(kept), "the hand-over")
    finally:
        os.kill(kept, signal.SIGKILL)
    second = t.result(1)
    assert second.state is TrialState.COMPLETED, second.reason
    assert pid_of(second) != kept


@pytest.mark.parametrize("kind", EXECUTORS)
def test_a_kept_worker_killed_between_trials_is_replaced(make, kind):
    t = make(kind, reuse=True)
    pid_file = t.submit(0)
    t.result(0)
    kept = int(pid_file.read_text())
    os.kill(kept, signal.SIGKILL)
    wait_for(lambda: not alive(kept), "the worker to die")
    t.submit(1)
    assert t.result(1).state is TrialState.COMPLETED and pid_of(t.results[1]) != kept


@pytest.mark.parametrize("kind", EXECUTORS)
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "fresh"])
def test_a_worker_that_cannot_start_fails_its_trial_once_with_its_reason(make, kind, reuse, tmp_path):
    broken = [sys.executable, "-c", "import sys; print('libcuda.so.1: cannot open shared object file', file=sys.stderr); "
                                    "sys.exit(3)"]
    t = make(kind, reuse, command=broken)
    t.submit(0)
    failed = t.result(0)
    assert failed.state is TrialState.FAILED
    assert failed.reason == ("worker process exited with code 3 before it started the trial: "
                             "libcuda.so.1: cannot open shared object file")
    log = (tmp_path / "trials" / "0" / "log.txt").read_text()
    assert log.count("$ ") == 1  # started once: no retry loop


@pytest.mark.parametrize("kind", EXECUTORS)
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "fresh"])
def test_a_cancelled_trial_fails_with_its_reason_and_takes_its_worker_along(make, kind, reuse):
    t = make(kind, reuse)
    pid_file = t.submit(0, "hang")
    worker = t.training(0, pid_file)
    t.executor.cancel(0, "timeout: still running after 5 s (trial_timeout)")
    cancelled = t.result(0)
    assert (cancelled.state, cancelled.reason) == (TrialState.FAILED, "timeout: still running after 5 s (trial_timeout)")
    wait_for(lambda: not alive(worker), "the cancelled trial's worker to end")
    assert (t.tmp / "trials" / "0" / "log.txt").exists()  # its log is kept, also from a Ray actor
    t.submit(1)
    assert t.result(1).state is TrialState.COMPLETED


@pytest.mark.parametrize("kind", EXECUTORS)
def test_an_early_stopped_trial_keeps_its_worker(make, kind):
    t = make(kind, reuse=True)
    pid_file = t.submit(0, "hang")
    worker = t.training(0, pid_file)
    t.executor.stop(0)
    assert t.result(0).state is TrialState.EARLY_STOPPED
    t.submit(1)
    assert pid_of(t.result(1)) == worker


@pytest.mark.parametrize("kind", EXECUTORS)
def test_a_trial_awaiting_verdicts_trains_on_when_told_and_stops_at_the_point_judged(make, kind):
    t = make(kind, reuse=True)
    t.submit(0, "curve", await_verdict=True)
    assert t.point(0, 1)["progress"] == 0.25
    t.executor.go_on(0)
    assert t.point(0, 2)["progress"] == 0.5
    t.executor.stop(0)
    stopped = t.result(0)
    assert stopped.state is TrialState.EARLY_STOPPED
    assert [p["progress"] for p in stopped.curve] == [0.25, 0.5]  # not a point further, however late the stop came
    t.submit(1, "curve")  # one that awaits no verdicts runs through
    assert [p["progress"] for p in t.result(1).curve] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("kind", EXECUTORS)
def test_turnover_and_a_base_switch_start_fresh_workers_between_trials(make, kind):
    t = make(kind, reuse=True, trials_per_worker=2)
    for index, model in enumerate(["base-a", "base-a", "base-a", "base-b", "base-b", "base-a"]):
        t.submit(index, model=model)
        assert t.result(index).state is TrialState.COMPLETED
    pids = [pid_of(t.results[i]) for i in range(6)]
    # two trials a worker; another base model, another worker
    assert pids[0] == pids[1] != pids[2] != pids[3] == pids[4] != pids[5]
    assert len(set(pids)) == 4


BASE_A = {"model": {"name": "base-a"}, "training": {}}  # the config Trials.submit gives a trial on base-a


def prestarted(t: Trials) -> int:
    """Start the executor's kept worker before any trial (as a study does while Ax sets up); its pid."""
    t.executor.prestart(BASE_A)
    return t.executor.runners[0].pid


def test_a_worker_started_before_the_study_takes_its_first_trial(make):
    t = make("local", reuse=True)
    early = prestarted(t)
    t.submit(0)
    assert t.result(0).state is TrialState.COMPLETED and pid_of(t.results[0]) == early
    t.submit(1, model="base-b")  # another base model: a fresh worker
    assert t.result(1).state is TrialState.COMPLETED and pid_of(t.results[1]) != early
    t.executor.shutdown()
    wait_for(lambda: not alive(early), "the early worker to end")


@pytest.mark.parametrize("when", ["before the hand-over", "after the hand-over"])
def test_a_worker_started_early_that_dies_before_its_first_trial_hands_it_to_a_fresh_one(make, when):
    t = make("local", reuse=True)
    early = prestarted(t)
    if when == "before the hand-over":
        os.kill(early, signal.SIGKILL)
        wait_for(lambda: not alive(early), "the early worker to die")
        t.submit(0)
    else:
        freeze(early)  # it cannot take the trial it is handed
        try:
            t.submit(0)
            wait_for(lambda: bytes_waiting_on_stdin(early), "the hand-over")
        finally:
            os.kill(early, signal.SIGKILL)
    result = t.result(0)
    assert result.state is TrialState.COMPLETED, result.reason
    assert pid_of(result) != early


def test_a_worker_started_early_is_not_kept_without_reuse(make):
    t = make("local", reuse=False)
    t.executor.prestart(BASE_A)
    assert t.executor.runners[0].pid is None  # a fresh process per trial: nothing to start early


def test_a_ray_actor_that_dies_between_trials_is_replaced_and_one_dying_mid_trial_fails_it(make):
    t = make("ray", reuse=True)
    pid_file = t.submit(0)
    t.result(0)
    actor = int(Path(f"/proc/{int(pid_file.read_text())}/stat").read_text().split(")")[-1].split()[1])  # its parent
    os.kill(actor, signal.SIGKILL)
    wait_for(lambda: not alive(actor), "the actor to die")
    t.submit(1)  # sent to the dead actor: it never started, so it runs on a fresh one
    assert t.result(1).state is TrialState.COMPLETED
    pid_file = t.submit(2, "hang")
    worker = t.training(2, pid_file)
    actor = int(Path(f"/proc/{worker}/stat").read_text().split(")")[-1].split()[1])
    os.kill(actor, signal.SIGKILL)
    lost = t.result(2)
    assert lost.state is TrialState.FAILED and lost.reason.startswith("Ray actor lost: "), lost.reason
    wait_for(lambda: not alive(worker), "the actor's worker to end with it")
    t.submit(3)
    assert t.result(3).state is TrialState.COMPLETED


def test_a_worker_killed_while_the_kernels_oom_killer_struck_is_out_of_memory(make, monkeypatch):
    from loratune.executors import serving

    kills = iter(range(100))
    monkeypatch.setattr(serving, "oom_kill_count", lambda: next(kills))  # the count rises during the trial
    t = make("local", reuse=True)
    pid_file = t.submit(0, "hang")
    os.kill(t.training(0, pid_file), signal.SIGKILL)
    result = t.result(0)
    assert (result.state, result.reason) == (TrialState.OUT_OF_MEMORY,
                                             "worker process was killed by the kernel's out-of-memory killer")


def test_exit_reasons_name_the_signal_and_the_moment():
    assert result_from_exit(-9, "").reason == ("worker process was killed by SIGKILL (the kernel's out-of-memory "
                                               "killer, or a kill from outside)")
    assert result_from_exit(-11, "").reason == "worker process was killed by SIGSEGV"
    assert result_from_exit(1, "Traceback...\nImportError: no torch\n", started=False).reason == \
        "worker process exited with code 1 before it started the trial: ImportError: no torch"
    assert result_from_exit(1, "... CUDA out of memory ...").state is TrialState.OUT_OF_MEMORY
    # the out-of-memory killer's count is the machine's: only a SIGKILL is taken for its work
    assert result_from_exit(-9, "", oom_killed=True).state is TrialState.OUT_OF_MEMORY
    for code in (1, -15):
        assert result_from_exit(code, "", oom_killed=True).state is TrialState.FAILED


class FaultyExecutor:
    """The local executor with a fault in every third trial, a different one each time, at a known moment."""

    FAULTS = ["fail", "oom", "crash", "kill -9", "handed to a dying worker", "timeout"]
    ACTS = {"fail": "fail", "oom": "oom", "crash": "crash", "kill -9": "hang", "timeout": "hang"}

    def __init__(self, tmp_path: Path):
        self.inner, self.tmp = LocalExecutor(worker_command=FAULT_WORKER), tmp_path
        self.slots = self.inner.slots
        self.fault: dict[int, str] = {}
        self.killed: set[int] = set()

    def submit(self, spec: TrialSpec) -> None:
        fault = self.FAULTS[(spec.index // 3) % len(self.FAULTS)] if spec.index % 3 == 2 else None
        self.fault[spec.index] = fault
        params = {**spec.params, "act": self.ACTS.get(fault, "complete"), "pid_file": str(self.tmp / f"pid-{spec.index}")}
        spec = TrialSpec(spec.index, params, spec.directory, spec.config)
        kept = self.inner.runners[0].pid
        if fault != "handed to a dying worker" or kept is None:
            self.inner.submit(spec)
            return
        freeze(kept)
        try:
            self.inner.submit(spec)
            wait_for(lambda: bytes_waiting_on_stdin(kept), "the hand-over")
        finally:
            os.kill(kept, signal.SIGKILL)

    def poll(self, timeout: float):
        events = self.inner.poll(timeout)
        for e in events:
            if e.tick is not None and self.fault.get(e.index) == "kill -9" and e.index not in self.killed:
                self.killed.add(e.index)
                os.kill(int((self.tmp / f"pid-{e.index}").read_text()), signal.SIGKILL)
        return events

    def stop(self, index: int) -> None:
        self.inner.stop(index)

    def together(self):
        import contextlib

        return contextlib.nullcontext()  # each trial handed over at once: a fault waits for its hand-over

    def cancel(self, index: int, reason: str) -> None:
        self.inner.cancel(index, reason)

    def shutdown(self) -> None:
        self.inner.shutdown()


def test_a_30_trial_study_with_a_fault_in_every_third_trial_ends_as_planned(tmp_path):
    from loratune.checkpoint import StoredStudy, StudyPaths
    from loratune.config import StudyConfig
    from loratune.console import StudyConsole
    from loratune.optimizer import Optimizer
    from loratune.search_space import parse_search_space
    from loratune.study import Study

    cfg = StudyConfig(trials=30, search_space={"learning_rate": [1e-5, 1e-3], "lora_rank": [4, 8, 16, 32]},
                      trial_timeout=5, report=False, init_trials=30)  # Sobol points: the loop, not the model, is tested
    space = parse_search_space(cfg.search_space, cfg.constraints, cfg.base())
    optimizer = Optimizer.create(space, cfg.objectives, cfg.minimize, [], 0, cfg.init_trials)
    executor = FaultyExecutor(tmp_path)
    study = Study(StoredStudy(cfg, [], "finetune"), StudyPaths.from_output(tmp_path / "study"), optimizer,
                  StudyConsole(quiet=True), executor=executor)
    result = study.run()

    records = {r["index"]: r for r in result["trials"]}
    assert sorted(records) == list(range(30))  # the budget, used
    expected = {None: ("completed", ""), "handed to a dying worker": ("completed", ""),
                "fail": ("failed", "non-finite loss"), "oom": ("out_of_memory", "OutOfMemoryError"),
                "crash": ("failed", "worker process exited with code 1"),
                "kill -9": ("failed", "worker process was killed by SIGKILL"),
                "timeout": ("failed", "timeout: still running after 5 s")}
    for index, fault in executor.fault.items():
        state, reason = expected[fault]
        assert records[index]["state"] == state and (records[index]["reason"] or "").startswith(reason), \
            (index, fault, records[index]["state"], records[index]["reason"])
    assert set(executor.fault.values()) == set(FaultyExecutor.FAULTS) | {None}
    failing = sum(expected[f][0] != "completed" for f in executor.fault.values())
    assert failing == 9 and sum(r["state"] == "completed" for r in records.values()) == 30 - failing
    saved = json.loads((tmp_path / "study" / "optimization_checkpoint.json").read_text())["records"]
    assert all(r["state"] != "running" for r in saved) and len(saved) == 30


@pytest.mark.slow
def test_a_diverging_baseline_does_not_take_a_study_on_kept_workers_down(tiny_model, tmp_path):
    """The issue's example, on the default path: trial 0 fails (NaN), the next trials run and the study ends."""
    from conftest import run_cli

    config = tmp_path / "study.yaml"
    config.write_text("trials: 2\nseed: 0\nsearch_space:\n  learning_rate: {low: 1.0e-4, high: 1.0e+3, log: true}\n"
                      "  lora_rank: [4, 8, 16]\nlora: {rank: 8}\ntraining: {epochs: 0.25, learning_rate: 1000.0}\n")
    run = run_cli("-m", "loratune.cli", "optimize", "--config", str(config), "--output", str(tmp_path / "study"),
                  "--quiet", "--no-report", cwd=tmp_path)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    trials = json.loads((tmp_path / "study" / "optimization_results.json").read_text())["trials"]
    assert len(trials) == 2 and trials[0]["state"] == "failed"
    assert trials[0]["reason"].startswith("non-finite loss: validation loss is nan")
    assert trials[1]["state"] == "completed"
