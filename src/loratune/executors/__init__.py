"""Where trials run: threads for a Python function, child processes on this machine, or Ray actors."""

from __future__ import annotations

from collections.abc import Callable

from ..config import StudyConfig
from .base import Event, Executor, TrialSpec

__all__ = ["Event", "Executor", "TrialSpec", "create_executor"]


def create_executor(cfg: StudyConfig, evaluate: Callable | None = None) -> Executor:
    """The executor a study's settings ask for."""
    if evaluate is not None:
        from .callable import CallableExecutor

        return CallableExecutor(evaluate, cfg.objectives, slots=cfg.workers)
    if cfg.executor == "ray":
        from .ray import RayExecutor

        return RayExecutor(cfg.workers, address=cfg.ray_address, gpus_per_trial=cfg.gpus_per_trial,
                           shared_dir=cfg.shared_dir, reuse_model=cfg.reuse_model, trials_per_worker=cfg.trials_per_worker)
    from .local import LocalExecutor

    return LocalExecutor(slots=cfg.workers, objectives=cfg.objectives, command=cfg.command, gpus=cfg.gpus,
                         gpus_per_trial=cfg.gpus_per_trial, reuse_model=cfg.reuse_model,
                         trials_per_worker=cfg.trials_per_worker)
