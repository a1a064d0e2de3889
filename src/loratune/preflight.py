"""Everything that can be checked before a study deletes or starts anything: the output directory,
the evaluation (a Python function, a command, or loratune's trainer with its model and data) and the
executor. Each problem is one ``LoratuneError`` line naming what is wrong and where."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path

from .checkpoint import StudyPaths
from .config import FinetuneConfig, StudyConfig
from .errors import LoratuneError
from .executors.command import check_command
from .search_space import SearchSpace
from .settings import Origin


def check_output(paths: StudyPaths, output: str | Path) -> None:
    """The study directory can be created and written, and the results file is a JSON file there."""
    out = Path(output)
    if out.exists() and out.is_file() and out.suffix != ".json":
        raise LoratuneError(f"--output: {out} is an existing file that is not a results file (.json); "
                            "give a directory or a .json path")
    if paths.results.is_dir():
        raise LoratuneError(f"--output: {paths.results} is a directory, not a results file")
    directory = paths.directory
    existing = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LoratuneError(f"--output: {existing} is a file, so the study's directory {directory} cannot be made")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise LoratuneError(f"--output: {existing} is not writable")


def check_evaluation(cfg: StudyConfig, space: SearchSpace, evaluate: Callable | None) -> None:
    """A Python function must be callable; a command must run; Ray runs loratune's own trainer only."""
    if evaluate is not None and not callable(evaluate):
        raise LoratuneError(f"evaluate: expected a function of the parameters, got {type(evaluate).__name__} {evaluate!r}")
    if evaluate is not None and cfg.command:
        raise LoratuneError("evaluate and command: give one way to evaluate a trial, not both")
    if cfg.command:
        check_command(cfg.command, space.names)
    if cfg.tracking == "mlflow":
        from .tracking import check_available

        check_available()
    if cfg.executor == "ray":
        if evaluate is not None or cfg.command:
            raise LoratuneError("executor: Ray runs loratune's fine-tune trials; a Python evaluate or --command "
                                "runs with the local executor")
        try:
            import ray  # noqa: F401
        except ImportError:
            raise LoratuneError("executor: ray needs Ray: pip install 'loratune[ray]'") from None


def check_training_inputs(cfg: FinetuneConfig, space: SearchSpace | None = None, origin: Origin | None = None) -> None:
    """The model resolves, the data loads and renders with its chat template, and the model checks
    pass (``check_model``): what would otherwise fail every trial, one by one."""
    from .data import load_examples
    from .model import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    load_examples(tokenizer, cfg.data, cfg.training.seed)
    check_model(cfg, space, origin)


def check_model(cfg: FinetuneConfig, space: SearchSpace | None = None, origin: Origin | None = None) -> None:
    """Quantized loading runs on this machine, and the adapter's target modules exist in the model."""
    from .model import check_quantization

    kinds = {cfg.model.quantization} | {v for p in (space.params if space else []) if p.target == "model.quantization"
                                        for v in p.candidates()}
    for kind in sorted(kinds):
        check_quantization(kind, (origin or Origin()).at("model.quantization"))
    check_adapter_targets(cfg, space, origin)


def check_adapter_targets(cfg: FinetuneConfig, space: SearchSpace | None = None, origin: Origin | None = None) -> None:
    """Every target module the adapter names exists in the model (peft itself ignores a misspelt one as
    long as another name matches)."""
    from .model import module_names

    targets = [cfg.lora.target_modules]
    if space is not None:
        targets += [v for p in space.params if p.target == "lora.target_modules" for v in p.candidates()]
    lists = [t for t in targets if isinstance(t, list)]
    patterns = [t for t in targets if isinstance(t, str) and t != "all-linear"]
    if lists or patterns:
        modules = module_names(cfg)
        at = (origin or Origin()).at("lora.target_modules")
        check_target_modules([m for t in lists for m in t], modules, at)
        for pattern in patterns:  # peft reads a single string as a regular expression over module names
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise LoratuneError(f"{at}: '{pattern}' is not a valid regular expression: {exc}") from None
            if not any(regex.fullmatch(m) for m in modules):
                raise LoratuneError(f"{at}: the pattern '{pattern}' matches no module of the model; "
                                    "give 'all-linear' or a list of names such as [q_proj, v_proj]")


def check_target_modules(wanted: list[str], modules: list[str], at: str = "lora.target_modules") -> None:
    """Each name must match a module as peft matches them (the whole name, or its last dotted parts)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if n})
    for name in wanted:
        if not any(m == name or m.endswith("." + name) for m in modules):
            close = difflib.get_close_matches(name, leaves, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            linear = [n for n in leaves if n.endswith("proj") or n in ("fc1", "fc2", "c_attn", "c_proj", "query", "value")]
            raise LoratuneError(f"{at}: no module named '{name}' in the model; {hint}"
                                f"its modules include {', '.join(linear[:8] or leaves[:8])}")
