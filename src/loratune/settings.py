"""Settings in, typed configs out: YAML files, ``--set section.field=value`` overrides, command-line
flags and API keyword arguments all pass through the same build-and-validate code.

Every error names where the bad value came from and the dotted field: ``cfg.yaml: training.epochs:
must be > 0, got 0.0``, ``--set: lora.rank: expected an integer, got 'big'``,
``run_optimization(workers=...): workers: expected an integer, got '4'``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import DEMO_TRAIN, SECTIONS, FinetuneConfig, StudyConfig, get_field, to_dict
from .errors import LoratuneError
from .textfile import read_text


@dataclass
class Origin:
    """Where each setting came from: a file by default, a flag or an argument for overridden fields."""

    default: str | None = None
    fields: dict[str, str] = field(default_factory=dict)  # dotted field (or section) -> label

    def label(self, dotted: str) -> str | None:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.fields:
                return self.fields[".".join(parts[:n])]
        return self.default

    def at(self, dotted: str) -> str:
        """``"cfg.yaml: training.epochs"``, ``"--set: lora.rank"``, ``"--seed"`` or just the field."""
        label = self.label(dotted)
        if label and label.lstrip("-").replace("-", "_") == dotted:  # --seed, workers=: the label is the field
            return label
        return f"{label}: {dotted}" if label else dotted


# ---------------------------------------------------------------------------------------------
# Values


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {' to '.join(_type_name(a).removeprefix('a ').removeprefix('an ') + 's' for a in typing.get_args(tp))}"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(tp, str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Return value as type tp, or raise ValueError. Ints are accepted where floats are; a float is
    never infinite or NaN; a whole float is accepted where an int is."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ValueError
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except ValueError:
                pass
        raise ValueError
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError
        key_type, value_type = typing.get_args(tp)
        return {coerce(k, key_type): coerce(v, value_type) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError
        return [coerce(v, typing.get_args(tp)[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError from None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise TypeError(f"unsupported config type {tp}")


def unknown_field_message(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field '{name}'{hint}"


def build(cls: type, data: Any, origin: Origin, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types field by field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LoratuneError(f"{origin.at(prefix.rstrip('.') or 'config')}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise LoratuneError(f"{origin.at(prefix.rstrip('.') or 'config')}: {unknown_field_message(str(key), fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, origin, f"{dotted}.")
            continue
        try:
            kwargs[key] = coerce(value, tp)
        except ValueError:
            raise LoratuneError(f"{origin.at(dotted)}: expected {_type_name(tp)}, got {value!r}") from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Overrides: --set, command-line flags, API keyword arguments


def parse_assignment(text: str) -> tuple[str, Any]:
    """``training.learning_rate=1e-4`` -> (``training.learning_rate``, 0.0001): the value is read as YAML,
    so lists, booleans, null and numbers mean what they mean in a config file."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise LoratuneError(f"--set: expected section.field=value, got '{text}'")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return name.strip(), value


def _check_path(cls: type, dotted: str, label: str) -> None:
    """``dotted`` names a field (or a section) of ``cls``; a misspelt one gets the closest name."""
    obj_cls, parts = cls, dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj_cls)}
        if part not in names:
            known = [".".join([*parts[:i], n]) for n in names]
            raise LoratuneError(f"{label}: {unknown_field_message('.'.join(parts[:i + 1]), known)}")
        tp = typing.get_type_hints(obj_cls)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise LoratuneError(f"{label}: {'.'.join(parts[:i + 1])} has no fields")
            obj_cls = tp


def override(data: dict, cls: type, dotted: str, value: Any, label: str, origin: Origin) -> None:
    """Set ``dotted`` in the plain settings ``data`` (to be built as ``cls``), remembering ``label`` as
    where the value came from. A section given as a mapping sets each of its fields."""
    _check_path(cls, dotted, label)
    target = get_field_type(cls, dotted)
    if dataclasses.is_dataclass(target) and isinstance(value, dict):
        for key, inner in value.items():
            override(data, cls, f"{dotted}.{key}", inner, label, origin)
        return
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    origin.fields[dotted] = label


def get_field_type(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


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
        ("early_stopping.check_at", 0 < es.check_at <= 1, "must be in (0, 1]"),
        ("early_stopping.percentile", es.percentile is None or 0 < es.percentile < 100, "must be in (0, 100)"),
        ("early_stopping.min_progression", 0 <= es.min_progression <= 1, "must be in [0, 1]"),
        ("early_stopping.min_curves", es.min_curves >= 1, "must be at least 1"),
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


# ---------------------------------------------------------------------------------------------
# Files


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string: read it as the number everyone means. A key given
    twice in one mapping is an error, not a silent "last one wins"."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice in one mapping", mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing, unreadable or malformed file is one LoratuneError line."""
    path = Path(path)
    if not path.is_file():
        raise LoratuneError(f"{path}: config file not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        text = read_text(path, str(path))  # UTF-8 as editors save it (a byte-order mark, CRLF), else one line
    except OSError as exc:
        raise LoratuneError(f"{path}: cannot read it: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LoratuneError(f"{path}{at}: invalid YAML: {problem}") from None
    if data is None:
        raise LoratuneError(f"{path}: holds no settings (the file is empty or only comments); write the settings to "
                            "change, or leave --config out for the defaults")
    if not isinstance(data, dict):
        raise LoratuneError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def dump_yaml(data: dict, header: str = "") -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return header + body


Override = tuple[str, Any, str]  # (dotted field, value, where it came from: "--set", "--trials", ...)


def _settings(cls: type, config: str | Path | Any | None, overrides: Iterable[Override]) -> tuple[Any, Origin]:
    if config is None or dataclasses.is_dataclass(config):
        data, origin = (copy.deepcopy(to_dict(config)) if config is not None else {}), Origin()
    else:
        data, origin = read_yaml(config), Origin(str(config))
    for dotted, value, label in overrides:
        override(data, cls, dotted, value, label, origin)
    return build(cls, data, origin), origin


def load_study_config(config: str | Path | StudyConfig | None = None, overrides: Iterable[Override] = (),
                      custom_metrics: bool = False, scorer_names: Iterable[str] = ()) -> tuple[StudyConfig, Origin]:
    """An optimization config: a YAML file (None: the embedded default, the demo) or a StudyConfig,
    with overrides applied, built and validated once. Returns the config and where each setting came from."""
    cfg, origin = _settings(StudyConfig, config, overrides)
    return validate_study(cfg, origin, custom_metrics, scorer_names), origin


def load_finetune_config(config: str | Path | FinetuneConfig, overrides: Iterable[Override] = ()) -> FinetuneConfig:
    """A training config (``loratune finetune --config``), with overrides applied, validated once."""
    cfg, origin = _settings(FinetuneConfig, config, overrides)
    return validate(cfg, origin)


def finetune_config_from_dict(data: dict, source: str | None = None) -> FinetuneConfig:
    return validate(build(FinetuneConfig, data, Origin(source)), Origin(source))


def section_fields() -> dict[str, list[str]]:
    """The training config's field names per section: ``{"lora": ["rank", ...], ...}``."""
    return {s: [f.name for f in dataclasses.fields(getattr(FinetuneConfig(), s))] for s in SECTIONS}
