"""The threshold rule for stopping poor trials early (Module 4.5's ``EarlyStoppingCallback``).

Ax's learning-curve (percentile) stopping is the other kind; it lives in the optimizer, configured
by ``early_stopping.percentile``. Both can be used together.
"""

from __future__ import annotations

from dataclasses import dataclass

from .trial import with_loss


@dataclass
class EarlyStoppingCallback:
    """Stop a trial whose validation loss is above ``threshold`` once ``check_at`` of its training is done.

    ``threshold="baseline"`` compares with the baseline trial's own curve at the same point instead
    of a fixed number, so the rule needs no knowledge of the model's loss scale: a trial doing worse
    than the current settings at ``check_at`` is stopped.

    >>> from ax_optimization import run_optimization, EarlyStoppingCallback
    >>> results = run_optimization(num_trials=20,
    ...     early_stopping=EarlyStoppingCallback(threshold=0.7, check_at=0.1))  # doctest: +SKIP
    """

    threshold: float | str
    check_at: float = 0.1

    def __post_init__(self) -> None:  # the rules of the early_stopping section, checked where it is built
        from .config import EarlyStoppingConfig
        from .rules import check_early_stopping
        from .schema import Origin, build

        where = "EarlyStoppingCallback"
        section = build(EarlyStoppingConfig, {"threshold": self.threshold, "check_at": self.check_at}, Origin(where))
        check_early_stopping(section, where)

    def should_stop(self, curve: list[dict], baseline_curve: list[dict] | None = None) -> bool:
        """Decide at the first validation point at or past ``check_at``; never again after it.
        With ``threshold="baseline"`` and no baseline value at that point yet, the trial goes on."""
        reached = [p for p in curve if p.get("progress", 0) >= self.check_at - 1e-9]
        if len(reached) != 1:
            return False
        value = self._value(reached[0])
        limit = self.threshold if self.threshold != "baseline" else self._at(baseline_curve or [], reached[0]["progress"])
        return value is not None and limit is not None and value > limit

    def _value(self, point: dict) -> float | None:
        value = with_loss(dict(point)).get("loss")  # the validation loss, whatever the study's objectives
        return value if isinstance(value, int | float) else None

    def _at(self, curve: list[dict], progress: float) -> float | None:
        """The curve's value at ``progress`` (linear between its points); None past its last point."""
        points = [(p["progress"], v) for p in curve if "progress" in p and (v := self._value(p)) is not None]
        if not points or progress > points[-1][0] + 1e-9:
            return None
        if progress <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            if progress <= x1:
                return y0 + (y1 - y0) * (progress - x0) / (x1 - x0) if x1 > x0 else y1
        return points[-1][1]
