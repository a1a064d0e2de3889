"""A user's own training script as a study's trials (--command): with LoratuneCallback each evaluation is a
curve point, the threshold rule stops a trial at the point judged, and its script ends there."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

# A trainer's loop in miniature: an evaluation every 10 of 40 steps, through the callback, as a
# Trainer calls it; the loss is lowest at the baseline's learning rate (2e-4) at every step.
SCRIPT = """
import math, sys
from types import SimpleNamespace
from loratune.integrations import LoratuneCallback, trial_params

params = trial_params()
callback, reached = LoratuneCallback(), 0
for step in (10, 20, 30, 40):
    state = SimpleNamespace(global_step=step, max_steps=40, is_world_process_zero=True)
    control = SimpleNamespace(should_training_stop=False)
    loss = (1 + abs(math.log10(params["learning_rate"] / 2e-4))) * (1 - step / 100)
    callback.on_evaluate(None, state, control, metrics={"eval_loss": loss, "eval_runtime": 0.1})
    reached = step
    if control.should_training_stop:
        break
open(sys.argv[1], "a").write(f"{params['learning_rate']} {reached}\\n")
"""


def study(tmp_path, command: str, trials: int) -> list[dict]:
    out = tmp_path / "study"
    result = run_cli(str(ROOT / "ax_optimization.py"), "--trials", str(trials), "--output", str(out), "--command",
                     command, "--set", "early_stopping.threshold=baseline", "--set", "early_stopping.check_at=0.3",
                     "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "optimization_results.json").read_text())["trials"]


def assert_nothing_left_running(what: str) -> None:
    assert subprocess.run(["pgrep", "-f", what], capture_output=True).returncode == 1, f"{what} still running"


def test_a_script_with_the_callback_has_curves_and_stops_at_the_point_judged(tmp_path):
    script, reached = tmp_path / "train.py", tmp_path / "reached"
    script.write_text(SCRIPT)
    trials = study(tmp_path, f"{sys.executable} {script} {reached}", trials=2)
    assert trials[0]["baseline"] and trials[0]["state"] == "completed"
    assert trials[0]["metrics"]["loss"] == pytest.approx(0.6)  # its last evaluation: no JSON line printed
    assert [p["progress"] for p in trials[0]["curve"]] == [0.25, 0.5, 0.75, 1.0]
    for trial in trials[1:]:  # worse than the baseline at every point: stopped at the first point past 30%
        assert trial["state"] == "early_stopped" and [p["progress"] for p in trial["curve"]] == [0.25, 0.5]
        assert trial["training_saved"] == 0.5 and trial["stop_requested_at"] == 0.5
    ends = dict(line.split() for line in reached.read_text().splitlines())
    assert sorted(ends.values()) == ["20", "40"]  # the stopped script ended itself at step 20
    assert_nothing_left_running(str(script))


@pytest.mark.slow
@pytest.mark.parametrize("example", ["hf_trainer.py", "trl_sft.py"])
def test_the_examples_tune_as_their_first_lines_say(tmp_path, tiny_model, example):
    """The command each example opens with, on the demo model (5 trials as written there; the baseline and one
    more show the same)."""
    if example == "trl_sft.py":
        pytest.importorskip("trl")  # the dev extra has it; a user's venv may not
    path = ROOT / "examples" / example
    assert f'--command "python examples/{example}"' in path.read_text()
    trials = study(tmp_path, f"{sys.executable} {path} --output {tmp_path / 'out'}", trials=2)
    assert all(len(t["curve"]) >= 1 for t in trials)
    assert trials[0]["state"] == "completed" and trials[0]["metrics"]["loss"] == trials[0]["curve"][-1]["loss"]
    stopped = [t for t in trials if t["state"] == "early_stopped"]
    assert stopped and all(t["curve"][-1]["step"] < 40 for t in stopped)
    assert_nothing_left_running(str(path))
