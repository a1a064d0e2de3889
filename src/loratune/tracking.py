"""Experiment tracking: MLflow as an optional sink, fed from the same events the checkpoint records.

A study is a parent run (its settings, search space, best result and, at the end, ``best_config.yaml``,
``OPTIMIZATION_RESULTS.md`` and the plots as artifacts); each trial is a child run with its parameters,
its validation curve as step metrics logged while it trains, its final metrics, and its state and
failure reason as tags. Resume finds the same parent run (tagged with the study's id) and gives a trial
that runs again a fresh child run in place of the old one, so there is one child run per trial.

Tracking never stops or slows a study: every MLflow call runs in a background thread, and the first
failure (a server down, a full disk) is one warning, after which tracking is off for the session.
"""

from __future__ import annotations

import json
import math
import os
import queue
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import to_dict
from .errors import LoratuneError, first_line
from .listeners import StudyListener
from .trial import TrialRecord, TrialState

STATUS = {TrialState.COMPLETED: "FINISHED", TrialState.EARLY_STOPPED: "KILLED", TrialState.FAILED: "FAILED",
          TrialState.OUT_OF_MEMORY: "FAILED"}
FLUSH_TIMEOUT_S = 60.0


def default_uri(directory: Path) -> str:
    """A local store inside the study's directory: no server to start."""
    return f"sqlite:///{(directory / 'mlflow.db').resolve()}"


def check_available() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise LoratuneError("tracking: mlflow needs MLflow: pip install 'loratune[mlflow]'") from None


class Tracker(StudyListener):
    """No tracking: a listener that hears nothing."""


class MlflowTracker(Tracker):
    def __init__(self, uri: str, experiment: str, warn: Callable[[str], None]):
        self.uri, self.experiment, self.warn = uri, experiment, warn
        self.calls: queue.Queue = queue.Queue()
        self.failed: str | None = None
        self.parent: str | None = None
        self.children: dict[int, str] = {}  # trial index -> child run id
        self.logged_steps: dict[int, int] = {}  # trial index -> last curve step sent
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a server that is down fails at once
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.thread = threading.Thread(target=self._work, name="loratune-mlflow", daemon=True)
        self.thread.start()

    # -- the background thread ----------------------------------------------------------------

    def _work(self) -> None:
        while (call := self.calls.get()) is not None:
            if self.failed is None:
                try:
                    call()
                except Exception as exc:  # tracking is a sink: its failure is a warning, never the study's
                    self.failed = first_line(exc, 160)
                    self.warn(f"MLflow tracking at {self.uri} failed ({self.failed}); it is off for the rest of "
                              "this session, the study goes on")
            self.calls.task_done()
        self.calls.task_done()

    def _later(self, call: Callable[[], None]) -> None:
        if self.failed is None:
            self.calls.put(call)

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Wait (up to ``timeout`` seconds) for the calls still queued, then stop the thread."""
        self.calls.put(None)
        self.thread.join(timeout)

    # -- hooks --------------------------------------------------------------------------------

    def study_started(self, stored, paths) -> None:
        if not _reachable(self.uri):
            self.failed = "not reachable"
            self.warn(f"MLflow tracking server {self.uri} is not reachable; the study runs without tracking")
            return
        started = _now_ms()  # the worker thread may get to it later (importing mlflow takes seconds)
        self._later(lambda: self._open_parent(stored, paths, started))

    def _open_parent(self, stored, paths, started: int) -> None:
        import logging

        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." is no news for the user
            logging.getLogger(name).setLevel(logging.WARNING)

        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            self.experiment, artifact_location=_artifact_location(self.uri, paths.directory))
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`loratune.study_id` = '{stored.study_id}'"
                                        " and tags.`loratune.role` = 'study'")
        if found:
            self.parent = found[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
            children = self.client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent}'")
            self.children = {int(r.data.tags["loratune.trial"]): r.info.run_id for r in children}
        else:
            cfg = stored.config
            run = self.client.create_run(experiment_id, run_name=paths.directory.resolve().name, start_time=started, tags={
                "loratune.study_id": stored.study_id, "loratune.role": "study", "loratune.evaluation": stored.evaluation,
                "loratune.directory": str(paths.directory.resolve())})
            self.parent = run.info.run_id
            settings = {k: json.dumps(v) if isinstance(v, dict | list) else str(v)
                        for k, v in _flatten(to_dict(cfg)).items() if k not in ("search_space",)}
            settings["search_space"] = json.dumps(cfg.search_space)
            _log_params(self.client, self.parent, settings)
        self.experiment_id = experiment_id

    def trial_started(self, record: TrialRecord) -> None:
        index, params, baseline, started = record.index, dict(record.params), record.baseline, _now_ms()
        self.logged_steps[index] = -1

        def start() -> None:
            if index in self.children:  # run again after an interruption: a fresh child in place of the old
                self.client.delete_run(self.children.pop(index))
            run = self.client.create_run(self.experiment_id, run_name=f"trial {index}", start_time=started, tags={
                "mlflow.parentRunId": self.parent, "loratune.trial": str(index), "loratune.baseline": str(baseline),
                "loratune.state": TrialState.RUNNING.value})
            self.children[index] = run.info.run_id
            _log_params(self.client, run.info.run_id, {k: str(v) for k, v in params.items()})

        self._later(start)

    def trial_progress(self, record: TrialRecord, tick: dict | None = None, point: dict | None = None) -> None:
        if point is not None:
            self._point(record, point)

    def _point(self, record: TrialRecord, point: dict) -> None:
        index, step = record.index, int(point.get("step") or 0)
        self.logged_steps[index] = max(step, self.logged_steps.get(index, -1))
        values = {k: float(v) for k, v in point.items()
                  if k in ("val_loss", "train_loss", "loss", "progress") or isinstance(v, float) and k != "subset"}

        def log() -> None:
            from mlflow.entities import Metric

            now = _now_ms()
            self.client.log_batch(self.children[index], metrics=[Metric(k, v, now, step) for k, v in values.items()])

        self._later(log)

    def trial_ended(self, record: TrialRecord, records: list[TrialRecord] | None = None) -> None:
        # the points the trial reported only in its result (where a stopped trial ended, on the whole set)
        for point in record.curve:
            if int(point.get("step") or 0) > self.logged_steps.get(record.index, -1):
                self._point(record, point)
        index, state, reason = record.index, record.state, record.reason
        metrics = {k: float(v) for k, v in record.metrics.items()}

        def end() -> None:
            from mlflow.entities import Metric, RunTag

            run_id, now = self.children[index], _now_ms()
            tags = [RunTag("loratune.state", state.value)] + ([RunTag("loratune.reason", reason[:5000])] if reason else [])
            self.client.log_batch(run_id, metrics=[Metric(f"final_{k}", v, now, 0) for k, v in metrics.items()], tags=tags)
            self.client.set_terminated(run_id, STATUS.get(state, "FINISHED"))

        self._later(end)

    def study_ended(self, paths, result: dict, report: Path | None) -> None:
        def end() -> None:
            from mlflow.entities import Metric

            now = _now_ms()
            best = {f"best_{k}": float(v) for k, v in (result.get("best_metrics") or {}).items()}
            if result.get("best_trial") is not None:
                best["best_trial"] = float(result["best_trial"])
            gain = result.get("improvement") or {}
            best |= {f"improvement_{k}": float(v) for k, v in gain.items()
                     if isinstance(v, int | float) and not isinstance(v, bool)}  # no relative change against a zero
            best |= test_metrics(result.get("test"))
            self.client.log_batch(self.parent, metrics=[Metric(k, v, now, 0) for k, v in best.items()])
            for path in (paths.best_config, report):
                if path is not None and Path(path).exists():
                    self.client.log_artifact(self.parent, str(path))
            plots = paths.directory / "plots"
            if plots.is_dir():
                self.client.log_artifacts(self.parent, str(plots), artifact_path="plots")
            self.client.set_terminated(self.parent, "FINISHED")

        self._later(end)
        self.close()


def test_metrics(test: dict | None) -> dict[str, float]:
    """The final test as the parent run's metrics, beside the validation ones: ``test_best_loss``,
    ``test_baseline_loss``, ``test_improvement_loss`` (relative), ``validation_improvement_loss``, ... and
    ``test_held_share`` (of the validation gain)."""
    if not test or "error" in test:
        return {}
    out = {}
    for side in ("best", "baseline"):
        out |= {f"test_{side}_{k}": float(v) for k, v in (test.get(side) or {}).items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("trial", "generation_s")}
    for key, prefix in (("improvement", "test_improvement"), ("validation", "validation_improvement")):
        out |= {f"{prefix}_{k}": float(g["relative"]) for k, g in (test.get(key) or {}).items()
                if g.get("relative") is not None and math.isfinite(g["relative"])}
    if test.get("held") is not None:
        out["test_held_share"] = float(test["held"])
    return out


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and k != "search_space":
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run_id, params=items[i:i + 100])


def _artifact_location(uri: str, directory: Path) -> str | None:
    """Local stores keep their artifacts beside the database, in the study's directory; a server decides itself."""
    return str((directory / "mlartifacts").resolve()) if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None


def _reachable(uri: str) -> bool:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return True
    try:
        with socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), timeout=3):
            return True
    except OSError:
        return False


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
