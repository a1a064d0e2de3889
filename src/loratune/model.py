"""The base model and its adapters, with transformers + peft: resolve a model name (built-in, local or
a hub id), load it once with the precision the hardware takes (bf16, fp16 or fp32), quantized with
bitsandbytes if asked, with gradient checkpointing if asked; put a fresh LoRA adapter on it for a
trial and take it off again, leaving the base as it was loaded.
"""

from __future__ import annotations

import logging
import sys
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


def import_libraries(quantized: bool = False) -> None:
    """Import torch, transformers and peft now (seconds in a fresh process; nothing once imported).

    Without quantization bitsandbytes is kept out of the process: peft imports it whenever it is
    installed, which costs every worker's start-up a second or so and put a note about an optional
    ``kernels`` package in every trial's log (docs/benchmarks.md, "Worker start-up with bitsandbytes
    installed")."""
    if quantized:
        _quiet_bitsandbytes()
    elif "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # an import of it fails; peft's check finds nothing
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
    """``auto``: bf16 where the GPU supports it, fp16 (with loss scaling) on older GPUs, fp32 on CPU.
    Asked for by name, bf16 and fp16 run on CPU too (torch's CPU autocast and gradient scaler)."""
    import torch

    if requested != "auto":
        return requested
    if device == "cpu":
        return "fp32"
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
        tokenizer.pad_token_id, why = padding_id(tokenizer)
        if why:
            print(f"note: {cfg.model.name}: the tokenizer has no pad token; {why}", file=sys.stderr)
    return tokenizer


def padding_id(tokenizer) -> tuple[int, str | None]:
    """The id to pad batches with when the tokenizer declares no pad token, and a note when it is not its
    eos token. Any id is safe: padding is masked out of the attention and the loss. A token the
    tokenizer already treats as special is preferred, so that no ordinary text is tokenized differently."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id, None  # the usual choice, silently
    for name in ("unk_token_id", "bos_token_id"):
        if getattr(tokenizer, name, None) is not None:
            token = getattr(tokenizer, name)
            return token, f"padding with its {name.removesuffix('_token_id')} token (id {token}), masked out of attention and loss"
    added = sorted(tokenizer.get_added_vocab().values())
    pad = added[0] if added else 0
    return pad, f"padding with id {pad} ({tokenizer.convert_ids_to_tokens(pad)!r}), masked out of attention and loss"


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/transformers
    _quiet_bitsandbytes()  # peft imports it wherever it is installed


def _quiet_bitsandbytes() -> None:
    """Before it is imported: its note on an optional CPU kernel from a hub (at import) and its warning
    on every 8-bit forward pass would fill every trial's log."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")


def device_of_this_machine() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(cfg: FinetuneConfig) -> Base:
    """Load the base model once: precision from the hardware, quantization, gradient checkpointing."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    quantized = cfg.model.quantization != "none"
    _quiet_libraries()
    device = device_of_this_machine()
    precision = choose_precision(cfg.training.precision, device)
    tokenizer = load_tokenizer(cfg)
    dtype = {"auto": {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if quantized:
        kwargs["quantization_config"] = _quantization_config(cfg.model.quantization, dtype)
        kwargs["device_map"] = {"": 0 if device == "cuda" else "cpu"}
    model = _load_pretrained(AutoModelForCausalLM, resolve_model(cfg.model.name), **kwargs)
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
        for module in model.modules():
            # On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weights for inference the
            # first time it runs in eval mode and never packs them back: the training step after the first
            # validation point then fails ("a view of a leaf Variable ... in-place operation").
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    else:
        model.to(device)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    for p in model.parameters():  # the base stays frozen; only adapters train
        p.requires_grad_(False)
    return Base(model, tokenizer, device, precision, time.perf_counter() - start)


def _quantization_config(kind: str, dtype):
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def check_quantization(kind: str, where: str = "model.quantization") -> None:
    """The installed bitsandbytes runs ``kind`` layers on this machine's device (CUDA, or the CPU with
    bitsandbytes 0.50 and newer): one small quantized layer, forward and backward, before any trial
    starts. Raises ``LoratuneError`` naming what to install or set."""
    if kind == "none":
        return
    _quiet_bitsandbytes()
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LoratuneError(f"{where}: {kind} loading needs bitsandbytes: pip install 'loratune[quantization]'") from None
    import torch

    device = device_of_this_machine()
    try:
        layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4") if kind == "4bit" else \
            bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as exc:  # bitsandbytes raises many kinds where a device lacks a kernel
        raise LoratuneError(f"{where}: the installed bitsandbytes {bnb.__version__} cannot run {kind} layers on "
                            f"{device} ({first_line(exc, 120)}); set it to 'none' on this machine, or install "
                            "a bitsandbytes that supports this device") from None


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


def load_adapter(base: Base, path: str | Path):
    """A saved adapter (``adapter/`` of a trial or a retrain) put on ``base``, for evaluation."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base.model, str(path), is_trainable=False)
    if base.device != "cpu" and getattr(base.model, "hf_device_map", None) is None:
        model.to(base.device)
    return model


def detach_adapter(model) -> Any:
    """Remove the adapter's layers without merging them: the base model is left exactly as loaded."""
    base = model.unload()  # leaves no attribute, module or weight of the adapter behind (tested)
    base.config.use_cache = False
    return base


def _model_config(cfg: FinetuneConfig):
    from transformers import AutoConfig

    _quiet_libraries()
    return _load_pretrained(AutoConfig, resolve_model(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)


def _empty_model(cfg: FinetuneConfig):
    """The model built from its config alone, on the meta device: its shapes, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _model_config(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def module_names(cfg: FinetuneConfig) -> list[str]:
    """The model's module names, from its config alone."""
    return [name for name, _ in _empty_model(cfg).named_modules()]


def parameter_count(cfg: FinetuneConfig) -> int:
    """The model's parameters (weights shared between layers counted once), from its config alone."""
    return sum(p.numel() for p in _empty_model(cfg).parameters())


def model_limits(cfg: FinetuneConfig) -> tuple[int | None, int | None]:
    """(hidden size, longest sequence its positions cover) from the model's config; None where it does not say."""
    config = _model_config(cfg)
    text = getattr(config, "get_text_config", lambda: config)()  # a multimodal model's language part
    hidden = next((getattr(text, k) for k in ("hidden_size", "n_embd", "d_model") if isinstance(getattr(text, k, None), int)), None)
    context = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions")
                    if isinstance(getattr(text, k, None), int)), None)
    return hidden, context
