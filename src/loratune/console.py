"""What a study shows in the terminal: a line per finished trial, the running trials live (rich) when
stdout is a terminal, a plain line per validation point when it is not (a log file, CI), the summary
at the end, and nothing at all when quiet."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import results
from .trial import TrialRecord, TrialState


def clock(seconds: float) -> str:
    seconds = round(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def duration(seconds: float) -> str:
    """Seconds with a tenth under a minute (so that two short spans never read in the wrong order), else a clock."""
    return f"{seconds:.1f} s" if seconds < 59.95 else clock(seconds)


@dataclass
class _Live:
    """What the console knows of a running trial."""

    record: TrialRecord
    started: float = field(default_factory=time.monotonic)
    step: int = 0
    steps: int = 0
    train_s: float = 0.0  # seconds of training at the last step event
    val_loss: float | None = None

    def left_s(self) -> float | None:
        """Seconds of training left, from the pace of the steps so far."""
        if not self.step or not self.steps:
            return None
        return self.train_s / self.step * (self.steps - self.step)


class StudyConsole:
    def __init__(self, quiet: bool = False, objective: str = "loss", minimize: bool = True, total: int = 1,
                 workers: int = 1, scores: list[str] | tuple[str, ...] = ()):
        self.console = Console(quiet=quiet, highlight=False)
        self.objective, self.minimize, self.total, self.workers = objective, minimize, total, workers
        self.scores = [s for s in scores if s != objective]  # task scores shown beside the objective
        self.live_mode = self.console.is_terminal and not quiet
        self.running: dict[int, _Live] = {}
        self.elapsed: Callable[[], float] = lambda: 0.0  # the study's wall time, earlier sessions included
        self.done = 0
        self.mean_trial_s: float | None = None
        self._live: Live | None = None

    # -- the live view ------------------------------------------------------------------------

    def __enter__(self) -> StudyConsole:
        if self.live_mode:
            self._live = Live(console=self.console, get_renderable=self._render, refresh_per_second=2, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def _render(self):
        table = Table(box=None, show_header=True, header_style="dim", pad_edge=False)
        for column in ("trial", "parameters", "step", f"val {self.objective}", "time", "left"):
            table.add_column(column)
        for live in self.running.values():
            left = live.left_s()
            table.add_row(f"#{live.record.index}", results.format_params(live.record.params),
                          f"{live.step}/{live.steps}" if live.steps else "starting",
                          f"{live.val_loss:.4f}" if live.val_loss is not None else "",
                          clock(time.monotonic() - live.started), f"~{clock(left)}" if left is not None else "")
        return Group(table, Text(self._study_line(), style="dim"))

    def _study_line(self) -> str:
        left = self.study_left_s()
        return (f"study: {self.done}/{self.total} trials done, {clock(self.elapsed())} elapsed"
                + (f", ~{clock(left)} left" if left is not None else ""))

    def study_left_s(self) -> float | None:
        """The trials not yet started at the mean trial time over the workers, plus the longest running one."""
        if self.mean_trial_s is None:
            return None
        waiting = max(0, self.total - self.done - len(self.running))
        current = max((lv.left_s() or 0.0 for lv in self.running.values()), default=0.0)
        return waiting * self.mean_trial_s / max(self.workers, 1) + current

    # -- events -------------------------------------------------------------------------------

    def print(self, *args, **kwargs) -> None:
        self.console.print(*args, soft_wrap=True, **kwargs)

    def started(self, record: TrialRecord) -> None:
        self.running[record.index] = _Live(record)

    def tick(self, record: TrialRecord, tick: dict) -> None:
        live = self.running.get(record.index)
        if live is not None:
            live.step, live.steps, live.train_s = tick.get("step", 0), tick.get("steps", 0), tick.get("elapsed_s", 0.0)

    def point(self, record: TrialRecord, point: dict) -> None:
        live = self.running.get(record.index)
        value = point.get(self.objective, point.get("val_loss"))
        if live is None or not isinstance(value, int | float):
            return
        live.val_loss = value
        if not self.live_mode:
            step = f"step {point.get('step')}" + (f"/{live.steps}" if live.steps else "")
            self.print(f"  trial #{record.index}: {step}, {point.get('progress', 0):.0%} of training, "
                       f"val {self.objective} {value:.4f}")

    # -- as a listener of the study (listeners.py) --------------------------------------------

    def trial_started(self, record: TrialRecord) -> None:
        self.started(record)

    def trial_progress(self, record: TrialRecord, tick: dict | None = None, point: dict | None = None) -> None:
        if tick is not None:
            self.tick(record, tick)
        if point is not None:
            self.point(record, point)

    def trial_ended(self, record: TrialRecord, records: list[TrialRecord]) -> None:
        self.ended(record, [r for r in records if r is not record and r.finished],
                   [r.duration_s for r in records if r.duration_s])

    def study_started(self, stored, paths) -> None:
        pass

    def study_ended(self, paths, result: dict, report) -> None:
        pass  # the summary comes from the command, which knows where it wrote what

    def ended(self, record: TrialRecord, before: list[TrialRecord], durations: list[float]) -> None:
        """The trial's line, as Module 4.5 writes it: ``Trial 2/20: rank=32, ... → loss=0.5834 ✓ IMPROVED``."""
        self.running.pop(record.index, None)
        self.done = sum(r.finished for r in before) + 1
        self.mean_trial_s = sum(durations) / len(durations) if durations else None
        value = record.metrics.get(self.objective)
        shown = f"{self.objective}={value:.4f}" if isinstance(value, int | float) else record.state.value
        shown += "".join(f", {s}={record.metrics[s]:.3f}" for s in self.scores if s in record.metrics)
        if record.state is TrialState.EARLY_STOPPED:
            shown = f"stopped at {record.curve[-1]['progress']:.0%}" if record.curve else "stopped"
        elif record.state is not TrialState.COMPLETED:
            shown = f"{record.state.value}: {record.reason}"
        mark = results.trial_marks(record, before, self.objective, self.minimize)
        left = self.study_left_s()
        self.print(f"Trial {self.done}/{self.total} (#{record.index}): {results.format_params(record.params)} → {shown} {mark}"
                   f"  [dim]({clock(self.elapsed())} elapsed" + (f", ~{clock(left)} left)" if left is not None else ")")
                   + "[/]")

    # -- the end ------------------------------------------------------------------------------

    def summary(self, records: list[TrialRecord], names: list[str], objectives: list[str], result: dict,
                report: str | None) -> None:
        """The top trials, the improvement over the baseline, where the time went, and what was written."""
        top = results.ranked(records, self.objective, self.minimize)[:5]
        if top:
            table = Table(title="Top trials")
            shown = [*objectives, *(s for s in self.scores if s not in objectives)]
            for col in ["#", *[results.SHORT_NAMES.get(n, n) for n in names], *shown, "time (s)"]:
                table.add_column(col)
            for r in top:
                table.add_row(str(r.index) + (" baseline" if r.baseline else ""),
                              *[f"{r.params[n]:.3g}" if isinstance(r.params[n], float) else str(r.params[n]) for n in names],
                              *[f"{r.metrics[o]:.4f}" if o in r.metrics else "" for o in shown],
                              f"{r.duration_s or 0:.1f}")
            self.console.print(table)
        gain = result.get("improvement")
        test = result.get("test") or {}
        if gain:
            which = "Validation (used to choose): " if test.get("improvement") else ""
            gain = results.Gain.from_dict(gain)
            self.print(f"{which}best {self.objective} against the baseline: {gain.text()}" if gain.absolute >= 0 else
                       f"{which}best {self.objective} {gain.best:.4f}: the baseline ({gain.baseline:.4f}) was not beaten")
        for line in test_lines(test):
            self.print(line)
        wall, ax_s = result["wall_time_s"], result["optimizer_time_s"]
        self.print(f"Time: {duration(wall)} in all, {duration(ax_s)} of it in Ax "
                   f"({min(ax_s / max(wall, 1e-9), 1.0):.0%}: set-up, suggestions, checkpoints)")
        self.print(f"Results: {result['results_file']}")
        if report:
            self.print(f"Report: {report}")
        if result.get("best_config"):
            self.print(f"Best config: {result['best_config']}  (retrain: python finetune_lora.py --config "
                       f"{result['best_config']})")


def test_lines(test: dict | None) -> list[str]:
    """The final test in words: each metric of the best config against the baseline on data the search never
    saw, and how much of the validation gain held."""
    if not test:
        return []
    if "error" in test:
        return [f"Test: not scored ({test['error']})"]
    gains = test.get("improvement") or {}
    if not gains:
        best = test["best"]
        return [f"Test (never seen, {test['examples']} examples): best trial {best['trial']} loss {best['loss']:.4f}"]
    parts = [f"{name} {results.Gain.from_dict(g).text()}" for name, g in gains.items()]
    lines = [f"Test (never seen, {test['examples']} examples): " + "; ".join(parts)]
    held = test.get("held")
    if held is not None:
        lines.append(f"  {held:.0%} of the validation gain in loss held on test" if held <= 1 else
                     "  the gain in loss on test exceeds the gain on validation")
    return lines


class TrainingProgress:
    """A progress bar for one fine-tune (``loratune finetune``): steps, running train loss, time left."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.task = quiet, None, None

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())
        self.bar.__enter__()
        return self.update

    def update(self, step: int, total: int, elapsed: float, loss: float) -> None:
        if self.task is None:
            self.task = self.bar.add_task("train", total=total, loss=float("nan"))
        self.bar.update(self.task, completed=step, loss=loss)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)
