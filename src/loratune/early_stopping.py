"""The seed's threshold rule for stopping poor trials early.

Ax's learning-curve (percentile) stopping is the other kind; it lives in the optimizer, configured
by ``early_stopping.percentile``. Both can be used together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LoratuneError


@dataclass
class EarlyStoppingCallback:
    """Stop a trial whose validation loss is above ``threshold`` once ``check_at`` of its training is done.

    >>> from ax_optimization import run_optimization, EarlyStoppingCallback
    >>> results = run_optimization(num_trials=20,
    ...     early_stopping=EarlyStoppingCallback(threshold=0.7, check_at=0.1))  # doctest: +SKIP
    """

    threshold: float
    check_at: float = 0.1
    metric: str = "loss"

    def __post_init__(self) -> None:
        if not (isinstance(self.check_at, int | float) and 0 < self.check_at <= 1):
            raise LoratuneError(f"EarlyStoppingCallback: check_at must be in (0, 1], got {self.check_at!r}")
        if not (isinstance(self.threshold, int | float) and math.isfinite(self.threshold)):
            raise LoratuneError(f"EarlyStoppingCallback: threshold must be a number, got {self.threshold!r}")

    def should_stop(self, curve: list[dict]) -> bool:
        """Decide at the first validation point at or past ``check_at``; never again after it."""
        reached = [p for p in curve if p.get("progress", 0) >= self.check_at - 1e-9]
        if len(reached) != 1:
            return False
        value = reached[0].get(self.metric, reached[0].get("val_loss"))
        return value is not None and value > self.threshold
