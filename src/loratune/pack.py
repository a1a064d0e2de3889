"""Training several trials at once on one loaded base model: a pack.

Each trial of a pack keeps everything it has when it trains alone: its adapter (``adapters.py``), its
AdamW state, learning-rate schedule, gradient clipping and loss scaling, its seed, data order and
micro-batches, its curve points and its ending. What the trials share is the pass through the frozen
base: a round gives every trial that is not waiting for a verdict one optimizer step, and the rows of
all their micro-batches go through the base together, in chunks of at most the sum of their batch sizes
(about one micro-batch of each trial per forward pass, so a pack needs the memory of its trials'
micro-batches together). Each trial's loss is normalised by its own answer tokens over its own
optimizer step, so its gradient is the one it gets alone; the adapters share no parameter, so one
backward pass over the sum of the losses gives each adapter exactly its own gradient.

A trial alone is a pack of one: ``training.run_training`` runs it here too, so packed and alone are the
same code (tests/unit/test_pack.py trains four trials both ways and compares every curve point).

Trials join and leave between rounds: one that ends (its last step, a stop, a failure of its own) leaves
at once and the others go on; whoever runs the pack may add another in its place.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .adapters import PackedAdapters, Segment
from .config import FinetuneConfig
from .data.batching import collate, length_grouped_batches
from .data.chat import IGNORE, Example
from .losses import autocast, can_score_only_responses, mean_losses, row_losses
from .model import Base


@dataclass
class CurvePoint:
    step: int
    progress: float  # share of the planned optimizer steps done
    val_loss: float  # mean loss per response token; on the curve's subset before the last point
    train_loss: float  # mean loss per response token since the previous point
    subset: int = 0  # validation examples it was computed on (all of them at the last point)


class Hooks:
    """What a pack tells whoever runs one of its trials, and asks them. These defaults tell nothing and
    never stop the trial."""

    def on_point(self, point: CurvePoint) -> bool:
        """A curve point before the last; True: the trial waits for ``verdict`` before its next step."""
        return False

    def verdict(self) -> bool | None:
        """After ``on_point`` returned True: True to stop at that point, False to go on, None: not yet."""
        return False

    def on_step(self, step: int, steps: int, elapsed_s: float, train_loss: float) -> None:
        """After each optimizer step (step, planned steps, seconds of training so far, running train loss)."""

    def on_last_point(self, point: CurvePoint) -> None:
        """The trial's last curve point, on the whole validation set, when it was not told as ``on_point``
        first (the end of training, or a stop asked between points); a trial stopped by a verdict ends at
        the point it was told, its loss then taken on the whole set (``PackTrial.curve``)."""

    def stop_requested(self) -> bool:
        """Checked after each optimizer step: True stops the trial right there (at a point on the whole set)."""
        return False


MIN_SUBSET = 8


def curve_subset(cfg: FinetuneConfig, validation: list[Example]) -> list[Example]:
    """The fixed validation examples of the curve's intermediate points: ``training.eval_subset`` of
    them (a share, at least ``MIN_SUBSET``, or a count above 1), drawn once from the seed; the last point
    uses all of them: a curve on the whole set costs a real model a large share of each trial
    (docs/benchmarks.md, "Trial runner")."""
    share = cfg.training.eval_subset
    n = round(share * len(validation)) if share <= 1 else int(share)
    n = max(min(MIN_SUBSET, len(validation)), min(len(validation), n))
    if n == len(validation):
        return validation
    order = list(range(len(validation)))
    random.Random(cfg.training.seed).shuffle(order)
    return [validation[i] for i in sorted(order[:n])]


@dataclass
class PackTrial:
    """One trial of a pack: its config, its optimizer and where it has got to."""

    name: str  # its adapter's name
    cfg: FinetuneConfig
    hooks: Hooks
    params: list
    optimizer: Any
    scheduler: Any
    scaler: Any
    accumulation: int
    steps: int  # planned optimizer steps
    eval_at: list[int]
    subset: list[Example]
    feed: Iterator[list[int]]
    trainable_params: int
    step: int = 0
    micro_batches: int = 0  # drawn so far: numbers each one's dropout seed
    tokens: int = 0
    window_loss: float = 0.0
    window_tokens: int = 0
    curve: list[CurvePoint] = field(default_factory=list)
    used: list[list[int]] = field(default_factory=list)  # its micro-batches, for the padding it would have alone
    train_time_s: float = 0.0  # the pack's training time while this trial trained in it
    eval_time_s: float = 0.0
    awaiting: bool = False  # at a curve point, waiting for the verdict
    stopped: bool = False
    done: bool = False  # trained to its end or stopped
    error: BaseException | None = None  # what ended it, when something of its own went wrong


@dataclass
class _MicroBatch:
    trial: PackTrial
    rows: list[Example]
    seed: int


class Pack:
    """Trials training together on ``base``: ``add`` them, call ``round`` until each is ``done`` (or has an
    ``error``), and ``remove`` each as it ends. ``data``: the tokenized (train, validation) every trial shares."""

    def __init__(self, base: Base, data: tuple[list[Example], list[Example]]):
        self.base, (self.train, self.validation) = base, data
        self.adapters = PackedAdapters(base)
        self.trials: list[PackTrial] = []
        self.lengths = [len(e) for e in self.train]
        self.scored_only = False

    def add(self, name: str, cfg: FinetuneConfig, hooks: Hooks | None = None) -> PackTrial:
        """A trial with a fresh adapter (drawn from its seed), its optimizer and its plan."""
        import torch
        from transformers import get_scheduler

        t = cfg.training
        params = self.adapters.add(name, cfg)
        self.scored_only = can_score_only_responses(self.adapters.model)
        accumulation, steps, eval_at = t.plan(len(self.train))
        # the fused kernel updates every LoRA tensor in one call, as Trainer's default adamw_torch_fused does
        # (docs/benchmarks.md, "Trainer throughput")
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                      fused=self.base.device in ("cuda", "cpu") or None)
        scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * steps),
                                  num_training_steps=steps)
        scaler = torch.amp.GradScaler(self.base.device, enabled=self.base.precision == "fp16")
        trial = PackTrial(name, cfg, hooks or Hooks(), params, optimizer, scheduler, scaler, accumulation, steps,
                          eval_at, curve_subset(cfg, self.validation), _micro_batches(self.lengths, t.batch_size, t.seed),
                          sum(p.numel() for p in params))
        self.trials.append(trial)
        return trial

    def remove(self, trial: PackTrial) -> None:
        """The trial leaves the pack; its adapter comes off (save it before)."""
        if trial in self.trials:
            self.trials.remove(trial)
        trial.optimizer = trial.scheduler = trial.params = None
        self.adapters.remove(trial.name)

    def close(self) -> None:
        for trial in list(self.trials):
            self.remove(trial)

    @property
    def active(self) -> list[PackTrial]:
        return [t for t in self.trials if not t.done and t.error is None]

    def round(self) -> bool:
        """One optimizer step of every active trial that is not waiting for a verdict, then the curve points
        that are due. False when every active trial waits (nothing trained). A failure of the shared passes
        (out of memory) raises; a failure of one trial's own (its loss not finite) sets its ``error``."""
        self._hear_verdicts()
        ready = [t for t in self.active if not t.awaiting]
        if not ready:
            return False
        start = time.perf_counter()
        self.adapters.model.train()
        self._train_step(ready)
        elapsed = time.perf_counter() - start
        due = []
        for t in ready:
            t.train_time_s += elapsed
            t.step += 1
            t.hooks.on_step(t.step, t.steps, t.train_time_s, t.window_loss / max(t.window_tokens, 1))
            if t.step < t.steps and t.hooks.stop_requested():
                t.stopped = True
            if t.step in t.eval_at or t.stopped:
                due.append(t)
        self._curve_points(due)
        return True

    # -- training -----------------------------------------------------------------------------

    def _train_step(self, ready: list[PackTrial]) -> None:
        """Forward and backward passes over one optimizer step's micro-batches of every ready trial, then
        each trial's own optimizer step."""
        batches, n_items = [], {}
        for t in ready:
            group = [next(t.feed) for _ in range(t.accumulation)]
            t.used += group
            for idx in group:
                t.micro_batches += 1
                seed = zlib.crc32(f"{t.cfg.training.seed}:{t.micro_batches}".encode())
                batches.append(_MicroBatch(t, [self.train[i] for i in idx], seed))
            n_items[t.name] = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for b in batches if b.trial is t
                                  for e in b.rows)
        limit = sum(t.cfg.training.batch_size for t in ready)
        for chunk in _chunks(batches, limit):
            examples = [e for b in chunk for e in b.rows]
            batch = {k: v.to(self.base.device) for k, v in collate(examples, self.base.tokenizer.pad_token_id).items()}
            segments, row = [], 0
            for b in chunk:
                segments.append(Segment(b.trial.name, row, row + len(b.rows), max(len(e) for e in b.rows), b.seed))
                row += len(b.rows)
            with self.adapters.routed(segments), autocast(self.base):
                sums = row_losses(self.adapters.model, batch, self.scored_only)
            total = 0
            for s, b in zip(segments, chunk, strict=True):
                t = b.trial
                loss = sums[s.start:s.stop].sum() / max(n_items[t.name], 1)
                total = total + t.scaler.scale(loss)
                t.window_loss += float(loss.detach()) * n_items[t.name]
                t.tokens += int(batch["attention_mask"][s.start:s.stop].sum())
            total.backward()
        for t in ready:
            t.window_tokens += n_items[t.name]
            _optimizer_step(t)

    # -- the curve ----------------------------------------------------------------------------

    def _curve_points(self, due: list[PackTrial]) -> None:
        """The curve points due this round, their validation losses computed together; a stopped trial's
        last point is on the whole validation set."""
        if not due:
            return
        start = time.perf_counter()
        final = [t for t in due if t.step == t.steps or t.stopped]
        partial = [t for t in due if t not in final]
        losses = {**self._losses(final, self.validation), **self._subset_losses(partial)}
        for t in due:
            t.eval_time_s += time.perf_counter() - start
        for t in due:
            whole = t in final
            point = CurvePoint(t.step, t.step / t.steps, losses[t.name],
                               t.window_loss / max(t.window_tokens, 1), len(self.validation if whole else t.subset))
            t.window_loss, t.window_tokens = 0.0, 0
            t.curve.append(point)
            if not math.isfinite(point.val_loss):
                t.error = FloatingPointError(f"validation loss is {point.val_loss} at step {t.step}")
            elif whole:
                t.done = True
                t.hooks.on_last_point(point)
            else:
                t.awaiting = t.hooks.on_point(point)
        self._hear_verdicts()

    def _subset_losses(self, trials: list[PackTrial]) -> dict[str, float]:
        """Each trial's loss on its curve subset (trials with equal subsets are scored together)."""
        out: dict[str, float] = {}
        groups: dict[int, list[PackTrial]] = {}
        for t in trials:  # the subset is drawn from these; trials that agree share their passes
            tc = t.cfg.training
            groups.setdefault((tc.seed, tc.eval_subset, tc.eval_batch_size), []).append(t)
        for group in groups.values():
            out.update(self.validation_losses(group, group[0].subset))
        return out

    def _losses(self, trials: list[PackTrial], examples: list[Example]) -> dict[str, float]:
        """``validation_losses`` of trials grouped by their ``eval_batch_size``."""
        out: dict[str, float] = {}
        for size in {t.cfg.training.eval_batch_size for t in trials}:
            out.update(self.validation_losses([t for t in trials if t.cfg.training.eval_batch_size == size], examples))
        return out

    def _hear_verdicts(self) -> None:
        """Trials waiting at a curve point: a stop verdict ends them there (on the whole validation set);
        a go lets them train on."""
        stopping = []
        for t in self.active:
            if not t.awaiting:
                continue
            verdict = t.hooks.verdict()
            if verdict is None:
                continue
            t.awaiting = False
            if verdict:
                stopping.append(t)
        if not stopping:
            return
        start = time.perf_counter()
        losses = self._losses(stopping, self.validation)
        for t in stopping:
            t.eval_time_s += time.perf_counter() - start
            point = t.curve[-1]
            point.val_loss, point.subset = losses[t.name], len(self.validation)
            t.stopped = t.done = True
            if not math.isfinite(point.val_loss):
                t.error = FloatingPointError(f"validation loss is {point.val_loss} at step {t.step}")

    def validation_losses(self, trials: list[PackTrial], examples: list[Example],
                          batch_size: int | None = None) -> dict[str, float]:
        """Mean loss per answer token of each trial's adapter over ``examples``, each batch of
        ``batch_size`` (default: the first trial's ``training.eval_batch_size``) examples run once for all
        the trials, its rows repeated per trial."""
        if not trials:
            return {}
        size = batch_size or trials[0].cfg.training.eval_batch_size
        return mean_losses(self.adapters.model, self.base, examples, size, [t.name for t in trials], self.adapters)


def _chunks(batches: list[_MicroBatch], limit: int) -> list[list[_MicroBatch]]:
    """Whole micro-batches into forward passes of at most ``limit`` rows (at least one micro-batch each),
    the longest together so that little is padding; inside a pass, each trial's rows are contiguous."""
    order = sorted(batches, key=lambda b: max(len(e) for e in b.rows), reverse=True)
    chunks, current, rows = [], [], 0
    for b in order:
        if current and rows + len(b.rows) > limit:
            chunks.append(current)
            current, rows = [], 0
        current.append(b)
        rows += len(b.rows)
    if current:
        chunks.append(current)
    return [sorted(c, key=lambda b: b.trial.name) for c in chunks]


def _micro_batches(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Micro-batches (lists of example indices) without end: each epoch grouped by length from its own seed."""
    epoch = 0
    while True:
        yield from length_grouped_batches(lengths, batch_size, seed=seed + epoch)
        epoch += 1


def _optimizer_step(t: PackTrial) -> None:
    import torch

    if t.cfg.training.max_grad_norm > 0:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.params, t.cfg.training.max_grad_norm)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
