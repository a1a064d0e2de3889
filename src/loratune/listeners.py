"""Who hears what a study does: the terminal, the experiment tracker, the pruning of adapters, and any
listener of the user's (``run_optimization(listeners=[...])``). The study loop tells them its events in
order; none of them changes what the search does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import LoratuneError, first_line
from .trial import TrialRecord


class StudyListener:
    """The events of a study. Subclass it and override what you need; each does nothing here.

    >>> class Printer(StudyListener):
    ...     def trial_ended(self, record, records):
    ...         print(record.index, record.state, record.metrics.get("loss"))
    >>> run_optimization(num_trials=5, listeners=[Printer()])  # doctest: +SKIP
    """

    def study_started(self, stored: Any, paths: Any) -> None:
        """Before its first trial (also when it resumes). ``stored``: settings and records; ``paths``: its files."""

    def trial_started(self, record: TrialRecord) -> None:
        """A trial was handed to a worker."""

    def trial_progress(self, record: TrialRecord, tick: dict | None = None, point: dict | None = None) -> None:
        """A trial's training moved (``tick``: step, steps, elapsed_s, train_loss) or reached a point of its
        validation curve (``point``: step, progress, val_loss, train_loss, subset)."""

    def trial_ended(self, record: TrialRecord, records: list[TrialRecord]) -> None:
        """A trial ended (``record.state``); ``records``: every trial of the study started so far."""

    def study_ended(self, paths: Any, result: dict, report: Path | None) -> None:
        """After its final test and report: ``result`` is what ``run_optimization`` returns."""


EVENTS = ("study_started", "trial_started", "trial_progress", "trial_ended", "study_ended")


class Listeners:
    """Tells every listener each event, in the order given. A user's listener that raises is reported once
    (``warn``) and heard no more: the study goes on; loratune's own listeners are not second-guessed."""

    def __init__(self, own: list[Any], users: list[Any] | None = None, warn=print):
        self.own, self.users, self.warn = list(own), list(users or []), warn

    def _tell(self, event: str, *args: Any) -> None:
        for listener in self.own:
            getattr(listener, event)(*args)
        for listener in list(self.users):
            handler = getattr(listener, event, None)
            if handler is None:
                continue
            try:
                handler(*args)
            except Exception as exc:  # noqa: BLE001 - a user's code must not end the study
                self.users.remove(listener)
                self.warn(f"listener {type(listener).__name__}.{event} raised {type(exc).__name__}: {first_line(exc)}; "
                          "it hears nothing more of this study")

    def study_started(self, stored: Any, paths: Any) -> None:
        self._tell("study_started", stored, paths)

    def trial_started(self, record: TrialRecord) -> None:
        self._tell("trial_started", record)

    def trial_progress(self, record: TrialRecord, tick: dict | None = None, point: dict | None = None) -> None:
        self._tell("trial_progress", record, tick, point)

    def trial_ended(self, record: TrialRecord, records: list[TrialRecord]) -> None:
        self._tell("trial_ended", record, records)

    def study_ended(self, paths: Any, result: dict, report: Path | None) -> None:
        self._tell("study_ended", paths, result, report)


class AdapterPruning(StudyListener):
    """With ``keep_adapters: best``, only the Pareto front's adapters stay on disk, and the baseline's where
    a final test will score it."""

    def __init__(self, cfg: Any, directory: Path):
        self.cfg, self.directory = cfg, directory

    def trial_ended(self, record: TrialRecord, records: list[TrialRecord]) -> None:
        import shutil

        from . import results
        from .data import test_source

        if self.cfg.keep_adapters != "best":
            return
        keep = {r.index for r in results.pareto_front(records, self.cfg.objectives, self.cfg.minimize)}
        if test_source(self.cfg.data) is not None:
            keep |= {r.index for r in records if r.baseline}
        for r in records:
            if r.finished and r.index not in keep:
                shutil.rmtree(self.directory / r.directory / "adapter", ignore_errors=True)


def checked_listeners(listeners: Any) -> list:
    """Listeners of the user's: objects with one or more of a ``StudyListener``'s methods."""
    if listeners is None:
        return []
    if not isinstance(listeners, list | tuple) or not all(any(callable(getattr(x, e, None)) for e in EVENTS)
                                                           for x in listeners):
        raise LoratuneError(f"listeners: expected a list of objects with a StudyListener's methods ({', '.join(EVENTS)}), "
                            f"got {listeners!r}")
    return list(listeners)
