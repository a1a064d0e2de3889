"""QLoRA and mixed precision wherever the installed libraries run them (bitsandbytes trains 4-bit and 8-bit
layers on the CPU too), refused in one line before anything starts where they do not."""

import os
import subprocess
import sys

import pytest
from conftest import run_cli

from loratune import finetune, run_optimization

pytest.importorskip("bitsandbytes", reason="the quantization extra: pip install 'loratune[quantization]'")


@pytest.mark.slow
def test_a_4bit_study_on_kept_workers_learns_keeps_memory_flat_and_its_best_config_retrains(tiny_model, tmp_path):
    results = run_optimization(num_trials=3, output_dir=tmp_path / "study", quiet=True, report=False, seed=0,
                               search_space={"learning_rate": [1e-4, 1e-3], "lora_rank": [4, 8]},
                               model={"quantization": "4bit"}, training={"epochs": 0.25}, retrain_epochs=0.25)
    trials = results["trials"]
    assert [t["state"] for t in trials] == ["completed"] * 3, [t["reason"] for t in trials]
    for t in trials:
        assert t["curve"][0]["val_loss"] > t["curve"][-1]["val_loss"]  # it learns through the 4-bit layers
    # one worker, the base loaded once, and what it holds after each trial does not grow
    assert [t["extra"]["timings"]["load_s"] > 0 for t in trials] == [True, False, False]
    held = [t["extra"]["memory_after"]["rss_gb"] for t in trials]
    assert max(held) - min(held) < 0.05 * held[0], held
    best = results["best_trial"]
    assert (tmp_path / "study" / "trials" / str(best) / "adapter" / "adapter_model.safetensors").exists()
    metrics = finetune(tmp_path / "study" / "best_config.yaml", output_dir=str(tmp_path / "retrain"), quiet=True)
    assert metrics["config"]["model"]["quantization"] == "4bit"
    assert metrics["val_loss"] == pytest.approx(results["best_loss"], rel=1e-5)  # the same run, in a fresh process


@pytest.mark.slow
def test_8bit_fine_tunes_on_this_machine(tiny_model, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{quantization: 8bit}}\ntraining: {{epochs: 0.25}}\noutput_dir: {tmp_path / 'run'}\n")
    metrics = finetune(config, quiet=True)
    assert metrics["curve"][0]["val_loss"] > metrics["curve"][-1]["val_loss"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_and_fp16_train_on_the_cpu_when_asked_for(tiny_model, tmp_path, precision):
    config = tmp_path / "c.yaml"
    config.write_text(f"training: {{epochs: 0.25, precision: {precision}}}\noutput_dir: {tmp_path / 'run'}\n")
    metrics = finetune(config, quiet=True)
    assert metrics["precision"] == precision
    assert metrics["curve"][0]["val_loss"] > metrics["curve"][-1]["val_loss"]


FAKES = {
    "missing": "raise ImportError('No module named bitsandbytes')",
    "no kernel": "__version__ = '0.42.0'\nclass nn:\n    class Linear4bit:\n        def __init__(self, *a, **k):\n"
                 "            raise RuntimeError('CUDA Setup failed despite GPU being available')\n",
}


@pytest.mark.parametrize("kind, message", [
    ("missing", "error: --set: model.quantization: 4bit loading needs bitsandbytes: pip install 'loratune[quantization]'"),
    ("no kernel", "error: --set: model.quantization: the installed bitsandbytes 0.42.0 cannot run 4bit layers on cpu "
                  "(CUDA Setup failed despite GPU being available); set it to 'none' on this machine, or install a "
                  "bitsandbytes that supports this device"),
])
def test_quantization_this_machine_cannot_run_is_one_line_before_anything_starts(tmp_path, kind, message):
    fake = tmp_path / "fake" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKES[kind])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-m", "loratune.cli", "optimize", "--output", str(tmp_path / "study"),
                          "--set", "model.quantization=4bit", "--trials", "2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stderr.strip()) == (2, message)
    assert not (tmp_path / "study").exists()


def test_bitsandbytes_stays_out_of_a_worker_that_does_not_quantize():
    """peft imports it whenever it is installed: 1.1 s of every worker's start and a warning in its log."""
    code = ("import sys\nfrom loratune.model import import_libraries\nimport_libraries(quantized=False)\n"
            "print(sys.modules.get('bitsandbytes'))")
    assert run_cli("-c", code).stdout.strip() == "None"  # installed (see importorskip above), and not imported

