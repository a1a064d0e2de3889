"""Everything that can be checked before a study deletes or starts anything: the output directory,
the evaluation (a Python function, a command, or loratune's trainer with its model and data) and the
executor. Each problem is one ``LoratuneError`` line naming what is wrong and where."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from .checkpoint import StudyPaths
from .config import SECTIONS, FinetuneConfig, StudyConfig
from .errors import LoratuneError
from .executors.command import check_command
from .schema import Origin
from .scoring import Scorer
from .search_space import SearchSpace
from .storage import check_creatable


def check_output(paths: StudyPaths, output: str | Path) -> None:
    """The study directory can be created and written, and the results file is a JSON file there."""
    out = Path(output)
    if out.exists() and out.is_file() and out.suffix != ".json":
        raise LoratuneError(f"--output: {out} is an existing file that is not a results file (.json); "
                            "give a directory or a .json path")
    if paths.results.is_dir():
        raise LoratuneError(f"--output: {paths.results} is a directory, not a results file")
    check_creatable(paths.directory, "--output")
    check_no_foreign_files(paths, "--output")


def check_no_foreign_files(paths: StudyPaths, where: str) -> None:
    """Nothing of the names a study writes lies there unless a loratune study wrote it: neither a study
    nor ``--overwrite`` replaces a user's own files."""
    foreign = paths.foreign_files()
    if foreign:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in foreign)
        them = "it" if len(foreign) == 1 else "them"
        raise LoratuneError(f"{where}: {paths.directory} holds {names}, which no loratune study wrote, and a study would "
                            f"replace {them} (--overwrite too); move {them}, or choose another --output")


def check_evaluation(cfg: StudyConfig, space: SearchSpace, evaluate: Callable | None, origin: Origin | None = None) -> None:
    """A Python function must be callable; a command must run; Ray runs loratune's own trainer only; a
    fine-tune setting given to a study of the user's own evaluation must reach it."""
    if evaluate is not None and not callable(evaluate):
        raise LoratuneError(f"evaluate: expected a function of the parameters, got {type(evaluate).__name__} {evaluate!r}")
    if evaluate is not None and cfg.command:
        raise LoratuneError("evaluate and command: give one way to evaluate a trial, not both")
    if cfg.command:
        check_command(cfg.command, space.names)
    if evaluate is not None or cfg.command:
        _check_settings_reach_the_evaluation(space, origin or Origin(), "a --command study trains what its command "
                                             "trains" if cfg.command else "evaluate= trains what the function trains")
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


def _check_settings_reach_the_evaluation(space: SearchSpace, origin: Origin, why: str) -> None:
    """A fine-tune setting given as a flag, ``--set`` or an argument (``--model``, ``--set lora.dropout=0``)
    configures loratune's own trainer, which a study of the user's own evaluation never runs: refuse it
    rather than drop it unsaid. A searched setting stays: its given value is the baseline's."""
    searched = {p.target for p in space.params}
    for dotted in origin.fields:
        if dotted.split(".")[0] in SECTIONS and dotted not in searched:
            raise LoratuneError(f"{origin.at(dotted)}: {why}, so this setting would not reach it; give it to "
                                "the trial's own code, or search it (search_space)")


def check_training_inputs(cfg: FinetuneConfig, space: SearchSpace | None = None, origin: Origin | None = None,
                          trials_run_here: bool = True) -> list[str]:
    """The model resolves, the data loads and renders with its chat template, and the model checks
    pass (``check_model``): what would otherwise fail every trial, one by one. Quantized loading is
    checked where trials run: on this machine (in a child process), not for a Ray cluster's nodes.
    Returns the warnings of a study that would run but measure little (``data_warnings``), one line each."""
    train, validation = load_checked_data(cfg)
    check_model(cfg, space, origin, quantization="child" if trials_run_here else "skip")
    return data_warnings(cfg, train, validation, space, origin)


def load_checked_data(cfg: FinetuneConfig) -> tuple[list, list]:
    """(training, validation) examples as a trial gets them, rendered with the model's tokenizer: loading
    them is the check that the data and its chat template work."""
    from .data import load_examples
    from .model import load_tokenizer

    return load_examples(load_tokenizer(cfg), cfg.data, cfg.training.seed)


TINY_VALIDATION = 2  # examples: at most this many, a trial's validation loss is mostly the examples' own noise


def data_warnings(cfg: FinetuneConfig, train: list, validation: list, space: SearchSpace | None = None,
                  origin: Origin | None = None, study: bool = True) -> list[str]:
    """What makes every trial (``study``; else the one fine-tune) measure little while it still runs, one
    line each naming the setting to change: a validation split of one or two examples, answers whose end
    ``data.max_length`` cuts off."""
    origin = origin or Origin()
    lines = [_tiny_validation(cfg, len(validation), origin, study), _ends_cut(cfg, train, validation, space, origin, study)]
    return [line for line in lines if line]


def _tiny_validation(cfg: FinetuneConfig, n: int, origin: Origin, study: bool) -> str | None:
    if n > TINY_VALIDATION:
        return None
    d = cfg.data
    field = "data.validation_split" if d.validation_split else "data.validation_path" if d.validation_path \
        else "data.validation_size"
    says = ("a trial's validation loss rests on so few that trials can hardly be told apart" if study
            else "the validation loss rests on so few that it says little about the adapter")
    return f"{origin.at(field)}: the validation split holds {n} example{'' if n == 1 else 's'}: {says}; give it more rows"


def _ends_cut(cfg: FinetuneConfig, train: list, validation: list, space: SearchSpace | None,
              origin: Origin, study: bool) -> str | None:
    """Examples (training, validation) whose last answer's end of turn lies beyond ``data.max_length``
    tokens at its smallest value, searched or not: the model would learn answers that never end."""
    length, at = min(_values(cfg, "data.max_length", space, origin), key=lambda value_at: value_at[0])
    cut = [sum(e.end_cut(length) for e in split) for split in (train, validation)]
    if not any(cut):
        return None
    longest = max(e.answer_end for e in [*train, *validation])
    every = "" if cut[0] < len(train) else ", so no trial learns where an answer ends" if study \
        else ", so the model never learns where an answer ends"
    context = _context(cfg)
    if context and longest > context:  # no max_length keeps them all: say how far the model goes
        shorten = f"shorten the examples whose answer ends beyond {context} tokens (the longest at {longest})"
        raise_to = (f"raise it to {context}, as far as the model's positions reach, and {shorten}" if length < context
                    else f"the model's positions reach no further: {shorten}")
    else:
        raise_to = f"raise it to {longest} to keep every answer's end"
    return (f"{at}: {length} tokens cuts off the answer's end (its end of turn) in {cut[0]} of {len(train)} "
            f"training and {cut[1]} of {len(validation)} validation examples{every}; {raise_to}")


def _context(cfg: FinetuneConfig) -> int | None:
    from .model import model_limits

    return model_limits(cfg)[1]


def check_model(cfg: FinetuneConfig, space: SearchSpace | None = None, origin: Origin | None = None,
                quantization: Literal["here", "child", "skip"] = "here") -> None:
    """Quantized loading runs on this machine, the adapter's target modules exist in the model, and no
    rank or sequence length is beyond what the model can use. ``quantization``: check quantized loading
    in this process (a fine-tune about to run here), in a child process (so that a study's own process
    never opens a GPU context it would hold for the whole study), or not (trials run elsewhere)."""
    from .model import check_quantization, model_limits

    at = (origin or Origin()).at("model.quantization")
    for kind in sorted({v for v, _ in _values(cfg, "model.quantization", space, origin)} - {"none"}):
        if quantization == "here":
            check_quantization(kind, at)
        elif quantization == "child":
            _check_quantization_in_a_child(kind, at)
    check_adapter_targets(cfg, space, origin)
    hidden, context = model_limits(cfg)
    for value, at in _values(cfg, "lora.rank", space, origin):
        if hidden and value > hidden:
            raise LoratuneError(f"{at}: {value} is above the model's hidden size ({hidden}): a LoRA update cannot "
                                "have a higher rank than the layers it adapts")
    for value, at in _values(cfg, "data.max_length", space, origin):
        if context and value > context:
            raise LoratuneError(f"{at}: {value} tokens is longer than the model's positions reach "
                                f"({context}, its max_position_embeddings)")


def _check_quantization_in_a_child(kind: str, at: str) -> None:
    code = ("import sys\nfrom loratune.errors import LoratuneError\nfrom loratune.model import check_quantization\n"
            "try:\n    check_quantization(sys.argv[1], sys.argv[2])\nexcept LoratuneError as exc:\n"
            "    sys.exit(str(exc))\n")
    proc = subprocess.run([sys.executable, "-c", code, kind, at], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise LoratuneError(last if last.startswith(at) else f"{at}: checking {kind} loading failed: {last}")


def _values(cfg: FinetuneConfig, target: str, space: SearchSpace | None, origin: Origin | None) -> list[tuple]:
    """Every value ``target`` takes in a run: the config's own, and each searched value (a range's bounds),
    with where it is set."""
    section, name = target.split(".")
    out = [(getattr(getattr(cfg, section), name), (origin or Origin()).at(target))]
    for p in space.params if space else []:
        if p.target == target:
            out += [(v, f"{(origin or Origin()).at('search_space')}.{p.name}") for v in p.candidates()]
    return out


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


def resolve_scorers(cfg: StudyConfig, functions: dict | None, where: str = "scoring", finetune: bool = True) -> list[Scorer]:
    """The study's task scorers (``settings.requested_scores``), each loaded and called once on a made-up
    answer: one that cannot be imported, raises or returns no number is one line before anything starts.
    ``functions``: scores given to the API as functions (``scorers={name: fn}``)."""
    from . import scoring
    from .rules import requested_scores

    if functions is not None and not (isinstance(functions, dict) and all(
            isinstance(k, str) and callable(v) for k, v in functions.items())):
        raise LoratuneError(f"scorers: expected a mapping of score names to functions, got {functions!r}")
    functions = functions or {}
    scorers = [scoring.load(name, functions.get(name) or cfg.scoring.scorers.get(name), f"{where}.scorers")
               for name in requested_scores(cfg, functions, finetune)]
    scoring.check(scorers, where)
    return scorers


def require_scorer_functions(stored, functions: dict | None, checkpoint_path, how: str) -> None:
    """Refuse to go on with a study that scored with functions given to the API (``scorers={name: fn}``,
    which no file holds) unless the same names are given again; ``how``: what the line tells the user to do."""
    missing = sorted(set(stored.scorer_functions) - set(functions or {}))
    if missing:
        raise LoratuneError(f"{checkpoint_path}: this study scored with {', '.join(missing)}, given to the API as "
                            f"functions; {how}")
