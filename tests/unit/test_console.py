"""What the terminal shows while a study runs: the running trials live on a terminal, plain lines in a log,
nothing when quiet."""

import io
import sys

from conftest import ROOT, cli
from rich.console import Console

from loratune.console import StudyConsole
from loratune.trial import TrialRecord

TRAIN = """
import json, sys, time
for step in (1, 2):
    time.sleep(0.2)
print(json.dumps({"loss": 0.5 + int(sys.argv[1]) / 1000}))
"""


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


def test_a_log_gets_a_plain_line_per_validation_point_and_quiet_gets_nothing(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    common = ["--trials", "2", "--command", f"{sys.executable} {script} {{lora_rank}}", "--no-report"]
    logged = cli(str(ROOT / "ax_optimization.py"), *common, "--output", str(tmp_path / "a"), cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr
    assert "Trial 1/2 (#0): rank=16, alpha=32, lr=0.0002, bs=1 → loss=0.5160 (baseline)" in logged.stdout
    assert "\x1b[" not in logged.stdout  # no terminal codes in a log file
    quiet = cli(str(ROOT / "ax_optimization.py"), *common, "--output", str(tmp_path / "b"), "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == ""


def test_plain_progress_lines_of_a_fine_tune(tiny_model, tmp_path):
    proc = cli(str(ROOT / "ax_optimization.py"), "--trials", "1", "--output", str(tmp_path / "s"), "--no-report",
               "--set", "training.epochs=0.2", "--set", "training.eval_points=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("  trial #0: step ")]
    assert len(lines) == 2 and "50% of training, val loss " in lines[0] and "100% of training" in lines[1]


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
