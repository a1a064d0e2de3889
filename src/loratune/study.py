"""The study loop: one process owns the Ax client and asks -> runs -> tells -> saves.

Everything checkable was checked before a ``Study`` exists (see ``preflight.py``). The loop keeps
every slot of its executor busy, streams learning curves to the early-stopping rules, tells Ax how
each trial ended, and saves the checkpoint after every round of events and before any trial starts,
so a study killed at any moment resumes without losing or repeating a finished trial.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import checkpoint, results
from .checkpoint import StoredStudy, StudyPaths
from .config import get_field, to_dict
from .console import StudyConsole
from .data import test_source
from .early_stopping import EarlyStopping
from .errors import LoratuneError, StudyAborted
from .executors import Event, Executor, TrialSpec, create_executor, pack_size
from .listeners import AdapterPruning, Listeners
from .optimizer import Optimizer
from .outcome import Outcomes
from .rules import needed_metrics
from .scoring import Scorer
from .search_space import study_space
from .tracking import Tracker
from .trial import Evaluation, TrialRecord, TrialResult, TrialState, failure_message, with_loss
from .trial_dir import awaits_verdict


class Study:
    def __init__(self, stored: StoredStudy, paths: StudyPaths, optimizer: Optimizer, console: StudyConsole, *,
                 evaluate: Callable | None = None, started: float | None = None, tracker: Tracker | None = None,
                 executor: Executor | None = None, scorers: list[Scorer] | None = None, listeners: list | None = None):
        self.stored, self.paths, self.opt, self.console, self.evaluate = stored, paths, optimizer, console, evaluate
        self.scorers = scorers or []  # task scores of each trial's answers (scoring.py)
        self.tracker = tracker or Tracker()
        self.listeners = Listeners([console, self.tracker, AdapterPruning(stored.config, paths.directory)], listeners,
                                   warn=lambda text: console.print(f"[yellow]warning[/]: {text}"))
        self.executor = executor  # None: the one the settings ask for (benchmarks give their own)
        self.cfg = stored.config
        self.space = study_space(self.cfg)
        self.stopping = EarlyStopping(self.cfg, optimizer)
        self.outcomes = Outcomes(self.cfg, self.scorers, optimizer, self.stopping)
        self.failures_in_a_row = 0
        self.session_start = started or time.time()  # this session's clock starts when the caller began
        self.elapsed_before, self.optimizer_before = stored.elapsed_s, stored.optimizer_s  # earlier sessions
        self.started_at: dict[int, float] = {}  # trial index -> monotonic start, for trial_timeout
        self.queue: list[TrialRecord] = []  # trials to run before Ax is asked for more, in order
        self.pack, self.pack_note = pack_size(self.cfg, stored.evaluation)
        self.batch_fill = self.pack > 1  # packs start together, even once an out-of-memory shrank them to one
        if stored.pack_limit is not None and stored.pack_limit < self.pack:  # an earlier session's out-of-memory holds
            self.pack_note = (f"packs hold at most {stored.pack_limit} trials: a larger one ran out of memory in an "
                              "earlier session of this study")
            self.pack = stored.pack_limit
        console.elapsed = lambda: self.elapsed_before + time.time() - self.session_start

    @property
    def records(self) -> list[TrialRecord]:
        return self.stored.records

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Run until the budget is spent; return the summary. Raises StudyAborted (everything saved) after
        ``max_failures_in_a_row`` failures with trials left to run, or when no trial completed."""
        executor = self.executor or create_executor(self.cfg, self.stored.evaluation, self.evaluate)
        if self.stored.pack_limit is not None:
            executor.limit_pack(self.pack)
        running: dict[int, TrialRecord] = {}
        aborted = None
        try:
            with self.console:
                for note in [*self.opt.notes, self.space.note, self.pack_note]:
                    if note:
                        self.console.print(f"[yellow]note[/]: {note}")
                self.listeners.study_started(self.stored, self.paths)
                self._start_interrupted(executor, running)
                changed = False
                while running:
                    for event in executor.poll(0.5):
                        changed = self._handle(event, executor, running) or changed
                    self._enforce_timeout(executor, running)
                    if aborted is None and self.failures_in_a_row >= self.cfg.max_failures_in_a_row \
                            and self.stored.finished() + len(running) + len(self.queue) < self.cfg.trials:
                        aborted = self._abort_message()
                    started = aborted is None and self._fill(executor, running)
                    if changed and not started:  # one atomic save per round; _fill saved before starting a trial
                        self.save()
                    changed = False
                if aborted is None:
                    self._final_test(executor)
                self.save()
        except KeyboardInterrupt:
            executor.shutdown()
            self.save()
            self.console.print(f"[yellow]interrupted[/]; {self._resume_hint()}")
            raise
        finally:  # however the loop ends, no trial process outlives it
            executor.shutdown()
        if aborted:
            raise StudyAborted(aborted)
        if not any(r.state is TrialState.COMPLETED for r in self.records):
            raise StudyAborted(f"no trial completed; {self._abort_message(brief=True)}")
        return self.save()

    def _start_interrupted(self, executor: Executor, running: dict) -> None:
        """Trials that were running or queued when an earlier session died run again, first; a new study
        starts with its baseline. The checkpoint says so before any of them starts."""
        interrupted = [r for r in self.records if r.state in (TrialState.RUNNING, TrialState.QUEUED)]
        rerun = [r.index for r in interrupted if r.state is TrialState.RUNNING]
        if rerun:  # what the earlier session trained of them is lost: say so before they start
            trials = f"trial {rerun[0]} was" if len(rerun) == 1 else f"trials {', '.join(map(str, rerun))} were"
            self.console.print(f"[yellow]note[/]: {trials} running when the earlier session ended: "
                               f"{'it runs' if len(rerun) == 1 else 'they run'} again from the start, as the same Ax trial")
        for record in interrupted:
            _requeue(record, restarted=record.state is TrialState.RUNNING)
        baseline = self._baseline() if not self.records else None
        self.queue = [*interrupted, *([baseline] if baseline else [])]
        for record in self.queue:
            record.state = TrialState.QUEUED
        self.save()
        self._fill(executor, running)

    def _baseline(self) -> TrialRecord | None:
        """Trial 0 is the current config, when it lies in the search space."""
        if not self.cfg.baseline:
            return None
        base = self.cfg.base()
        values = {p.name: get_field(base, p.target) for p in self.space.params}
        if not self.space.contains(values):
            self.console.print(f"baseline ({results.format_params(values)}) is outside the search space: not run")
            return None
        values = self.space.cast(values, "baseline")
        return self._new_record(self.opt.attach(values, baseline=True), values, baseline=True)

    def _fill(self, executor: Executor, running: dict) -> bool:
        """Keep every slot busy. Without packing, one suggestion at a time: each trial starts as soon as its
        own point is chosen (Ax knows the running ones), where a batch would keep every slot waiting for the
        whole batch, which costs several times one (docs/benchmarks.md, "Optimizer cost at scale"). Queued
        trials (the baseline, trials of an interrupted session) start first. A point is chosen once a slot
        is free, with every finished trial's result known: choosing it while the trial before it still ran
        was measured worse ("Choosing the next point while a trial trains"). Packed trials start together,
        once every trial of the last pack has ended: which points a pack trains then depends on the results
        before it alone, never on the order in which its trials' ends were heard (``--seed``). Ax chooses the
        points of every free slot (each worker's pack) in one call: chosen one at a time, each competed for the cores with the pack's first
        trials, already training, and the 20-trial demo study spent 54 s in Ax instead of 5 s
        (docs/benchmarks.md, "Packed trials"). Saves before a trial starts; True when one did."""
        if self.batch_fill and running:
            return False
        before = len(running)
        batch: list[TrialRecord] = []  # a pack's trials, handed over together once all are saved as running
        while len(running) + len(batch) < executor.slots and (self.queue or self._unproposed(len(running) + len(batch)) > 0):
            free = min(executor.slots - len(running) - len(batch), self._unproposed(len(running) + len(batch)))
            if not self.queue and not self._propose(free if self.batch_fill else 1):
                break
            record = self.queue.pop(0)
            record.state = TrialState.RUNNING  # on disk before it starts: a kill from here on runs it again
            batch.append(record)
            if not self.batch_fill:
                self._start(executor, batch, running)
        self._start(executor, batch, running)
        started = len(running) > before
        if not started and not running and not self.queue and self.stored.finished() < self.cfg.trials:
            why = "every point of the search space has been tried" if self.opt.exhausted else \
                "it waits for completed trials that will not come"
            self.console.print(f"Ax proposes no further trials: {why}")
        return started

    def _start(self, executor: Executor, records: list[TrialRecord], running: dict) -> None:
        """Save, then hand the trials over together (``executor.together``): a pack's trials reach its worker
        at once, train every round together from the first, and their answers are generated together."""
        if records:
            self.save()
        with executor.together():
            for record in records:
                self._submit(executor, record, running)
        records.clear()

    def _unproposed(self, busy: int) -> int:
        """Trials of the budget that Ax has not proposed yet, with ``busy`` running or about to."""
        return self.cfg.trials - self.stored.finished() - busy - len(self.queue)

    def _propose(self, n: int) -> bool:
        """Ask Ax for up to n more trials and queue them; False when it proposes none."""
        new = [self._new_record(index, params) for index, params in self.opt.ask(n).items()]
        for record in new:
            record.state = TrialState.QUEUED
        self.queue += new
        return bool(new)

    def _new_record(self, index: int, params: dict, baseline: bool = False) -> TrialRecord:
        directory = self.paths.trial_dir(index).relative_to(self.paths.directory)
        record = TrialRecord(index, params, baseline=baseline, directory=str(directory))
        self.records.append(record)
        return record

    def _submit(self, executor: Executor, record: TrialRecord, running: dict) -> None:
        config = None
        if self.stored.evaluation is Evaluation.FINETUNE:
            config = to_dict(checkpoint.trial_config(self.cfg, self.space, record.params, self.paths.trial_dir(record.index)))
        record.started_at, record.curve, record.state = checkpoint.now(), [], TrialState.RUNNING
        measure = "inference_time" in needed_metrics(self.cfg)
        answer = self.cfg.scoring.subset if self.scorers else 0
        # a trial the study may stop waits for the verdict at each curve point, so that where it stops
        # depends on its curve alone, never on how fast this loop answers
        executor.submit(TrialSpec(record.index, dict(record.params), self.paths.trial_dir(record.index), config, measure,
                                  answer, self.cfg.scoring.max_new_tokens,
                                  # loratune's own worker waits, as a command's LoratuneCallback does; a
                                  # Python evaluate= is not asked to
                                  await_verdict=self.stored.evaluation is not Evaluation.CALLABLE and self.stopping.may_stop(record)))
        running[record.index] = record
        self.started_at[record.index] = time.monotonic()
        self.listeners.trial_started(record)

    def _enforce_timeout(self, executor: Executor, running: dict) -> None:
        limit = self.cfg.trial_timeout
        if limit is None:
            return
        for index in list(running):
            if time.monotonic() - self.started_at[index] > limit:
                executor.cancel(index, f"timeout: still running after {limit:g} s (trial_timeout)")

    # -- events -------------------------------------------------------------------------------

    def _handle(self, event: Event, executor: Executor, running: dict) -> bool:
        """Apply one event; True when a trial ended."""
        record = running.get(event.index)
        if record is None:
            return False
        if event.tick is not None:
            self.listeners.trial_progress(record, tick=event.tick)
        if event.point is not None:
            self._on_point(record, event.point, executor)
        if event.result is None:
            return False
        del running[event.index]
        if not self._rerun_in_a_smaller_pack(record, event.result, executor):
            self._on_result(record, event.result)
        return True

    def _rerun_in_a_smaller_pack(self, record: TrialRecord, result: TrialResult, executor: Executor) -> bool:
        """An out-of-memory in a pack of K trials is the pack's, not the point's: the trial runs again, before
        any new one, and from then on packs hold at most K // 2 trials; in a pack of one it is the point's
        (recorded, and Ax never proposes the point again). True when the trial was queued again."""
        size = (result.extra or {}).get("pack", 1)
        if result.state is not TrialState.OUT_OF_MEMORY or not isinstance(size, int) or size <= 1:
            return False
        if size // 2 < self.pack:
            self.pack = self.stored.pack_limit = max(1, size // 2)  # saved: a resumed study packs no more
            executor.limit_pack(self.pack)
            self.console.print(f"[yellow]note[/]: out of memory in a pack of {size} trials: its trials run again, "
                               f"and packs hold at most {self.pack} from now on")
        _requeue(record, restarted=True)
        self.queue = sorted([*self.queue, record], key=lambda r: r.index)  # its pack's trials first
        return True

    def _on_point(self, record: TrialRecord, point: dict, executor: Executor) -> None:
        record.curve.append(with_loss(point))
        self.listeners.trial_progress(record, point=point)
        if not self.stopping.may_stop(record):
            return
        stop = self.stopping.judge(record, point, next((r.curve for r in self.records if r.baseline), None))
        if not awaits_verdict(point):
            return
        if stop:
            record.stop_requested_at = point.get("progress")
            executor.stop(record.index)
        else:
            executor.go_on(record.index)

    def _on_result(self, record: TrialRecord, result: TrialResult) -> None:
        self.outcomes.finish(record, result)
        self.failures_in_a_row = self.failures_in_a_row + 1 if record.state.is_failure else 0
        self.listeners.trial_ended(record, [r for r in self.records if r.state is not TrialState.QUEUED])

    def _final_test(self, executor: Executor) -> None:
        """The best trial and the baseline scored on the test split (evaluation.py), on the study's own
        workers, which hold the base model already. One that fails is a warning and a line in the results:
        the study's own results stand, and ``loratune evaluate`` tries again."""
        from .evaluation import final_test

        if self.stored.evaluation is not Evaluation.FINETUNE or test_source(self.cfg.data) is None or self.stored.best() is None:
            return
        self.console.print("Final test: the best config and the baseline on the test split the search never saw")
        try:
            self.stored.test = final_test(self.stored, self.paths, self.scorers, executor)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong there, the study's results are saved
            reason = str(exc) if isinstance(exc, LoratuneError) else failure_message(exc)
            self.stored.test = {"error": reason}
            self.console.print(f"[yellow]warning[/]: {reason}; `loratune evaluate {self.paths.directory}` tries again")

    # -- outputs ------------------------------------------------------------------------------

    def save(self) -> dict:
        self.stored.elapsed_s = self.elapsed_before + (time.time() - self.session_start)
        self.stored.optimizer_s = self.optimizer_before + self.opt.busy_s
        self.stored.ax = self.opt.snapshot()
        try:
            return checkpoint.save(self.stored, self.paths)
        except OSError as exc:  # a full disk, a directory gone: the writes are atomic, the last checkpoint holds
            raise StudyAborted(f"cannot write {exc.filename or self.paths.directory}: {exc.strerror or exc}; the last "
                               f"checkpoint is intact: {self._resume_hint()} once this is fixed") from None

    def _resume_hint(self) -> str:
        if self.stored.evaluation is Evaluation.CALLABLE:
            return f"resume with resume_optimization('{self.paths.checkpoint}', evaluate=<the same function>)"
        return f"resume with: loratune resume {self.paths.directory}"

    def _abort_message(self, brief: bool = False) -> str:
        last = next((r for r in reversed(self.records) if r.state.is_failure), None)
        where = "" if self.stored.evaluation is Evaluation.CALLABLE else f"; logs in {self.paths.directory / 'trials'}"
        what = f"last failure: {last.reason}" if last else "no trial ran to its end"
        if brief:
            return what + where
        return (f"stopped after {self.failures_in_a_row} failed trials in a row; {what}{where}; "
                f"fix the cause, then {self._resume_hint()}")


def _requeue(record: TrialRecord, restarted: bool) -> None:
    """The trial runs again from its start (an interrupted session, its pack out of memory): what its last
    run left goes, the listeners hear it start again."""
    record.state, record.curve, record.reason, record.stop_requested_at = TrialState.QUEUED, [], None, None
    record.restarts += restarted
