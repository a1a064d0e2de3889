"""loratune: find the best LoRA fine-tuning hyperparameters with Bayesian optimization (Meta Ax).

    from loratune import run_optimization, resume_optimization, EarlyStoppingCallback, finetune

The names are imported on first use, so that ``python -m loratune.worker`` and the command line
start without loading the whole package.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_HOMES = {
    "run_optimization": "api", "resume_optimization": "api", "finetune": "api", "export_config": "api", "evaluate": "api",
    "EarlyStoppingCallback": "early_stopping", "LoratuneError": "errors", "StudyListener": "listeners",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'loratune' has no attribute {name!r}")
