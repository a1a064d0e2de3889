"""The study loop: one process owns the Ax client and asks -> runs -> tells -> saves.

Everything a study has learned is on disk after each trial starts or ends, written atomically:
``optimization_checkpoint.json`` (our records plus the Ax experiment), ``optimization_results.json``
(the history people read) and ``best_config.yaml``. A trial that was running when the process died
is still "running" in the checkpoint, and ``resume`` runs it again under the same Ax trial index.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from . import results as R
from .config import OUTCOME_CONSTRAINT, StudyConfig, build, dump_yaml, get_field, to_dict, validate_study
from .early_stopping import EarlyStoppingCallback
from .errors import LoratuneError
from .executors.base import CallableExecutor, Event, TrialSpec, check_command
from .executors.local import LocalExecutor
from .optimizer import Optimizer
from .search_space import SearchSpace, apply, parse_search_space
from .storage import DirectoryLock, atomic_write_json, atomic_write_text, read_json
from .trial import TrialResult, TrialState, check_metrics

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "loratune-study", 1
CHECKPOINT_NAME, BEST_CONFIG_NAME, RESULTS_NAME = "optimization_checkpoint.json", "best_config.yaml", "optimization_results.json"
PROGRESSION_SCALE = 1000  # Ax progressions are integers: per-mille of a trial's training


class StudyAborted(LoratuneError):
    """Too many failures in a row: the study stopped with everything saved (exit code 1)."""


@dataclass
class StudyPaths:
    directory: Path
    results: Path

    @classmethod
    def from_output(cls, output: str | Path) -> StudyPaths:
        """``configs/optimization_results.json`` (a file) or ``configs/`` (a directory)."""
        out = Path(output)
        if out.suffix == ".json":
            return cls(out.parent, out)
        return cls(out, out / RESULTS_NAME)

    @property
    def checkpoint(self) -> Path:
        return self.directory / CHECKPOINT_NAME

    @property
    def best_config(self) -> Path:
        return self.directory / BEST_CONFIG_NAME

    def trial_dir(self, index: int) -> Path:
        return self.directory / "trials" / str(index)


class Study:
    def __init__(self, cfg: StudyConfig, paths: StudyPaths, *, evaluate: Callable | None = None,
                 early_stopping: EarlyStoppingCallback | None = None, quiet: bool = False,
                 preflight: bool = True):
        self.cfg, self.paths, self.evaluate = cfg, paths, evaluate
        self.space: SearchSpace = parse_search_space(cfg.search_space, cfg.constraints, cfg.base())
        if cfg.command:
            check_command(cfg.command, self.space.names)
        if cfg.executor == "ray" and (evaluate or cfg.command):
            raise LoratuneError("executor: Ray runs loratune's fine-tune trials; a Python evaluate or --command "
                                "runs with the local executor")
        es = cfg.early_stopping
        if early_stopping is None and es.threshold is not None:
            early_stopping = EarlyStoppingCallback(es.threshold, es.check_at)
        if early_stopping is not None and early_stopping.threshold == "baseline" and not cfg.baseline:
            raise LoratuneError("early_stopping: threshold 'baseline' compares with the baseline trial, which is off")
        self.threshold_rule = early_stopping
        self.console = Console(quiet=quiet, highlight=False)
        self.records: list[dict] = []
        self.opt: Optimizer | None = None
        self.elapsed_before = 0.0  # wall time of earlier sessions of this study
        self.optimizer_before = 0.0  # seconds those sessions spent in Ax
        self.failures_in_a_row = 0
        self.recorded_evaluation: str | None = None  # what a loaded study evaluated with
        if preflight and self.evaluation == "finetune":
            from .training import preflight as check_inputs

            check_inputs(cfg.base())

    # -- setting up ---------------------------------------------------------------------------

    @property
    def evaluation(self) -> str:
        if self.evaluate:
            return "callable"
        return self.recorded_evaluation or ("command" if self.cfg.command else "finetune")

    def _new_optimizer(self) -> Optimizer:
        opt = Optimizer.create(self.space, self.cfg.objectives, self.cfg.minimize, self.cfg.outcome_constraints,
                               self.cfg.seed, self.cfg.init_trials)
        self._apply_percentile(opt)
        return opt

    def _apply_percentile(self, opt: Optimizer) -> None:
        es = self.cfg.early_stopping
        if es.percentile is not None:
            opt.set_percentile_early_stopping(es.percentile, round(es.min_progression * PROGRESSION_SCALE), es.min_curves)

    def _executor(self):
        metrics = self.cfg.objectives
        if self.evaluate:
            return CallableExecutor(self.evaluate, metrics, slots=self.cfg.workers)
        if self.cfg.executor == "ray":
            from .executors.ray import RayExecutor

            return RayExecutor(self.cfg.workers, address=self.cfg.ray_address, gpus_per_trial=self.cfg.gpus_per_trial,
                               shared_dir=self.cfg.shared_dir)
        return LocalExecutor(slots=self.cfg.workers, objectives=metrics, command=self.cfg.command,
                             gpus=self.cfg.gpus, gpus_per_trial=self.cfg.gpus_per_trial, measure_inference=True)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, overwrite: bool = False) -> dict:
        """Run a new study in ``paths.directory``; refuses a directory that holds one unless ``overwrite``."""
        with DirectoryLock(self.paths.directory):
            if self.paths.checkpoint.exists() or self.paths.results.exists():
                if not overwrite:
                    raise LoratuneError(
                        f"{self.paths.directory}: already holds a study ({self.paths.checkpoint.name}); resume it "
                        "with `loratune resume`, choose another --output, or pass --overwrite")
                self._clear_outputs()
            return self._loop()

    def _clear_outputs(self) -> None:
        d = self.paths.directory
        for path in (self.paths.checkpoint, self.paths.results, self.paths.best_config,
                     d / "OPTIMIZATION_RESULTS.md", d / "comparison.json"):
            path.unlink(missing_ok=True)
        for folder in ("trials", "plots", "comparison"):  # so the new report shows nothing of the old study
            shutil.rmtree(d / folder, ignore_errors=True)

    def _loop(self) -> dict:
        executor = self._executor()
        started = time.time()
        self._session_start = started
        running: dict[int, dict] = {}
        try:
            for record in [r for r in self.records if r["state"] == TrialState.RUNNING.value]:
                record["restarts"] = record.get("restarts", 0) + 1  # interrupted before: run it again
                self._submit(executor, record, running)
            if self.opt is None:  # a new study: the baseline trains while Ax is imported and set up
                baseline = self._start_baseline(executor, running)
                self.opt = self._new_optimizer()
                if baseline is not None and self.opt.attach(baseline["params"], baseline=True) != baseline["index"]:
                    raise AssertionError("the baseline must be Ax's first trial")
                self.save()
            aborted = None
            changed = self._fill(executor, running)
            while running:
                for event in executor.poll(0.5):
                    changed = self._handle(event, executor, running) or changed
                if self.failures_in_a_row >= self.cfg.max_failures_in_a_row and aborted is None:
                    last = self.records[-1] if self.records else {}
                    aborted = (f"stopped after {self.failures_in_a_row} failed trials in a row; last: "
                               f"{last.get('reason')}; logs in {self.paths.directory / 'trials'}")
                if aborted is None:
                    changed = self._fill(executor, running) or changed
                if changed:  # one atomic save per round of events, after the freed slots are refilled
                    self.save()
                    changed = False
            self.save()
        except KeyboardInterrupt:
            executor.shutdown()
            if self.opt is not None:
                self.save()
            self.console.print(f"[yellow]interrupted[/]; resume with: loratune resume {self.paths.directory}")
            raise
        finally:  # however the loop ends, no trial process outlives it
            executor.shutdown()
        report = self._write_report()
        if aborted:
            raise StudyAborted(aborted)
        self._print_summary(report)
        return self.summary()

    def _write_report(self) -> Path | None:
        if not self.cfg.report:
            return None
        from .report import write_report

        try:
            return write_report(self.paths.directory)
        except Exception as exc:  # the study's results are saved; a report problem must not hide them
            self.console.print(f"[yellow]could not write the report[/]: {exc}; `loratune report "
                               f"{self.paths.directory}` retries", soft_wrap=True)
            return None

    def _finished(self) -> int:
        return sum(1 for r in self.records if r["state"] != TrialState.RUNNING.value)

    def _start_baseline(self, executor, running: dict) -> dict | None:
        """Trial 0 is the current config, when it lies in the search space."""
        if not self.cfg.baseline:
            return None
        base = self.cfg.base()
        values = {p.name: get_field(base, p.target) for p in self.space.params}
        if not self.space.contains(values):
            self.console.print(f"baseline ({R.format_params(values)}) is outside the search space: not run")
            return None
        record = self._new_record(0, self.space.cast(values, "baseline"), baseline=True)
        self._submit(executor, record, running)
        return record

    def _fill(self, executor, running: dict) -> bool:
        """Keep every slot busy; True when new trials started."""
        free = min(executor.slots - len(running), self.cfg.trials - self._finished() - len(running))
        if free <= 0:
            return False
        new = self.opt.ask(free)
        for index, params in new.items():
            self._submit(executor, self._new_record(index, params), running)
        if not new and not running:
            why = "every point of the search space has been tried" if self.opt.exhausted else \
                "it waits for completed trials that will not come"
            self.console.print(f"Ax proposes no further trials: {why}")
        return bool(new)

    def _new_record(self, index: int, params: dict, baseline: bool = False) -> dict:
        record = {"index": index, "params": params, "state": TrialState.RUNNING.value, "baseline": baseline,
                  "metrics": {}, "curve": [], "reason": None, "directory": f"trials/{index}",
                  "started_at": None, "ended_at": None, "duration_s": None, "restarts": 0}
        self.records.append(record)
        return record

    def _submit(self, executor, record: dict, running: dict) -> None:
        config = None
        if self.evaluation == "finetune":
            cfg = apply(self.cfg.base(), record["params"], self.space)
            cfg.training.seed = self.cfg.seed if self.cfg.seed is not None else cfg.training.seed
            cfg.output_dir = str(self.paths.trial_dir(record["index"]))
            cfg.save_adapter = self.cfg.keep_adapters != "none"
            config = to_dict(cfg)
        record.update(started_at=_now(), curve=[], state=TrialState.RUNNING.value)
        executor.submit(TrialSpec(record["index"], dict(record["params"]), self.paths.trial_dir(record["index"]), config))
        running[record["index"]] = record

    def _handle(self, event: Event, executor, running: dict) -> bool:
        """Apply one event; True when a trial ended."""
        record = running.get(event.index)
        if record is None:
            return False
        if event.point is not None:
            self._on_progress(record, event.point, executor)
        if event.result is None:
            return False
        del running[event.index]
        self._on_result(record, event.result)
        return True

    def _on_progress(self, record: dict, point: dict, executor) -> None:
        if "loss" not in point and "val_loss" in point:
            point["loss"] = point["val_loss"]
        record["curve"].append(point)
        if record["baseline"]:  # the reference every trial is measured against always runs to the end
            return
        baseline = next((r["curve"] for r in self.records if r["baseline"]), None)
        stop = bool(self.threshold_rule and self.threshold_rule.should_stop(record["curve"], baseline))
        if self.cfg.early_stopping.percentile is not None and isinstance(point.get(self.cfg.objectives[0]), int | float):
            progression = max(1, round(point["progress"] * PROGRESSION_SCALE))
            self.opt.progress(record["index"], {self.cfg.objectives[0]: point[self.cfg.objectives[0]]}, progression)
            stop = stop or self.opt.should_stop(record["index"])
        if stop and point.get("progress", 1.0) < 1.0:
            record["stop_requested_at"] = point.get("progress")
            executor.stop(record["index"])

    def _on_result(self, record: dict, result: TrialResult) -> None:
        if result.state is TrialState.COMPLETED:
            result = check_metrics(result.metrics, self.cfg.objectives) or result
        before = [r for r in self.records if r is not record and r["state"] != TrialState.RUNNING.value]
        record.update(state=result.state.value, metrics=result.metrics, reason=result.reason, ended_at=_now(),
                      duration_s=_duration(record["started_at"]), extra=result.extra or {})
        if result.curve and not record["curve"]:
            record["curve"] = result.curve
        if result.state is TrialState.EARLY_STOPPED:
            reached = record["curve"][-1]["progress"] if record["curve"] else 0.0
            record["training_saved"] = round(1.0 - reached, 6)  # share of this trial's training not spent
        index = record["index"]
        if result.state is TrialState.COMPLETED:
            self.opt.complete(index, {m: result.metrics[m] for m in self._ax_metrics(result.metrics)})
        elif result.state is TrialState.EARLY_STOPPED:
            self._early_stopped(record)
        elif result.state is TrialState.OUT_OF_MEMORY:
            self.opt.abandoned(index)
        else:
            self.opt.failed(index, result.reason or "failed")
        failed = result.state in (TrialState.FAILED, TrialState.OUT_OF_MEMORY)
        self.failures_in_a_row = self.failures_in_a_row + 1 if failed else 0
        self._prune_adapters()
        self._print_trial(record, before)

    def _early_stopped(self, record: dict) -> None:
        """Ax keeps a stopped trial's curve; one with no point at all is abandoned instead."""
        objective = self.cfg.objectives[0]
        points = [p for p in record["curve"] if isinstance(p.get(objective), int | float)]
        if not points:
            self.opt.abandoned(record["index"])
            return
        if self.cfg.early_stopping.percentile is None:  # curves were not streamed to Ax: send the last point
            last = points[-1]
            self.opt.progress(record["index"], {objective: last[objective]},
                              max(1, round(last["progress"] * PROGRESSION_SCALE)))
        self.opt.early_stopped(record["index"])

    def _ax_metrics(self, metrics: dict) -> list[str]:
        names = list(self.cfg.objectives)
        for constraint in self.cfg.outcome_constraints:
            name = OUTCOME_CONSTRAINT.match(constraint).group(1)
            if name in metrics and name not in names:
                names.append(name)
        return names

    # -- outputs ------------------------------------------------------------------------------

    def best(self) -> dict | None:
        return R.best_record(self.records, self.cfg.objectives, self.cfg.minimize)

    def _prune_adapters(self) -> None:
        if self.cfg.keep_adapters != "best":
            return
        keep = {r["index"] for r in R.pareto_front(self.records, self.cfg.objectives, self.cfg.minimize)}
        for r in self.records:
            if r["state"] != TrialState.RUNNING.value and r["index"] not in keep:
                shutil.rmtree(self.paths.directory / r["directory"] / "adapter", ignore_errors=True)

    def summary(self) -> dict:
        """What ``run_optimization`` returns and ``optimization_results.json`` holds."""
        best = self.best()
        objective, minimize = self.cfg.objectives[0], self.cfg.minimize[0]
        gain = R.improvement(self.records, objective, minimize)
        front = R.pareto_front(self.records, self.cfg.objectives, self.cfg.minimize)
        return {
            "best_loss": best["metrics"].get("loss") if best else None,
            "best_params": dict(best["params"]) if best else None,
            "best_trial": best["index"] if best else None,
            "best_metrics": dict(best["metrics"]) if best else None,
            "baseline": R.baseline_record(self.records),
            "improvement": gain.__dict__ if gain else None,
            "pareto_front": [{"index": r["index"], "params": r["params"], "metrics": r["metrics"]} for r in front]
            if len(self.cfg.objectives) > 1 else None,
            "objectives": self.cfg.objectives,
            "minimize": self.cfg.minimize,
            "search_space": self.cfg.search_space,
            "constraints": self.cfg.constraints,
            "seed": self.cfg.seed,
            "rslora": self.cfg.lora.use_rslora,
            "evaluation": self.evaluation,
            "n_trials": self._finished(),
            "early_stopping": R.early_stopping_savings(self.records),
            "states": {s.value: sum(r["state"] == s.value for r in self.records) for s in TrialState},
            "wall_time_s": self.elapsed_before + (time.time() - getattr(self, "_session_start", time.time())),
            "optimizer_time_s": self.optimizer_before + (self.opt.busy_s if self.opt else 0.0),
            "best_config": str(self.paths.best_config) if best and self.evaluation == "finetune" else None,
            "trials": self.records,
        }

    def save(self) -> None:
        summary = self.summary()
        checkpoint = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "saved_at": _now(),
            "config": to_dict(self.cfg), "results_file": str(self.paths.results.name),
            "evaluation": self.evaluation, "elapsed_s": summary["wall_time_s"],
            "optimizer_s": summary["optimizer_time_s"],
            "records": self.records, "ax": self.opt.snapshot(),
        }
        atomic_write_json(self.paths.checkpoint, checkpoint)
        atomic_write_json(self.paths.results, summary)
        best = self.best()
        if best and self.evaluation == "finetune":
            atomic_write_text(self.paths.best_config, self.config_yaml(best, self.paths.best_config))

    def config_yaml(self, best: dict, path: Path) -> str:
        """A complete training config for the record's parameters, with the retrain's epochs."""
        cfg = apply(self.cfg.base(), best["params"], self.space)
        cfg.training.epochs = self.cfg.retrain_epochs
        if self.cfg.seed is not None:
            cfg.training.seed = self.cfg.seed
        cfg.output_dir = str((self.paths.directory / "best_model").resolve())
        for attr in ("path", "validation_path"):  # absolute, so the file works from any directory
            value = getattr(cfg.data, attr)
            if value and not value.startswith("builtin:"):
                setattr(cfg.data, attr, str(Path(value).resolve()))
        metric = ", ".join(f"{o}={best['metrics'][o]:.4g}" for o in self.cfg.objectives if o in best["metrics"])
        which = (f"Best of {self._finished()} trials: trial {best['index']}" if best is self.best()
                 else f"Trial {best['index']} of {self._finished()}")
        header = (f"# python finetune_lora.py --config {path}\n"
                  f"# {which} ({metric}), {self.cfg.retrain_epochs:g} epochs for the full retrain.\n")
        return dump_yaml(to_dict(cfg), header)

    # -- terminal -----------------------------------------------------------------------------

    def _print_trial(self, record: dict, before: list[dict]) -> None:
        objective = self.cfg.objectives[0]
        value = record["metrics"].get(objective)
        shown = f"{objective}={value:.4f}" if isinstance(value, int | float) else record["state"]
        mark = R.verdict(record, before, objective, self.cfg.minimize[0])
        if record["state"] == TrialState.EARLY_STOPPED.value:
            shown = f"stopped at {record['curve'][-1]['progress']:.0%}" if record["curve"] else "stopped"
        elif record["state"] != TrialState.COMPLETED.value:
            shown = f"{record['state']}: {record['reason']}"
        done = self._finished()
        elapsed = self.elapsed_before + time.time() - self._session_start
        durations = [r["duration_s"] for r in self.records if r.get("duration_s")]
        left = (self.cfg.trials - done) * (sum(durations) / len(durations)) / self.cfg.workers if durations else 0
        self.console.print(f"Trial {done}/{self.cfg.trials} (#{record['index']}): {R.format_params(record['params'])}"
                           f" → {shown} {mark}  [dim]({_clock(elapsed)} elapsed, ~{_clock(left)} left)[/]",
                           soft_wrap=True)

    def _print_summary(self, report: Path | None) -> None:
        from rich.table import Table

        objective, minimize = self.cfg.objectives[0], self.cfg.minimize[0]
        if not R.ranked(self.records, objective, minimize):
            self.console.print("No trial completed: see the reasons above and the logs under "
                               f"{self.paths.directory / 'trials'}")
            return
        table = Table(title="Top trials")
        names = self.space.names
        for col in ["#", *[R.SHORT_NAMES.get(n, n) for n in names], *self.cfg.objectives, "time (s)"]:
            table.add_column(col)
        for r in R.ranked(self.records, objective, minimize)[:5]:
            table.add_row(str(r["index"]) + (" baseline" if r["baseline"] else ""),
                          *[f"{r['params'][n]:.3g}" if isinstance(r["params"][n], float) else str(r["params"][n]) for n in names],
                          *[f"{r['metrics'][o]:.4f}" for o in self.cfg.objectives], f"{r['duration_s'] or 0:.1f}")
        self.console.print(table)
        gain = R.improvement(self.records, objective, minimize)
        if gain:
            self.console.print(f"Best {objective} {gain.best:.4f} vs baseline {gain.baseline:.4f} "
                               f"({gain.relative:+.1%} better)" if gain.absolute >= 0 else
                               f"Best {objective} {gain.best:.4f}: the baseline ({gain.baseline:.4f}) was not beaten")
        summary = self.summary()
        wall, ax_s = summary["wall_time_s"], summary["optimizer_time_s"]
        self.console.print(f"Time: {_clock(wall)} in all, {ax_s:.0f} s of it in Ax "
                           f"({ax_s / max(wall, 1e-9):.0%}: set-up, suggestions, checkpoints)")
        self.console.print(f"Results: {self.paths.results}", soft_wrap=True)
        if report:
            self.console.print(f"Report: {report}", soft_wrap=True)
        if self.best() and self.evaluation == "finetune":
            self.console.print(f"Best config: {self.paths.best_config}  (retrain: python finetune_lora.py --config "
                               f"{self.paths.best_config})", soft_wrap=True)

    # -- resume -------------------------------------------------------------------------------

    @classmethod
    def load(cls, checkpoint: str | Path, *, additional_trials: int = 0, evaluate: Callable | None = None,
             early_stopping: EarlyStoppingCallback | None = None, quiet: bool = False,
             read_only: bool = False) -> Study:
        """Rebuild a study from its checkpoint; ``read_only`` loads one only to read it (no resume)."""
        path = Path(checkpoint)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        data = read_json(path, "checkpoint")
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise LoratuneError(f"{path}: not a loratune checkpoint")
        if data.get("version") != CHECKPOINT_VERSION:
            raise LoratuneError(f"{path}: checkpoint version {data.get('version')} is not supported (expected {CHECKPOINT_VERSION})")
        if additional_trials < 0:
            raise LoratuneError(f"additional_trials: must be >= 0, got {additional_trials}")
        if data.get("evaluation") == "callable" and evaluate is None and not read_only:
            raise LoratuneError(f"{path}: this study evaluated a Python function; pass the same evaluate= to resume it")
        try:
            cfg = build(StudyConfig, data["config"], str(path), "config.")
            records, snapshot = list(data["records"]), data["ax"]
        except (KeyError, TypeError) as exc:
            raise LoratuneError(f"{path}: checkpoint is incomplete ({exc})") from None
        cfg.trials += additional_trials
        validate_study(cfg, str(path), custom_metrics=data.get("evaluation") != "finetune")
        study = cls(cfg, StudyPaths(path.parent, path.parent / data.get("results_file", RESULTS_NAME)),
                    evaluate=evaluate, early_stopping=early_stopping, quiet=quiet, preflight=not read_only)
        study.recorded_evaluation = data.get("evaluation")
        study.records = records
        study.elapsed_before = float(data.get("elapsed_s") or 0.0)
        study.optimizer_before = float(data.get("optimizer_s") or 0.0)
        study.opt = Optimizer.restore(snapshot, study.space, cfg.seed)
        study._apply_percentile(study.opt)
        return study

    def resume(self) -> dict:
        with DirectoryLock(self.paths.directory):
            return self._loop()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _duration(started: str | None) -> float | None:
    if not started:
        return None
    return (datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
