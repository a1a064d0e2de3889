"""LoRA fine-tuning with transformers + peft, top to bottom: the base (model.py) -> a pack of one or more
trials trained together (pack.py) -> their endings (answers, inference time, the test split) -> saved
adapters and ``metrics.json``.

The loop is ours rather than ``transformers.Trainer``: it batches by length (little padding), weights
the loss by response tokens across gradient accumulation, reports a validation curve at fixed points
of the run, can be stopped early at a curve point or between optimizer steps, and trains several
trials' adapters in one pass over the base. The base model is loaded apart from the adapters, so a
worker keeps one base and trains trial after trial on it, leaving it as it was.
"""

from __future__ import annotations

import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .adapters import PackedAdapters
from .config import FinetuneConfig, to_dict
from .data import load_examples
from .data.batching import padding_fraction, sorted_batches
from .data.chat import Example
from .errors import LoratuneError
from .losses import autocast, mean_losses
from .model import Base, detach_adapter, load_base
from .pack import CurvePoint, Hooks, Pack, PackTrial
from .storage import atomic_write_json, check_creatable
from .trial import TrialState

# Called after each curve point before the last; returning True stops training there.
EvalCallback = Callable[[CurvePoint], bool]
# Called after each optimizer step with (step, planned steps, seconds of training so far, running train loss).
StepCallback = Callable[[int, int, float, float], None]


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

    def objective_metrics(self) -> dict[str, float]:
        """Under the names the optimizer knows (``loss`` is the validation loss)."""
        out = {
            "loss": self.val_loss, "train_loss": self.train_loss, "train_time": self.train_time_s,
            "peak_memory_gb": self.peak_memory_gb, "trainable_params": float(self.trainable_params),
            "tokens_per_s": self.tokens_per_s, "padding_fraction": self.padding_fraction,
        }
        for name in ("inference_time", "generation_s"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def to_dict(self) -> dict:
        """As ``metrics.json`` holds it, and ``finetune()`` returns it: fields left unmeasured are left out."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["state"] = self.state.value
        return out


@dataclass
class Ending:
    """What a trained trial does before it ends, besides saving its adapter and metrics."""

    measure_inference: bool = False  # time generation: metrics.inference_time
    answer: int = 0  # validation prompts to answer (``answer_subset``) unless stopped early
    max_new_tokens: int | None = None  # the longest answer; None: from the references (``generate_answers``)
    test: list[Example] | None = None  # examples to score the adapter on as well (``score_examples``)
    test_answers: bool = False  # answer the test examples too


def finish(pack: Pack, ended: list[tuple[PackTrial, Ending]], load_s: float = 0.0) -> list[TrainingMetrics]:
    """The metrics of trials of ``pack`` that trained to their end or were stopped, in order: their answers
    generated together (one mixed-adapter batch per group of prompts) and their adapters saved. The caller
    completes the times it knows and writes each (``write_metrics``); the trials stay in the pack
    (``Pack.remove`` them after)."""
    for t, _ in ended:
        out = Path(t.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if t.cfg.save_adapter:
            pack.adapters.save(t.name, out / "adapter")
    inference = {t.name: _timed(lambda t=t: measure_inference_time(pack, t.name)) for t, e in ended if e.measure_inference}
    answers = _answers(pack, [(t, e) for t, e in ended if e.answer and not t.stopped])
    tests = {t.name: score_examples(pack.adapters.model, pack.base, pack.adapters, [t.name], e.test, t.cfg.training.eval_batch_size, e.test_answers,
                                    e.max_new_tokens)[t.name] for t, e in ended if e.test}
    metrics = []
    for t, _ in ended:
        last = t.curve[-1]
        asked = answers.get(t.name)
        m = TrainingMetrics(
            state=TrialState.EARLY_STOPPED if t.stopped else TrialState.COMPLETED, val_loss=last.val_loss,
            train_loss=last.train_loss, steps=t.step, planned_steps=t.steps, tokens_seen=t.tokens,
            tokens_per_s=t.tokens / max(t.train_time_s, 1e-9), train_time_s=t.train_time_s, eval_time_s=t.eval_time_s,
            inference_measure_s=inference[t.name][1] if t.name in inference else 0.0, load_time_s=load_s,
            data_time_s=0.0, wall_time_s=0.0, peak_memory_gb=peak_memory_gb(pack.base.device),
            padding_fraction=padding_fraction(t.used, pack.lengths), trainable_params=t.trainable_params,
            n_train=len(pack.train), n_validation=len(pack.validation), device=pack.base.device,
            precision=pack.base.precision, curve=[asdict(p) for p in t.curve], config=to_dict(t.cfg),
            inference_time=inference[t.name][0] if t.name in inference else None,
            answers=asked[0] if asked else None, generation_s=asked[1] if asked else None, test=tests.get(t.name))
        metrics.append(m)
    return metrics


def write_metrics(cfg: FinetuneConfig, metrics: TrainingMetrics) -> None:
    atomic_write_json(Path(cfg.output_dir) / "metrics.json", metrics.to_dict())


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def _answers(pack: Pack, asking: list[tuple[PackTrial, Ending]]) -> dict[str, tuple[list[dict], float]]:
    """Each trial's answers to its ``answer_subset``, with the references, and the seconds the answering
    took (the group's, where trials asking the same prompts answered together)."""
    groups: dict[tuple, list[tuple[PackTrial, Ending]]] = {}
    for t, e in asking:
        groups.setdefault((e.answer, t.cfg.training.seed, e.max_new_tokens), []).append((t, e))
    out = {}
    for (n, seed, max_new_tokens), group in groups.items():
        asked = answer_subset(pack.validation, n, seed)
        texts, seconds = _timed(lambda asked=asked, group=group, m=max_new_tokens: generate_answers(
            pack.adapters.model, pack.base, asked, [t.name for t, _ in group], m))
        for t, _ in group:
            out[t.name] = ([{"prediction": p, "reference": e.reference}
                            for p, e in zip(texts[t.name], asked, strict=True)], seconds)
    return out

def peak_memory_gb(device: str) -> float:
    """Peak GPU memory of this trial (CUDA), else the peak resident memory of its process so far (CPU), in GiB."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def memory_after_trial() -> dict[str, float]:
    """What this process holds once a trial is over (its adapter gone): a reused worker's memory must stay flat."""
    import gc

    import torch

    gc.collect()
    out = {"rss_gb": _rss_bytes() / 2**30}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        out["cuda_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        out["cuda_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
    return out


def _rss_bytes() -> int:
    import os

    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, where the current is not known


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    out = Path(path)
    check_creatable(out, "output_dir")
    if out.exists() and not overwrite and ((out / "metrics.json").exists() or (out / "adapter").exists()):
        raise LoratuneError(f"output_dir: {out} already holds a run; choose another directory or pass --overwrite")


def measure_inference_time(pack: Pack, name: str, n_prompts: int = 4, new_tokens: int = 16) -> float:
    """Milliseconds per generated token, greedy, on the first validation prompts, with adapter ``name``
    unmerged as a multi-adapter server runs it (so its cost grows with the rank); the pack's other trials
    wait meanwhile."""
    import torch

    model, base = pack.adapters.model, pack.base
    model.eval()
    model.config.use_cache = True
    prompts = [e.prompt for e in pack.validation[:n_prompts]]
    generated, elapsed = 0, 0.0
    with torch.no_grad(), autocast(base):
        for ids in prompts:
            x = torch.tensor([ids], device=base.device)
            model.generate(input_ids=x, max_new_tokens=2, do_sample=False, pad_token_id=base.tokenizer.pad_token_id,
                           adapter_names=[name])  # warm-up
            start = time.perf_counter()
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=base.tokenizer.pad_token_id,
                                 adapter_names=[name])
            if base.device == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            generated += out.shape[1] - x.shape[1]
    model.config.use_cache = False
    model.train()
    return 1000 * elapsed / max(generated, 1)


def answer_subset(validation: list[Example], n: int, seed: int) -> list[Example]:
    """The ``n`` validation examples every trial answers (all when there are fewer), drawn once from the seed."""
    if n >= len(validation):
        return validation
    return [validation[i] for i in sorted(random.Random(seed).sample(range(len(validation)), n))]


def generate_answers(model, base: Base, examples: list[Example], adapters: list[str | None],
                     max_new_tokens: int | None = None, batch_size: int = 16) -> dict[str | None, list[str]]:
    """Greedy answers of each adapter (None: the model's own active adapter) to the examples' prompts, as a
    server generates them: batches left-padded, each answer ending at the end-of-turn token (or after
    ``max_new_tokens``: by default the longest reference's length plus a quarter, plus 8), decoded without
    special tokens and stripped. Several adapters answer in one mixed-adapter batch (peft's ``adapter_names``)."""
    import torch

    from .data.chat import end_of_turn_ids

    tokenizer = base.tokenizer
    stop = end_of_turn_ids(tokenizer)
    if max_new_tokens is None:
        longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
        max_new_tokens = longest + longest // 4 + 8
    pad = tokenizer.pad_token_id
    answers: dict[str | None, dict[int, str]] = {a: {} for a in adapters}
    model.eval()
    model.config.use_cache = True
    with torch.no_grad(), autocast(base):
        for idx in sorted_batches([len(e.prompt) for e in examples], batch_size):
            width = max(len(examples[i].prompt) for i in idx)
            rows = [[pad] * (width - len(examples[i].prompt)) + examples[i].prompt for i in idx] * len(adapters)
            masks = [[0] * (width - len(examples[i].prompt)) + [1] * len(examples[i].prompt) for i in idx] * len(adapters)
            routing = {} if adapters == [None] else {"adapter_names": [a for a in adapters for _ in idx]}
            out = model.generate(input_ids=torch.tensor(rows, device=base.device),
                                 attention_mask=torch.tensor(masks, device=base.device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop or None, pad_token_id=pad, **routing)
            for row in range(len(rows)):
                new = out[row, width:].tolist()
                end = next((k for k, t in enumerate(new) if t in stop), len(new))
                answers[adapters[row // len(idx)]][idx[row % len(idx)]] = \
                    tokenizer.decode(new[:end], skip_special_tokens=True).strip()
    model.config.use_cache = False
    model.train()
    return {a: [found[i] for i in range(len(examples))] for a, found in answers.items()}


def score_examples(model, base: Base, router: PackedAdapters | None, names: list[str | None], examples: list[Example],
                   batch_size: int, answer: bool, max_new_tokens: int | None = None) -> dict[str | None, dict]:
    """For each adapter of ``names`` (routed by ``router``; without one ``[None]``, the model as it is): the
    loss per answer token over ``examples`` and, with ``answer``, its greedy answers (with the references,
    for the study's scorers) and the seconds generating them took."""
    losses = mean_losses(model, base, examples, batch_size, names, router)
    out = {n: {"loss": losses[n], "examples": len(examples)} for n in names}
    if answer:
        texts, seconds = _timed(lambda: generate_answers(model, base, examples, names, max_new_tokens))
        for n in names:
            out[n]["answers"] = [{"prediction": p, "reference": e.reference}
                                 for p, e in zip(texts[n], examples, strict=True)]
            out[n]["generation_s"] = seconds
    return out


def score_adapter(cfg: FinetuneConfig, base: Base, adapter: str | Path, examples: list[Example], answer: bool,
                  max_new_tokens: int | None = None) -> dict:
    """``score_examples`` of a saved adapter, put on ``base`` and taken off again."""
    from .model import load_adapter

    model = load_adapter(base, adapter)
    try:
        return score_examples(model, base, None, [None], examples, cfg.training.eval_batch_size, answer,
                              max_new_tokens)[None]
    finally:
        base.model = detach_adapter(model)


class _Callbacks(Hooks):
    """``run_training``'s callbacks as a pack's hooks: each verdict is known as soon as its point is told."""

    def __init__(self, on_eval, on_step, stop_requested):
        self.on_eval, self.step, self.stop = on_eval, on_step, stop_requested
        self.decided = False

    def on_point(self, point: CurvePoint) -> bool:
        self.decided = bool(self.on_eval and self.on_eval(point))
        return True

    def verdict(self) -> bool:
        return self.decided

    def on_last_point(self, point: CurvePoint) -> None:
        if self.on_eval:
            self.on_eval(point)

    def on_step(self, step: int, steps: int, elapsed_s: float, train_loss: float) -> None:
        if self.step:
            self.step(step, steps, elapsed_s, train_loss)

    def stop_requested(self) -> bool:
        return bool(self.stop and self.stop())


def train_alone(pack: Pack, cfg: FinetuneConfig, hooks: Hooks, name: str = "trial") -> PackTrial:
    """Train one trial to its end (or its stop) in ``pack``; raises what ended it otherwise."""
    trial = pack.add(name, cfg, hooks)
    try:
        while not trial.done and trial.error is None:
            if not pack.round():
                time.sleep(0.005)  # waiting for a verdict
    except BaseException:
        pack.remove(trial)
        raise
    if trial.error is not None:
        pack.remove(trial)
        raise trial.error
    return trial


def run_training(cfg: FinetuneConfig, *, overwrite: bool = False, on_eval: EvalCallback | None = None,
                 on_step: StepCallback | None = None, stop_requested: Callable[[], bool] | None = None,
                 measure_inference: bool = False, base: Base | None = None,
                 data: tuple[list[Example], list[Example]] | None = None, answer: int = 0,
                 max_new_tokens: int | None = None, test: list[Example] | None = None,
                 test_answers: bool = False) -> TrainingMetrics:
    """Fine-tune a LoRA adapter as ``cfg`` says (a pack of one trial, see pack.py); write ``metrics.json``
    (and the adapter) to its output_dir; return the metrics. With ``base`` (and ``data``), train on that
    loaded base and leave it as it was: the adapter is removed afterwards. ``on_eval`` hears each curve
    point before the last and stops training there by returning True; ``on_step`` hears each optimizer
    step; ``stop_requested()`` stops it after the next one. ``answer``: validation prompts to answer (see
    ``answer_subset``) once trained, unless stopped early; the answers go to the metrics, with their
    references. ``test``: examples to score the trained adapter on as well (``metrics.test``, see
    ``score_examples``).

    >>> from loratune.config import FinetuneConfig
    >>> metrics = run_training(FinetuneConfig(output_dir="runs/demo"))  # doctest: +SKIP
    >>> metrics.val_loss  # doctest: +SKIP
    """
    check_output_dir(cfg.output_dir, overwrite)
    wall = time.perf_counter()
    loaded = base is None
    base = base or load_base(cfg)
    data_start = time.perf_counter()
    data = data or load_examples(base.tokenizer, cfg.data, cfg.training.seed)
    data_s = time.perf_counter() - data_start
    if base.device == "cuda":  # the peak of this trial, not of the trials before it on a reused base
        import torch

        torch.cuda.reset_peak_memory_stats()
    pack = Pack(base, data)
    trial = train_alone(pack, cfg, _Callbacks(on_eval, on_step, stop_requested))
    try:
        ending = Ending(measure_inference, answer, max_new_tokens, test, test_answers)
        [metrics] = finish(pack, [(trial, ending)], base.load_time_s if loaded else 0.0)
    finally:
        pack.remove(trial)
    metrics.data_time_s, metrics.wall_time_s = data_s, time.perf_counter() - wall
    write_metrics(cfg, metrics)
    return metrics
