"""Command line: parse, call one public function, print. Bad input is one line and exit code 2; a
study that ended without its result (too many failures, nothing completed) is one line and code 1."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from .config import StudyConfig, flag_help
from .errors import STUDY_FAILED_EXIT_CODE, USAGE_EXIT_CODE, LoratuneError, first_line

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports Ctrl-C
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM: what systemd, Docker and Kubernetes expect of a stopped process


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)


def _number(convert: type, expected: str, ok=lambda value: True, rule: str = ""):
    """An argparse type: ``convert`` the text (``expected``: what the line says when it cannot), then
    refuse a value that is not ``ok`` with ``rule``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return parse


_int = _number(int, "an integer")
_positive_int = _number(int, "a positive integer", lambda v: v >= 1, "must be a positive integer")
_non_negative_int = _number(int, "an integer", lambda v: v >= 0, "must be >= 0")
_positive_float = _number(float, "a number", lambda v: math.isfinite(v) and v > 0, "must be a number > 0")


DEFAULT_OUTPUT = "configs/optimization_results.json"
SET_HELP = "override any setting: section.field=value, read as YAML (repeatable), e.g. --set training.epochs=0.5"
# the options that are not a study field of their own (those come from config.setting), for docs/commands.md too:
# (option, meaning, what it does on resume)
OPTIONS = [
    ("--config FILE", "optimization config (default: the embedded demo, the same as `configs/optimization_config.yaml`)",
     "no"),
    ("--output PATH", "results file (or a directory); `best_config.yaml`, `optimization_checkpoint.json` and `trials/` go "
                      "beside it", "no"),
    ("--model NAME", "base model: hub id or local directory", "no"),
    ("--data PATH", "training data (a validation split is then held out from it)", "no"),
    ("--set FIELD=VALUE", "any setting of the config reference below, e.g. `--set training.epochs=0.5` (repeatable; the "
                          "value is read as YAML and checked as in a file)", "for the fields that may"),
    ("--overwrite", "replace a study already in the output directory (otherwise it is refused); files of a study's names "
                    "that no loratune study wrote are never replaced", "no"),
    ("--quiet", "print nothing but errors", "yes"),
]


def study_flags(resuming: bool = False) -> list[dataclasses.Field]:
    """The study fields with a flag of their own; on resume, those that may change then."""
    from .config import StudyConfig
    from .rules import may_change_on_resume

    return [f for f in dataclasses.fields(StudyConfig) if f.metadata.get("flag")
            and (not resuming or may_change_on_resume(f.name))]


def _flag_type(f: dataclasses.Field) -> dict:
    """argparse's type (or choices, or a switch) for a field, from its type; the values are checked later as
    the same values in a config file are."""
    tp = typing.get_type_hints(StudyConfig)[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if f.metadata["flag"].startswith("--no-"):
        return {"action": "store_true"}
    if typing.get_origin(tp) is Literal:
        return {"choices": list(typing.get_args(tp))}
    kind = tp if typing.get_origin(tp) is list else args[0] if args else tp  # list[str] or str | None
    if kind is int or tp is int:
        return {"type": _positive_int if f.name not in ("seed",) else _int}
    if kind is float:
        return {"type": float}
    if typing.get_origin(kind) is list:
        return {"type": lambda text: [g.strip() for g in text.split(",")]}
    return {"type": str}


def add_study_flags(p: argparse.ArgumentParser, resuming: bool = False) -> None:
    for f in study_flags(resuming):
        if resuming and f.name == "trials":
            continue
        kind = _flag_type(f)
        if f.metadata.get("metavar"):
            kind["metavar"] = f.metadata["metavar"]
        p.add_argument(f.metadata["flag"], dest=f.name, help=flag_help(f), **kind)


def options_markdown() -> str:
    """The options table (docs/commands.md) of ``ax_optimization.py`` / ``loratune optimize``: the study fields'
    flags (``config.setting``) and the other options, in the order of ``--help``, with the resume policy."""
    others = {flag: (meaning, resume) for flag, meaning, resume in OPTIONS}
    order = [*list(others)[:4], *study_flags(), *list(others)[4:]]
    lines = ["| option | meaning | on resume |", "|---|---|---|"]
    for item in order:
        if isinstance(item, str):
            (meaning, resume), flag = others[item], item
        else:
            flag = f"{item.metadata['flag']} {item.metadata.get('metavar') or ''}".strip()
            meaning = flag_help(item, markdown=True)
            resume = "adds N trials" if item.name == "trials" else "may change" if item.metadata.get("resume") else "no"
        lines.append(f"| `{flag}` | {meaning} | {resume} |")
    lines.append("| `--resume CHECKPOINT` | (`ax_optimization.py` only) continue a study: it runs the trials still "
                 "planned, and `--trials N` adds N more | |")
    return "\n".join(lines) + "\n"


def add_optimize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="optimization config YAML (default: the embedded demo: the default search "
                                    "space on the offline tiny model)")
    p.add_argument("--output", help=f"results file (or directory; default {DEFAULT_OUTPUT}); "
                                    "best_config.yaml and the checkpoint go beside it")
    p.add_argument("--model", help="base model: hub id or local directory")
    p.add_argument("--data", help="training data file (a validation split is held out from it)")
    add_study_flags(p)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="assignments", help=SET_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace a study already in the output directory")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def study_overrides(args: argparse.Namespace, resuming: bool = False) -> list:
    """The flags given on the command line, as settings overrides that name their flag."""
    from .settings import parse_assignment

    overrides = []
    for f in study_flags():
        value, flag = getattr(args, f.name, None), f.metadata["flag"]
        if flag.startswith("--no-"):
            if value:
                overrides.append((f.name, False, flag))
        elif value is not None and not (resuming and f.name == "trials"):  # there: the additional trials
            overrides.append((f.name, value, flag))
    if getattr(args, "model", None) is not None:
        overrides.append(("model.name", args.model, "--model"))
    if getattr(args, "data", None) is not None:  # a validation split is then held out of it
        overrides += [("data.path", args.data, "--data"), ("data.validation_path", None, "--data")]
    return overrides + [(*parse_assignment(text), "--set") for text in args.assignments]


def cmd_optimize(args: argparse.Namespace) -> None:
    from .api import optimize

    optimize(args.config, study_overrides(args), args.output or DEFAULT_OUTPUT, overwrite=args.overwrite, quiet=args.quiet)


def cmd_resume(args: argparse.Namespace) -> None:
    from .api import resume

    resume(args.checkpoint, args.trials, study_overrides(args, resuming=True), quiet=args.quiet)


def cmd_finetune(args: argparse.Namespace) -> None:
    from .api import finetune
    from .settings import parse_assignment

    overrides = [(*parse_assignment(text), "--set") for text in args.assignments]
    metrics = finetune(args.config, output_dir=args.output_dir, overwrite=args.overwrite, quiet=args.quiet,
                       overrides=overrides, own_process=True)
    if not args.quiet:
        print(f"validation loss {metrics['val_loss']:.4f} after {metrics['steps']} steps "
              f"({metrics['tokens_per_s']:.0f} tokens/s, padding {metrics['padding_fraction']:.1%}); "
              f"wrote {metrics['config']['output_dir']}")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    pairs = [tuple(p.split(",", 1)) for p in args.contour] if args.contour else None
    if pairs and any(len(p) != 2 for p in pairs):
        raise LoratuneError("--contour: write two parameter names, e.g. lora_rank,learning_rate")
    print(f"wrote {write_report(args.study, contours=pairs, interactive=not args.no_interactive)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import retrain_and_compare
    from .report import write_report

    result = retrain_and_compare(args.study, seeds=args.seeds, epochs=args.epochs, quiet=args.quiet)
    where = "on the test split" if result.data == "test" else \
        "on the validation set that chose the winner (the study has no test split)"
    print(f"{where}: best loss {result.best_mean:.4f} ± {result.best_std:.4f} vs baseline {result.baseline_mean:.4f} ± "
          f"{result.baseline_std:.4f}: {result.verdict()}")
    print(f"wrote {write_report(args.study)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .api import evaluate

    test = evaluate(args.study)
    if not args.quiet:
        from .console import test_lines

        for line in test_lines(test):
            print(line)


def cmd_export(args: argparse.Namespace) -> None:
    from .api import export_config

    print(f"wrote {export_config(args.study, args.trial, args.output)}")


def refused_on_resume(args: argparse.Namespace, also: tuple[str, ...] = ()) -> str | None:
    """The error line for the first option given in ``args`` that resuming cannot take (``loratune resume``'s
    options are the ones it can; ``also``: the caller's own, as ``--resume`` itself), else None."""
    resume = _Parser(add_help=False)
    add_resume_arguments(resume)
    may = {*vars(resume.parse_args([])), "checkpoint", *also}
    given = [name for name, value in vars(args).items() if name not in may and value not in (None, False, [])]
    if not given:
        return None
    flag = next((f.metadata["flag"] for f in study_flags() if f.name == given[0]), "--" + given[0].replace("_", "-"))
    can = ", ".join(f.metadata["flag"] for f in study_flags(resuming=True) if f.name != "trials")
    return (f"error: {flag}: cannot change when a study resumes; it takes --trials (additional), {can}, --set for "
            "those, --quiet")


def add_resume_arguments(p: argparse.ArgumentParser) -> None:
    """What can change when a study resumes: how its trials run, never what they measure
    (``rules.may_change_on_resume``)."""
    p.add_argument("--trials", type=_non_negative_int, default=0, help="additional trials beyond those planned")
    add_study_flags(p, resuming=True)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="assignments",
                   help="override a setting that may change on resume (workers, trial_timeout, ...)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loratune", description="Bayesian optimization of LoRA fine-tuning hyperparameters (Meta Ax).")
    sub = parser.add_subparsers(dest="command_name", required=True, parser_class=_Parser)

    p = sub.add_parser("optimize", help="search hyperparameters (the same as python ax_optimization.py)")
    add_optimize_arguments(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("resume", help="continue a study from its checkpoint")
    p.add_argument("checkpoint", nargs="?", default="configs/optimization_checkpoint.json",
                   help="optimization_checkpoint.json or the directory that holds it")
    add_resume_arguments(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("finetune", help="fine-tune with a training config (e.g. best_config.yaml)")
    add_finetune_arguments(p)
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("report", help="write OPTIMIZATION_RESULTS.md and plots for a study (also mid-run)")
    p.add_argument("study", help="the study's output directory")
    p.add_argument("--contour", action="append", metavar="X,Y", help="a parameter pair to plot (repeatable)")
    p.add_argument("--no-interactive", action="store_true", help="skip Ax's HTML plots and sensitivity analysis")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="retrain the best config and the baseline with several seeds; add to the report")
    p.add_argument("study", help="the study's output directory")
    p.add_argument("--seeds", type=_positive_int, default=3, help="seeds per config (default 3)")
    p.add_argument("--epochs", type=_positive_float, help="epochs per retrain (default: the study's retrain_epochs)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="score a study's best config and its baseline on the test split the search "
                                        "never saw (a study does it when it ends)")
    p.add_argument("study", help="the study's output directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write the training config of any trial (e.g. another Pareto point)")
    p.add_argument("study", help="the study's output directory")
    p.add_argument("--trial", type=_non_negative_int, required=True, help="trial index (the # column)")
    p.add_argument("--output", required=True, help="config file to write")
    p.set_defaults(func=cmd_export)
    return parser


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--output-dir", help="where the adapter and metrics.json go (overrides output_dir)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="assignments", help=SET_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in the output directory")
    p.add_argument("--quiet", action="store_true")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that a study stopped by ``kill``, a
    scheduler or a container runtime ends its trials, saves, and prints its "resume with" line as after
    Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    # one stop is asked for once: a second SIGTERM during the clean-up ends the process at once (its
    # trials follow by their parent-death signal, processes.py)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def _sigterm_as_interrupt():
    """Install ``_on_sigterm``; return the handler it replaced (None where none can be installed: a
    thread other than the main one, as a test runner's may be)."""
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        return None


def run(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Call a command; turn every error into one line and an exit code (2: bad input, 1: a run that failed
    or a bug; ``LORATUNE_DEBUG=1`` shows a bug's traceback). Ctrl-C exits with 130 and SIGTERM with 143
    (128 + the signal, as a shell reports a process the signal ended); a study stopped either way saves,
    ends its trials and prints how to resume it."""
    command = f"loratune {args.command_name}" if getattr(args, "command_name", None) else Path(sys.argv[0]).name
    previous = _sigterm_as_interrupt()
    try:
        func(args)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        return TERMINATED_EXIT_CODE
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT_CODE
    except OSError as exc:  # the system refused a file: say which
        print(f"error: {exc.filename or command}: {exc.strerror or first_line(exc)}",
              file=sys.stderr)
        return STUDY_FAILED_EXIT_CODE
    except Exception as exc:
        if os.environ.get("LORATUNE_DEBUG"):
            raise
        print(f"error: {command}: {type(exc).__name__}: {first_line(exc)} (a bug in loratune, not "
              "in your input: LORATUNE_DEBUG=1 shows where)", file=sys.stderr)
        return STUDY_FAILED_EXIT_CODE
    finally:
        if previous is not None:  # the caller's own handler again (the API in a long-lived process, tests)
            signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
