"""Settings in, typed configs out: YAML files, ``--set section.field=value`` overrides, command-line
flags and API keyword arguments all pass through the same build-and-validate code.

Every error names where the bad value came from and the dotted field: ``cfg.yaml: training.epochs:
must be > 0, got 0.0``, ``--set: lora.rank: expected an integer, got 'big'``,
``run_optimization(workers=...): workers: expected an integer, got '4'``.
"""


from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .config import FinetuneConfig, StudyConfig, to_dict
from .errors import LoratuneError
from .rules import validate, validate_study
from .schema import Origin, Override, build, override
from .textfile import read_text

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



def dump_yaml(data: dict, header: str = "") -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return header + body



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


def load_finetune_config(config: str | Path | FinetuneConfig,
                         overrides: Iterable[Override] = ()) -> tuple[FinetuneConfig, Origin]:
    """A training config (``loratune finetune --config``), with overrides applied, validated once. Returns
    the config and where each setting came from."""
    cfg, origin = _settings(FinetuneConfig, config, overrides)
    return validate(cfg, origin), origin


def finetune_config_from_dict(data: dict, source: str | None = None) -> FinetuneConfig:
    return validate(build(FinetuneConfig, data, Origin(source)), Origin(source))


