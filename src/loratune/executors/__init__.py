"""Where trials run: threads for a Python function, child processes on this machine, or Ray actors."""

from __future__ import annotations

from collections.abc import Callable

from ..config import StudyConfig
from ..trial import Evaluation
from .base import Event, Executor, TrialSpec

__all__ = ["Event", "Executor", "TrialSpec", "create_executor"]


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
                         trials_per_worker=cfg.trials_per_worker)
