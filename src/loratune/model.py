"""The base model and its adapters, with transformers + peft: resolve a model name (built-in, local or
a hub id), load it once with the precision the hardware takes (bf16, fp16 or fp32), quantized with
bitsandbytes if asked, with gradient checkpointing if asked; put a fresh LoRA adapter on it for a
trial and take it off again, leaving the base as it was loaded.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import FinetuneConfig
from .errors import LoratuneError, first_line


@dataclass
class Base:
    """A loaded base model and its tokenizer: what a reusing worker keeps from trial to trial."""

    model: Any
    tokenizer: Any
    device: str
    precision: str
    load_time_s: float = 0.0


def import_libraries() -> None:
    """Import torch, transformers and peft now (seconds in a fresh process; nothing once imported)."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def resolve_model(name: str) -> str:
    if name.startswith("builtin:"):
        if name != "builtin:tiny-qwen2":
            raise LoratuneError(f"model.name: unknown built-in model '{name}' (known: builtin:tiny-qwen2)")
        from .demo.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model())
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.is_dir():
        raise LoratuneError(f"model.name: model directory does not exist: {name}")
    if path.is_dir():
        return str(path)
    from . import hub

    hub.use_hub()  # a hub id: the cache only, at once, when the hub is out of reach
    return name


def choose_precision(requested: str, device: str) -> str:
    import torch

    if device == "cpu":
        return "fp32"
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _load_pretrained(loader, path: str, **kwargs):
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        from . import hub

        where = "a local model directory" if Path(path).is_dir() else \
            f"a local directory, nor a model found in {hub.where_looked(not hub.offline())}"
        raise LoratuneError(f"model.name: cannot load '{path}': not {where} ({first_line(exc, 160)})") from None


def load_tokenizer(cfg: FinetuneConfig):
    from transformers import AutoTokenizer

    tokenizer = _load_pretrained(AutoTokenizer, resolve_model(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/transformers


def load_base(cfg: FinetuneConfig) -> Base:
    """Load the base model once: precision from the hardware, quantization, gradient checkpointing."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    _quiet_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = choose_precision(cfg.training.precision, device)
    tokenizer = load_tokenizer(cfg)
    dtype = {"auto": {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(cfg.model.quantization, dtype, device)
        kwargs["device_map"] = {"": 0}
    model = _load_pretrained(AutoModelForCausalLM, resolve_model(cfg.model.name), **kwargs)
    if cfg.model.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    else:
        model.to(device)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    for p in model.parameters():  # the base stays frozen; only adapters train
        p.requires_grad_(False)
    return Base(model, tokenizer, device, precision, time.perf_counter() - start)


def _quantization_config(kind: str, dtype, device: str):
    if device != "cuda":
        raise LoratuneError(f"model.quantization: {kind} loading needs a CUDA GPU; set it to 'none' on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoratuneError("model.quantization: needs bitsandbytes: pip install 'loratune[quantization]'") from None
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def attach_adapter(base: Base, cfg: FinetuneConfig):
    """A fresh LoRA adapter on ``base``, drawn from the trial's seed exactly as in a fresh process."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.training.seed)  # LoRA A matrices are drawn here
    lora = cfg.lora
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, use_rslora=lora.use_rslora, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(base.model, peft_config)
    except ValueError as exc:
        raise LoratuneError(f"lora.target_modules: {first_line(exc)}") from None
    if cfg.model.quantization == "none":
        model.to(base.device)
    return model


def detach_adapter(model) -> Any:
    """Remove the adapter's layers without merging them: the base model is left exactly as loaded."""
    base = model.unload()  # leaves no attribute, module or weight of the adapter behind (tested)
    base.config.use_cache = False
    return base


def module_names(cfg: FinetuneConfig) -> list[str]:
    """The model's module names, from its config alone (an empty model on the meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_libraries()
    path = resolve_model(cfg.model.name)
    config = _load_pretrained(AutoConfig, path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return [name for name, _ in model.named_modules()]
