"""LoRA fine-tuning with transformers + peft, top to bottom: the base (model.py) with a fresh adapter ->
fit -> evaluate -> save.

The loop is ours rather than ``transformers.Trainer``: it batches by length (little padding), weights
the loss by response tokens across gradient accumulation, reports a validation curve at fixed points
of the run, and can be stopped early between optimizer steps. The base model is loaded apart from
the adapter, so a worker can keep one base and train trial after trial on it: ``attach_adapter``
puts a fresh adapter on, ``detach_adapter`` takes it off and leaves the base as it was.
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import FinetuneConfig, to_dict
from .data import load_examples
from .data.batching import collate, length_grouped_batches, padding_fraction, sorted_batches
from .data.chat import IGNORE, Example
from .errors import LoratuneError
from .model import Base, attach_adapter, detach_adapter, load_base
from .storage import atomic_write_json, check_creatable
from .trial import TrialState


@dataclass
class CurvePoint:
    step: int
    progress: float  # share of the planned optimizer steps done
    val_loss: float  # mean loss per response token; on the curve's subset before the last point
    train_loss: float  # mean loss per response token since the previous point
    subset: int = 0  # validation examples it was computed on (all of them at the last point)


@dataclass
class FitResult:
    train_loss: float
    val_loss: float
    curve: list[CurvePoint]
    steps: int
    planned_steps: int
    tokens_seen: int
    train_time_s: float  # optimizer steps only: validation is timed apart
    eval_time_s: float
    padding_fraction: float
    stopped_early: bool = False


@dataclass
class TrainingMetrics:
    """What one fine-tune measured: ``run_training``'s result, and its ``metrics.json``. Losses are mean
    cross-entropy per answer token (nats); times in seconds; memory in GiB."""

    state: TrialState  # completed, or early_stopped when asked to stop
    val_loss: float  # on the whole validation set, at the last point of the curve
    train_loss: float  # since the curve's previous point
    steps: int  # optimizer steps taken
    planned_steps: int
    tokens_seen: int
    tokens_per_s: float
    train_time_s: float  # optimizer steps only
    eval_time_s: float  # the validation curve
    inference_measure_s: float
    load_time_s: float  # the base model (0 on a base loaded before)
    data_time_s: float
    wall_time_s: float
    peak_memory_gb: float  # peak GPU memory of this run on CUDA, else the process's peak resident memory
    padding_fraction: float
    trainable_params: int
    n_train: int
    n_validation: int
    device: str
    precision: str
    curve: list[dict]  # CurvePoint's fields
    config: dict  # the training config as run
    inference_time: float | None = None  # ms per generated token, when measured
    answers: list[dict] | None = None  # {prediction, reference} of the validation prompts answered
    generation_s: float | None = None  # seconds the answers took
    test: dict | None = None  # score_examples on the test split, when asked

    def to_dict(self) -> dict:
        """As ``metrics.json`` holds it, and ``finetune()`` returns it: fields left unmeasured are left out."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["state"] = self.state.value
        return out


# Called after each validation point; returning True stops training there.
EvalCallback = Callable[[CurvePoint], bool]
# Called after each optimizer step with (step, planned steps, seconds of training so far, running train loss).
StepCallback = Callable[[int, int, float, float], None]


@dataclass
class Setup:
    model: Any  # the base with this trial's adapter
    tokenizer: Any
    train: list[Example]
    validation: list[Example]
    device: str
    precision: str
    trainable_params: int
    times: dict[str, float] = field(default_factory=dict)  # load_s, data_s


def setup(cfg: FinetuneConfig, base: Base | None = None,
          data: tuple[list[Example], list[Example]] | None = None) -> Setup:
    """The base (loaded unless given), the tokenized data (unless given) and a fresh adapter."""
    base = base or load_base(cfg)
    start = time.perf_counter()
    train, validation = data or load_examples(base.tokenizer, cfg.data, cfg.training.seed)
    data_s = time.perf_counter() - start
    model = attach_adapter(base, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Setup(model, base.tokenizer, train, validation, base.device, base.precision, trainable,
                 {"load_s": base.load_time_s, "data_s": data_s})


def _autocast(s: Setup):
    import contextlib

    import torch

    if s.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(s.device, dtype=torch.bfloat16 if s.precision == "bf16" else torch.float16)


def evaluate(s: Setup, batch_size: int, examples: list[Example] | None = None) -> float:
    """Mean loss per response token over ``examples`` (default: the whole validation set)."""
    import torch

    examples = s.validation if examples is None else examples
    scored_only = _can_score_only_responses(s.model)
    total, count = 0.0, 0
    s.model.eval()
    with torch.no_grad(), _autocast(s):
        for idx in sorted_batches([len(e) for e in examples], batch_size):
            batch = {k: v.to(s.device) for k, v in collate([examples[i] for i in idx], s.tokenizer.pad_token_id).items()}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            # with n_items=1 both return the summed token loss
            total += float(response_loss(s.model, batch, 1) if scored_only else s.model(**batch, num_items_in_batch=1).loss)
            count += n
    s.model.train()
    return total / max(count, 1)


MIN_SUBSET = 8


def curve_subset(cfg: FinetuneConfig, validation: list[Example]) -> list[Example]:
    """The fixed validation examples of the curve's intermediate points: ``training.eval_subset`` of
    them (a share, at least ``MIN_SUBSET``, or a count above 1), drawn once from the seed; the last point
    uses all of them: a curve on the whole set costs a real model a large share of each trial
    (docs/BENCHMARKS.md, "Trial runner")."""
    share = cfg.training.eval_subset
    n = round(share * len(validation)) if share <= 1 else int(share)
    n = max(min(MIN_SUBSET, len(validation)), min(len(validation), n))
    if n == len(validation):
        return validation
    order = list(range(len(validation)))
    random.Random(cfg.training.seed).shuffle(order)
    return [validation[i] for i in sorted(order[:n])]


def fit(s: Setup, cfg: FinetuneConfig, on_eval: EvalCallback | None = None, on_step: StepCallback | None = None,
        stop_requested: Callable[[], bool] | None = None) -> FitResult:
    """Train the adapter; evaluate at the planned points; stop when ``on_eval`` says so, or right
    after the next optimizer step once ``stop_requested()`` turns true."""
    import torch

    t = cfg.training
    accumulation, steps, eval_at = cfg.training.plan(len(s.train))
    subset = curve_subset(cfg, s.validation)
    params, optimizer, scheduler, scaler = _setup_optimizer(s, cfg, steps)
    lengths = [len(e) for e in s.train]
    torch.manual_seed(t.seed)
    scored_only = _can_score_only_responses(s.model)
    feed, used = _micro_batches(lengths, t.batch_size, t.seed), []
    curve, step, tokens, window_loss, window_tokens = [], 0, 0, 0.0, 0
    stopped, start, eval_time = False, time.perf_counter(), 0.0
    s.model.train()
    while step < steps and not stopped:
        group = [next(feed) for _ in range(accumulation)]
        used += group
        loss_sum, n_items, seen = _accumulate(s, [[s.train[i] for i in idx] for idx in group], scaler, scored_only)
        window_loss, window_tokens, tokens = window_loss + loss_sum, window_tokens + n_items, tokens + seen
        _optimizer_step(optimizer, scheduler, scaler, params, t.max_grad_norm)
        step += 1
        if on_step:
            on_step(step, steps, time.perf_counter() - start - eval_time, window_loss / max(window_tokens, 1))
        if stop_requested and step < steps and stop_requested():
            stopped = True
        if step in eval_at or stopped:
            eval_start = time.perf_counter()
            final = step == steps or stopped
            examples = s.validation if final else subset
            point = CurvePoint(step, step / steps, evaluate(s, t.eval_batch_size, examples),
                               window_loss / max(window_tokens, 1), len(examples))
            curve.append(point)
            window_loss, window_tokens = 0.0, 0
            if not math.isfinite(point.val_loss):
                raise FloatingPointError(f"validation loss is {point.val_loss} at step {step}")
            stopped = stopped or (bool(on_eval and on_eval(point)) and step < steps)
            if stopped and not final:  # the loss a stopped trial is judged by is on the whole set too
                point.val_loss, point.subset = evaluate(s, t.eval_batch_size), len(s.validation)
            eval_time += time.perf_counter() - eval_start
    return FitResult(
        train_loss=curve[-1].train_loss, val_loss=curve[-1].val_loss, curve=curve, steps=step, planned_steps=steps,
        tokens_seen=tokens, train_time_s=time.perf_counter() - start - eval_time, eval_time_s=eval_time,
        padding_fraction=padding_fraction(used, lengths), stopped_early=stopped,
    )


def _setup_optimizer(s: Setup, cfg: FinetuneConfig, steps: int):
    """(the adapter's parameters, AdamW over them, the learning-rate schedule, the gradient scaler of fp16)."""
    import torch
    from transformers import get_scheduler

    t = cfg.training
    params = [p for p in s.model.parameters() if p.requires_grad]
    # the fused kernel updates every LoRA tensor in one call, as Trainer's default adamw_torch_fused does
    # (docs/BENCHMARKS.md, "Trainer throughput")
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=s.device in ("cuda", "cpu") or None)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * steps),
                              num_training_steps=steps)
    return params, optimizer, scheduler, torch.amp.GradScaler(s.device, enabled=s.precision == "fp16")


def _micro_batches(lengths: list[int], batch_size: int, seed: int):
    """Micro-batches (lists of example indices) without end: each epoch grouped by length from its own seed."""
    epoch = 0
    while True:
        yield from length_grouped_batches(lengths, batch_size, seed=seed + epoch)
        epoch += 1


def _accumulate(s: Setup, groups: list[list[Example]], scaler, scored_only: bool) -> tuple[float, int, int]:
    """Forward and backward passes over one optimizer step's micro-batches, the loss weighted by answer tokens
    across them. Returns (the summed loss of their answer tokens, answer tokens, tokens seen)."""
    batches = [collate(examples, s.tokenizer.pad_token_id) for examples in groups]
    n_items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(s.device) for k, v in batch.items()}
        with _autocast(s):
            loss = response_loss(s.model, batch, max(n_items, 1)) if scored_only else \
                s.model(**batch, num_items_in_batch=max(n_items, 1)).loss
        scaler.scale(loss).backward()
        loss_sum += float(loss.detach()) * n_items
        tokens += int(batch["attention_mask"].sum())
    return loss_sum, n_items, tokens


def _optimizer_step(optimizer, scheduler, scaler, params, max_grad_norm: float) -> None:
    import torch

    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _can_score_only_responses(model) -> bool:
    """True when the model can project only chosen positions onto its vocabulary (``logits_to_keep``
    with a mask) and adds nothing else to its loss (a mixture of experts' router loss)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ("logits_to_keep" in inspect.signature(base.forward).parameters
            and not getattr(base.config, "output_router_logits", False))


def response_loss(model, batch: dict, n_items: int):
    """The causal-LM loss over the response tokens, computing logits only where a token is scored.

    Prompt and padding positions (label IGNORE, -100) never reach the vocabulary projection: the same loss
    as ``model(**batch).loss`` with far less work and memory where the vocabulary is large.
    """
    import torch

    targets = batch["labels"][:, 1:]
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE  # position t predicts token t + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[targets != IGNORE],
                                             reduction="sum") / n_items


def peak_memory_gb(device: str) -> float:
    """Peak GPU memory of this trial (CUDA), else the peak resident memory of its process so far (CPU), in GiB."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    out = Path(path)
    check_creatable(out, "output_dir")
    if out.exists() and not overwrite and ((out / "metrics.json").exists() or (out / "adapter").exists()):
        raise LoratuneError(f"output_dir: {out} already holds a run; choose another directory or pass --overwrite")


def measure_inference_time(s: Setup, n_prompts: int = 4, new_tokens: int = 16) -> float:
    """Milliseconds per generated token, greedy, on the first validation prompts, with the adapter
    unmerged as a multi-adapter server runs it (so its cost grows with the rank)."""
    import torch

    s.model.eval()
    s.model.config.use_cache = True
    prompts = [e.prompt for e in s.validation[:n_prompts]]
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
    s.model.config.use_cache = False
    s.model.train()
    return 1000 * elapsed / max(generated, 1)


def answer_subset(validation: list[Example], n: int, seed: int) -> list[Example]:
    """The ``n`` validation examples every trial answers (all when there are fewer), drawn once from the seed."""
    if n >= len(validation):
        return validation
    return [validation[i] for i in sorted(random.Random(seed).sample(range(len(validation)), n))]


def generate_answers(s: Setup, examples: list[Example], max_new_tokens: int | None = None,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to the examples' prompts, as a server generates them: batches left-padded, each answer
    ending at the end-of-turn token (or after ``max_new_tokens``: by default the longest reference's length
    plus a quarter, plus 8), decoded without special tokens and stripped."""
    import torch

    from .data.chat import end_of_turn_ids

    stop = end_of_turn_ids(s.tokenizer)
    if max_new_tokens is None:
        longest = max(len(s.tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
        max_new_tokens = longest + longest // 4 + 8
    pad = s.tokenizer.pad_token_id
    answers: dict[int, str] = {}
    s.model.eval()
    s.model.config.use_cache = True
    with torch.no_grad(), _autocast(s):
        for idx in sorted_batches([len(e.prompt) for e in examples], batch_size):
            width = max(len(examples[i].prompt) for i in idx)
            ids = torch.tensor([[pad] * (width - len(examples[i].prompt)) + examples[i].prompt for i in idx], device=s.device)
            mask = torch.tensor([[0] * (width - len(examples[i].prompt)) + [1] * len(examples[i].prompt) for i in idx],
                                device=s.device)
            out = s.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=stop or None, pad_token_id=pad)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                end = next((k for k, t in enumerate(new) if t in stop), len(new))
                answers[i] = s.tokenizer.decode(new[:end], skip_special_tokens=True).strip()
    s.model.config.use_cache = False
    s.model.train()
    return [answers[i] for i in range(len(examples))]


def score_examples(s: Setup, examples: list[Example], batch_size: int, answer: bool,
                   max_new_tokens: int | None = None) -> dict:
    """The loss per answer token over ``examples`` and, with ``answer``, their greedy answers (with the
    references, for the study's scorers) and the seconds generating them took."""
    out: dict = {"loss": evaluate(s, batch_size, examples), "examples": len(examples)}
    if answer:
        start = time.perf_counter()
        out["answers"] = [{"prediction": p, "reference": e.reference}
                          for p, e in zip(generate_answers(s, examples, max_new_tokens), examples, strict=True)]
        out["generation_s"] = time.perf_counter() - start
    return out


def score_adapter(cfg: FinetuneConfig, base: Base, adapter: str | Path, examples: list[Example], answer: bool,
                  max_new_tokens: int | None = None) -> dict:
    """``score_examples`` of a saved adapter, put on ``base`` and taken off again."""
    from .model import load_adapter

    model = load_adapter(base, adapter)
    try:
        s = Setup(model, base.tokenizer, [], examples, base.device, base.precision, 0)
        return score_examples(s, examples, cfg.training.eval_batch_size, answer, max_new_tokens)
    finally:
        base.model = detach_adapter(model)


def run_training(cfg: FinetuneConfig, *, overwrite: bool = False, on_eval: EvalCallback | None = None,
                 on_step: StepCallback | None = None, stop_requested: Callable[[], bool] | None = None,
                 measure_inference: bool = False, base: Base | None = None,
                 data: tuple[list[Example], list[Example]] | None = None, answer: int = 0,
                 max_new_tokens: int | None = None, test: list[Example] | None = None,
                 test_answers: bool = False) -> dict:
    """Fine-tune a LoRA adapter as ``cfg`` says; write ``metrics.json`` (and the adapter) to its
    output_dir; return the metrics. With ``base`` (and ``data``), train on that loaded base and leave
    it as it was: the adapter is removed afterwards. ``answer``: validation prompts to answer (see
    ``answer_subset``) once trained, unless stopped early; the answers go to the metrics, with their references.
    ``test``: examples to score the trained adapter on as well (``metrics["test"]``, see ``score_examples``).

    >>> from loratune.config import FinetuneConfig
    >>> metrics = run_training(FinetuneConfig(output_dir="runs/demo"))  # doctest: +SKIP
    >>> metrics["val_loss"]  # doctest: +SKIP
    """
    check_output_dir(cfg.output_dir, overwrite)
    wall = time.perf_counter()
    s = setup(cfg, base, data)
    if s.device == "cuda":  # the peak of this trial, not of the trials before it on a reused base
        import torch

        torch.cuda.reset_peak_memory_stats()
    try:
        result = fit(s, cfg, on_eval=on_eval, on_step=on_step, stop_requested=stop_requested)
        inference_start = time.perf_counter()
        inference_ms = measure_inference_time(s) if measure_inference else None
        inference_s = time.perf_counter() - inference_start
        answered, generation_s = [], 0.0
        if answer and not result.stopped_early:
            generation_start = time.perf_counter()
            asked = answer_subset(s.validation, answer, cfg.training.seed)
            answered = [{"prediction": p, "reference": e.reference}
                        for p, e in zip(generate_answers(s, asked, max_new_tokens), asked, strict=True)]
            generation_s = time.perf_counter() - generation_start
        tested = score_examples(s, test, cfg.training.eval_batch_size, test_answers, max_new_tokens) if test else None
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.save_adapter:
            s.model.save_pretrained(out / "adapter")
    finally:
        if base is not None:
            base.model = detach_adapter(s.model)
    metrics = TrainingMetrics(
        state=TrialState.EARLY_STOPPED if result.stopped_early else TrialState.COMPLETED,
        val_loss=result.val_loss, train_loss=result.train_loss, steps=result.steps, planned_steps=result.planned_steps,
        tokens_seen=result.tokens_seen, tokens_per_s=result.tokens_seen / max(result.train_time_s, 1e-9),
        train_time_s=result.train_time_s, eval_time_s=result.eval_time_s, inference_measure_s=inference_s,
        load_time_s=s.times["load_s"] if base is None else 0.0, data_time_s=s.times["data_s"],
        wall_time_s=time.perf_counter() - wall, peak_memory_gb=peak_memory_gb(s.device),
        padding_fraction=result.padding_fraction, trainable_params=s.trainable_params, n_train=len(s.train),
        n_validation=len(s.validation), device=s.device, precision=s.precision,
        curve=[asdict(p) for p in result.curve], config=to_dict(cfg), inference_time=inference_ms,
        answers=answered or None, generation_s=generation_s if answered else None, test=tested)
    atomic_write_json(Path(cfg.output_dir) / "metrics.json", metrics.to_dict())
    return metrics
