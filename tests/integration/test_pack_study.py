"""Packed trials in a whole study: Ax chooses a pack's points in one call, a trial packed scores what it
scores alone, and a study killed while a pack trains loses no completed trial and leaves no worker."""

import json
import signal

import pytest
from conftest import fake_loss, run_cli, wait_for
from test_lifetimes import alive, start_study

from loratune.errors import StudyAborted
from loratune.optimizer import Optimizer, seam
from loratune.trial import TrialState


def study(tmp_path, name, pack, asks=None, monkeypatch=None):
    from loratune import run_optimization

    if asks is not None:  # the sizes of Ax's calls
        ask = Optimizer.ask
        monkeypatch.setattr(Optimizer, "ask", lambda self, n: asks.append(n) or ask(self, n))
    results = run_optimization(num_trials=4, output_dir=tmp_path / name, seed=3, quiet=True, report=False, pack=pack,
                               training={"epochs": 0.2}, scoring={"subset": 0})
    return {t["index"]: (t["params"], t["metrics"]["loss"], t["state"], t["extra"].get("pack")) for t in results["trials"]}


def test_a_packed_study_asks_ax_once_a_pack_and_its_trials_score_what_they_score_alone(tiny_model, tmp_path, monkeypatch):
    """4 trials are the baseline and the initial design, the same points whatever the pack: so each trial's
    loss packed in twos must be its loss alone (to 1e-4, the trainer's promise)."""
    asks: list[int] = []
    packed = study(tmp_path, "packed", 2, asks, monkeypatch)
    assert asks == [1, 2]  # the baseline and one point, then the second pack's two points in one call
    alone = study(tmp_path, "alone", 1)
    assert asks == [1, 2, 1, 1, 1]  # alone, a point at a time
    assert sorted(packed) == sorted(alone) == [0, 1, 2, 3]
    assert [packed[i][3] for i in range(4)] == [2, 2, 2, 2] and [alone[i][3] for i in range(4)] == [1, 1, 1, 1]
    for index, (params, loss, state, _) in alone.items():
        assert state == packed[index][2] == "completed"
        assert packed[index][0] == params
        assert packed[index][1] == pytest.approx(loss, rel=1e-4)


@pytest.mark.slow
def test_kill_9_while_a_pack_trains_ends_its_worker_loses_no_completed_trial_and_resume_reruns_the_pack(
        tiny_model, tmp_path):
    config = tmp_path / "packed.yaml"  # the baseline's pack ends, then the second pack trains long enough to be killed
    config.write_text("trials: 4\npack: 2\ntraining: {epochs: 0.2}\nscoring: {subset: 0}\n")
    out = tmp_path / "study"
    proc = start_study(tmp_path, "--config", str(config))
    checkpoint = out / "optimization_checkpoint.json"

    def second_pack_training():
        records = json.loads(checkpoint.read_text())["records"] if checkpoint.exists() else []
        running = [r for r in records if r["state"] == "running" and r["index"] >= 2]
        locks = [out / r["directory"] / ".lock" for r in running]
        return len(running) == 2 and all(lock.exists() and lock.read_text().strip() for lock in locks) and locks

    locks = wait_for(second_pack_training, "the second pack to train", 180)
    worker = int(locks[0].read_text())
    assert worker == int(locks[1].read_text())  # one worker holds the pack
    proc.send_signal(signal.SIGKILL)  # the study alone, as a user's kill -9 does
    proc.wait()
    wait_for(lambda: not alive(worker), "the pack's worker to end", 10)
    records = json.loads(checkpoint.read_text())["records"]
    completed = {r["index"]: r for r in records if r["state"] == "completed"}
    assert sorted(completed) == [0, 1]

    resumed = run_cli("-m", "loratune.cli", "resume", str(out), "--quiet", "--no-report", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final = {t["index"]: t for t in json.loads((out / "optimization_results.json").read_text())["trials"]}
    assert sorted(final) == [0, 1, 2, 3] and all(t["state"] == "completed" for t in final.values())
    for index, before in completed.items():  # nothing completed was lost, changed or rerun
        assert final[index]["metrics"] == before["metrics"] and final[index]["restarts"] == 0
    assert final[2]["restarts"] == final[3]["restarts"] == 1


class ScriptedPacks:
    """An executor with one worker that trains what it was handed since the last poll as one pack: a pack
    of more than ``fits`` trials runs out of memory (the worker reports the pack's size, as packed_worker.py
    does), a smaller one completes with the scripted loss."""

    def __init__(self, pack: int, fits: int):
        self.slots, self.fits, self.handed, self.packs = pack, fits, [], []

    def submit(self, spec):
        self.handed.append(spec)

    def poll(self, timeout):
        from loratune.executors import Event
        from loratune.trial import TrialResult, TrialState

        pack, self.handed = self.handed, []
        if pack:
            self.packs.append([s.index for s in pack])
        if len(pack) > self.fits:
            return [Event(s.index, result=TrialResult(TrialState.OUT_OF_MEMORY, reason="CUDA out of memory",
                                                      extra={"pack": len(pack)})) for s in pack]
        return [Event(s.index, result=TrialResult(TrialState.COMPLETED, {"loss": fake_loss(s.params)})) for s in pack]

    def limit_pack(self, size):
        self.slots = size

    def together(self):
        import contextlib

        return contextlib.nullcontext()  # a pack here is what was handed over between two polls

    def stop(self, index):
        pass

    go_on = stop

    def cancel(self, index, reason):
        pass

    def shutdown(self):
        pass


def scripted_study(tmp_path, fits: int, trials: int = 6):
    from loratune.checkpoint import StoredStudy, StudyPaths
    from loratune.config import StudyConfig
    from loratune.console import StudyConsole
    from loratune.search_space import study_space
    from loratune.study import Study

    cfg = StudyConfig(trials=trials, pack=4, seed=0, report=False)
    cfg.scoring.subset = 0
    space = study_space(cfg)
    optimizer = Optimizer.create(space, cfg.objectives, cfg.minimize, [], 0, cfg.init_trials)
    executor = ScriptedPacks(4, fits)
    console = StudyConsole(quiet=True)
    lines = []
    console.print = lambda text, *a, **k: lines.append(str(text))
    study = Study(StoredStudy(cfg, [], "finetune"), StudyPaths.from_output(tmp_path / "study"), optimizer, console,
                  executor=executor)
    try:
        study.run()
    except StudyAborted as exc:  # every trial out of memory: none completed
        lines.append(str(exc))
    return study, executor, lines


def test_a_pack_out_of_memory_runs_its_trials_again_in_smaller_packs_under_the_same_indices(tmp_path):
    study, executor, lines = scripted_study(tmp_path, fits=2)
    first = [dict(r.params) for r in study.records[:4]]
    assert executor.packs == [[0, 1, 2, 3], [0, 1], [2, 3], [4, 5]]
    assert [r.index for r in study.records] == list(range(6))  # no trial added for a rerun
    assert [dict(r.params) for r in study.records[:4]] == first
    assert all(r.state is TrialState.COMPLETED for r in study.records)
    assert [r.restarts for r in study.records] == [1, 1, 1, 1, 0, 0]
    assert sum("out of memory in a pack of 4" in line and "at most 2" in line for line in lines) == 1


def test_a_resumed_study_keeps_the_smaller_packs_an_out_of_memory_left(tmp_path):
    from loratune import checkpoint
    from loratune.console import StudyConsole
    from loratune.study import Study

    scripted_study(tmp_path, fits=2)
    paths, stored = checkpoint.load(tmp_path / "study", additional_trials=2)
    assert stored.pack_limit == 2
    executor, lines = ScriptedPacks(4, fits=2), []
    console = StudyConsole(quiet=True)
    console.print = lambda text, *a, **k: lines.append(str(text))
    optimizer = Optimizer.restore(stored.ax, stored.space, 0, stored.config.early_stopping)
    Study(stored, paths, optimizer, console, executor=executor).run()
    assert executor.packs[0] == [6, 7]  # not four at once, out of memory again (then the final test's job)
    assert all(r.state is TrialState.COMPLETED for r in stored.records) and len(stored.records) == 8
    assert any("at most 2 trials" in line and "earlier session" in line for line in lines)


def test_an_out_of_memory_alone_is_the_points_own(tmp_path):
    study, executor, lines = scripted_study(tmp_path, fits=0, trials=4)
    assert executor.packs == [[0, 1, 2, 3], [0, 1], [0], [1], [2], [3]]  # halved down to one trial
    assert [(r.state, r.restarts) for r in study.records] == [(TrialState.OUT_OF_MEMORY, 2)] * 2 + [(TrialState.OUT_OF_MEMORY, 1)] * 2
    assert any("no trial completed" in line for line in lines)
    assert seam.experiment(study.opt.client).trials[0].status.is_abandoned  # Ax never proposes the point again


def test_pack_auto_packs_a_small_model_on_the_cpu_only(tiny_model, monkeypatch):
    from loratune.executors import AUTO_PACK, auto_pack

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("loratune.executors.local.visible_gpus", lambda: [])
    assert auto_pack("builtin:tiny-qwen2") == AUTO_PACK > 1
    monkeypatch.setattr("loratune.executors.local.visible_gpus", lambda: ["0"])
    assert auto_pack("builtin:tiny-qwen2") == 1  # not measured on a GPU yet
