"""The rules a config obeys beyond its types (``validate``, ``validate_study``), and the study's own
rules read from its settings: the metrics it needs, the scores it computes, what may change on resume.
Errors name the dotted field and where its value came from: ``cfg.yaml: training.epochs: must be > 0,
got 0.0``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from .config import DEMO_TRAIN, EarlyStoppingConfig, FinetuneConfig, StudyConfig, get_field
from .errors import LoratuneError
from .schema import Origin, unknown_field_message

# ---------------------------------------------------------------------------------------------
# Value rules beyond types


def _finetune_checks(cfg: FinetuneConfig) -> list[tuple[str, bool, str]]:
    t, lo, d = cfg.training, cfg.lora, cfg.data
    return [
        ("lora.rank", lo.rank >= 1, "must be a positive integer"),
        ("lora.alpha", lo.alpha > 0, "must be > 0"),
        ("lora.dropout", 0 <= lo.dropout < 1, "must be in [0, 1)"),
        ("lora.target_modules", (isinstance(lo.target_modules, str) and bool(lo.target_modules.strip())) or (
            isinstance(lo.target_modules, list) and lo.target_modules and all(m.strip() for m in lo.target_modules)),
         "must be 'all-linear', a regular expression over module names, or a non-empty list of module names"),
        ("data.validation_size", d.validation_size > 0, "must be > 0"),
        ("data.test_size", d.test_size >= 0, "must be >= 0 (0: no test split held out)"),
        ("data.test_split", not (d.test_split and d.test_path), "give one test source, data.test_path or data.test_split"),
        ("data.test_size", not (d.test_size and (d.test_path or d.test_split)),
         "give one test source: data.test_size holds rows out, data.test_path or data.test_split names them"),
        ("data.test_split", d.test_split is None or d.test_split not in (d.split, d.validation_split),
         "must be a split of its own, not the training or validation split"),
        ("data.max_length", d.max_length >= 8, "must be at least 8 tokens"),
        ("data.columns", d.columns is None or all(isinstance(k, str) and isinstance(v, str) and v
                                                  for k, v in d.columns.items()),
         "must map loratune's column names to your column names, e.g. {prompt: question}"),
        ("training.epochs", t.epochs > 0, "must be > 0"),
        ("training.learning_rate", t.learning_rate > 0, "must be > 0"),
        ("training.batch_size", t.batch_size >= 1, "must be a positive integer"),
        ("training.gradient_accumulation", t.gradient_accumulation == "auto" or t.gradient_accumulation >= 1,
         "must be 'auto' or a positive integer"),
        ("training.effective_batch_size", t.effective_batch_size >= 1, "must be a positive integer"),
        ("training.warmup_ratio", 0 <= t.warmup_ratio < 1, "must be in [0, 1)"),
        ("training.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("training.max_grad_norm", t.max_grad_norm >= 0, "must be >= 0"),
        ("training.seed", 0 <= t.seed < 2**32, "must be in [0, 2**32)"),
        ("training.eval_points", t.eval_points is None or t.eval_points >= 1, "must be a positive integer or null"),
        ("training.eval_batch_size", t.eval_batch_size >= 1, "must be a positive integer"),
        ("training.eval_subset", t.eval_subset > 0, "must be > 0 (a share up to 1, or a count)"),
    ]


def validate(cfg: FinetuneConfig, origin: Origin | None = None) -> FinetuneConfig:
    origin = origin or Origin()
    for name, ok, rule in _finetune_checks(cfg):
        if not ok:
            raise LoratuneError(f"{origin.at(name)}: {rule}, got {get_field(cfg, name)!r}")
    return cfg


OUTCOME_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
KNOWN_METRICS = ("loss", "inference_time", "train_time", "peak_memory_gb", "trainable_params", "train_loss", "tokens_per_s")


def needed_metrics(cfg: StudyConfig) -> list[str]:
    """The metrics a study needs of every trial: its objectives, then those its outcome constraints bound
    (each once, in that order). Constraints not yet checked (``validate_study``) that do not parse are left out."""
    bounded = (m.group(1) for c in cfg.outcome_constraints if (m := OUTCOME_CONSTRAINT.match(c)))
    return list(dict.fromkeys([*cfg.objectives, *bounded]))


def may_change_on_resume(dotted: str) -> bool:
    """The resume policy: how a study's trials run may change when it resumes, what they measure may not.
    Each study field says which it is (``config.setting(resume=...)``); the sections never may."""
    f = StudyConfig.__dataclass_fields__.get(dotted.split(".")[0])
    return bool(f is not None and f.metadata.get("resume"))


def resumable_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(StudyConfig) if f.metadata.get("resume")]


def requested_scores(cfg: StudyConfig, scorer_names: Iterable[str] = (), finetune: bool = True) -> list[str]:
    """The task scores a study computes: ``scoring.scores``, and every score an objective or an outcome
    constraint names (a built-in one, one of ``scoring.scorers``, or one given to the API). The demo data
    brings its own, as it brings its validation and test splits: ``plan_accuracy``, for fine-tune studies."""
    from .scoring import BUILTIN

    known = {*BUILTIN, *cfg.scoring.scorers, *scorer_names}
    named = [*cfg.scoring.scores, *needed_metrics(cfg)]
    scores = list(dict.fromkeys(n for n in named if n in known or n in cfg.scoring.scores))
    if not scores and finetune and cfg.data.path == DEMO_TRAIN:
        scores = ["plan_accuracy"]
    return scores


def early_stopping_checks(es: EarlyStoppingConfig) -> list[tuple[str, bool, str]]:
    """The early-stopping section's rules, as (field, holds, rule): a study's config and the API's
    ``EarlyStoppingCallback`` are checked by these same ones."""
    return [("check_at", 0 < es.check_at <= 1, "must be in (0, 1]"),
            ("percentile", es.percentile is None or 0 < es.percentile < 100, "must be in (0, 100)"),
            ("min_progression", 0 <= es.min_progression <= 1, "must be in [0, 1]"),
            ("min_curves", es.min_curves >= 1, "must be at least 1")]


def check_early_stopping(es: EarlyStoppingConfig, where: str) -> None:
    """Raise LoratuneError, naming ``where`` and the field, at the first rule ``es`` breaks."""
    for name, ok, rule in early_stopping_checks(es):
        if not ok:
            raise LoratuneError(f"{where}: {name}: {rule}, got {getattr(es, name)!r}")


def validate_study(cfg: StudyConfig, origin: Origin | None = None, custom_metrics: bool = False,
                   scorer_names: Iterable[str] = ()) -> StudyConfig:
    """Check a study config once; ``custom_metrics`` (or a ``command``) allows any metric name: the user's
    own evaluation measures what it likes. ``scorer_names``: scores given to the API as functions."""
    from .scoring import BUILTIN

    origin = origin or Origin()
    custom_metrics = custom_metrics or bool(cfg.command)
    known_metrics = (*KNOWN_METRICS, "generation_s", *BUILTIN, *cfg.scoring.scorers, *scorer_names)
    es, sc = cfg.early_stopping, cfg.scoring
    checks = [
        ("trials", cfg.trials >= 1, "must be at least 1"),
        ("seed", cfg.seed is None or 0 <= cfg.seed < 2**32, "must be in [0, 2**32) or null"),
        ("workers", cfg.workers >= 1, "must be at least 1"),
        ("gpus_per_trial", cfg.gpus_per_trial >= 1, "must be at least 1"),
        ("trials_per_worker", cfg.trials_per_worker >= 1, "must be at least 1"),
        ("pack", cfg.pack == "auto" or cfg.pack >= 1, "must be a positive integer or auto"),
        ("max_failures_in_a_row", cfg.max_failures_in_a_row >= 1, "must be at least 1"),
        ("retrain_epochs", cfg.retrain_epochs > 0, "must be > 0"),
        ("init_trials", cfg.init_trials is None or cfg.init_trials >= 1, "must be at least 1"),
        ("trial_timeout", cfg.trial_timeout is None or cfg.trial_timeout > 0, "must be > 0 seconds or null"),
        ("command", cfg.command is None or bool(cfg.command.strip()), "must be a command or null, not empty"),
        ("gpus", cfg.gpus is None or (cfg.gpus and all(re.fullmatch(r"\d+|GPU-[0-9a-fA-F-]+|MIG-[\w/-]+", g.strip())
                                                       for g in cfg.gpus)),
         "must list GPU indices such as 0,1 (or GPU UUIDs)"),
        ("objectives", len(cfg.objectives) >= 1, "needs at least one metric"),
        ("minimize", len(cfg.minimize) == len(cfg.objectives), f"needs one flag per objective ({len(cfg.objectives)})"),
        *((f"early_stopping.{name}", ok, rule) for name, ok, rule in early_stopping_checks(es)),
        ("scoring.subset", sc.subset >= 0, "must be >= 0 (0: no answers generated during the search)"),
        ("scoring.max_new_tokens", sc.max_new_tokens is None or sc.max_new_tokens >= 1, "must be a positive integer or null"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise LoratuneError(f"{origin.at(name)}: {rule}, got {get_field(cfg, name)!r}")
    if es.threshold == "baseline" and not cfg.baseline:
        raise LoratuneError(f"{origin.at('early_stopping.threshold')}: 'baseline' compares with the baseline "
                            "trial, which is off (baseline: false)")
    if len(set(cfg.objectives)) != len(cfg.objectives):
        raise LoratuneError(f"{origin.at('objectives')}: an objective is named twice: {cfg.objectives}")
    for text in cfg.outcome_constraints:
        match = OUTCOME_CONSTRAINT.match(text)
        if not match:
            raise LoratuneError(f"{origin.at('outcome_constraints')}: '{text}' is not 'metric <= number' or "
                                "'metric >= number'")
        if not custom_metrics and match.group(1) not in known_metrics:
            raise LoratuneError(f"{origin.at('outcome_constraints')}: "
                                f"{unknown_field_message(match.group(1), known_metrics)}: not a metric loratune measures")
        if match.group(1) in cfg.objectives:
            raise LoratuneError(f"{origin.at('outcome_constraints')}: '{match.group(1)}' is already an objective")
    if not custom_metrics:
        for name in cfg.objectives:
            if name not in known_metrics:
                raise LoratuneError(f"{origin.at('objectives')}: {unknown_field_message(name, known_metrics)}: "
                                    f"not a metric loratune measures ({', '.join(known_metrics)})")
    _check_scoring(cfg, origin, custom_metrics, scorer_names)
    validate(cfg.base(), origin)
    return cfg


def _check_scoring(cfg: StudyConfig, origin: Origin, custom_metrics: bool, scorer_names: Iterable[str]) -> None:
    from .scoring import BUILTIN

    sc = cfg.scoring
    for name in sc.scores:
        if name not in {*BUILTIN, *sc.scorers, *scorer_names}:
            raise LoratuneError(f"{origin.at('scoring.scores')}: {unknown_field_message(name, [*BUILTIN, *sc.scorers])}: "
                                f"not a built-in score ({', '.join(BUILTIN)}) nor one of scoring.scorers")
    for name in sc.scorers:
        if name in KNOWN_METRICS or name == "generation_s" or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LoratuneError(f"{origin.at('scoring.scorers')}: '{name}' cannot name a score (a metric of that name "
                                "exists, or it is not an identifier)")
    scores = requested_scores(cfg, scorer_names, finetune=not custom_metrics)
    if scores and custom_metrics:
        raise LoratuneError(f"{origin.at('scoring')}: task scores ({', '.join(scores)}) score loratune's own fine-tunes; "
                            "a Python evaluate or a --command returns its own metrics")
    optimized = [n for n in needed_metrics(cfg) if n in scores]
    if optimized and sc.subset == 0:
        raise LoratuneError(f"{origin.at('scoring.subset')}: 0 answers no validation prompt during the search, so "
                            f"trials have no {optimized[0]} to optimize; give it a number of prompts")


