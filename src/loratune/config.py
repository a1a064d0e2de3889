"""Typed configuration: nested dataclasses, loaded from YAML and validated once.

Every field has a docstring-like comment in ``docs``/README; errors name the file and the dotted
field (``configs/x.yaml: training.learning_rate: must be > 0, got 0``) and suggest the closest
name for a misspelt one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import LoratuneError, where

DEMO_MODEL = "builtin:tiny-qwen2"
DEMO_TRAIN = "builtin:ai_director_train"
DEMO_VALIDATION = "builtin:ai_director_validation"


@dataclass
class ModelConfig:
    name: str = DEMO_MODEL
    """Hugging Face hub id, local directory, or ``builtin:tiny-qwen2`` (the offline demo model)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; ``auto`` follows the chosen precision (bf16/fp16 on GPU, fp32 on CPU)."""
    trust_remote_code: bool = False
    """Run code shipped with the model repository. Off unless you trust it."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the base model quantized with bitsandbytes (QLoRA); CUDA only."""
    gradient_checkpointing: bool = False
    """Trade compute for memory: recompute activations in the backward pass."""


@dataclass
class LoraConfig:
    rank: int = 16
    """LoRA rank r: the width of the low-rank update."""
    alpha: float = 32
    """LoRA alpha: the update is scaled by alpha/rank (alpha/sqrt(rank) with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: ``all-linear`` or a list of names such as ``[q_proj, v_proj]``."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(rank)."""


@dataclass
class DataConfig:
    path: str = DEMO_TRAIN
    """Training data: a .jsonl/.json/.csv file, or ``builtin:ai_director_train``."""
    format: Literal["auto", "chat", "instruction", "completion"] = "auto"
    """Row form: chat (``messages``), instruction (``instruction``/``input``/``output``) or
    completion (``prompt``/``completion``); ``auto`` detects it from the columns."""
    validation_path: str | None = DEMO_VALIDATION
    """Validation data in the same form; when null, a split of the training data is held out."""
    validation_size: float = 0.2
    """Held-out share (< 1) or count (>= 1) of the training data when no validation file is given."""
    max_length: int = 512
    """Longest tokenized example; longer responses are truncated. A prompt longer than this is an error."""
    system_prompt: str | None = None
    """System message prepended to instruction/completion rows rendered with a chat template."""


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    """Passes over the training data; fractions such as 0.5 are allowed."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""
    batch_size: int = 1
    """Examples per device per forward pass."""
    gradient_accumulation: int | Literal["auto"] = "auto"
    """Forward passes per optimizer step; ``auto`` keeps batch_size x accumulation at effective_batch_size."""
    effective_batch_size: int = 4
    """Target examples per optimizer step when gradient_accumulation is ``auto``."""
    optimizer: Literal["adamw"] = "adamw"
    """Optimizer (AdamW, decoupled weight decay)."""
    warmup_ratio: float = 0.1
    """Share of optimizer steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables it)."""
    seed: int = 42
    """Seed for weights of the adapter, data order and the validation split."""
    eval_points: int = 10
    """Validation loss is computed this many times, evenly spread over training (the learning curve)."""
    eval_batch_size: int = 8
    """Examples per forward pass when computing validation loss."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision; ``auto``: bf16 where the GPU supports it, fp16 with loss scaling otherwise, fp32 on CPU."""


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output_dir: str = "runs/finetune"
    """Where the adapter and metrics.json go. An existing run there is never overwritten."""
    save_adapter: bool = True
    """Write the trained LoRA adapter (adapter_model.safetensors) to output_dir/adapter."""


SECTIONS = ("model", "lora", "data", "training")


def seed_search_space() -> dict:
    """The seed's four parameters, types and ranges."""
    return {
        "lora_rank": [8, 16, 32, 64],
        "lora_alpha": [16, 32, 64, 128],
        "learning_rate": [1.0e-5, 5.0e-4],
        "batch_size": [1, 2, 4],
    }


@dataclass
class EarlyStoppingConfig:
    threshold: float | Literal["baseline"] | None = None
    """Stop a trial whose validation loss is above this once it has done ``check_at`` of its training;
    ``baseline``: above the baseline trial's loss at the same point of its training."""
    check_at: float = 0.1
    """Share of training (0, 1] after which the threshold rule is applied."""
    percentile: float | None = None
    """Ax learning-curve stopping: stop a trial whose loss is worse than this percentile of the other
    trials at the same point (e.g. 50). Off when null."""
    min_progression: float = 0.3
    """Share of training a trial must reach before the percentile rule looks at it."""
    min_curves: int = 5
    """Trials with curves at a point needed before the percentile rule compares against them."""


@dataclass
class StudyConfig:
    trials: int = 20
    """Trials to run in all, the baseline included."""
    seed: int | None = 0
    """Seed of the search (Ax) and of every trial's training; null for a random search seed."""
    search_space: dict = field(default_factory=seed_search_space)
    """Parameter -> range ``[low, high]`` (floats), choice ``[a, b, c]``, fixed ``[v]``, or a mapping
    ``{low, high, log}`` / ``{values: [...]}``. Names are training-config fields."""
    constraints: list[str] = field(default_factory=list)
    """Parameter constraints, linear or a product: ``lora_rank * batch_size <= 128``."""
    objectives: list[str] = field(default_factory=lambda: ["loss"])
    """Metrics to optimize: loss, inference_time, train_time, peak_memory_gb, trainable_params."""
    minimize: list[bool] = field(default_factory=lambda: [True])
    """One flag per objective."""
    outcome_constraints: list[str] = field(default_factory=list)
    """Bounds on measured metrics, e.g. ``peak_memory_gb <= 15``."""
    baseline: bool = True
    """Run the current config (the training section's values of the searched parameters) first."""
    init_trials: int | None = None
    """Quasi-random trials before Bayesian optimization starts; null lets Ax decide."""
    workers: int = 1
    """Trials running at once."""
    gpus_per_trial: int = 1
    """GPUs handed to each trial (CUDA_VISIBLE_DEVICES) when the machine has GPUs."""
    gpus: list[str] | None = None
    """Which local GPUs trials may use (ids as CUDA_VISIBLE_DEVICES takes them); null: all visible."""
    executor: Literal["local", "ray"] = "local"
    """Where trials run: child processes here, or Ray tasks on a cluster."""
    ray_address: str | None = None
    """Ray cluster to join (e.g. ``ray://head:10001`` or ``auto``); null starts Ray on this machine."""
    shared_dir: str | None = None
    """With Ray: a path every node shares where trials write their files; null ships them back to the driver."""
    max_failures_in_a_row: int = 3
    """Stop the study after this many failed trials in a row."""
    keep_adapters: Literal["best", "all", "none"] = "best"
    """Which trial adapters to keep on disk."""
    retrain_epochs: float = 3
    """Epochs written into best_config.yaml for the full retrain."""
    report: bool = True
    """Write OPTIMIZATION_RESULTS.md and its plots when the study ends."""
    command: str | None = None
    """External training command with {parameter} placeholders; its last JSON line holds the metrics."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def base(self) -> FinetuneConfig:
        """The fixed parameters: the training config every trial starts from."""
        return FinetuneConfig(model=self.model, lora=self.lora, data=self.data, training=self.training)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the field


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return value as type tp, or raise ValueError. Ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
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
                return _coerce(value, arg)
            except ValueError:
                pass
        raise ValueError
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
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
                return float(value)
            except ValueError:
                raise ValueError from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise TypeError(f"unsupported config type {tp}")


def unknown_field_message(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field '{name}'{hint}"


def build(cls: type, data: Any, source: str | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types field by field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LoratuneError(f"{where(source, prefix.rstrip('.') or 'config')}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise LoratuneError(f"{where(source, prefix.rstrip('.') or 'config')}: {unknown_field_message(str(key), fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, source, f"{dotted}.")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except ValueError:
            raise LoratuneError(f"{where(source, dotted)}: expected {_type_name(tp)}, got {value!r}") from None
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


# ---------------------------------------------------------------------------------------------
# Value checks beyond types


def _checks(cfg: FinetuneConfig) -> list[tuple[str, bool, str]]:
    t, lo, d = cfg.training, cfg.lora, cfg.data
    return [
        ("lora.rank", lo.rank >= 1, "must be a positive integer"),
        ("lora.alpha", lo.alpha > 0, "must be > 0"),
        ("lora.dropout", 0 <= lo.dropout < 1, "must be in [0, 1)"),
        ("data.validation_size", d.validation_size > 0, "must be > 0"),
        ("data.max_length", d.max_length >= 8, "must be at least 8 tokens"),
        ("training.epochs", t.epochs > 0, "must be > 0"),
        ("training.learning_rate", t.learning_rate > 0, "must be > 0"),
        ("training.batch_size", t.batch_size >= 1, "must be a positive integer"),
        ("training.gradient_accumulation", t.gradient_accumulation == "auto" or t.gradient_accumulation >= 1,
         "must be 'auto' or a positive integer"),
        ("training.effective_batch_size", t.effective_batch_size >= 1, "must be a positive integer"),
        ("training.warmup_ratio", 0 <= t.warmup_ratio < 1, "must be in [0, 1)"),
        ("training.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("training.max_grad_norm", t.max_grad_norm >= 0, "must be >= 0"),
        ("training.eval_points", t.eval_points >= 1, "must be a positive integer"),
        ("training.eval_batch_size", t.eval_batch_size >= 1, "must be a positive integer"),
    ]


def validate(cfg: FinetuneConfig, source: str | None = None) -> FinetuneConfig:
    for name, ok, rule in _checks(cfg):
        if not ok:
            value = get_field(cfg, name)
            raise LoratuneError(f"{where(source, name)}: {rule}, got {value!r}")
    return cfg


def get_field(obj: Any, dotted: str) -> Any:
    """``get_field(cfg, "training.learning_rate")``."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# Files


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; read it as the number everyone means."""


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
    """Read a YAML mapping; a missing file or a syntax error is one LoratuneError line."""
    path = Path(path)
    if not path.is_file():
        raise LoratuneError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LoratuneError(f"{path}{at}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoratuneError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def finetune_config_from_dict(data: dict, source: str | None = None) -> FinetuneConfig:
    return validate(build(FinetuneConfig, data, source), source)


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """Load and validate a training config file (``loratune finetune --config``)."""
    return finetune_config_from_dict(read_yaml(path), str(path))


def dump_yaml(data: dict, header: str = "") -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return header + body


OUTCOME_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
KNOWN_METRICS = ("loss", "inference_time", "train_time", "peak_memory_gb", "trainable_params", "train_loss", "tokens_per_s")


def validate_study(cfg: StudyConfig, source: str | None = None, custom_metrics: bool = False) -> StudyConfig:
    """Check a study config once; ``custom_metrics`` allows any metric name (a user's own evaluation)."""
    es = cfg.early_stopping
    checks = [
        ("trials", cfg.trials >= 1, "must be at least 1"),
        ("workers", cfg.workers >= 1, "must be at least 1"),
        ("gpus_per_trial", cfg.gpus_per_trial >= 1, "must be at least 1"),
        ("max_failures_in_a_row", cfg.max_failures_in_a_row >= 1, "must be at least 1"),
        ("retrain_epochs", cfg.retrain_epochs > 0, "must be > 0"),
        ("init_trials", cfg.init_trials is None or cfg.init_trials >= 1, "must be at least 1"),
        ("objectives", len(cfg.objectives) >= 1, "needs at least one metric"),
        ("minimize", len(cfg.minimize) == len(cfg.objectives),
         f"needs one flag per objective ({len(cfg.objectives)})"),
        ("early_stopping.check_at", 0 < es.check_at <= 1, "must be in (0, 1]"),
        ("early_stopping.percentile", es.percentile is None or 0 < es.percentile < 100, "must be in (0, 100)"),
        ("early_stopping.min_progression", 0 <= es.min_progression <= 1, "must be in [0, 1]"),
        ("early_stopping.min_curves", es.min_curves >= 1, "must be at least 1"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise LoratuneError(f"{where(source, name)}: {rule}, got {get_field(cfg, name)!r}")
    if es.threshold == "baseline" and not cfg.baseline:
        raise LoratuneError(f"{where(source, 'early_stopping.threshold')}: 'baseline' compares with the baseline "
                            "trial, which is off (baseline: false)")
    if len(set(cfg.objectives)) != len(cfg.objectives):
        raise LoratuneError(f"{where(source, 'objectives')}: an objective is named twice: {cfg.objectives}")
    for text in cfg.outcome_constraints:
        match = OUTCOME_CONSTRAINT.match(text)
        if not match:
            raise LoratuneError(f"{where(source, 'outcome_constraints')}: '{text}' is not 'metric <= number' or "
                                "'metric >= number'")
        if not custom_metrics and match.group(1) not in KNOWN_METRICS:
            raise LoratuneError(f"{where(source, 'outcome_constraints')}: "
                                f"{unknown_field_message(match.group(1), KNOWN_METRICS)}: not a metric loratune measures")
        if match.group(1) in cfg.objectives:
            raise LoratuneError(f"{where(source, 'outcome_constraints')}: '{match.group(1)}' is already an objective")
    if not custom_metrics:
        for name in cfg.objectives:
            if name not in KNOWN_METRICS:
                raise LoratuneError(f"{where(source, 'objectives')}: {unknown_field_message(name, KNOWN_METRICS)}: "
                                    f"not a metric loratune measures ({', '.join(KNOWN_METRICS)})")
    validate(cfg.base(), source)
    return cfg


def load_study_config(path: str | Path | None, custom_metrics: bool = False) -> StudyConfig:
    """Load an optimization config (``--config``); None gives the embedded default, the demo."""
    if path is None:
        return validate_study(StudyConfig(), None, custom_metrics)
    return validate_study(build(StudyConfig, read_yaml(path), str(path)), str(path), custom_metrics)
