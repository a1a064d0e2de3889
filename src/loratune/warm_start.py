"""Warm start: the completed trials of earlier studies (``warm_start: [runs/v1, runs/v2]``), given to a new
study's Ax model as data before its first suggestion.

Each earlier trial is taken in the new study's parameters: a parameter the earlier study did not search
had its base config's value there; a parameter it searched that the new study does not must have the
value the new study fixes, else the trial was another config and is left out, as is a trial outside the
new search space. The earlier studies must optimize the same objectives in the same direction; one of
another model or data is taken as it is (said as the study starts): modelling it as a task of its own (a
multi-task GP) did worse after 20 trials on three of five related surfaces (docs/benchmarks-history.md, "An earlier study as a task of its own"). Their
trials are attached to Ax as trials of their own (arms named ``warm_start_...``), never run again and
never one of the new study's records: its best trial, baseline and history are its own. They count
towards the initial design, so a warm start that covers the space starts Bayesian optimization at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import load
from .config import StudyConfig, get_field
from .errors import LoratuneError
from .search_space import SearchSpace, resolve_target
from .trial import TrialState


@dataclass
class PriorTrial:
    params: dict  # in the new study's parameters
    metrics: dict[str, float]
    source: str  # "<earlier study's directory>#<its trial index>"


@dataclass
class Prior:
    trials: list[PriorTrial] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # per earlier study: what was taken and what was left out


def load_prior(cfg: StudyConfig, space: SearchSpace, metrics: list[str], where: str = "warm_start") -> Prior:
    """The completed trials of the studies in ``cfg.warm_start``, with their ``metrics`` (the objectives, then
    outcome-constraint metrics where recorded). Raises ``LoratuneError`` for a directory that holds no
    study, or a study of other objectives."""
    prior = Prior()
    base = cfg.base()
    for i, directory in enumerate(cfg.warm_start):
        at = f"{where}[{i}]"
        if not Path(directory).exists():
            raise LoratuneError(f"{at}: {directory} does not exist")
        if Path(directory).is_file() and Path(directory).suffix == ".json":  # the study's results or checkpoint file
            directory = str(Path(directory).parent)
        try:
            _, stored = load(directory)
        except LoratuneError as exc:
            raise LoratuneError(f"{at}: {exc}") from None
        earlier = stored.config
        if (earlier.objectives, earlier.minimize) != (cfg.objectives, cfg.minimize):
            raise LoratuneError(f"{at}: {directory} optimized {_objectives(earlier)}, this study {_objectives(cfg)}: "
                                "a warm start needs the same objectives")
        earlier_base, taken, other_config, outside = earlier.base(), 0, 0, 0
        searched = {p.target for p in space.params}
        for record in stored.records:
            if record.state is not TrialState.COMPLETED:
                continue
            # by the field each name sets: `lora_rank` and `lora.rank` are one parameter
            by_target = {resolve_target(name, at): value for name, value in record.params.items()}
            # a parameter only the earlier study searched must have the value this study fixes
            if any(get_field(base, target) != value for target, value in by_target.items() if target not in searched):
                other_config += 1
                continue
            values = {p.name: by_target.get(p.target, get_field(earlier_base, p.target)) for p in space.params}
            try:
                values = space.cast(values, at)
            except LoratuneError:
                outside += 1
                continue
            if not space.contains(values):
                outside += 1
                continue
            prior.trials.append(PriorTrial(values, {m: record.metrics[m] for m in metrics if m in record.metrics},
                                           f"{directory}#{record.index}"))
            taken += 1
        left = [f"{n} {why}" for n, why in ((outside, "outside this search space or its constraints"),
                                            (other_config, "with a parameter this study fixes at another value")) if n]
        other = [what for what, a, b in (("model", earlier.model, cfg.model), ("data", earlier.data, cfg.data)) if a != b]
        prior.notes.append(f"warm start: {taken} completed trial{'' if taken == 1 else 's'} from {directory}"
                           + (f" ({', '.join(left)}: left out)" if left else "")
                           + (f"; it trained on another {' and '.join(other)}: its losses are taken as they are, so "
                              "it helps as far as the two jobs agree" if other else ""))
    return prior


def _objectives(cfg: StudyConfig) -> str:
    return ", ".join(f"{'min' if low else 'max'} {name}" for name, low in zip(cfg.objectives, cfg.minimize, strict=True))
