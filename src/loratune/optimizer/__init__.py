"""The only package that imports Ax: a thin layer over ``ax.Client`` in loratune's terms.

It speaks user parameter values (Ax's parameters decoded, see ``encoding``) and metric names,
and keeps what Ax does not persist (the random seed, the early-stopping strategy) reapplied on load.
Ax's private names live in ``seam``; its state's JSON in ``snapshot``; its analyses in ``analyses``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import warnings
from typing import Any

from ..errors import LoratuneError, first_line
from ..search_space import SearchSpace
from . import seam
from .encoding import decode, encode, to_ax
from .kernel import bounded_fused_kernel
from .snapshot import Snapshots

DEFAULT_INIT_TRIALS = 5  # Ax's initial design when init_trials is null: the centre, then Sobol points
PROGRESSION_SCALE = 1000  # Ax progressions are integers: per-mille of a trial's training


def quiet_ax() -> None:
    """Ax logs every trial at INFO through its own handler; our loop prints what matters."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # Ax's import logs "Ax SQL storage initialized" at INFO before we can turn it down
    try:
        import ax  # noqa: F401  (installs Ax's handler, which we then turn down)
    finally:
        logging.disable(previous)

    for name in ("ax", "botorch", "gpytorch", "linear_operator"):
        logging.getLogger(name).setLevel(logging.ERROR)
        for handler in logging.getLogger(name).handlers:
            handler.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(ax|botorch|gpytorch|linear_operator)(\.|$)")


# A lighter acquisition search for BoTorch (Ax: 1024 raw samples, 20 restarts), for the benchmarks
# only. loratune keeps Ax's settings, with or without constraints: the lighter one is cheaper but its
# regret was no better (docs/benchmarks-history.md, "Against the current default", for the figures).


def objective_string(objectives: list[str], minimize: list[bool]) -> str:
    return ", ".join(("-" if m else "") + o for o, m in zip(objectives, minimize, strict=True))


def _timed(method):
    """Add the call's duration to ``busy_s``: the study reports the optimizer's share of its time."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.busy_s += time.perf_counter() - start
    return wrapper


class Optimizer:
    """Ask Ax for trials, tell it results, save and load its state."""

    def __init__(self, client: Any, space: SearchSpace, seed: int | None):
        self.client, self.space, self.seed = client, space, seed
        self.exhausted = False
        self.notes: list[str] = []  # what the user should hear about the optimizer (shown once, as the study starts)
        self.busy_s = 0.0  # seconds spent in Ax by this process (set-up, suggestions, updates, snapshots)
        self._snapshots = Snapshots()

    @classmethod
    def create(cls, space: SearchSpace, objectives: list[str], minimize: list[bool], outcome_constraints: list[str],
               seed: int | None, init_trials: int | None = None, early_stopping: Any = None,
               prior: list | None = None) -> Optimizer:
        """A configured Ax client; Ax's own checks of the space and the objectives become one error line.
        ``early_stopping`` (an EarlyStoppingConfig) sets Ax's percentile rule when it has a percentile.
        ``prior``: earlier studies' trials (``warm_start.PriorTrial``), attached as Ax trials 0, 1, ...; they
        take the place of as many points of the initial design."""
        start = time.perf_counter()
        quiet_ax()
        from ax import Client

        client = Client(random_seed=seed)
        params, constraints = to_ax(space)
        try:
            client.configure_experiment(parameters=params, parameter_constraints=constraints or None, name="loratune")
            client.configure_optimization(objective=objective_string(objectives, minimize),
                                          outcome_constraints=outcome_constraints or None)
        except Exception as exc:  # Ax validates here: report its reason in one line
            raise LoratuneError(f"search space: Ax rejected it: {first_line(exc)}") from None
        opt = cls(client, space, seed)
        if prior:
            init_trials = max(0, (DEFAULT_INIT_TRIALS if init_trials is None else init_trials) - len(prior))
        opt._configure_generation(init_trials)
        opt._set_early_stopping(early_stopping)
        for k, trial in enumerate(prior or []):
            encoded = encode(space, trial.params)
            index = opt.client.attach_trial(encoded, arm_name=opt._arm_name(encoded) or f"warm_start_{k}")
            opt.client.complete_trial(index, raw_data=trial.metrics)
        if len(objectives) > 1:
            opt.notes += [note] if (note := bounded_fused_kernel()) else []
        opt.busy_s = time.perf_counter() - start
        return opt

    def _configure_generation(self, init_trials: int | None) -> None:
        # The baseline is one hand-picked point, not part of a space-filling design: it does not count
        # toward the initialization (the centre of the space, then Sobol points), which would shrink to
        # 4 points that cover less. On LoRA-shaped surfaces counting it lost to a plain Ax Client at
        # 10-20 trials on one of three; not counting it was at or below it on all three
        # (docs/benchmarks-history.md, "How the search's defaults were chosen").
        # Early-stopped and failed trials do not count as observed: keep drawing quasi-random points
        # until enough have completed, instead of stalling before Bayesian optimization can start.
        self.client.configure_generation_strategy(initialization_budget=init_trials,
                                                  initialization_random_seed=self.seed,
                                                  use_existing_trials_for_initialization=False,
                                                  allow_exceeding_initialization_budget=True)

    def _before_ask(self) -> None:
        """What a variant of the search (``variants.py``, the benchmarks') changes before each suggestion."""

    def _model_specs(self) -> list:
        """The generator specs of Bayesian optimization (BoTorch) in the generation strategy."""
        return [spec for node in seam.generation_nodes(self.client)
                for spec in node.generator_specs if spec.generator_enum.name == "BOTORCH_MODULAR"]

    # -- asking and telling ---------------------------------------------------------------

    @_timed
    def ask(self, n: int) -> dict[int, dict]:
        """Up to n new trials as {index: user parameters}; none while Ax waits for data or when no
        untried point is left (``exhausted`` tells which)."""
        from ax.exceptions.core import DataRequiredError, SearchSpaceExhausted
        from ax.exceptions.generation_strategy import MaxParallelismReachedException

        self._before_ask()
        try:
            trials = self.client.get_next_trials(max_trials=n)
        except (DataRequiredError, MaxParallelismReachedException):
            return {}
        except SearchSpaceExhausted:
            self.exhausted = True
            return {}
        return {i: decode(self.space, dict(p)) for i, p in trials.items()}

    def trial_parameters(self) -> dict[int, dict]:
        """Every trial Ax knows, as {index: user parameters}."""
        return {i: decode(self.space, dict(t.arm.parameters)) for i, t in seam.experiment(self.client).trials.items()}

    @_timed
    def attach(self, values: dict, baseline: bool = False) -> int:
        """Add a trial that Ax did not suggest (the baseline); values are cast to their parameters' types first."""
        encoded = encode(self.space, values)
        try:
            if baseline:
                return self.client.attach_baseline(encoded, arm_name=self._arm_name(encoded))
            return self.client.attach_trial(encoded)
        except Exception as exc:  # Ax validates the point here: say which one, in one line
            what = "baseline" if baseline else "trial"
            raise LoratuneError(f"{what} {values}: Ax refused it: {first_line(exc)}") from None

    def _arm_name(self, encoded: dict) -> str | None:
        """The name of the arm Ax holds at this point already (two studies of a warm start share their
        baseline, for one), which a trial attached there must take; None for a new point."""
        from ax.core.arm import Arm

        known = seam.experiment(self.client).arms_by_signature.get(Arm(parameters=dict(encoded)).signature)
        return known.name if known else None

    @_timed
    def complete(self, index: int, metrics: dict[str, float]) -> None:
        self.client.complete_trial(index, raw_data=metrics)

    @_timed
    def progress(self, index: int, metrics: dict[str, float], progression: int) -> None:
        self.client.attach_data(index, raw_data=metrics, progression=progression)

    @_timed
    def should_stop(self, index: int) -> bool:
        return bool(self.client.should_stop_trial_early(index))

    @_timed
    def early_stopped(self, index: int) -> None:
        self.client.mark_trial_early_stopped(index)

    @_timed
    def failed(self, index: int, reason: str) -> None:
        self.client.mark_trial_failed(index, failed_reason=reason[:500])

    @_timed
    def abandoned(self, index: int) -> None:
        """Never propose this point again (a deterministic out-of-memory, for instance)."""
        self.client.mark_trial_abandoned(index)

    def _set_early_stopping(self, es: Any) -> None:
        """Ax's learning-curve rule, when the config asks for it (Ax does not save it: reapplied on load)."""
        if es is None or es.percentile is None:
            return
        from ax.early_stopping.strategies import PercentileEarlyStoppingStrategy

        self.client.set_early_stopping_strategy(PercentileEarlyStoppingStrategy(
            percentile_threshold=es.percentile, min_progression=round(es.min_progression * PROGRESSION_SCALE),
            min_curves=es.min_curves))

    # -- persistence ------------------------------------------------------------------------

    @_timed
    def snapshot(self) -> dict:
        """Ax's experiment and generation strategy as JSON, equal to Ax's own encoding (``snapshot.Snapshots``)."""
        return self._snapshots.encode(self.client)

    @classmethod
    def restore(cls, snapshot: dict, space: SearchSpace, seed: int | None, early_stopping: Any = None) -> Optimizer:
        """Rebuild from ``snapshot()``; the seed and the early-stopping rule are reapplied, as Ax does not
        store them. The generation strategy is Ax's as saved: a study keeps the acquisition settings it
        started with (one checkpointed while loratune gave constrained spaces the lighter search
        resumes with it)."""
        start = time.perf_counter()
        quiet_ax()
        try:  # what load_from_json_file reads; Ax's decoder consumes its input, and a snapshot in memory
            # holds one generator run's JSON in two places (its trial and the strategy's list)
            client = seam.from_json_snapshot(json.loads(json.dumps(snapshot)))
        except Exception as exc:
            raise LoratuneError(f"checkpoint: the Ax experiment in it cannot be loaded ({first_line(exc, 160)})") from None
        seam.set_random_seed(client, seed)  # not persisted by Ax 1.3.1; new candidates draw from it
        opt = cls(client, space, seed)
        opt._set_early_stopping(early_stopping)
        if seam.experiment(client).optimization_config.is_moo_problem:
            opt.notes += [note] if (note := bounded_fused_kernel()) else []
        opt.busy_s = time.perf_counter() - start
        return opt

