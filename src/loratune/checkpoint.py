"""A study on disk: its file names, the checkpoint that resumes it, the results people read and the
best config. Read and written without a running study: the report, ``compare`` and ``export`` use it.

Everything is written atomically after every round of trial events: ``optimization_checkpoint.json``
(our records, the study's settings and Ax's experiment), ``optimization_results.json`` (the history
people read, the same as ``run_optimization`` returns) and ``best_config.yaml``. A trial that was
running when the process died is still ``running`` in the checkpoint, and a resume runs it again
under the same Ax trial index.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import results
from .config import EVAL_POINTS, EVAL_POINTS_FOR_EARLY_STOPPING, FinetuneConfig, StudyConfig, to_dict
from .errors import LoratuneError
from .rules import validate_study
from .schema import Origin, build
from .search_space import SearchSpace, apply, study_space
from .settings import dump_yaml
from .storage import atomic_write_json, atomic_write_text, read_json
from .trial import Evaluation, TrialRecord, TrialState

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "loratune-study", 1
CHECKPOINT_NAME = "optimization_checkpoint.json"
RESULTS_NAME = "optimization_results.json"
BEST_CONFIG_NAME = "best_config.yaml"
REPORT_NAME = "OPTIMIZATION_RESULTS.md"
REPORT_TITLE = "# Optimization results"  # the report's first line
COMPARISON_NAME = "comparison.json"
TRIALS_DIR, PLOTS_DIR, COMPARISON_DIR, BEST_MODEL_DIR = "trials", "plots", "comparison", "best_model"
PREVIOUS_COMPARISON_DIR = "comparison.previous"  # the last comparison, while a new one runs
TEST_DIR = "test"  # the final test's jobs: the answers on the test split, a retrained adapter


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

    @property
    def report(self) -> Path:
        return self.directory / REPORT_NAME

    @property
    def comparison(self) -> Path:
        return self.directory / COMPARISON_NAME

    def trial_dir(self, index: int) -> Path:
        return self.directory / TRIALS_DIR / str(index)

    def written_by_a_study(self) -> list[Path]:
        """Every file and folder a study, its report and its comparison write here: what ``--overwrite``
        removes, and nothing else (a retrained ``best_model/`` is the user's, and stays)."""
        d = self.directory
        return [self.checkpoint, self.results, self.best_config, self.report, self.comparison,
                d / TRIALS_DIR, d / PLOTS_DIR, d / COMPARISON_DIR, d / PREVIOUS_COMPARISON_DIR, d / TEST_DIR]

    def holds_a_study(self) -> bool:
        return self.checkpoint.exists() or self.results.exists()

    def foreign_files(self) -> list[Path]:
        """Files and folders here of a study's names that no loratune study wrote: a study, and
        ``--overwrite``, would replace them, so they are refused instead. A file is a study's by its
        content (a checkpoint's format, a results file's study id, a best config's header); a folder,
        when a study's checkpoint or results file lies beside it."""
        owned = {self.checkpoint: _is_checkpoint, self.results: _has_study_id, self.comparison: _has_study_id,
                 self.best_config: lambda p: _first_line(p).startswith("# python finetune_lora.py --config"),
                 self.report: lambda p: _first_line(p) == REPORT_TITLE}
        study_here = (self.checkpoint.is_file() and _is_checkpoint(self.checkpoint)) or \
            (self.results.is_file() and _has_study_id(self.results))
        return [p for p in self.written_by_a_study() if p.exists()
                and not (owned[p](p) if p in owned and p.is_file() else p.is_dir() and study_here)]

    def clear(self) -> None:
        """Remove what an earlier study wrote here (``--overwrite``); ``foreign_files`` must be empty."""
        import shutil

        for path in self.written_by_a_study():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _json_mapping(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_checkpoint(path: Path) -> bool:
    return _json_mapping(path).get("format") == CHECKPOINT_FORMAT


def _has_study_id(path: Path) -> bool:
    return isinstance(_json_mapping(path).get("study_id"), str)


def _first_line(path: Path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.readline().rstrip("\n")
    except OSError:
        return ""


@dataclass
class StoredStudy:
    """What a checkpoint holds: enough to report on a study, export from it, or resume it."""

    config: StudyConfig
    records: list[TrialRecord]
    evaluation: Evaluation
    ax: dict | None = None  # Ax's experiment, as Client.save_to_json_file writes it
    elapsed_s: float = 0.0  # wall time of every session so far
    optimizer_s: float = 0.0  # seconds of it spent in Ax
    study_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # ties a comparison to its study
    test: dict | None = None  # the final test of the best trial and the baseline (evaluation.py)
    scorer_functions: list[str] = field(default_factory=list)  # scores given to the API as functions
    warm_start: dict[int, str] = field(default_factory=dict)  # Ax trial -> the earlier study's trial it is (warm_start.py)
    pack_limit: int | None = None  # trials a worker trains together at most, since a pack ran out of memory

    @property
    def space(self) -> SearchSpace:
        return study_space(self.config)

    def best(self) -> TrialRecord | None:
        return results.best_record(self.records, self.config.objectives, self.config.minimize)

    def record(self, index: int) -> TrialRecord | None:
        return next((r for r in self.records if r.index == index), None)

    def finished(self) -> int:
        return sum(r.finished for r in self.records)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------
# Reading


def checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load(path: str | Path, additional_trials: int = 0) -> tuple[StudyPaths, StoredStudy]:
    """Read a checkpoint (or the directory holding one), checked as strictly as a config."""
    path = checkpoint_path(path)
    data = read_json(path, "checkpoint")
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise LoratuneError(f"{path}: not a loratune checkpoint")
    if data.get("version") != CHECKPOINT_VERSION:
        raise LoratuneError(f"{path}: checkpoint version {data.get('version')} is not supported (expected {CHECKPOINT_VERSION})")
    for key, kind in (("config", dict), ("records", list), ("ax", dict)):
        if not isinstance(data.get(key), kind):
            raise LoratuneError(f"{path}: checkpoint is incomplete ('{key}' missing or not a {kind.__name__})")
    evaluation = data.get("evaluation", Evaluation.FINETUNE.value)
    if evaluation not in {e.value for e in Evaluation}:
        raise LoratuneError(f"{path}: unknown evaluation {evaluation!r} (known: {', '.join(Evaluation)})")
    evaluation = Evaluation(evaluation)
    origin = Origin(str(path))
    test, functions = data.get("test"), data.get("scorer_functions") or []
    if test is not None and not isinstance(test, dict):
        raise LoratuneError(f"{path}: test must be a mapping or null, got {test!r}")
    if not (isinstance(functions, list) and all(isinstance(f, str) for f in functions)):
        raise LoratuneError(f"{path}: scorer_functions must be a list of names, got {functions!r}")
    warm = data.get("warm_start_trials") or {}
    if not (isinstance(warm, dict) and all(k.isdigit() and isinstance(v, str) for k, v in warm.items())):
        raise LoratuneError(f"{path}: warm_start_trials must map Ax trial indices to sources, got {warm!r}")
    pack_limit = data.get("pack_limit")
    if pack_limit is not None and (not isinstance(pack_limit, int) or isinstance(pack_limit, bool) or pack_limit < 1):
        raise LoratuneError(f"{path}: pack_limit must be a positive integer or null, got {pack_limit!r}")
    # a study saved before the LoRA parameterization existed searched its parameters as written
    cfg = build(StudyConfig, {"parameterization": "raw", **data["config"]}, origin, "config.")
    cfg.trials += additional_trials
    validate_study(cfg, origin, custom_metrics=evaluation is not Evaluation.FINETUNE, scorer_names=functions)
    records = [TrialRecord.from_dict(r, f"{path}: records[{i}]") for i, r in enumerate(data["records"])]
    space = study_space(cfg, f"{path}: config.search_space", f"{path}: config.constraints")
    seen: set[int] = set()
    for i, r in enumerate(records):
        if r.index in seen:
            raise LoratuneError(f"{path}: records[{i}]: trial {r.index} is recorded twice")
        seen.add(r.index)
        unknown = sorted(set(r.params) - set(space.names))
        if unknown:
            raise LoratuneError(f"{path}: records[{i}].params: {unknown[0]} is not a searched parameter "
                                f"({', '.join(space.names)})")
        r.params = space.cast(r.params, f"{path}: records[{i}].params")
    results_name = Path(str(data.get("results_file") or RESULTS_NAME)).name
    stored = StoredStudy(cfg, records, evaluation, data["ax"], _number(data.get("elapsed_s")),
                         _number(data.get("optimizer_s")), str(data.get("study_id") or uuid.uuid4().hex[:12]),
                         test, functions, {int(k): v for k, v in warm.items()}, pack_limit)
    return StudyPaths(path.parent, path.parent / results_name), stored


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def load_results(directory: str | Path) -> dict:
    """The results file, or what a study killed before its first results left in its checkpoint, as a
    summary (the report reads this; records stay plain mappings there)."""
    directory = Path(directory)
    results = directory / RESULTS_NAME
    if results.exists():
        data = read_json(results, "results file")
        if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
            raise LoratuneError(f"{results}: not a loratune results file")
        return data
    if (directory / CHECKPOINT_NAME).exists():
        paths, stored = load(directory)
        return summary(stored, paths)
    raise LoratuneError(f"{directory}: holds no loratune study (no {RESULTS_NAME} or {CHECKPOINT_NAME})")


# ---------------------------------------------------------------------------------------------
# Writing


def summary(stored: StoredStudy, paths: StudyPaths) -> dict:
    """What ``run_optimization`` returns and ``optimization_results.json`` holds."""
    cfg = stored.config
    # a queued trial (known to Ax, not started: it runs first when the study resumes) is in the checkpoint only
    records = [r for r in stored.records if r.state is not TrialState.QUEUED]
    best = stored.best()
    gain = results.improvement(records, cfg.objectives, cfg.minimize)
    baseline = results.baseline_record(records)
    finetune = stored.evaluation is Evaluation.FINETUNE
    return {
        "best_loss": best.metrics.get("loss") if best else None,
        "best_params": dict(best.params) if best else None,
        "best_trial": best.index if best else None,
        "best_metrics": dict(best.metrics) if best else None,
        "baseline": baseline.to_dict() if baseline else None,
        "improvement": gain.to_dict() if gain else None,
        "pareto_front": [{"index": r.index, "params": r.params, "metrics": r.metrics}
                         for r in results.pareto_front(records, cfg.objectives, cfg.minimize)]
        if len(cfg.objectives) > 1 else None,
        "objectives": cfg.objectives,
        "minimize": cfg.minimize,
        "search_space": cfg.search_space,
        "constraints": cfg.constraints,
        "seed": cfg.seed,
        "rslora": cfg.lora.use_rslora,
        "parameterization": stored.space.parameterization,  # how Ax searched: "lora" only where it applied
        "warm_start": {"studies": cfg.warm_start, "trials": len(stored.warm_start)} if cfg.warm_start else None,
        "evaluation": stored.evaluation,
        "study_id": stored.study_id,
        "n_trials": stored.finished(),
        "early_stopping": results.early_stopping_savings(records),
        "states": {s.value: sum(r.state is s for r in records) for s in TrialState if s is not TrialState.QUEUED},
        "wall_time_s": stored.elapsed_s,
        "optimizer_time_s": stored.optimizer_s,
        "best_config": str(paths.best_config) if best and finetune else None,
        "test": stored.test,
        "trials": [r.to_dict() for r in records],
    }


def save(stored: StoredStudy, paths: StudyPaths) -> dict:
    """Write the checkpoint, the results and the best config, each atomically; return the summary."""
    result = summary(stored, paths)
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "saved_at": now(), "study_id": stored.study_id,
        "config": to_dict(stored.config), "results_file": paths.results.name, "evaluation": stored.evaluation,
        "elapsed_s": stored.elapsed_s, "optimizer_s": stored.optimizer_s, "test": stored.test,
        "scorer_functions": stored.scorer_functions, "records": [r.to_dict() for r in stored.records], "ax": stored.ax,
        "warm_start_trials": {str(k): v for k, v in stored.warm_start.items()}, "pack_limit": stored.pack_limit,
    }
    atomic_write_json(paths.checkpoint, checkpoint, indent=None)  # read by loratune only: compact
    atomic_write_json(paths.results, result)
    best = stored.best()
    if best and stored.evaluation is Evaluation.FINETUNE:
        atomic_write_text(paths.best_config, config_yaml(stored, paths, best, paths.best_config))
    return result


def trial_config(cfg: StudyConfig, space: SearchSpace, params: dict, output_dir: Path) -> FinetuneConfig:
    """The training config a trial runs: the study's fixed parameters with the trial's own, the study's seed,
    and a validation curve dense enough for the early-stopping rules that read it. The one place a trial's
    config is built (the study's trials, the final test's retrains, the retrain of ``best_config.yaml``)."""
    out = apply(cfg.base(), params, space)
    out.training.seed = cfg.seed if cfg.seed is not None else out.training.seed
    out.output_dir = str(Path(output_dir).resolve())
    out.save_adapter = cfg.keep_adapters != "none"
    if out.training.eval_points is None:
        reads = cfg.early_stopping.threshold is not None or cfg.early_stopping.percentile is not None
        out.training.eval_points = EVAL_POINTS_FOR_EARLY_STOPPING if reads else EVAL_POINTS
    return out


def training_config(stored: StoredStudy, paths: StudyPaths, record: TrialRecord) -> FinetuneConfig:
    """A complete training config with the record's parameters and the retrain's epochs (``best_config.yaml``)."""
    cfg = trial_config(stored.config, stored.space, record.params, paths.directory / BEST_MODEL_DIR)
    cfg.training.epochs, cfg.training.eval_points = stored.config.retrain_epochs, stored.config.training.eval_points
    cfg.save_adapter = True
    for attr in ("path", "validation_path"):  # absolute, so the file works from any directory
        value = getattr(cfg.data, attr)
        if value and not value.startswith("builtin:") and Path(value).expanduser().exists():
            setattr(cfg.data, attr, str(Path(value).expanduser().resolve()))
    return cfg


def config_yaml(stored: StoredStudy, paths: StudyPaths, record: TrialRecord, path: Path) -> str:
    """``training_config`` as YAML, headed by the command that retrains it."""
    cfg, objectives = training_config(stored, paths, record), stored.config.objectives
    metric = ", ".join(f"{o}={record.metrics[o]:.4g}" for o in objectives if o in record.metrics)
    best = stored.best()
    which = (f"Best of {stored.finished()} trials: trial {record.index}" if best and best.index == record.index
             else f"Trial {record.index} of {stored.finished()}")
    header = (f"# python finetune_lora.py --config {path}\n"
              f"# {which} ({metric}), {stored.config.retrain_epochs:g} epochs for the full retrain.\n")
    return dump_yaml(to_dict(cfg), header)


def check_records_match_ax(stored: StoredStudy, known: dict[int, dict], where: Path) -> None:
    """A checkpoint's records and its Ax experiment tell of the same trials with the same parameters (a hand
    edit of one and not the other would mix two studies). ``known``: the experiment's trials' parameters, by
    index (``Optimizer.trial_parameters``)."""
    known = dict(known)
    for index in stored.warm_start:  # earlier studies' trials, which are no record of this one
        if known.pop(index, None) is None:
            raise LoratuneError(f"{where}: warm-start trial {index} ({stored.warm_start[index]}) is not in the Ax experiment")
    for i, record in enumerate(stored.records):
        ax = known.pop(record.index, None)
        same = ax is not None and ax.keys() == record.params.keys() and all(
            math.isclose(v, ax[k], rel_tol=1e-9) if isinstance(v, float) else v == ax[k] for k, v in record.params.items())
        if not same:
            raise LoratuneError(f"{where}: records[{i}]: trial {record.index} has parameters {record.params}, but the "
                                f"Ax experiment in the same file {'has ' + str(ax) if ax else 'has no such trial'}")
    if known:
        raise LoratuneError(f"{where}: the Ax experiment holds trial {min(known)}, which no record has")
