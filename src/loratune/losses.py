"""The causal-LM loss of answer tokens, as training and validation take it: summed per row of a batch,
averaged per answer token over examples for each adapter of a pack, under the base's mixed precision.
Only answer tokens are scored (labels other than ``IGNORE``), and where the model allows it only their
positions reach the vocabulary projection."""

from __future__ import annotations

from .adapters import PackedAdapters, Segment
from .data.batching import collate, sorted_batches
from .data.chat import IGNORE, Example
from .model import Base


def mean_losses(model, base: Base, examples: list[Example], batch_size: int, names: list,
                router: PackedAdapters | None = None) -> dict:
    """Mean loss per answer token over ``examples`` of each adapter in ``names``, routed by ``router``
    (without one: ``names`` is ``[None]``, the model as it is, such as a loaded adapter)."""
    import contextlib

    import torch

    totals = dict.fromkeys(names, 0.0)
    count = 0
    scored_only = can_score_only_responses(model)
    model.eval()
    with torch.no_grad(), autocast(base):
        for idx in sorted_batches([len(e) for e in examples], batch_size):
            rows = [examples[i] for i in idx]
            batch = {k: v.to(base.device) for k, v in collate(rows * len(names), base.tokenizer.pad_token_id).items()}
            segments = [Segment(n, k * len(rows), (k + 1) * len(rows)) for k, n in enumerate(names)]
            with router.routed(segments) if router else contextlib.nullcontext():
                sums = row_losses(model, batch, scored_only)
            for s in segments:
                totals[s.adapter] += float(sums[s.start:s.stop].sum())
            count += sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in rows)
    model.train()
    return {name: total / max(count, 1) for name, total in totals.items()}


def autocast(base: Base):
    """Mixed precision as the base runs it: none in fp32, else torch's autocast to bf16 or fp16."""
    import contextlib

    import torch

    if base.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(base.device, dtype=torch.bfloat16 if base.precision == "bf16" else torch.float16)


def can_score_only_responses(model) -> bool:
    """True when the model can project only chosen positions onto its vocabulary (``logits_to_keep``
    with a mask) and adds nothing else to its loss (a mixture of experts' router loss)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ("logits_to_keep" in inspect.signature(base.forward).parameters
            and not getattr(base.config, "output_router_logits", False))


def row_losses(model, batch: dict, scored_only: bool):
    """The summed causal-LM loss of each row's answer tokens, shape (rows,), float32.

    With ``scored_only`` prompt and padding positions (label IGNORE) never reach the vocabulary
    projection (``logits_to_keep``): the same loss as from the full logits with far less work and memory
    where the vocabulary is large."""
    import torch

    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = scored  # position t predicts token t + 1
    if scored_only:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep]
    tokens = torch.nn.functional.cross_entropy(logits.float(), targets[scored], reduction="none")
    rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[scored]
    return torch.zeros(targets.shape[0], device=tokens.device, dtype=tokens.dtype).index_add_(0, rows, tokens)
