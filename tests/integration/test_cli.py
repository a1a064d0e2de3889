"""The command line as users type it: bad input is one line, exit code 2, no traceback, nothing lost."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli, run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(("args", "fragments"), [
    (["--trials", "0"], ["--trials: must be a positive integer, got 0"]),
    (["--trials", "-2"], ["--trials: must be a positive integer, got -2"]),
    (["--config", "missing.yaml"], ["missing.yaml: config file not found"]),
    (["--data", "no/such/data.jsonl", "--trials", "1"], ["data.path: dataset file not found: no/such/data.jsonl"]),
    (["--model", "./no/such/model", "--trials", "1"], ["model.name: model directory does not exist"]),
])
def test_optimize_bad_input(tmp_path, args, fragments):
    proc = cli(str(ROOT / "ax_optimization.py"), *args, "--output", str(tmp_path / "r.json"), cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "r.json").exists()


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search_space:\n  lora_rank: [8, 16]\n  learning_rate: [5e-4, 1e-5]\n")
    proc = cli(str(ROOT / "ax_optimization.py"), "--config", str(bad), "--output", str(tmp_path / "out.json"))
    assert_one_line_error(proc, "search_space.learning_rate: lower bound 0.0005 must be below upper bound 1e-05")
    assert not (tmp_path / "out.json").exists()


def test_finetune_bad_inputs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora:\n  rank: 8\n  alhpa: 16\n")
    assert_one_line_error(run_cli(str(ROOT / "finetune_lora.py"), "--config", str(cfg)),
                          "c.yaml: lora: unknown field 'alhpa' (did you mean 'alpha'?)")
    cfg.write_text("data: {path: nowhere.jsonl}\n")
    assert_one_line_error(run_cli("-m", "loratune.cli", "finetune", "--config", str(cfg)), "dataset file not found: nowhere.jsonl")


def test_resume_of_a_corrupted_checkpoint(tmp_path):
    (tmp_path / "optimization_checkpoint.json").write_text("{truncated")
    proc = cli("-m", "loratune.cli", "resume", str(tmp_path))
    assert_one_line_error(proc, "checkpoint is corrupted")
    assert (tmp_path / "optimization_checkpoint.json").read_text() == "{truncated"


TRAIN = """
import json, sys, time
lr, rank = float(sys.argv[1]), int(sys.argv[2])
time.sleep(0.4)
print(json.dumps({"loss": 0.5 + abs(lr - 3e-4) * 1000 + rank / 1000}))
"""


def test_kill_minus_9_loses_no_completed_trial_and_resume_finishes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "loratune.cli", "optimize", "--trials", "7", "--output", str(out),
           "--command", f"{sys.executable} {script} {{learning_rate}} {{lora_rank}}", "--quiet", "--no-report"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True)
    results = out / "optimization_results.json"
    deadline = time.time() + 120
    done = []
    while time.time() < deadline:
        if results.exists():
            done = [t for t in json.loads(results.read_text())["trials"] if t["state"] == "completed"]
            if len(done) >= 3:
                break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(done) >= 3
    killed = json.loads((out / "optimization_checkpoint.json").read_text())["records"]
    finished_before = {t["index"]: t for t in killed if t["state"] == "completed"}

    resumed = cli("-m", "loratune.cli", "resume", str(out), "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(results.read_text())
    assert len(final["trials"]) == 7 and all(t["state"] == "completed" for t in final["trials"])
    for index, before in finished_before.items():  # nothing completed was lost or changed
        after = next(t for t in final["trials"] if t["index"] == index)
        assert after["params"] == before["params"] and after["metrics"] == before["metrics"]


def test_resume_adds_trials_from_the_cli(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN.replace("time.sleep(0.4)", ""))
    out = tmp_path / "study"
    command = f"{sys.executable} {script} {{learning_rate}} {{lora_rank}}"
    first = run_cli(str(ROOT / "ax_optimization.py"), "--trials", "2", "--output", str(out), "--command", command, "--quiet", "--no-report")
    assert first.returncode == 0, first.stderr
    assert "[INFO" not in first.stdout + first.stderr  # not even the line Ax logs while it is imported
    again = cli(str(ROOT / "ax_optimization.py"), "--resume", str(out / "optimization_checkpoint.json"),
                "--trials", "2", "--quiet")
    assert again.returncode == 0, again.stderr
    assert len(json.loads((out / "optimization_results.json").read_text())["trials"]) == 4


def test_a_fine_tune_that_diverges_is_one_line_with_what_to_change(tiny_model, tmp_path, capsys):
    from loratune.cli import main

    config = tmp_path / "probe.yaml"
    config.write_text(f"training: {{epochs: 0.25, learning_rate: 1000.0}}\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["finetune", "--config", str(config), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {config}: non-finite loss: validation loss is nan at step ")
    assert err.endswith(": training diverged; lower training.learning_rate")


def test_a_bug_is_one_line_too_and_its_traceback_is_one_variable_away(tmp_path, capsys, monkeypatch):
    from loratune import report
    from loratune.cli import main

    def broken(*args, **kwargs):
        raise KeyError("plots")

    monkeypatch.setattr(report, "write_report", broken)
    assert main(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ("error: loratune report: KeyError: 'plots' (a bug in loratune, not in your input: "
                                       "LORATUNE_DEBUG=1 shows where)\n")
    import ax_optimization  # Module 4.5's script has no subcommand: it names itself
    monkeypatch.setattr(ax_optimization, "cmd_optimize", broken)
    monkeypatch.setattr("sys.argv", ["ax_optimization.py"])
    assert ax_optimization.main([]) == 1
    assert capsys.readouterr().err.startswith("error: ax_optimization.py: KeyError: 'plots' (a bug in loratune")
    monkeypatch.setenv("LORATUNE_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["report", str(tmp_path)])
