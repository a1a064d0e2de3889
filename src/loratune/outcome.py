"""A trial's outcome, once: how a result from an executor becomes its record's end state and what Ax is
told. The study loop hands every ended trial here; nothing else sets a finished record's state.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from . import checkpoint
from .config import StudyConfig
from .early_stopping import EarlyStopping
from .optimizer import Optimizer
from .rules import needed_metrics
from .scoring import Scorer, ScoringError, score_answers
from .trial import TrialRecord, TrialResult, TrialState, check_metrics, with_loss


class Outcomes:
    """Finishes the records of a study's trials: scores a completed trial's answers, checks its objectives
    (each a finite number), records its end, and tells Ax."""

    def __init__(self, cfg: StudyConfig, scorers: list[Scorer], optimizer: Optimizer, stopping: EarlyStopping):
        self.cfg, self.scorers, self.opt, self.stopping = cfg, scorers, optimizer, stopping

    def finish(self, record: TrialRecord, result: TrialResult) -> None:
        """Set ``record``'s end from ``result`` (state, metrics, reason, times, curve) and tell Ax."""
        result = self._scored(result)
        if result.state is TrialState.COMPLETED:  # a number of any kind, finite, for every objective
            checked = check_metrics(result.metrics, self.cfg.objectives)
            result = dataclasses.replace(result, state=checked.state, metrics=checked.metrics,
                                         reason=checked.reason or result.reason)
        record.state, record.metrics, record.reason = result.state, result.metrics, result.reason
        record.ended_at, record.extra = checkpoint.now(), result.extra or {}
        record.duration_s = (datetime.fromisoformat(record.ended_at) - datetime.fromisoformat(record.started_at)).total_seconds()
        if result.curve:  # the trial's own account: a stopped trial's last point is on the whole validation set
            record.curve = [with_loss(p) for p in result.curve]
        if result.state is TrialState.EARLY_STOPPED:
            reached = record.curve[-1]["progress"] if record.curve else 0.0
            record.training_saved = round(1.0 - reached, 6)  # share of this trial's training not spent
        self._tell_ax(record)

    def _scored(self, result: TrialResult) -> TrialResult:
        """A completed trial's answers scored by the study's scorers, the scores among its metrics (the
        answers themselves stay in its directory, in metrics.json)."""
        answers = (result.extra or {}).pop("answers", None)
        if not self.scorers or result.state is not TrialState.COMPLETED or answers is None:
            return result
        try:
            scores = score_answers(self.scorers, answers)
        except ScoringError as exc:
            return dataclasses.replace(result, state=TrialState.FAILED, reason=str(exc))
        return dataclasses.replace(result, metrics={**result.metrics, **scores})

    def _tell_ax(self, record: TrialRecord) -> None:
        if record.state is TrialState.COMPLETED:
            names = [m for m in needed_metrics(self.cfg) if m in self.cfg.objectives or m in record.metrics]
            self.opt.complete(record.index, {m: record.metrics[m] for m in names})
        elif record.state is TrialState.EARLY_STOPPED:
            self.stopping.tell_stopped(record)
        elif record.state is TrialState.OUT_OF_MEMORY:
            self.opt.abandoned(record.index)  # deterministic: never propose this point again
        else:
            self.opt.failed(record.index, record.reason or "failed")
