"""What a study run from the command line prints: a plain line per trial and per validation point in a log,
nothing when quiet. Each runs a study (Ax for real, and a fine-tune of the demo model for the progress
lines of a fine-tune); the lines themselves, from hand-made events, are tested in tests/unit/test_console.py."""

import sys

import pytest
from conftest import ROOT, cli

TRAIN = """
import json, sys, time
for step in (1, 2):
    time.sleep(0.2)
print(json.dumps({"loss": 0.5 + int(sys.argv[1]) / 1000}))
"""


def test_a_study_in_a_log_prints_plain_trial_lines_and_quiet_prints_nothing(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    common = ["--trials", "2", "--command", f"{sys.executable} {script} {{lora_rank}}", "--no-report"]
    logged = cli(str(ROOT / "ax_optimization.py"), *common, "--output", str(tmp_path / "a"), cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr
    assert "Trial 1/2 (#0): rank=16, alpha=32, lr=0.0002, bs=1 → loss=0.5160 (baseline)" in logged.stdout
    assert "\x1b[" not in logged.stdout  # no terminal codes in a log file
    quiet = cli(str(ROOT / "ax_optimization.py"), *common, "--output", str(tmp_path / "b"), "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == ""


@pytest.mark.slow  # a fine-tune of the demo model (10 s)
def test_plain_progress_lines_of_a_fine_tune(tiny_model, tmp_path):
    proc = cli(str(ROOT / "ax_optimization.py"), "--trials", "1", "--output", str(tmp_path / "s"), "--no-report",
               "--set", "training.epochs=0.2", "--set", "training.eval_points=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("  trial #0: step ")]
    assert len(lines) == 2 and "50% of training, val loss " in lines[0] and "100% of training" in lines[1]
