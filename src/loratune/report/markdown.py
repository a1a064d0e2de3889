"""OPTIMIZATION_RESULTS.md: the analysis a person reads, written from ReportData."""

from __future__ import annotations

from .. import results
from ..checkpoint import REPORT_TITLE
from ..trial import TrialState
from .findings import ReportData, effective_scale


def _fmt(v) -> str:
    if isinstance(v, tuple):  # a bin
        return f"{v[0]:.2g} to {v[1]:.2g}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def render(data: ReportData, summary: dict, images: dict[str, str], html: dict[str, str],
           importance: dict[str, float] | None, analysis_errors: list[str], comparison: dict | None,
           stale_comparison: str | None = None) -> str:
    """OPTIMIZATION_RESULTS.md, section after section."""
    lines = [REPORT_TITLE, ""] + _overview(data, summary) + _settings(summary) + _result(data, summary, comparison)
    lines += _trials(data, summary, images) + _insights(data, images) + _importance(importance, analysis_errors, images)
    lines += _early_stopping(data, images) + _pareto(data, summary, images)
    if comparison:
        lines += _comparison(comparison)
    elif stale_comparison:
        lines += ["## Best versus baseline, fully retrained", "",
                  f"Not shown: {stale_comparison}. `loratune compare DIR` retrains this study's best config.", ""]
    if html:
        lines += ["## Interactive plots (Ax)", ""] + [f"- [{name.replace('_', ' ')}]({path})" for name, path in html.items()] + [""]
    return "\n".join(lines) + "\n"


def _overview(data: ReportData, summary: dict) -> list[str]:
    objectives = summary.get("objectives", [data.objective])
    n = len(data.records)
    state = f"{n} trial{'' if n == 1 else 's'}" + (f", {data.running} still running or interrupted" if data.running else "")
    aims = ", ".join(("minimize " if m else "maximize ") + o
                     for o, m in zip(objectives, summary.get("minimize", [True]), strict=False))
    wall, ax_s = summary.get("wall_time_s", 0), summary.get("optimizer_time_s")
    in_ax = f", {ax_s:.0f} s of it in Ax ({min(ax_s / max(wall or 1, 1e-9), 1.0):.0%})" if ax_s is not None else ""
    return [f"Study of {state}: {summary.get('evaluation', 'finetune')} evaluation, objective"
            f"{'s' if len(objectives) > 1 else ''} {aims}, seed {summary.get('seed')}, {wall / 60:.1f} min of wall "
            f"time{in_ax}.", ""]


def _settings(summary: dict) -> list[str]:
    lines = ["## Settings", "", "Search space:", ""]
    lines += [f"- `{k}`: {v}" for k, v in (summary.get("search_space") or {}).items()]
    if summary.get("constraints"):
        lines += ["", "Constraints: " + ", ".join(f"`{c}`" for c in summary["constraints"])]
    if summary.get("parameterization") == "lora":
        lines += ["", "Ax searched the learning rate as LoRA's effective step (learning rate x alpha / rank, or / "
                      "sqrt(rank) with rsLoRA); every trial here is in the parameters above."]
    if warm := summary.get("warm_start"):
        lines += ["", f"Warm start: Ax's model also learned from {warm['trials']} completed trials of "
                      + ", ".join(f"`{s}`" for s in warm["studies"]) + " (not this study's trials, not run again)."]
    return lines + ["", "States: " + ", ".join(f"{k} {v}" for k, v in (summary.get("states") or {}).items() if v), ""]


def _result(data: ReportData, summary: dict, comparison: dict | None) -> list[str]:
    obj = data.objective
    lines = ["## Result", ""]
    if data.best is None:
        lines += ["No trial has completed yet, so there is no best configuration.", ""]
    else:
        rule = " (the knee of the Pareto front: the trial closest to the best of every objective at once)" \
            if data.pareto else ""
        lines += [f"Best trial{rule}: **#{data.best.index}**, {results.format_params(data.best.params)}, "
                  f"{obj} **{data.best.metrics[obj]:.4f}**."]
        if data.improvement:
            lines += [f"Baseline (#{data.baseline.index}, {results.format_params(data.baseline.params)}): {obj} "
                      f"{data.improvement.baseline:.4f}. Best against baseline: {data.improvement.text()}."]
        lines += [""]
    return lines + _test_section(summary.get("test")) + _recommendation(data, summary, comparison)


def _trials(data: ReportData, summary: dict, images: dict[str, str]) -> list[str]:
    obj, names = data.objective, list(summary.get("search_space") or {})
    lines = ["## Every trial", "", "★ best, ◆ baseline. Effective scale is alpha/rank"
             + (" (alpha/sqrt(rank) with rsLoRA)" if data.rslora else "") + ".", ""]
    rows = []
    for r in sorted(data.records, key=lambda r: r.index):
        mark = ("★ " if data.best and r.index == data.best.index else "") + ("◆ " if r.baseline else "")
        scale = effective_scale(r.params, data.rslora)
        value = r.metrics.get(obj)
        rows.append([f"{mark}{r.index}", *[r.params.get(n, "") for n in names],
                     f"{scale:.3g}" if scale else "", f"{value:.4f}" if isinstance(value, float) else "",
                     r.state + (f" ({r.reason})" if r.reason and r.state.is_failure else ""),
                     f"{r.duration_s or 0:.1f}"])
    lines += _table(["#", *names, "scale", obj, "state", "time (s)"], rows) + [""]
    if images.get("trace"):
        lines += [f"![Optimization trace: {obj} of each trial and the best so far]({images['trace']})", ""]
    return lines


def _insights(data: ReportData, images: dict[str, str]) -> list[str]:
    obj = data.objective
    lines = ["## Key insights", ""]
    if not data.insights:
        lines += ["Too few completed trials to say anything yet.", ""]
    for ins in data.insights:
        lines += [f"### {ins.title}", "", ins.finding, ""]
        lines += _table(["value", "trials", f"mean {obj}", f"best {obj}"],
                        [[g.value, g.n, g.mean, g.best] for g in ins.groups]) + [""]
    for key, img in images.items():
        if key.startswith("contour_"):
            x, y = key.removeprefix("contour_").split("__")
            lines += [f"![{obj} over {x} and {y}]({img})", ""]
    return lines


def _importance(importance: dict[str, float] | None, analysis_errors: list[str], images: dict[str, str]) -> list[str]:
    lines = ["## Parameter importance", ""]
    if importance:
        lines += ["Total Sobol sensitivity of Ax's model of the objective (share of its variance each parameter "
                  "explains, interactions included):", ""]
        lines += _table(["parameter", "importance"], sorted(importance.items(), key=lambda kv: -kv[1])) + [""]
        if any(name.startswith("effective_") for name in importance):
            lines += ["Ax searched the learning rate as LoRA's effective step (`effective_learning_rate`: learning "
                      "rate x alpha / rank, or / sqrt(rank) with rsLoRA), so its model's importance is that step's, "
                      "with alpha and rank at a fixed step.", ""]
        if images.get("importance"):
            lines += [f"![Parameter importance]({images['importance']})", ""]
        return lines
    reasons = [e.removeprefix("sensitivity: ") for e in analysis_errors if e.startswith("sensitivity")]
    return lines + ["Ax's sensitivity analysis is not available for this study"
                    + (f": {'; '.join(reasons)}." if reasons else "."), ""]


def _early_stopping(data: ReportData, images: dict[str, str]) -> list[str]:
    es = data.early_stopping
    lines = ["## Early stopping", ""]
    if es["stopped"]:
        lines += [f"{es['stopped']} trial{'s' * (es['stopped'] != 1)} stopped early, saving {es['trials_saved']:.2f} "
                  f"trials' worth of training ({es['share_saved']:.0%} of the training the finished trials would have "
                  "needed). Their partial results are never taken as the best.", ""]
        lines += _table(["#", "stopped at", "training saved"],
                        [[r.index, f"{r.curve[-1]['progress']:.0%}" if r.curve else "?",
                          f"{r.training_saved or 0:.0%}"] for r in data.records if r.state is TrialState.EARLY_STOPPED]) + [""]
    else:
        lines += ["No trial was stopped early.", ""]
    if images.get("curves"):
        lines += [f"![Learning curves; early-stopped trials dashed]({images['curves']})", ""]
    if images.get("parallel"):
        lines += [f"![Parallel coordinates of the completed trials]({images['parallel']})", ""]
    return lines


def _pareto(data: ReportData, summary: dict, images: dict[str, str]) -> list[str]:
    if not data.pareto:
        return []
    names, objs = list(summary.get("search_space") or {}), summary.get("objectives", [data.objective])
    lines = ["## Pareto front", "", "No other trial is better on every objective than these. best_config.yaml "
             "takes the knee: the point nearest the ideal corner once each objective is scaled to [0, 1] over "
             "the front; `loratune export DIR --trial N` writes the config of any other.", ""]
    lines += _table(["#", *names, *objs], [[r.index, *[r.params.get(n) for n in names],
                                            *[r.metrics.get(o) for o in objs]] for r in data.pareto]) + [""]
    if images.get("pareto"):
        lines += [f"![Pareto front]({images['pareto']})", ""]
    return lines


def _test_section(test: dict | None) -> list[str]:
    """Validation (used to choose the best) and test (never seen by the search) side by side."""
    if not test:
        return []
    lines = ["### Validation versus test", ""]
    if "error" in test:
        return lines + [f"The final test did not run: {test['error']}. `loratune evaluate DIR` tries again.", ""]
    lines += [f"The best config and the baseline scored on {test['examples']} test examples ({test['source']}) that no "
              "trial ever read. The best trial was chosen as the lowest of many noisy validation measurements, so its "
              "validation margin is biased upwards (the winner's curse); the test margin is not.", ""]
    gains, validation = test.get("improvement") or {}, test.get("validation") or {}
    if not gains:
        best = test["best"]
        return lines + [f"Best trial #{best['trial']}: test loss {best['loss']:.4f} (the study has no baseline to "
                        "compare it with).", ""]
    rows = []
    for name, g in gains.items():
        v = validation.get(name)
        rows.append([name, results.Gain.from_dict(v).text() if v else "not measured", results.Gain.from_dict(g).text()])
    lines += _table(["metric (best vs baseline)", "validation: used to choose", "test: never seen"], rows) + [""]
    held = test.get("held")
    if held is not None:
        lines += [(f"{held:.0%} of the validation gain in loss held on test." if held <= 1 else
                   "The gain in loss on test exceeds the gain on validation.") + " Gains are signed so that a positive "
                  "one is better.", ""]
    return lines


def _recommendation(data: ReportData, summary: dict, comparison: dict | None) -> list[str]:
    if data.best is None:
        return []
    lines = ["### Recommendation", ""]
    obj = data.objective
    values = sorted(r.metrics[obj] for r in data.completed)
    runner_up = values[1] if len(values) > 1 else None
    text = f"Retrain with `best_config.yaml` (trial #{data.best.index})."
    if runner_up is not None:
        text += f" The next best trial scored {runner_up:.4f}, {abs(runner_up - values[0]):.4f} away."
    if comparison:
        text += f" After the full retrain with {comparison['seeds']} seeds, {comparison['verdict']}."
    else:
        text += (" How sure this is depends on the seed-to-seed noise, which one run per trial does not show: "
                 "`loratune compare DIR` retrains the best config and the baseline with 3 seeds each and adds the "
                 "answer here.")
    if len(data.completed) < 10:
        text += f" Only {len(data.completed)} trials completed: more would make the search surer."
    return lines + [text, ""]


def _comparison(c: dict) -> list[str]:
    on_test = c.get("data") == "test"
    lines = ["## Best versus baseline, fully retrained", "",
             f"{c['epochs']:g} epochs, {c['seeds']} seeds each (trial #{c['best_trial']} against the baseline "
             f"#{c['baseline_trial']}), scored "
             + ("on the test split, which the search never saw:" if on_test else
                "on the validation set, the data that chose the winner (the study has no test split), so the best "
                "config's margin is biased in its favour:"), ""]
    what = "test" if on_test else "validation"
    rows = [["best", ", ".join(f"{v:.4f}" for v in c["best"]), c["best_mean"], c["best_std"]],
            ["baseline", ", ".join(f"{v:.4f}" for v in c["baseline"]), c["baseline_mean"], c["baseline_std"]]]
    lines += _table(["config", f"{what} loss per seed", "mean", "std"], rows)
    for metric, values in (c.get("scores") or {}).items():
        lines += ["", f"{metric} per seed: best {', '.join(f'{v:.4f}' for v in values['best'])}; baseline "
                      f"{', '.join(f'{v:.4f}' for v in values['baseline'])}."]
    gain = results.Gain(c["best_mean"], c["baseline_mean"])
    return lines + ["", f"Mean loss, best against baseline: {gain.text()}: {c['verdict']}.", ""]
