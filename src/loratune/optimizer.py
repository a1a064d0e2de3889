"""The only module that imports Ax: a thin layer over ``ax.Client`` in loratune's terms.

It speaks user parameter values (decoded from Ax's encoding, see search_space.py) and metric names,
and keeps what Ax does not persist (the random seed, the early-stopping strategy) reapplied on load.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from .errors import LoratuneError, first_line
from .processes import die_with_parent
from .search_space import Param, SearchSpace

PROGRESSION_SCALE = 1000  # Ax progressions are integers: per-mille of a trial's training


def _quiet_ax() -> None:
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


FUSED_KERNEL_BUILD_TIMEOUT_S = 300


def _bounded_fused_kernel() -> str | None:
    """BoTorch's multi-objective acquisition (qLogNEHVI) compiles a fused C++ kernel on first use with
    torch's JIT extension loader, which waits forever on the ``lock`` file a killed compile leaves
    behind. Never let it wait: a lock present means the pure-Python path (the same numbers, slower);
    a first build runs in a child process with a time limit. Returns a note for the user, or None."""
    import botorch.acquisition.multi_objective.logei as logei

    if logei._load_attempted:
        return None
    from torch.utils.cpp_extension import _get_build_directory

    build = Path(_get_build_directory("logei_fused_ext", verbose=False))
    lock = build / "lock"
    if lock.exists():
        logei._load_attempted = True  # BoTorch then uses its pure-Python implementation
        return (f"BoTorch's fused multi-objective kernel is locked by {lock} (left by an interrupted build?); using "
                "the slower pure-Python version. Delete that file if no other process is building the kernel.")
    if not (build / "logei_fused_ext.so").exists():
        code = ("import sys, botorch.acquisition.multi_objective.logei as m; m._try_load_fused_kernel(); "
                "sys.exit(0 if m._C is not None else 1)")
        started = time.time()
        try:
            subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, timeout=FUSED_KERNEL_BUILD_TIMEOUT_S,
                           preexec_fn=die_with_parent())
        except subprocess.TimeoutExpired:
            if lock.exists() and lock.stat().st_mtime >= started - 1:  # ours: the build we just ended made it
                lock.unlink(missing_ok=True)
            logei._load_attempted = True
            return (f"building BoTorch's fused multi-objective kernel took over {FUSED_KERNEL_BUILD_TIMEOUT_S} s; "
                    "using the slower pure-Python version")
        if not (build / "logei_fused_ext.so").exists():  # no compiler here: BoTorch's own fallback, quietly
            logei._load_attempted = True
            return None
    logei._try_load_fused_kernel()  # built: loads at once
    return None


def ax_parameter(p: Param) -> Any:
    from ax import ChoiceParameterConfig, RangeParameterConfig

    if p.log2_encoded:
        if p.kind == "choice":
            exps = sorted(int(round(math.log2(v))) for v in p.values)
            if exps == list(range(exps[0], exps[-1] + 1)):
                return RangeParameterConfig(name=p.ax_name, bounds=(exps[0], exps[-1]), parameter_type="int")
            return ChoiceParameterConfig(name=p.ax_name, values=exps, parameter_type="int", is_ordered=True)
        return RangeParameterConfig(name=p.ax_name, bounds=(math.log2(p.low), math.log2(p.high)), parameter_type="float")
    if p.kind == "range":
        return RangeParameterConfig(name=p.name, bounds=(p.low, p.high), parameter_type="int" if p.integer else "float",
                                    scaling="log" if p.log else "linear")
    values = p.values
    kind = "bool" if isinstance(values[0], bool) else "str" if isinstance(values[0], str) else "int" if p.integer else "float"
    return ChoiceParameterConfig(name=p.name, values=values, parameter_type=kind,
                                 is_ordered=kind in ("int", "float") and len(values) > 1)


def to_ax(space: SearchSpace) -> tuple[list[Any], list[str]]:
    """Ax parameter configs and constraint strings. Fixed parameters of a constraint move to its
    right-hand side; a product constraint is linear over the base-2 exponents Ax is given."""
    constraints = []
    by_name = {p.name: p for p in space.params}
    for c in space.constraints:
        scale = math.log2 if c.product else float
        bound, terms = scale(c.bound), []
        for name, k in c.terms.items():
            p = by_name[name]
            if p.kind == "fixed":  # a fixed value moves to the right-hand side
                bound -= k * scale(p.values[0])
            else:
                terms.append(f"{k:g}*{p.ax_name}")
        if terms:
            constraints.append(f"{' + '.join(terms)} {c.op} {bound:.12g}")
    return [ax_parameter(p) for p in space.params], constraints


# A lighter acquisition search for BoTorch (Ax: 1024 raw samples, 20 restarts), for the benchmarks
# only. loratune keeps Ax's settings, with or without constraints: under the product constraint the
# lighter one makes a suggestion 40% cheaper (2.1 s against 3.4 s at 50 trials), but both meet the
# 6 s goal, and over 20 seeds on two LoRA-shaped surfaces its median regret was higher in 5 of 6
# checkpoints, mostly by noise-sized margins (docs/BENCHMARKS.md, "Against the current default").
LIGHTER_ACQUISITION_SEARCH = {"raw_samples": 512, "num_restarts": 10}


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


class _EncodedTrial(NamedTuple):
    """A trial in a final state as ``Optimizer.snapshot`` encoded it, and what the encoding was made from."""
    trial: Any
    rows: list  # its data rows (Ax's DataRow objects) at the time
    trial_json: dict
    data_json: Any


class Optimizer:
    """Ask Ax for trials, tell it results, save and load its state."""

    def __init__(self, client: Any, space: SearchSpace, seed: int | None):
        self.client, self.space, self.seed = client, space, seed
        self.exhausted = False
        self.note: str | None = None  # something the user should hear about the optimizer (shown once)
        self.busy_s = 0.0  # seconds spent in Ax by this process (set-up, suggestions, updates, snapshots)
        self._encoded_trials: dict[int, _EncodedTrial] = {}  # by trial index: what snapshot() reuses
        # id(generator run) -> (the run, its JSON); holding the run keeps its id from being reused
        self._encoded_runs: dict[int, tuple[Any, Any]] = {}

    @classmethod
    def create(cls, space: SearchSpace, objectives: list[str], minimize: list[bool], outcome_constraints: list[str],
               seed: int | None, init_trials: int | None = None, early_stopping: Any = None) -> Optimizer:
        """A configured Ax client; Ax's own checks of the space and the objectives become one error line.
        ``early_stopping`` (an EarlyStoppingConfig) sets Ax's percentile rule when it has a percentile."""
        start = time.perf_counter()
        _quiet_ax()
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
        opt._configure_generation(init_trials)
        opt._set_early_stopping(early_stopping)
        if len(objectives) > 1:
            opt.note = _bounded_fused_kernel()
        opt.busy_s = time.perf_counter() - start
        return opt

    def _configure_generation(self, init_trials: int | None) -> None:
        # The baseline is one hand-picked point, not part of a space-filling design: it does not count
        # toward the initialization (the centre of the space, then Sobol points), which would shrink to
        # 4 points that cover less. On LoRA-shaped surfaces counting it lost to a plain Ax Client at
        # 10-20 trials on one of three; not counting it was at or below it on all three
        # (docs/BENCHMARKS.md, "How the search's defaults were chosen").
        # Early-stopped and failed trials do not count as observed: keep drawing quasi-random points
        # until enough have completed, instead of stalling before Bayesian optimization can start.
        self.client.configure_generation_strategy(initialization_budget=init_trials,
                                                  initialization_random_seed=self.seed,
                                                  use_existing_trials_for_initialization=False,
                                                  allow_exceeding_initialization_budget=True)

    def use_lighter_acquisition_search(self) -> None:
        """512 raw samples and 10 restarts for BoTorch's acquisition search instead of Ax's 1024 and 20
        (benchmarks compare the two). Set through Ax's ``model_gen_options`` on the Bayesian
        optimization node, so it is saved with the generation strategy."""
        for spec in self._model_specs():
            options = spec.generator_gen_kwargs.setdefault("model_gen_options", {})
            options.setdefault("optimizer_kwargs", {}).update(LIGHTER_ACQUISITION_SEARCH)

    def _model_specs(self) -> list:
        """The generator specs of Bayesian optimization (BoTorch) in the generation strategy."""
        return [spec for node in self.client._generation_strategy._nodes  # no public accessor in Ax 1.3.1
                for spec in node.generator_specs if spec.generator_enum.name == "BOTORCH_MODULAR"]

    # -- asking and telling ---------------------------------------------------------------

    @_timed
    def ask(self, n: int) -> dict[int, dict]:
        """Up to n new trials as {index: user parameters}; none while Ax waits for data or when no
        untried point is left (``exhausted`` tells which)."""
        from ax.exceptions.core import DataRequiredError, SearchSpaceExhausted
        from ax.exceptions.generation_strategy import MaxParallelismReachedException

        try:
            trials = self.client.get_next_trials(max_trials=n)
        except (DataRequiredError, MaxParallelismReachedException):
            return {}
        except SearchSpaceExhausted:
            self.exhausted = True
            return {}
        return {i: self.space.decode(dict(p)) for i, p in trials.items()}

    def trial_parameters(self) -> dict[int, dict]:
        """Every trial Ax knows, as {index: user parameters}."""
        return {i: self.space.decode(dict(t.arm.parameters)) for i, t in self.client._experiment.trials.items()}

    @_timed
    def attach(self, values: dict, baseline: bool = False) -> int:
        """Add a trial that Ax did not suggest (the baseline); values are cast to their parameters' types first."""
        encoded = self.space.encode(values)
        try:
            return self.client.attach_baseline(encoded) if baseline else self.client.attach_trial(encoded)
        except Exception as exc:  # Ax validates the point here: say which one, in one line
            what = "baseline" if baseline else "trial"
            raise LoratuneError(f"{what} {values}: Ax refused it: {first_line(exc)}") from None

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
        """Ax's experiment and generation strategy as JSON: what ``Client.save_to_json_file`` writes, less
        the generation strategy's own copy of the experiment (``Client`` decodes the strategy with the
        experiment it decoded first and never reads that copy).

        Ax encodes every trial, its data and its generator run again at each save, which grows with the
        study (0.47 s a save on average over a 100-trial study, a third of its time in Ax). Here a trial
        in a terminal state (``TrialStatus.is_terminal``: Ax's Client moves none back) keeps its
        encoding while its data rows are the same objects (Ax replaces a row it updates), and a
        generator run keeps its encoding once its arms are named. The result equals Ax's own encoding
        (tested); it shares those parts with other snapshots, so it is read, never changed in place."""
        from ax.storage.json_store.encoder import object_to_json
        from ax.storage.json_store.encoders import experiment_to_dict, generation_strategy_to_dict
        from ax.storage.json_store.registry import CORE_ENCODER_REGISTRY

        experiment, strategy = self.client._experiment, self.client._maybe_generation_strategy
        if CORE_ENCODER_REGISTRY.get(type(experiment)) is not experiment_to_dict or strategy is None or \
                CORE_ENCODER_REGISTRY.get(type(strategy)) is not generation_strategy_to_dict:
            # not the experiment and strategy loratune makes (nor a custom encoder registry, which
            # loratune never sets): Ax's own encoding, all of it
            snapshot = self.client._to_json_snapshot()
            if isinstance(snapshot.get("generation_strategy"), dict):
                snapshot["generation_strategy"]["experiment"] = None
            return snapshot

        def encoded_run(run: Any) -> Any:
            kept = self._encoded_runs.get(id(run))
            if kept is not None and kept[0] is run:
                return kept[1]
            encoded = object_to_json(run)
            if all(arm.has_name for arm in run.arms):  # named when its trial was made; fixed from then on
                self._encoded_runs[id(run)] = (run, encoded)
            return encoded

        fields = experiment_to_dict(experiment)  # one level deep: trials and data are still Ax objects
        data_by_trial = fields["data_by_trial"]
        rows: dict[int, list] = {}
        for row in experiment.data._data_rows:
            rows.setdefault(row.trial_index, []).append(row)
        trials, data = {}, {}
        for index, trial in fields["trials"].items():
            kept, its_rows = self._encoded_trials.get(index), rows.get(index, [])
            if kept is not None and kept.trial is trial and len(kept.rows) == len(its_rows) and \
                    all(a is b for a, b in zip(kept.rows, its_rows, strict=True)):
                trials[index], data_json = kept.trial_json, kept.data_json
            else:
                trial_fields = CORE_ENCODER_REGISTRY[type(trial)](trial)
                trials[index] = {key: encoded_run(value) if key == "generator_run" and value is not None
                                 else object_to_json(value) for key, value in trial_fields.items()}
                data_json = object_to_json(data_by_trial[index]) if index in data_by_trial else None
                if trial.status.is_terminal:
                    self._encoded_trials[index] = _EncodedTrial(trial, its_rows, trials[index], data_json)
            if data_json is not None:
                data[index] = data_json
        encoded = {"trials": trials, "data_by_trial": data}
        experiment_json = {key: encoded[key] if key in encoded else object_to_json(value)
                           for key, value in fields.items()}

        parts = generation_strategy_to_dict(strategy)
        parts["experiment"] = None
        strategy_json = {key: [encoded_run(run) for run in value] if key == "generator_runs"
                         else object_to_json(value) for key, value in parts.items()}
        return {"_type": type(self.client).__name__, "experiment": experiment_json,
                "generation_strategy": strategy_json}

    @classmethod
    def restore(cls, snapshot: dict, space: SearchSpace, seed: int | None, early_stopping: Any = None) -> Optimizer:
        """Rebuild from ``snapshot()``; the seed and the early-stopping rule are reapplied, as Ax does not
        store them. The generation strategy is Ax's as saved: a study keeps the acquisition settings it
        started with (one checkpointed while loratune gave constrained spaces the lighter search
        resumes with it)."""
        start = time.perf_counter()
        _quiet_ax()
        from ax import Client

        try:  # what load_from_json_file reads; Ax's decoder consumes its input, and a snapshot in memory
            # holds one generator run's JSON in two places (its trial and the strategy's list)
            client = Client._from_json_snapshot(json.loads(json.dumps(snapshot)))
        except Exception as exc:
            raise LoratuneError(f"checkpoint: the Ax experiment in it cannot be loaded ({first_line(exc, 160)})") from None
        client._random_seed = seed  # not persisted by Ax 1.3.1; new candidates draw from it
        opt = cls(client, space, seed)
        opt._set_early_stopping(early_stopping)
        if client._experiment.optimization_config.is_moo_problem:
            opt.note = _bounded_fused_kernel()
        opt.busy_s = time.perf_counter() - start
        return opt


def analyses(opt: Optimizer, objectives: list[str], contour_pairs: list[tuple[str, str]]) -> tuple[dict[str, Any], dict[str, float] | None, list[str]]:
    """Ax's interactive plots (name -> plotly figure), parameter importance (Sobol sensitivity of
    the model, |total index| per parameter) and the reasons of the analyses that could not run.

    Ax computes these from the experiment and the fitted model; ``Client.compute_analyses`` hides
    their errors, so each analysis is computed directly and its failure reported.
    """
    _quiet_ax()
    from ax.analysis.plotly.parallel_coordinates import ParallelCoordinatesPlot
    from ax.analysis.plotly.progression import ProgressionPlot
    from ax.analysis.plotly.scatter import ScatterPlot
    from ax.analysis.plotly.sensitivity import SensitivityAnalysisPlot
    from ax.analysis.plotly.surface.contour import ContourPlot
    from ax.analysis.plotly.utility_progression import UtilityProgressionAnalysis

    objective = objectives[0]
    experiment, strategy = opt.client._experiment, opt.client._generation_strategy  # no public accessor in 1.3.1
    wanted: dict[str, Any] = {
        "trace": UtilityProgressionAnalysis(),
        "parallel_coordinates": ParallelCoordinatesPlot(metric_name=objective),
        "learning_curves": ProgressionPlot(metric_name=objective),
        "sensitivity": SensitivityAnalysisPlot(metric_name=objective),
    }
    names = {p.ax_name: p.name for p in opt.space.params}
    for x, y in contour_pairs:
        ax_x = next((a for a, n in names.items() if n == x), None)
        ax_y = next((a for a, n in names.items() if n == y), None)
        if ax_x and ax_y:
            wanted[f"contour_{x}_{y}"] = ContourPlot(x_parameter_name=ax_x, y_parameter_name=ax_y, metric_name=objective)
    if len(objectives) > 1:
        wanted["pareto_front"] = ScatterPlot(x_metric_name=objectives[0], y_metric_name=objectives[1],
                                             show_pareto_frontier=True)
    from ax.adapter.torch import TorchAdapter

    # Ax fits its model of the objective once Bayesian optimization starts; before, the model-based
    # analyses fail with an error about adapter classes, which says nothing to a user
    no_model = not isinstance(strategy.adapter, TorchAdapter)
    figures, importance, errors = {}, None, []
    for name, analysis in wanted.items():
        try:
            card = analysis.compute(experiment=experiment, generation_strategy=strategy)
            figures[name] = card.get_figure()
            if name == "sensitivity":
                importance = {names.get(p, p): abs(float(v)) for p, v in zip(card.df["parameter_name"], card.df["sensitivity"], strict=True)}
        except Exception as exc:  # an analysis Ax cannot run yet (too few trials, no model) is skipped
            model_based = name == "sensitivity" or name.startswith("contour_")
            errors.append(f"{name}: {NO_MODEL_YET if no_model and model_based else first_line(exc, 160)}")
    return figures, importance, errors


NO_MODEL_YET = ("it needs Ax's model of the objective, fitted once Bayesian optimization starts (after the "
                "baseline and the initial design); this study ended before")
