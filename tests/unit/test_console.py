"""What the terminal shows while a study runs: the running trials live on a terminal, plain lines in a log,
nothing when quiet."""

import io
from dataclasses import replace

from rich.console import Console

from loratune.console import StudyConsole
from loratune.trial import TrialRecord, TrialState


def test_a_terminal_shows_each_running_trial_live():
    console = StudyConsole(objective="loss", total=20, workers=2)
    console.console = Console(file=io.StringIO(), force_terminal=True, width=140)
    console.elapsed = lambda: 75.0
    a, b = TrialRecord(3, {"lora_rank": 32, "learning_rate": 1.2e-4}), TrialRecord(4, {"lora_rank": 8, "learning_rate": 3e-5})
    console.started(a)
    console.started(b)
    console.tick(a, {"step": 12, "steps": 37, "elapsed_s": 24.0})
    console.point(a, {"step": 12, "progress": 0.32, "val_loss": 0.8123, "loss": 0.8123})
    console.mean_trial_s = 60.0
    console.console.print(console._render())
    shown = console.console.file.getvalue()
    assert "#3" in shown and "rank=32, lr=0.00012" in shown and "12/37" in shown and "0.8123" in shown
    assert "~0:50" in shown  # 25 steps left at 2 s a step
    assert "#4" in shown and "starting" in shown
    assert "study: 0/20 trials done, 1:15 elapsed, ~9:50 left" in shown  # 18 waiting x 60 s / 2 workers + 50 s






def test_a_log_gets_a_plain_line_per_validation_point_and_per_trial_and_quiet_gets_nothing(capsys):
    """What a study in a log file prints, from the events a study's listeners hear (a study from the command line:
    tests/integration/test_study_console.py)."""
    params = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1}
    printed = {}
    for quiet in (False, True):
        console = StudyConsole(quiet=quiet, objective="loss", total=2)  # stdout is no terminal here: plain lines
        baseline = TrialRecord(0, params, baseline=True)
        console.trial_started(baseline)
        console.trial_progress(baseline, tick={"step": 3, "steps": 6, "elapsed_s": 1.5})
        console.trial_progress(baseline, point={"step": 3, "progress": 0.5, "val_loss": 0.6123, "loss": 0.6123})
        done = replace(baseline, state=TrialState.COMPLETED, metrics={"loss": 0.516}, duration_s=3.0)
        console.trial_ended(done, [done])
        printed[quiet] = capsys.readouterr().out
    assert printed[False].splitlines() == [
        "  trial #0: step 3/6, 50% of training, val loss 0.6123",
        "Trial 1/2 (#0): rank=16, alpha=32, lr=0.0002, bs=1 → loss=0.5160 (baseline)  (0:00 elapsed, ~0:03 left)"]
    assert printed[True] == ""


def test_the_summary_gives_the_time_in_ax_and_in_all_in_one_unit():
    from loratune.console import duration

    assert (duration(4.62), duration(4.71), duration(59.96), duration(3725)) == ("4.6 s", "4.7 s", "1:00", "1:02:05")


def test_a_test_score_that_is_zero_for_the_baseline_shows_its_absolute_change_not_nan():
    """A task score of 0 for the baseline (SmolLM2's plan accuracy on a short study) has no relative change."""
    from loratune.console import test_lines

    zero = {"best": 0.0, "baseline": 0.0, "absolute": 0.0, "relative": float("nan")}
    loss = {"best": 3.0, "baseline": 3.2, "absolute": 0.2, "relative": 0.0625}
    line = test_lines({"examples": 37, "improvement": {"loss": loss, "plan_accuracy": zero}})[0]
    assert line == ("Test (never seen, 37 examples): loss 3.0000 vs 3.2000 (6.3% better); "
                    "plan_accuracy 0.0000 vs 0.0000 (no change)")  # a checkpoint saved NaN for no relative change
