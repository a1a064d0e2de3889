"""Where trials run: threads for a Python function, child processes on this machine, or Ray actors."""

from __future__ import annotations

from collections.abc import Callable

from ..config import StudyConfig
from ..trial import Evaluation
from .base import Event, Executor, TrialSpec

__all__ = ["Event", "Executor", "TrialSpec", "create_executor", "pack_size"]

AUTO_PACK = 1  # what pack: auto comes to: no whole study has measured faster packed yet (docs/BENCHMARKS.md, "Packed trials")
OWN_MEASURES = ("train_time", "peak_memory_gb", "tokens_per_s")  # a packed trial measures its pack's


def pack_size(cfg: StudyConfig, evaluation: Evaluation = Evaluation.FINETUNE) -> tuple[int, str | None]:
    """(trials each worker trains together, a note when fewer than asked for): ``pack``, or what ``auto``
    comes to on this machine; 1 wherever trials cannot pack."""
    from ..settings import outcome_metric

    asked = cfg.pack
    measured = [m for m in [*cfg.objectives, *(outcome_metric(c) for c in cfg.outcome_constraints)] if m in OWN_MEASURES]
    why = ("a --command study runs one trial per worker" if evaluation is Evaluation.COMMAND else
           "an evaluate= study runs one trial per worker" if evaluation is Evaluation.CALLABLE else
           "Ray actors run one trial each" if cfg.executor == "ray" else
           "without reuse_model every trial has a process of its own" if not cfg.reuse_model else
           f"{measured[0]} of a packed trial would be its pack's" if measured else None)
    if why:
        return 1, (f"pack: {asked} asked for, but {why}: trials run one per worker"
                   if isinstance(asked, int) and asked > 1 else None)
    if asked == "auto":
        return AUTO_PACK, None
    return asked, None


def create_executor(cfg: StudyConfig, evaluation: Evaluation = Evaluation.FINETUNE,
                    evaluate: Callable | None = None) -> Executor:
    """The executor a study's settings ask for, for its kind of evaluation (``evaluate``: its function)."""
    if evaluation is Evaluation.CALLABLE:
        from .callable import CallableExecutor

        return CallableExecutor(evaluate, cfg.objectives, slots=cfg.workers)
    if cfg.executor == "ray":
        from .ray import RayExecutor

        return RayExecutor(cfg.workers, address=cfg.ray_address, gpus_per_trial=cfg.gpus_per_trial,
                           shared_dir=cfg.shared_dir, reuse_model=cfg.reuse_model, trials_per_worker=cfg.trials_per_worker)
    from .local import LocalExecutor

    command = cfg.command if evaluation is Evaluation.COMMAND else None
    return LocalExecutor(slots=cfg.workers, objectives=cfg.objectives, command=command, gpus=cfg.gpus,
                         gpus_per_trial=cfg.gpus_per_trial, reuse_model=cfg.reuse_model,
                         trials_per_worker=cfg.trials_per_worker, pack=pack_size(cfg, evaluation)[0])
