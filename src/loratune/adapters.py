"""Several trials' LoRA adapters on one loaded base model, each row of a batch routed to its own trial's adapter.

peft holds the adapters, one named adapter per trial, so that each saves and loads as an ordinary peft
adapter. peft routes rows to adapters for inference only (``adapter_names=``, refused in training mode),
and sums several active adapters over every row. So while a pack trains or scores a validation loss,
each LoRA layer's forward is ours, as LoRAFusion patches peft's: the base layer (``nn.Linear``, or
bitsandbytes' ``Linear4bit``/``Linear8bitLt``) runs once over the whole batch, and each trial's update
``B(A(dropout(x))) * scale`` is computed on its own rows and added there (mLoRA's scheme, with
contiguous row segments, so the update of every segment is a slice and one ``cat``). Generation uses
peft's own forward with ``adapter_names=``.

Dropout on a segment draws from a generator seeded by (the micro-batch's seed, the layer's name), so a
mask does not depend on which trials share the batch, on how its rows are padded or chunked, or on the
forward being recomputed under gradient checkpointing: the same config trains the same adapter packed
as alone.
"""

from __future__ import annotations

import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import FinetuneConfig
from .errors import LoratuneError, first_line
from .model import Base, detach_adapter


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of a batch, routed to ``adapter``."""

    adapter: str
    start: int
    stop: int
    width: int = 0  # the micro-batch's own padded length: dropout covers positions below it (0: all)
    seed: int | None = None  # the micro-batch's dropout seed; None: no dropout (evaluation)


class PackedAdapters:
    """The adapters of the trials of one pack, on ``base``. ``add`` one per trial, ``remove`` it when the
    trial ends; once the last is removed the base is exactly as loaded (``detach_adapter``)."""

    def __init__(self, base: Base):
        self.base = base
        self.model: Any = None  # the peft model while any adapter is on
        self.routes: list[Segment] | None = None  # set while a routed forward runs
        self.names: dict[str, list] = {}  # adapter -> its trainable parameters

    def add(self, name: str, cfg: FinetuneConfig) -> list:
        """A fresh adapter for one trial, drawn from its seed exactly as ``model.attach_adapter`` draws it in a
        fresh process; returns its parameters (trainable)."""
        import torch
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, use_rslora=lora.use_rslora, task_type="CAUSAL_LM")
        torch.manual_seed(cfg.training.seed)  # LoRA A matrices are drawn here
        try:
            if self.model is None:
                self.model = get_peft_model(self.base.model, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
        except ValueError as exc:
            if self.model is not None and not self.names:
                self.base.model = detach_adapter(self.model)
                self.model = None
            raise LoratuneError(f"lora.target_modules: {first_line(exc)}") from None
        if cfg.model.quantization == "none":
            self.model.to(self.base.device)
        self.names[name] = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        self._mark_trainable()
        self._patch()
        return self.names[name]

    def remove(self, name: str) -> None:
        """Take one trial's adapter off; the last one leaves the base as it was loaded."""
        if name not in self.names:
            return
        del self.names[name]
        if not self.names:
            self.base.model = detach_adapter(self.model)
            self.model = None
        else:
            self.model.delete_adapter(name)
            self._mark_trainable()

    def _mark_trainable(self) -> None:
        """Every trial's adapter trains: peft marks only its active adapter so after adding or deleting one."""
        for params in self.names.values():
            for p in params:
                p.requires_grad_(True)

    def close(self) -> None:
        for name in list(self.names):
            self.remove(name)

    @contextmanager
    def routed(self, segments: list[Segment]) -> Iterator[None]:
        """Forward passes inside route each segment's rows to its adapter (and only there)."""
        self.routes = segments
        try:
            yield
        finally:
            self.routes = None

    def save(self, name: str, directory: Path) -> None:
        """``name``'s adapter alone, as ``PeftModel.save_pretrained`` writes a single adapter, in ``directory``."""
        directory = Path(directory)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".adapter-"))
        try:
            self.model.save_pretrained(str(tmp), selected_adapters=[name])  # into tmp/name (not "default")
            shutil.rmtree(directory, ignore_errors=True)
            (tmp / name).rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _patch(self) -> None:
        """Our routed forward on every LoRA layer (new ones appear when an adapter targets other modules)."""
        from peft.tuners.lora import LoraLayer

        for module_name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and "forward" not in vars(module):
                module.forward = _RoutedForward(self, module, module.forward, zlib.crc32(module_name.encode()))


class _RoutedForward:
    """A LoRA layer's forward while a pack routes rows; peft's own otherwise (generation, ``adapter_names=``)."""

    def __init__(self, adapters: PackedAdapters, layer, original, key: int):
        self.adapters, self.layer, self.original, self.key = adapters, layer, original, key

    def __call__(self, x, *args, **kwargs):
        segments = self.adapters.routes
        if segments is None:
            return self.original(x, *args, **kwargs)
        import torch

        layer = self.layer
        result = layer.base_layer(x, *args, **kwargs)
        parts, routed = [], False
        for run in _runs(segments):  # a trial's contiguous micro-batches: one update over all their rows
            name, start, stop = run[0].adapter, run[0].start, run[-1].stop
            if name not in layer.lora_A:  # this trial's target modules leave this layer out
                parts.append(result.new_zeros((stop - start, *result.shape[1:])))
                continue
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            rows = x[start:stop].to(lora_a.weight.dtype)
            p = float(getattr(layer.lora_dropout[name], "p", 0.0))
            if p > 0 and layer.training and run[0].seed is not None:
                rows = torch.cat([self._dropout(rows[s.start - start:s.stop - start], p, s) for s in run])
            parts.append((lora_b(lora_a(rows)) * layer.scaling[name]).to(result.dtype))
            routed = True
        return result + torch.cat(parts) if routed else result

    def _dropout(self, rows, p: float, s: Segment):
        """Dropout on one micro-batch's rows, its mask drawn from (its seed, this layer) over its own length."""
        import torch

        three_d = rows.dim() == 3
        width = s.width if three_d and 0 < s.width < rows.shape[1] else rows.shape[1] if three_d else 0
        head = rows[:, :width] if three_d else rows
        generator = torch.Generator(device=rows.device)
        generator.manual_seed((s.seed * 1_000_003 + self.key) % (2**63 - 1))
        mask = torch.empty(head.shape, device=rows.device, dtype=head.dtype).bernoulli_(1.0 - p, generator=generator)
        head = head * mask / (1.0 - p)
        if three_d and width < rows.shape[1]:  # positions past the micro-batch's own length are padding
            return torch.cat([head, rows[:, width:]], dim=1)
        return head


def _runs(segments: list[Segment]) -> list[list[Segment]]:
    """Consecutive segments of the same adapter, together."""
    runs: list[list[Segment]] = []
    for s in segments:
        if runs and runs[-1][-1].adapter == s.adapter and runs[-1][-1].stop == s.start:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs
