"""Ax's analyses of a study: its interactive plots and parameter importance, for the report."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import first_line
from . import quiet_ax, seam
from .encoding import ax_name

if TYPE_CHECKING:
    from . import Optimizer


def analyses(opt: Optimizer, objectives: list[str], contour_pairs: list[tuple[str, str]]) -> tuple[dict[str, Any], dict[str, float] | None, list[str]]:
    """Ax's interactive plots (name -> plotly figure), parameter importance (Sobol sensitivity of
    the model, |total index| per parameter) and the reasons of the analyses that could not run.

    Ax computes these from the experiment and the fitted model; ``Client.compute_analyses`` hides
    their errors, so each analysis is computed directly and its failure reported.
    """
    quiet_ax()
    from ax.analysis.plotly.parallel_coordinates import ParallelCoordinatesPlot
    from ax.analysis.plotly.progression import ProgressionPlot
    from ax.analysis.plotly.scatter import ScatterPlot
    from ax.analysis.plotly.sensitivity import SensitivityAnalysisPlot
    from ax.analysis.plotly.surface.contour import ContourPlot
    from ax.analysis.plotly.utility_progression import UtilityProgressionAnalysis

    objective = objectives[0]
    experiment, strategy = seam.experiment(opt.client), seam.generation_strategy(opt.client)
    wanted: dict[str, Any] = {
        "trace": UtilityProgressionAnalysis(),
        "parallel_coordinates": ParallelCoordinatesPlot(metric_name=objective),
        "learning_curves": ProgressionPlot(metric_name=objective),
        "sensitivity": SensitivityAnalysisPlot(metric_name=objective),
    }
    # under the LoRA parameterization Ax's model sees the effective step, not the learning rate: its
    # importance is reported under that name, and Ax's contours over the learning rate are left to the
    # report's own contour plots, which are drawn in the user's parameters
    step = opt.space.step
    names = {ax_name(p): p.name for p in opt.space.params if p is not step}
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
                labels = {**names, **({ax_name(step): f"effective_{step.name}"} if step else {})}
                importance = {labels.get(p, p): abs(float(v)) for p, v in zip(card.df["parameter_name"], card.df["sensitivity"], strict=True)}
        except Exception as exc:  # an analysis Ax cannot run yet (too few trials, no model) is skipped
            model_based = name == "sensitivity" or name.startswith("contour_")
            errors.append(f"{name}: {NO_MODEL_YET if no_model and model_based else first_line(exc, 160)}")
    return figures, importance, errors


NO_MODEL_YET = ("it needs Ax's model of the objective, fitted once Bayesian optimization starts (after the "
                "baseline and the initial design); this study ended before")
