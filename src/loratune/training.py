"""LoRA fine-tuning with transformers + peft, top to bottom: setup -> fit -> evaluate.

The loop is ours rather than ``transformers.Trainer``: it batches by length (little padding),
weights the loss by response tokens across gradient accumulation, reports a validation curve at
fixed points of the run, and can be stopped early between optimizer steps.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import FinetuneConfig, to_dict
from .data import Example, collate, length_grouped_batches, load_examples, padding_fraction, sorted_batches
from .errors import LoratuneError, first_line
from .storage import atomic_write_json


@dataclass
class CurvePoint:
    step: int
    progress: float  # share of the planned optimizer steps done
    val_loss: float
    train_loss: float


@dataclass
class FitResult:
    train_loss: float
    val_loss: float
    curve: list[CurvePoint]
    steps: int
    planned_steps: int
    tokens_seen: int
    train_time_s: float
    padding_fraction: float
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)


# Called after each validation point; returning True stops training there.
EvalCallback = Callable[[CurvePoint], bool]


@dataclass
class Setup:
    model: object
    tokenizer: object
    train: list[Example]
    validation: list[Example]
    device: str
    precision: str
    trainable_params: int


def resolve_model(name: str) -> str:
    if name.startswith("builtin:"):
        if name != "builtin:tiny-qwen2":
            raise LoratuneError(f"model.name: unknown built-in model '{name}' (known: builtin:tiny-qwen2)")
        from .demo.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model())
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise LoratuneError(f"model.name: model directory does not exist: {name}")
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


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
    except OSError as exc:
        reason = first_line(exc, 160)
        raise LoratuneError(f"model.name: cannot load '{path}' (not a local model and not reachable on the hub: {reason})") from None


def preflight(cfg: FinetuneConfig) -> None:
    """Find bad input before any trial starts: the model must resolve and the data must load and
    tokenize. Costs a tokenizer load; a study calls it once so that trials never fail on it."""
    from transformers import AutoTokenizer

    tokenizer = _load_pretrained(AutoTokenizer, resolve_model(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
    load_examples(tokenizer, cfg.data, cfg.training.seed)


def setup(cfg: FinetuneConfig) -> Setup:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = choose_precision(cfg.training.precision, device)
    path = resolve_model(cfg.model.name)
    tokenizer = _load_pretrained(AutoTokenizer, path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, validation = load_examples(tokenizer, cfg.data, cfg.training.seed)

    dtype = {"auto": {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.quantization != "none":
        kwargs["quantization_config"] = _quantization_config(cfg.model.quantization, dtype, device)
        kwargs["device_map"] = {"": 0}
    model = _load_pretrained(AutoModelForCausalLM, path, **kwargs)
    if cfg.model.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False

    torch.manual_seed(cfg.training.seed)  # LoRA A matrices are drawn here
    lora = cfg.lora
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_rslora=lora.use_rslora, task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise LoratuneError(f"lora.target_modules: {first_line(exc)}") from None
    if cfg.model.quantization == "none":
        model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Setup(model, tokenizer, train, validation, device, precision, trainable)


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


def _autocast(s: Setup):
    import contextlib

    import torch

    if s.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(s.device, dtype=torch.bfloat16 if s.precision == "bf16" else torch.float16)


def evaluate(s: Setup, batch_size: int) -> float:
    """Mean loss per response token over the validation set."""
    import torch

    lengths = [len(e) for e in s.validation]
    total, count = 0.0, 0
    s.model.eval()
    with torch.no_grad(), _autocast(s):
        for idx in sorted_batches(lengths, batch_size):
            batch = {k: v.to(s.device) for k, v in collate([s.validation[i] for i in idx], s.tokenizer.pad_token_id).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            # num_items_in_batch=1 makes the model return the summed token loss
            total += float(s.model(**batch, num_items_in_batch=1).loss)
            count += n
    s.model.train()
    return total / max(count, 1)


def plan(cfg: FinetuneConfig, n_train: int) -> tuple[int, int, list[int]]:
    """(gradient accumulation, optimizer steps, steps after which to evaluate)."""
    t = cfg.training
    accumulation = max(1, t.effective_batch_size // t.batch_size) if t.gradient_accumulation == "auto" else t.gradient_accumulation
    micro_batches = math.ceil(t.epochs * math.ceil(n_train / t.batch_size))
    steps = max(1, math.ceil(micro_batches / accumulation))
    points = sorted({max(1, round(steps * k / t.eval_points)) for k in range(1, t.eval_points + 1)})
    return accumulation, steps, points


def fit(s: Setup, cfg: FinetuneConfig, on_eval: EvalCallback | None = None,
        progress: Callable[[int, int, float], None] | None = None,
        stop_requested: Callable[[], bool] | None = None) -> FitResult:
    """Train the adapter; evaluate at the planned points; stop when ``on_eval`` says so, or right
    after the next optimizer step once ``stop_requested()`` turns true."""
    import torch
    from transformers import get_scheduler

    t = cfg.training
    accumulation, steps, eval_at = plan(cfg, len(s.train))
    params = [p for p in s.model.parameters() if p.requires_grad]
    # the fused kernel updates every LoRA tensor in one call (as Trainer's default adamw_torch_fused
    # does): measured 1.08x -> 1.17x of Trainer's throughput on the demo (benchmarks/trainer_throughput.py)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=s.device in ("cuda", "cpu") or None)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * steps),
                              num_training_steps=steps)
    scaler = torch.amp.GradScaler(s.device, enabled=s.precision == "fp16")
    lengths = [len(e) for e in s.train]
    torch.manual_seed(t.seed)

    def micro_batches():
        epoch = 0
        while True:
            yield from length_grouped_batches(lengths, t.batch_size, seed=t.seed + epoch)
            epoch += 1

    scored_only = _can_score_only_responses(s.model)
    feed, used = micro_batches(), []
    curve, step, tokens, window_loss, window_tokens = [], 0, 0, 0.0, 0
    stopped, start, eval_time = False, time.perf_counter(), 0.0
    s.model.train()
    while step < steps and not stopped:
        group = [next(feed) for _ in range(accumulation)]
        used += group
        batches = [collate([s.train[i] for i in idx], s.tokenizer.pad_token_id) for idx in group]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:
            batch = {k: v.to(s.device) for k, v in batch.items()}
            with _autocast(s):
                loss = response_loss(s.model, batch, max(n_items, 1)) if scored_only else \
                    s.model(**batch, num_items_in_batch=max(n_items, 1)).loss
            scaler.scale(loss).backward()
            window_loss += float(loss.detach()) * n_items
            tokens += int(batch["attention_mask"].sum())
        window_tokens += n_items
        if t.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if progress:
            progress(step, steps, window_loss / max(window_tokens, 1))
        if stop_requested and step < steps and stop_requested():
            stopped = True
        if step in eval_at or stopped:
            eval_start = time.perf_counter()
            point = CurvePoint(step, step / steps, evaluate(s, t.eval_batch_size), window_loss / max(window_tokens, 1))
            eval_time += time.perf_counter() - eval_start
            curve.append(point)
            window_loss, window_tokens = 0.0, 0
            if not math.isfinite(point.val_loss):
                raise FloatingPointError(f"validation loss is {point.val_loss} at step {step}")
            stopped = stopped or (bool(on_eval and on_eval(point)) and step < steps)
    elapsed = time.perf_counter() - start - eval_time  # training only: validation is timed apart
    return FitResult(
        train_loss=curve[-1].train_loss, val_loss=curve[-1].val_loss, curve=curve, steps=step,
        planned_steps=steps, tokens_seen=tokens, train_time_s=elapsed,
        padding_fraction=padding_fraction(used, lengths), stopped_early=stopped, extra={"eval_time_s": eval_time},
    )


def _can_score_only_responses(model) -> bool:
    """True when the model can project only chosen positions onto its vocabulary (``logits_to_keep``
    with a mask) and adds nothing else to its loss (a mixture of experts' router loss)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ("logits_to_keep" in inspect.signature(base.forward).parameters
            and not getattr(base.config, "output_router_logits", False))


def response_loss(model, batch: dict, n_items: int):
    """The causal-LM loss over the response tokens, computing logits only where a token is scored.

    Prompt and padding positions (label -100) never reach the vocabulary projection: the same loss
    as ``model(**batch).loss`` with far less work and memory where the vocabulary is large.
    """
    import torch

    targets = batch["labels"][:, 1:]
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = targets != -100  # position t predicts token t + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[targets != -100],
                                             reduction="sum") / n_items


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    out = Path(path)
    if out.exists() and not overwrite and ((out / "metrics.json").exists() or (out / "adapter").exists()):
        raise LoratuneError(f"output_dir: {out} already holds a run; choose another directory or pass --overwrite")


def measure_inference_time(s: Setup, n_prompts: int = 4, new_tokens: int = 16) -> float:
    """Milliseconds per generated token, greedy, on the first validation prompts, with the adapter
    unmerged as a multi-adapter server runs it (so its cost grows with the rank)."""
    import torch

    s.model.eval()
    s.model.config.use_cache = True
    prompts = [[t for t, label in zip(e.input_ids, e.labels, strict=True) if label == -100] for e in s.validation[:n_prompts]]
    generated, elapsed = 0, 0.0
    with torch.no_grad(), _autocast(s):
        for ids in prompts:
            x = torch.tensor([ids], device=s.device)
            s.model.generate(input_ids=x, max_new_tokens=2, do_sample=False, pad_token_id=s.tokenizer.pad_token_id)  # warm-up
            start = time.perf_counter()
            out = s.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=s.tokenizer.pad_token_id)
            if s.device == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            generated += out.shape[1] - x.shape[1]
    return 1000 * elapsed / max(generated, 1)


def finetune(cfg: FinetuneConfig, *, quiet: bool = False, overwrite: bool = False,
             on_eval: EvalCallback | None = None, stop_requested: Callable[[], bool] | None = None,
             measure_inference: bool = False) -> dict:
    """Fine-tune a LoRA adapter as ``cfg`` says; write ``metrics.json`` (and the adapter) to its output_dir.

    >>> from loratune import finetune
    >>> from loratune.config import FinetuneConfig
    >>> metrics = finetune(FinetuneConfig(output_dir="runs/demo"), quiet=True)  # doctest: +SKIP
    >>> metrics["val_loss"]  # doctest: +SKIP
    """
    check_output_dir(cfg.output_dir, overwrite)
    wall = time.perf_counter()
    s = setup(cfg)
    with _progress_bar(quiet) as progress:
        result = fit(s, cfg, on_eval=on_eval, progress=progress, stop_requested=stop_requested)
    inference_ms = measure_inference_time(s) if measure_inference else None
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.save_adapter:
        s.model.save_pretrained(out / "adapter")
    metrics = {
        "state": "early_stopped" if result.stopped_early else "completed",
        "val_loss": result.val_loss,
        "train_loss": result.train_loss,
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "tokens_seen": result.tokens_seen,
        "tokens_per_s": result.tokens_seen / max(result.train_time_s, 1e-9),
        "train_time_s": result.train_time_s,
        "eval_time_s": result.extra["eval_time_s"],
        "wall_time_s": time.perf_counter() - wall,
        "peak_memory_gb": peak_memory_gb(s.device),
        "padding_fraction": result.padding_fraction,
        "trainable_params": s.trainable_params,
        "n_train": len(s.train),
        "n_validation": len(s.validation),
        "device": s.device,
        "precision": s.precision,
        "curve": [asdict(p) for p in result.curve],
        "config": to_dict(cfg),
    }
    if inference_ms is not None:
        metrics["inference_time"] = inference_ms
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


class _progress_bar:
    """A rich progress bar with the running train loss; nothing at all when quiet."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task = quiet, None, None

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())
        self.bar.__enter__()
        return self.update

    def update(self, step: int, total: int, loss: float) -> None:
        if self.task is None:
            self.task = self.bar.add_task("train", total=total, loss=float("nan"))
        self.bar.update(self.task, completed=step, loss=loss)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)
