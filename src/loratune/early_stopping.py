"""Stopping poor trials early: the threshold rule (Module 4.5's ``EarlyStoppingCallback``) and the
study's arbitration of each curve point between it and Ax's learning-curve (percentile) rule, which
lives in the optimizer (``early_stopping.percentile``). Both can be used together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .optimizer import PROGRESSION_SCALE
from .trial import TrialRecord, with_loss

if TYPE_CHECKING:
    from .config import StudyConfig
    from .optimizer import Optimizer


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


class EarlyStopping:
    """The study's early-stopping rules, judging each curve point of a trial they may stop: the threshold
    rule (``early_stopping.threshold``) and Ax's percentile rule (``early_stopping.percentile``), which
    sees the curves as Ax data at progressions of ``PROGRESSION_SCALE``. Either may stop a trial."""

    def __init__(self, cfg: StudyConfig, optimizer: Optimizer):
        es = cfg.early_stopping
        self.threshold_rule = None if es.threshold is None else EarlyStoppingCallback(es.threshold, es.check_at)
        self.percentile = es.percentile is not None
        self.objective, self.opt = cfg.objectives[0], optimizer

    def may_stop(self, record: TrialRecord) -> bool:
        """Whether a rule may stop the trial (never the baseline: the reference every trial is measured
        against always runs to the end)."""
        return not record.baseline and (self.threshold_rule is not None or self.percentile)

    def judge(self, record: TrialRecord, point: dict, baseline_curve: list[dict] | None) -> bool:
        """Whether to stop the trial at ``point``, the last of ``record.curve``; Ax's rule hears the point too."""
        stop = bool(self.threshold_rule and self.threshold_rule.should_stop(record.curve, baseline_curve))
        if self.percentile and isinstance(point.get(self.objective), int | float):
            self.opt.progress(record.index, {self.objective: point[self.objective]}, _progression(point))
            stop = stop or self.opt.should_stop(record.index)
        return stop

    def tell_stopped(self, record: TrialRecord) -> None:
        """Tell Ax how a stopped trial ended: early-stopped at its last point, which Ax already has where the
        percentile rule streamed its curve; abandoned where it stopped before its first point (nothing to
        learn from)."""
        points = [p for p in record.curve if isinstance(p.get(self.objective), int | float)]
        if not points:
            self.opt.abandoned(record.index)
            return
        if not self.percentile:  # the curve was not streamed to Ax: send its last point
            self.opt.progress(record.index, {self.objective: points[-1][self.objective]}, _progression(points[-1]))
        self.opt.early_stopped(record.index)


def _progression(point: dict) -> int:
    return max(1, round(point["progress"] * PROGRESSION_SCALE))
