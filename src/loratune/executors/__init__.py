"""Where trials run: threads for a Python function, child processes on this machine, or Ray actors."""

from __future__ import annotations

import functools
from collections.abc import Callable

from ..config import StudyConfig
from ..trial import Evaluation
from .base import Event, Executor, TrialSpec, run_to_end

__all__ = ["Event", "Executor", "TrialSpec", "create_executor", "pack_size", "run_to_end"]

# What pack: auto comes to, where packing measured faster (docs/benchmarks.md, "Packed trials"): on a CPU, for
# a model below SMALL_MODEL parameters (the 0.4M-parameter demo model: its 20-trial study packed in fours took
# about two thirds of its time one at a time). SmolLM2-135M on a CPU gained nothing (0.99x: its passes are compute-bound), and
# no GPU has measured packing yet: one trial per worker there.
AUTO_PACK, SMALL_MODEL = 4, 10_000_000
OWN_MEASURES = ("train_time", "peak_memory_gb", "tokens_per_s")  # a packed trial measures its pack's


def pack_size(cfg: StudyConfig, evaluation: Evaluation = Evaluation.FINETUNE) -> tuple[int, str | None]:
    """(trials each worker trains together, a note when fewer than asked for): ``pack``, or what ``auto``
    comes to on this machine; 1 wherever trials cannot pack."""
    from ..rules import needed_metrics

    asked = cfg.pack
    measured = [m for m in needed_metrics(cfg) if m in OWN_MEASURES]
    why = ("a --command study runs one trial per worker" if evaluation is Evaluation.COMMAND else
           "an evaluate= study runs one trial per worker" if evaluation is Evaluation.CALLABLE else
           "without reuse_model every trial has a process of its own" if not cfg.reuse_model else
           f"{measured[0]} of a packed trial would be its pack's" if measured else None)
    if why:
        return 1, (f"pack: {asked} asked for, but {why}: trials run one per worker"
                   if isinstance(asked, int) and asked > 1 else None)
    if asked == "auto":  # on Ray, the nodes' devices are not known here: one trial per actor unless asked
        return (1 if cfg.executor == "ray" else auto_pack(cfg.base().model.name, cfg.base().model.trust_remote_code)), None
    return asked, None


def auto_pack(model: str, trust_remote_code: bool = False) -> int:
    """``pack: auto`` for this base model on this machine: ``AUTO_PACK`` for a small model where trials train on
    the CPU (no GPU visible to this process), else 1 (see ``AUTO_PACK``)."""
    from .local import visible_gpus

    if visible_gpus():
        return 1
    return AUTO_PACK if _parameters(model, trust_remote_code) < SMALL_MODEL else 1


@functools.cache
def _parameters(model: str, trust_remote_code: bool) -> float:
    """The model's parameter count, from its config alone (once per process); inf where it cannot be read
    here (the checks before the study name why)."""
    from ..config import FinetuneConfig
    from ..model import parameter_count

    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.trust_remote_code = model, trust_remote_code
    try:
        return parameter_count(cfg)
    except Exception:  # noqa: BLE001 - a model whose config cannot be read
        return float("inf")


def create_executor(cfg: StudyConfig, evaluation: Evaluation = Evaluation.FINETUNE,
                    evaluate: Callable | None = None) -> Executor:
    """The executor a study's settings ask for, for its kind of evaluation (``evaluate``: its function)."""
    if evaluation is Evaluation.CALLABLE:
        from .callable import CallableExecutor

        return CallableExecutor(evaluate, cfg.objectives, slots=cfg.workers)
    if cfg.executor == "ray":
        from .ray import RayExecutor

        return RayExecutor(cfg.workers, address=cfg.ray_address, gpus_per_trial=cfg.gpus_per_trial,
                           shared_dir=cfg.shared_dir, reuse_model=cfg.reuse_model, trials_per_worker=cfg.trials_per_worker,
                           pack=pack_size(cfg, evaluation)[0])
    from .local import LocalExecutor

    command = cfg.command if evaluation is Evaluation.COMMAND else None
    return LocalExecutor(slots=cfg.workers, objectives=cfg.objectives, command=command, gpus=cfg.gpus,
                         gpus_per_trial=cfg.gpus_per_trial, reuse_model=cfg.reuse_model,
                         trials_per_worker=cfg.trials_per_worker, pack=pack_size(cfg, evaluation)[0])
