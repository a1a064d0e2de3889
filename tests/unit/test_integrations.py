"""LoratuneCallback in a trial's directory: what it writes, when it waits, when it stops; nothing outside a study."""

import json
import threading
import time
from types import SimpleNamespace

from loratune.integrations import LoratuneCallback, eval_metrics, trial_params
from loratune.trial_dir import LAST_EVAL_FILE, PROGRESS_FILE, STOP_FILE, TRIAL_DIR_ENV, TrialSpec, go_on

METRICS = {"eval_loss": 0.7, "eval_accuracy": 0.5, "eval_runtime": 0.04, "eval_samples_per_second": 900.0, "epoch": 0.3}


def state(step: int, steps: int = 40):
    return SimpleNamespace(global_step=step, max_steps=steps, is_world_process_zero=True)


def control():
    return SimpleNamespace(should_training_stop=False)


def in_a_trial(tmp_path, monkeypatch, await_verdict: bool):
    TrialSpec(1, {"learning_rate": 3e-4, "lora_rank": 8}, tmp_path, await_verdict=await_verdict).write()
    monkeypatch.setenv(TRIAL_DIR_ENV, str(tmp_path))
    return LoratuneCallback()


def events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / PROGRESS_FILE).read_text().splitlines()]


def test_outside_a_study_it_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(TRIAL_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    callback, c = LoratuneCallback(), control()
    callback.on_step_end(None, state(10), c)
    callback.on_evaluate(None, state(10), c, metrics=METRICS)
    assert trial_params() == {} and not c.should_training_stop and list(tmp_path.iterdir()) == []


def test_an_evaluation_is_a_curve_point_and_the_trials_result(tmp_path, monkeypatch):
    callback = in_a_trial(tmp_path, monkeypatch, await_verdict=False)
    assert trial_params() == {"learning_rate": 3e-4, "lora_rank": 8}
    callback.on_log(None, state(10), control(), logs={"loss": 0.9})
    callback.on_evaluate(None, state(10), control(), metrics=METRICS)
    assert events(tmp_path) == [{"kind": "eval", "step": 10, "progress": 0.25, "loss": 0.7, "accuracy": 0.5,
                                 "val_loss": 0.7, "train_loss": 0.9}]
    assert json.loads((tmp_path / LAST_EVAL_FILE).read_text()) == {"loss": 0.7, "accuracy": 0.5, "val_loss": 0.7}


def test_it_waits_for_the_verdict_and_trains_on_or_stops(tmp_path, monkeypatch):
    callback = in_a_trial(tmp_path, monkeypatch, await_verdict=True)

    def answer(after: float, verdict) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(after), verdict()))
        thread.start()
        return thread

    told = []  # when the verdict is given: before it is written, so that the callback cannot see it sooner
    thread, c = answer(0.3, lambda: (told.append(time.monotonic()), go_on(tmp_path))), control()
    callback.on_evaluate(None, state(10), c, metrics=METRICS)
    returned = time.monotonic()
    thread.join()
    assert told and returned >= told[0] and not c.should_training_stop  # waited for the verdict, then went on

    thread, c = answer(0.1, lambda: (tmp_path / STOP_FILE).touch()), control()
    callback.on_evaluate(None, state(20), c, metrics=METRICS)
    thread.join()
    assert c.should_training_stop
    callback.on_evaluate(None, state(40), control(), metrics={"eval_loss": 0.1})  # the script's own evaluate() after
    assert [e["step"] for e in events(tmp_path)] == [10, 20]  # the trial ended at the point judged
    assert json.loads((tmp_path / LAST_EVAL_FILE).read_text())["loss"] == 0.7


def test_the_last_point_awaits_no_verdict(tmp_path, monkeypatch):
    callback, c = in_a_trial(tmp_path, monkeypatch, await_verdict=True), control()
    callback.on_evaluate(None, state(40), c, metrics=METRICS)  # would hang here if it waited
    assert not c.should_training_stop and events(tmp_path)[0]["progress"] == 1.0


def test_a_stop_between_evaluations_ends_training_at_the_next_step(tmp_path, monkeypatch):
    callback, c = in_a_trial(tmp_path, monkeypatch, await_verdict=False), control()
    callback.on_step_end(None, state(3), c)
    assert not c.should_training_stop and events(tmp_path)[0] == {"kind": "step", "step": 3, "steps": 40,
                                                                 "elapsed_s": events(tmp_path)[0]["elapsed_s"]}
    (tmp_path / STOP_FILE).touch()
    callback.on_step_end(None, state(4), c)
    assert c.should_training_stop


def test_eval_metrics_keeps_the_models_numbers_only():
    assert eval_metrics({**METRICS, "eval_flag": True, "eval_name": "x", "loss": 3.0}) == {
        "loss": 0.7, "accuracy": 0.5, "val_loss": 0.7}
