"""The Python API, as Module 4.5 writes it. The command line calls these same functions.

Every entry point turns its arguments into settings (``settings.py``, ``schema.py``, ``rules.py``), checks everything it can
(``preflight.py``) and only then takes the output directory, clears an earlier study (with
``overwrite``) and starts trials.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import checkpoint, preflight
from .checkpoint import StoredStudy, StudyPaths
from .config import FinetuneConfig, StudyConfig, to_dict
from .console import StudyConsole, TrainingProgress
from .early_stopping import EarlyStoppingCallback
from .errors import LoratuneError, StudyAborted, TrainingFailed
from .listeners import checked_listeners
from .optimizer import Optimizer
from .rules import may_change_on_resume, needed_metrics, resumable_fields, validate_study
from .schema import Origin, Override, build, override
from .search_space import study_space
from .settings import load_finetune_config, load_study_config
from .storage import DirectoryLock, atomic_write_text, check_creatable
from .trial import Evaluation, failure_message
from .warm_start import load_prior

# run_optimization's own argument -> the setting it sets
_ARGUMENTS = {"num_trials": "trials", "model_name": "model.name", "search_space": "search_space",
              "objectives": "objectives", "minimize": "minimize", "constraints": "constraints", "seed": "seed",
              "workers": "workers", "command": "command", "outcome_constraints": "outcome_constraints",
              "report": "report"}


def run_optimization(
    num_trials: int | None = None,
    model_name: str | None = None,
    output_dir: str | Path = "configs/",
    search_space: dict | None = None,
    objectives: list[str] | None = None,
    minimize: list[bool] | None = None,
    early_stopping: EarlyStoppingCallback | None = None,
    constraints: list[str] | None = None,
    *,
    config: str | Path | StudyConfig | None = None,
    data_path: str | None = None,
    seed: int | None = None,
    evaluate: Callable | None = None,
    command: str | None = None,
    workers: int | None = None,
    outcome_constraints: list[str] | None = None,
    scorers: dict[str, Callable] | None = None,
    listeners: list | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    report: bool | None = None,
    **settings: Any,
) -> dict:
    """Search LoRA hyperparameters with Ax; return the best and the full history.

    Arguments left as None come from ``config`` (a YAML path or a StudyConfig), and without one from
    the embedded default: the default search space on the offline demo model and dataset.
    ``output_dir`` may also name the results file (``configs/optimization_results.json``). Any other
    study field can be passed by name (``executor="ray"``, ``trial_timeout=600``), and a section as a
    mapping (``training={"epochs": 2}``); every value is checked as the same value in YAML would be.
    ``scorers``: task scores of generated answers as functions, ``{name: fn(prediction, reference)}``,
    usable as objectives like ``scoring.scorers`` in YAML. ``listeners``: objects that hear the study's
    events (``listeners.StudyListener``: trial ended, ...). Raises ``LoratuneError`` on bad input, before
    anything is written or started.

    >>> from ax_optimization import run_optimization
    >>> results = run_optimization(num_trials=20, model_name="Qwen/Qwen2.5-7B-Instruct",
    ...                            output_dir="configs/")  # doctest: +SKIP
    >>> print(f"Best loss: {results['best_loss']:.4f}")  # doctest: +SKIP
    >>> print(f"Best params: {results['best_params']}")  # doctest: +SKIP
    """
    output_dir = _path_argument(output_dir, "output_dir")
    overwrite, quiet = _flag_argument(overwrite, "overwrite"), _flag_argument(quiet, "quiet")
    given = {"num_trials": num_trials, "model_name": model_name, "search_space": search_space, "objectives": objectives,
             "minimize": minimize, "constraints": constraints, "seed": seed, "workers": workers, "command": command,
             "outcome_constraints": outcome_constraints, "report": report}
    overrides: list[Override] = [(_ARGUMENTS[k], v, k) for k, v in given.items() if v is not None]
    if objectives is not None and minimize is None and isinstance(objectives, list | tuple):
        overrides.append(("minimize", [True] * len(objectives), "objectives"))
    if data_path is not None:  # a validation split is then held out of it
        overrides += [("data.path", data_path, "data_path"), ("data.validation_path", None, "data_path")]
    if early_stopping is not None:
        overrides += _early_stopping_overrides(early_stopping)
    for name, value in settings.items():
        if name not in StudyConfig.__dataclass_fields__:
            raise LoratuneError(f"run_optimization: unknown argument '{name}'")
        overrides.append((name, value, name))
    return optimize(config, overrides, output_dir, evaluate=evaluate, overwrite=overwrite, quiet=quiet, scorers=scorers,
                    listeners=listeners)


def _path_argument(value: Any, name: str) -> Path:
    """A path argument of the API, checked as its YAML field or flag would be."""
    if isinstance(value, str | os.PathLike) and str(value).strip():
        return Path(value)
    raise LoratuneError(f"{name}: expected a path (a string or os.PathLike), got {type(value).__name__} {value!r}")


def _flag_argument(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise LoratuneError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def _early_stopping_overrides(rule: Any) -> list[Override]:
    if not isinstance(rule, EarlyStoppingCallback):
        raise LoratuneError(f"early_stopping: expected an EarlyStoppingCallback, got {type(rule).__name__}")
    return [("early_stopping.threshold", rule.threshold, "early_stopping"),
            ("early_stopping.check_at", rule.check_at, "early_stopping")]


def optimize(config: str | Path | StudyConfig | None, overrides: Iterable[Override], output: str | Path, *,
             evaluate: Callable | None = None, overwrite: bool = False, quiet: bool = False,
             scorers: dict[str, Callable] | None = None, listeners: list | None = None) -> dict:
    """A new study: settings, every check, then the output directory, then the trials."""
    started = time.time()
    if config is not None and not isinstance(config, str | Path | StudyConfig):
        raise LoratuneError(f"config: expected a YAML path or a StudyConfig, got {type(config).__name__}")
    cfg, origin = load_study_config(config, overrides, custom_metrics=evaluate is not None,
                                    scorer_names=scorers if isinstance(scorers, dict) else ())
    paths = StudyPaths.from_output(output)
    preflight.check_output(paths, output)
    space = study_space(cfg, origin.at("search_space"), origin.at("constraints"))
    if paths.holds_a_study() and not overwrite:
        raise _already_holds_a_study(paths)
    evaluation = Evaluation.of(evaluate, cfg.command)
    checked = _checks(cfg, space, origin, evaluation, evaluate, scorers, listeners)
    prior = load_prior(cfg, space, needed_metrics(cfg), origin.at("warm_start"))

    def new_optimizer() -> Optimizer:
        optimizer = Optimizer.create(space, cfg.objectives, cfg.minimize, cfg.outcome_constraints, cfg.seed,
                                     cfg.init_trials, cfg.early_stopping, prior.trials)
        optimizer.notes += prior.notes
        return optimizer

    def new_study() -> StoredStudy:  # under the directory's lock: no other study starts there meanwhile
        if paths.holds_a_study():
            if not overwrite:
                raise _already_holds_a_study(paths)
            paths.clear()
        return StoredStudy(cfg, [], evaluation, scorer_functions=sorted(scorers or {}),
                           warm_start={i: t.source for i, t in enumerate(prior.trials)})

    return _start(cfg, evaluation, paths, new_optimizer, new_study, checked, evaluate, quiet, started)


def _checks(cfg: StudyConfig, space, origin: Origin, evaluation: Evaluation, evaluate: Callable | None,
            scorers: dict | None, listeners: Any) -> tuple[list, list[str], list]:
    """The checks a study passes before it starts, new or resumed: (its scorers, the warnings of a study that
    will measure little, its listeners). Raises LoratuneError at the first problem."""
    preflight.check_evaluation(cfg, space, evaluate, origin)
    scorer_list = preflight.resolve_scorers(cfg, scorers, origin.at("scoring"), finetune=evaluation is Evaluation.FINETUNE)
    warnings = []
    if evaluation is Evaluation.FINETUNE:
        warnings = preflight.check_training_inputs(cfg.base(), space, origin, trials_run_here=cfg.executor == "local")
    return scorer_list, warnings, checked_listeners(listeners)


def _start(cfg: StudyConfig, evaluation: Evaluation, paths: StudyPaths, make_optimizer: Callable[[], Optimizer],
           make_study: Callable[[], StoredStudy], checked: tuple[list, list[str], list], evaluate: Callable | None,
           quiet: bool, started: float) -> dict:
    """Start a study that passed its checks, new or resumed: its workers first (their imports overlap Ax's
    set-up), then its optimizer, then, holding the directory's lock, the study itself."""
    scorer_list, warnings, listeners = checked
    executor = _prestarted(cfg, evaluation)
    try:
        optimizer = make_optimizer()
        with DirectoryLock(paths.directory):
            return _run(make_study(), paths, optimizer, evaluate, quiet, started, scorer_list, listeners, executor, warnings)
    finally:  # the study shuts it down too; here for every way out before the study took it
        if executor is not None:
            executor.shutdown()


def _prestarted(cfg: StudyConfig, evaluation: Evaluation):
    """For loratune's own fine-tunes in kept workers on this machine: the executor, its workers started
    now, so that their imports (about 4 s, docs/benchmarks.md) overlap Ax's set-up. None otherwise (the
    study creates its executor)."""
    if evaluation is not Evaluation.FINETUNE or cfg.executor != "local" or not cfg.reuse_model:
        return None
    from .executors import create_executor

    executor = create_executor(cfg, evaluation)
    executor.prestart(to_dict(cfg.base()))
    return executor


def _already_holds_a_study(paths: StudyPaths) -> LoratuneError:
    return LoratuneError(f"{paths.directory}: already holds a study ({paths.checkpoint.name}); resume it with "
                         "`loratune resume`, choose another --output, or pass --overwrite")


def _run(stored: StoredStudy, paths: StudyPaths, optimizer: Optimizer, evaluate: Callable | None, quiet: bool,
         started: float, scorers: list, listeners: list | None = None, executor=None,
         warnings: Iterable[str] = ()) -> dict:
    """The warnings of the checks (a study that will measure little), the loop, the final test, then the
    report (also after an aborted study: what ran is worth reading), then the summary."""
    from .study import Study

    cfg = stored.config
    console = StudyConsole(quiet, cfg.objectives[0], cfg.minimize[0], cfg.trials, cfg.workers, [s.name for s in scorers])
    for text in warnings:  # before the first trial, where a user still reads; the study runs all the same
        console.print(f"[yellow]warning[/]: {text}")
    tracker = _tracker(cfg, paths, console)
    study = Study(stored, paths, optimizer, console, evaluate=evaluate, started=started, tracker=tracker, scorers=scorers,
                  listeners=listeners, executor=executor)
    try:
        result = study.run()
    except StudyAborted:
        report = _write_report(paths, cfg.report, console)
        study.listeners.study_ended(paths, checkpoint.summary(stored, paths), report)
        raise
    except BaseException:
        study.listeners.study_ended(paths, checkpoint.summary(stored, paths), None)
        raise
    report = _write_report(paths, cfg.report, console)
    study.listeners.study_ended(paths, result, report)
    console.summary(stored.records, study.space.names, cfg.objectives, {**result, "results_file": str(paths.results)},
                    str(report) if report else None)
    return result


def _tracker(cfg: StudyConfig, paths: StudyPaths, console: StudyConsole):
    from . import tracking

    if cfg.tracking != "mlflow":
        return tracking.Tracker()
    return tracking.MlflowTracker(cfg.tracking_uri or tracking.default_uri(paths.directory), cfg.tracking_experiment,
                                  warn=lambda text: console.print(f"[yellow]warning[/]: {text}"))


def _write_report(paths: StudyPaths, wanted: bool, console: StudyConsole) -> Path | None:
    if not wanted:
        return None
    from .report import write_report

    try:
        return write_report(paths.directory)
    except Exception as exc:  # the study's results are saved; a report problem must not hide them
        console.print(f"[yellow]could not write the report[/]: {exc}; `loratune report {paths.directory}` retries")
        return None


def resume_optimization(
    checkpoint: str | Path = "configs/optimization_checkpoint.json",
    additional_trials: int = 0,
    *,
    evaluate: Callable | None = None,
    scorers: dict[str, Callable] | None = None,
    listeners: list | None = None,
    quiet: bool = False,
    **settings: Any,
) -> dict:
    """Continue a study from its checkpoint: trials that were running are run again, then
    ``additional_trials`` more than the study had planned. How the trials run may change
    (``workers=4``, ``trial_timeout=600``, ...: see ``rules.may_change_on_resume``); what they measure may not.

    >>> from ax_optimization import resume_optimization
    >>> results = resume_optimization(checkpoint="configs/optimization_checkpoint.json",
    ...                               additional_trials=10)  # doctest: +SKIP
    """
    return resume(_path_argument(checkpoint, "checkpoint"), additional_trials, [(k, v, k) for k, v in settings.items()],
                  evaluate=evaluate, quiet=_flag_argument(quiet, "quiet"), scorers=scorers, listeners=listeners)


def resume(path: str | Path, additional_trials: int, overrides: Iterable[Override], *,
           evaluate: Callable | None = None, quiet: bool = False, scorers: dict[str, Callable] | None = None,
           listeners: list | None = None) -> dict:
    started = time.time()
    if not isinstance(additional_trials, int) or isinstance(additional_trials, bool) or additional_trials < 0:
        raise LoratuneError(f"additional_trials: must be a non-negative integer, got {additional_trials!r}")
    paths, stored = checkpoint.load(path, additional_trials)
    preflight.check_no_foreign_files(paths, str(paths.checkpoint))
    data, origin = {}, Origin(str(paths.checkpoint))
    for dotted, value, label in overrides:
        if not may_change_on_resume(dotted):
            named = label if label.lstrip("-").replace("-", "_") in (dotted, dotted.split(".")[0]) else f"{label}: {dotted}"
            raise LoratuneError(f"{named}: cannot change when a study resumes (it would mix trials of two set-ups); "
                                f"what can: {', '.join(resumable_fields())}")
        override(data, StudyConfig, dotted, value, label, origin)
    if stored.evaluation is Evaluation.CALLABLE and evaluate is None:
        raise LoratuneError(f"{paths.checkpoint}: this study evaluated a Python function; pass the same evaluate= "
                            "to resume it (resume_optimization)")
    if stored.evaluation is not Evaluation.CALLABLE and evaluate is not None:
        raise LoratuneError(f"evaluate: this study ran {stored.evaluation} trials; resume it without evaluate=")
    preflight.require_scorer_functions(stored, scorers, paths.checkpoint, "pass the same scorers= to resume it "
                                       "(resume_optimization)")
    if data:
        merged = {**to_dict(stored.config), **data}
        stored.config = validate_study(build(StudyConfig, merged, origin), origin, stored.evaluation is not Evaluation.FINETUNE,
                                       stored.scorer_functions)
    cfg = stored.config
    space = study_space(cfg)
    checked = _checks(cfg, space, origin, stored.evaluation, evaluate, scorers, listeners)

    def restored_optimizer() -> Optimizer:
        optimizer = Optimizer.restore(stored.ax, space, cfg.seed, cfg.early_stopping)
        checkpoint.check_records_match_ax(stored, optimizer.trial_parameters(), paths.checkpoint)
        return optimizer

    return _start(cfg, stored.evaluation, paths, restored_optimizer, lambda: stored, checked, evaluate, quiet, started)


def finetune(config: str | Path | FinetuneConfig, *, output_dir: str | None = None, overwrite: bool = False,
             quiet: bool = False, overrides: Iterable[Override] = (), own_process: bool = False) -> dict:
    """Fine-tune with a training config, e.g. the ``best_config.yaml`` a study wrote; return its metrics.
    Raises ``LoratuneError`` on bad input, ``TrainingFailed`` (one line with what to change) when the run
    fails. ``own_process``: nothing else will train in this process (the command line), so an
    unquantized run keeps bitsandbytes out of it, as a study's workers do.

    >>> from loratune import finetune
    >>> metrics = finetune("configs/best_config.yaml")  # doctest: +SKIP
    """
    from .model import import_libraries
    from .training import check_output_dir, run_training

    if not isinstance(config, FinetuneConfig):
        config = _path_argument(config, "config")
    overwrite, quiet = _flag_argument(overwrite, "overwrite"), _flag_argument(quiet, "quiet")
    if output_dir is not None:
        output_dir = str(_path_argument(output_dir, "output_dir"))
    overrides = list(overrides) + ([("output_dir", output_dir, "--output-dir")] if output_dir is not None else [])
    cfg, origin = load_finetune_config(config, overrides)
    if own_process:
        import_libraries(quantized=cfg.model.quantization != "none")
    preflight.check_model(cfg, origin=origin)
    check_output_dir(cfg.output_dir, overwrite)  # before the progress bar draws anything
    data = preflight.load_checked_data(cfg)
    for text in [] if quiet else preflight.data_warnings(cfg, *data, origin=origin, study=False):
        print(f"warning: {text}", file=sys.stderr)  # a run that will measure little runs all the same
    try:
        with TrainingProgress(quiet) as on_step:
            return run_training(cfg, overwrite=overwrite, on_step=on_step, data=data).to_dict()
    except (LoratuneError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a run that failed: one line with what to change
        raise TrainingFailed(f"{config if not isinstance(config, FinetuneConfig) else cfg.output_dir}: "
                             f"{failure_message(exc)}") from None


def evaluate(study_dir: str | Path = "configs/", *, scorers: dict[str, Callable] | None = None) -> dict:
    """Score a finished study's best config and its baseline on the test split the search never saw (what
    a study does when it ends), save it in the study's results and return that ``test`` section.

    >>> from loratune import evaluate
    >>> test = evaluate("configs/")  # doctest: +SKIP
    >>> test["improvement"]["loss"]["relative"]  # doctest: +SKIP
    """
    from .evaluation import evaluate_study

    paths, stored = checkpoint.load(_path_argument(study_dir, "study_dir"))
    preflight.require_scorer_functions(stored, scorers, paths.checkpoint, "pass the same scorers= to evaluate it")
    scorer_list = preflight.resolve_scorers(stored.config, scorers, str(paths.checkpoint))
    with DirectoryLock(paths.directory):
        test = evaluate_study(paths.directory, scorer_list)
    _write_report(paths, True, StudyConsole(True, "loss", True, 0, 1))
    return test


def export_config(study_dir: str | Path, trial: int, path: str | Path) -> Path:
    """Write the training config of any trial, e.g. another point of the Pareto front than the
    one ``best_config.yaml`` took, ready for ``finetune_lora.py --config``.

    >>> from loratune import export_config
    >>> export_config("configs/", trial=7, path="configs/fast_config.yaml")  # doctest: +SKIP
    """
    study_dir, path = _path_argument(study_dir, "study_dir"), _path_argument(path, "path")
    if isinstance(trial, bool) or not isinstance(trial, int):
        raise LoratuneError(f"trial: expected a trial index (an integer), got {trial!r}")
    paths, stored = checkpoint.load(study_dir)
    record = stored.record(trial)
    if record is None:
        raise LoratuneError(f"{study_dir}: no trial {trial} (trials: {', '.join(str(r.index) for r in stored.records)})")
    if stored.evaluation is not Evaluation.FINETUNE:
        raise LoratuneError(f"{study_dir}: this study ran its own evaluation, so it has no training config to export")
    out = Path(path)
    if out.exists():
        raise LoratuneError(f"{out}: already exists; choose another path")
    check_creatable(out, "--output", directory=False)
    atomic_write_text(out, checkpoint.config_yaml(stored, paths, record, out))
    return out
