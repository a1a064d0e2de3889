"""Every shipped config runs, by the command written at its top: to a first completed trial (an
optimization config) or a trained adapter (a training config). What this CPU machine cannot have is
swapped with --set: a hub model for the tiny demo model, a placeholder data path for the demo data, and
4-bit loading for none only where bitsandbytes is not installed (it trains 4-bit layers on the CPU too).
Everything else runs as written."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
from conftest import ROOT, cli, run_cli

from loratune.settings import read_yaml

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def cpu_overrides(config: Path) -> list[str]:
    """--set arguments for what the config needs that this machine lacks, and a short training."""
    data = read_yaml(config)
    model, dataset = data.get("model") or {}, data.get("data") or {}
    sets = ["training.epochs=0.1", "training.eval_points=2"]
    if not str(model.get("name", "builtin:")).startswith("builtin:"):
        sets.append("model.name=builtin:tiny-qwen2")
    if model.get("quantization", "none") != "none" and importlib.util.find_spec("bitsandbytes") is None:
        sets.append("model.quantization=none")
    path = dataset.get("path")
    if path and not path.startswith("builtin:") and not (ROOT / path).exists():
        sets += ["data.path=builtin:ai_director_train", "data.validation_path=builtin:ai_director_validation"]
    return [arg for s in sets for arg in ("--set", s)]


def command_of(config: Path, tmp_path: Path) -> list[str]:
    """The command on the config's first line, writing into tmp_path."""
    first = config.read_text().splitlines()[0]
    assert first.startswith("# python "), f"{config.name} must begin with the command that runs it"
    args = shlex.split(first.removeprefix("# python "))
    script, rest = args[0], args[1:]
    out = {"ax_optimization.py": ["--output", str(tmp_path / "study"), "--trials", "2", "--workers", "2"],
           "finetune_lora.py": ["--output-dir", str(tmp_path / "run")]}[script]
    kept = []
    while rest:  # the config's own path stays; where it writes and how long it runs are ours
        flag = rest.pop(0)
        value = rest.pop(0) if rest and not rest[0].startswith("--") else None
        if flag == "--config":
            assert value and (ROOT / value).resolve() == config.resolve(), f"{config.name}'s command runs {value}"
            kept += [flag, str(config)]
        elif flag not in ("--output", "--trials", "--output-dir"):
            kept += [flag] + ([value] if value else [])
    return [str(ROOT / script), *kept, *out, *cpu_overrides(config)]


# configs/optimization_config.yaml is the embedded default (tests/unit/test_config.py), which
# tests/integration/test_e2e.py runs end to end by the same command: its first line is still checked here
DEMO = ROOT / "configs" / "optimization_config.yaml"


def test_the_demo_configs_first_line_is_its_command(tmp_path):
    assert command_of(DEMO, tmp_path)[:3] == [str(ROOT / "ax_optimization.py"), "--config", str(DEMO)]


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c in CONFIGS if c != DEMO], ids=[c.stem for c in CONFIGS if c != DEMO])
def test_every_shipped_config_runs_by_its_own_command(config, tiny_model, tmp_path):
    command = command_of(config, tmp_path)  # a study in this process; a fine-tune in one of its own
    proc = (cli if command[0].endswith("ax_optimization.py") else run_cli)(*command, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    if (tmp_path / "study").exists():
        results = json.loads((tmp_path / "study" / "optimization_results.json").read_text())
        completed = [t for t in results["trials"] if t["state"] == "completed"]
        assert completed and len(results["trials"]) == 2
        for name in results["objectives"]:  # every objective measured, e.g. inference_time
            assert all(name in t["metrics"] for t in completed)
        assert (tmp_path / "study" / "best_config.yaml").exists()
    else:
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["val_loss"] > 0 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_git_ignores_every_file_a_study_writes_into_configs():
    """`make demo` writes its study into configs/: none of it may be committed, by accident or otherwise."""
    import shutil
    import subprocess

    from loratune.checkpoint import BEST_MODEL_DIR, StudyPaths

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = StudyPaths.from_output(ROOT / "configs" / "optimization_results.json")
    written = [*paths.written_by_a_study(), paths.directory / BEST_MODEL_DIR, paths.directory / ".loratune.lock"]
    names = [str(p.relative_to(ROOT)) for p in written]
    tracked = subprocess.run(["git", "ls-files", "--", *names], cwd=ROOT, capture_output=True, text=True)
    assert tracked.returncode == 0, tracked.stderr
    assert tracked.stdout.split() == []  # nothing of a study's in the index
    # a folder's pattern ("/configs/trials/") matches a path inside it, a file's the path itself
    candidates = [*names, *(n + "/x" for n in names)]
    check = subprocess.run(["git", "check-ignore", "--no-index", *candidates], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode in (0, 1), check.stderr  # 1: none ignored; anything else: git could not answer
    ignored = set(check.stdout.split())
    assert [n for n in names if n not in ignored and n + "/x" not in ignored] == []
