"""The Python API, as the seed writes it. The CLI calls these same functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import StudyConfig, load_finetune_config, load_study_config, validate_study
from .early_stopping import EarlyStoppingCallback
from .errors import LoratuneError
from .study import Study, StudyPaths


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
    overwrite: bool = False,
    quiet: bool = False,
    report: bool | None = None,
    **settings,
) -> dict:
    """Search LoRA hyperparameters with Ax; return the best and the full history.

    Arguments left as None come from ``config`` (a YAML path or a StudyConfig), and without one
    from the embedded default: the seed's search space on the offline demo model and dataset.
    ``output_dir`` may also name the results file (``configs/optimization_results.json``). Any
    other study field can be passed by name (``executor="ray"``, ``gpus_per_trial=2``, ...).

    >>> from ax_optimization import run_optimization
    >>> results = run_optimization(num_trials=20, model_name="Qwen/Qwen2.5-7B-Instruct",
    ...                            output_dir="configs/")  # doctest: +SKIP
    >>> print(f"Best loss: {results['best_loss']:.4f}")  # doctest: +SKIP
    >>> print(f"Best params: {results['best_params']}")  # doctest: +SKIP
    """
    custom = evaluate is not None or command is not None
    cfg = config if isinstance(config, StudyConfig) else load_study_config(config, custom_metrics=custom)
    source = str(config) if isinstance(config, str | Path) else None
    if num_trials is not None:
        cfg.trials = num_trials
    if model_name is not None:
        cfg.model.name = model_name
    if data_path is not None:
        cfg.data.path, cfg.data.validation_path = data_path, None
    if search_space is not None:
        cfg.search_space = search_space
    if objectives is not None:
        cfg.objectives = list(objectives)
        cfg.minimize = list(minimize) if minimize is not None else [True] * len(objectives)
    elif minimize is not None:
        cfg.minimize = list(minimize)
    if constraints is not None:
        cfg.constraints = list(constraints)
    if outcome_constraints is not None:
        cfg.outcome_constraints = list(outcome_constraints)
    if seed is not None:
        cfg.seed = seed
    if workers is not None:
        cfg.workers = workers
    if command is not None:
        cfg.command = command
    if report is not None:
        cfg.report = report
    for name, value in settings.items():  # any other study field: executor="ray", gpus_per_trial=2, ...
        if name not in StudyConfig.__dataclass_fields__ or name in ("model", "lora", "data", "training"):
            raise LoratuneError(f"run_optimization: unknown argument '{name}'")
        setattr(cfg, name, value)
    if not isinstance(num_trials, int | None) or (num_trials is not None and num_trials < 1):
        raise LoratuneError(f"num_trials: must be a positive integer, got {num_trials!r}")
    validate_study(cfg, source, custom_metrics=custom)
    study = Study(cfg, StudyPaths.from_output(output_dir), evaluate=evaluate, early_stopping=early_stopping,
                  quiet=quiet)
    return study.run(overwrite=overwrite)


def resume_optimization(
    checkpoint: str | Path = "configs/optimization_checkpoint.json",
    additional_trials: int = 0,
    *,
    evaluate: Callable | None = None,
    early_stopping: EarlyStoppingCallback | None = None,
    quiet: bool = False,
) -> dict:
    """Continue a study from its checkpoint: trials that were running are run again, then
    ``additional_trials`` more than the study had planned.

    >>> from ax_optimization import resume_optimization
    >>> results = resume_optimization(checkpoint="configs/optimization_checkpoint.json",
    ...                               additional_trials=10)  # doctest: +SKIP
    """
    study = Study.load(checkpoint, additional_trials=additional_trials, evaluate=evaluate,
                       early_stopping=early_stopping, quiet=quiet)
    return study.resume()


def finetune(config: str | Path, *, output_dir: str | None = None, overwrite: bool = False, quiet: bool = False) -> dict:
    """Fine-tune with a training config file, e.g. the ``best_config.yaml`` a study wrote.

    >>> from loratune import finetune
    >>> metrics = finetune("configs/best_config.yaml")  # doctest: +SKIP
    """
    from .training import finetune as run_finetune

    cfg = load_finetune_config(config)
    if output_dir is not None:
        cfg.output_dir = output_dir
    return run_finetune(cfg, quiet=quiet, overwrite=overwrite)


def export_config(study_dir: str | Path, trial: int, path: str | Path) -> Path:
    """Write the training config of any trial, e.g. another point of the Pareto front than the
    one ``best_config.yaml`` took, ready for ``finetune_lora.py --config``.

    >>> from loratune import export_config
    >>> export_config("configs/", trial=7, path="configs/fast_config.yaml")  # doctest: +SKIP
    """
    from .storage import atomic_write_text

    study = Study.load(study_dir, quiet=True, read_only=True)
    record = next((r for r in study.records if r["index"] == trial), None)
    if record is None:
        raise LoratuneError(f"{study_dir}: no trial {trial} (trials: {', '.join(str(r['index']) for r in study.records)})")
    if study.evaluation != "finetune":
        raise LoratuneError(f"{study_dir}: this study ran its own evaluation, so it has no training config to export")
    out = Path(path)
    if out.exists():
        raise LoratuneError(f"{out}: already exists; choose another path")
    atomic_write_text(out, study.config_yaml(record, out))
    return out

