"""Retrain the best config and the baseline for the full number of epochs with several seeds, and
say whether the difference exceeds the seed-to-seed noise. With ~150 examples it often does not.

The retrains are scored on the test split when the study has one: the validation set chose the winner, so
a comparison on it inherits the winner's curse. Without one, the comparison says that it reuses that data.
They run as jobs on one worker that keeps the base model loaded (the same results as fresh processes)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from .errors import LoratuneError, TrainingFailed
from .executors.base import TrialSpec
from .results import Gain
from .storage import atomic_write_json
from .trial import Evaluation, TrialState

T = TypeVar("T")


@dataclass
class Comparison:
    best: list[float]
    baseline: list[float]
    best_mean: float
    best_std: float
    baseline_mean: float
    baseline_std: float
    difference: float  # baseline_mean - best_mean: positive when the best config is better
    relative: float | None  # difference / |baseline_mean|; None against a mean of 0 (results.Gain)
    p_value: float | None  # Welch's t-test, two-sided; None with fewer than two runs a side
    beyond_noise: bool
    data: str = "validation"  # what the losses are on: "test" (never seen by the search) or "validation"

    def verdict(self) -> str:
        if self.p_value is None:
            return "one run per config: no estimate of the noise"
        if self.beyond_noise:
            p = "p < 0.001" if self.p_value < 0.001 else f"p = {self.p_value:.3f}"
            return f"the improvement exceeds the seed-to-seed noise (Welch's t-test, {p})"
        return (f"the difference is within the seed-to-seed noise (p = {self.p_value:.2f}): "
                "this win may not be real")


def compare_runs(best: list[float], baseline: list[float], alpha: float = 0.05) -> Comparison:
    """Means, spreads, and Welch's t-test of validation losses (lower is better)."""
    from scipy import stats

    if not best or not baseline:
        raise LoratuneError("comparison: needs at least one run of each config")
    bm, am = statistics.fmean(best), statistics.fmean(baseline)
    bs = statistics.stdev(best) if len(best) > 1 else 0.0
    as_ = statistics.stdev(baseline) if len(baseline) > 1 else 0.0
    p = None
    if len(best) > 1 and len(baseline) > 1:
        if bs == 0 and as_ == 0:
            p = 0.0 if bm != am else 1.0
        else:
            p = float(stats.ttest_ind(best, baseline, equal_var=False).pvalue)
    gain = Gain(bm, am, minimize=True)
    return Comparison(best, baseline, bm, bs, am, as_, gain.absolute, gain.relative, p,
                      bool(p is not None and p < alpha and gain.absolute > 0))


def retrain_and_compare(study_dir: str | Path, seeds: int = 3, epochs: float | None = None,
                        quiet: bool = False, scorers: dict | None = None) -> Comparison:
    """Retrain the best config and the baseline ``seeds`` times each, score each retrain on the test split
    (or, without one, on the validation set), write ``comparison.json`` (tied to this study and its best
    trial) and return the comparison of their losses. The last comparison's retrains are kept aside until
    all the new ones succeeded: a comparison that fails, or is killed, leaves the last one as it was
    (restored by the next). ``scorers``: the study's score functions, when it was given some."""
    from . import checkpoint
    from .data import test_source
    from .preflight import require_scorer_functions, resolve_scorers

    directory = Path(study_dir)
    paths, stored = checkpoint.load(directory)
    best, base = stored.best(), next((r for r in stored.records if r.baseline), None)
    if best is None or stored.evaluation is not Evaluation.FINETUNE:
        raise LoratuneError(f"{directory}: no completed fine-tune trial to retrain")
    if base is None:
        raise LoratuneError(f"{directory}: the study has no baseline trial to compare with")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise LoratuneError(f"seeds: must be a positive integer, got {seeds!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int | float)
                               or not math.isfinite(epochs) or epochs <= 0):
        raise LoratuneError(f"epochs: must be a number > 0, got {epochs!r}")
    require_scorer_functions(stored, scorers, paths.checkpoint, "compare it from Python with the same scorers=")
    on_test = test_source(stored.config.data) is not None
    scorer_list = resolve_scorers(stored.config, scorers, str(paths.checkpoint)) if on_test else []
    runs = {"best": best, "baseline": base}
    jobs = _retrain_jobs(stored, paths, runs, seeds, epochs, on_test, bool(scorer_list))
    ended = _keeping_the_last_comparison(paths, lambda: _retrain(stored, jobs, runs, seeds, scorer_list, quiet))
    losses = {name: [ended[name][seed]["loss"] for seed in range(seeds)] for name in runs}  # in seed order
    scores = {m: {name: [ended[name][seed][m] for seed in range(seeds) if m in ended[name][seed]] for name in runs}
              for m in ended["best"][0] if m != "loss"}
    result = dataclasses.replace(compare_runs(losses["best"], losses["baseline"]), data="test" if on_test else "validation")
    atomic_write_json(paths.comparison, {
        **asdict(result), "seeds": seeds, "epochs": jobs[0][2].config["training"]["epochs"], "scores": scores,
        "study_id": stored.study_id, "best_trial": best.index, "baseline_trial": base.index, "verdict": result.verdict()})
    return result


def _retrain_jobs(stored, paths, runs: dict, seeds: int, epochs: float | None, on_test: bool,
                  answer: bool) -> list[tuple[str, int, TrialSpec]]:
    """(name, seed, job) for each retrain: the trial's training config with the seed, the epochs asked for
    and its own directory under the comparison's."""
    from . import checkpoint
    from .config import to_dict

    jobs = []
    for name, record in runs.items():
        for seed in range(seeds):
            run_dir = paths.directory / checkpoint.COMPARISON_DIR / f"{name}_seed{seed}"
            cfg = checkpoint.training_config(stored, paths, record)
            cfg.training.seed, cfg.output_dir = seed, str(run_dir.resolve())
            if epochs is not None:
                cfg.training.epochs = epochs
            jobs.append((name, seed, TrialSpec(len(jobs), dict(record.params), run_dir, to_dict(cfg), test=on_test,
                                               answer=int(answer), max_new_tokens=stored.config.scoring.max_new_tokens)))
    return jobs


def _retrain(stored, jobs: list[tuple[str, int, TrialSpec]], runs: dict, seeds: int, scorer_list: list,
             quiet: bool) -> dict[str, dict[int, dict[str, float]]]:
    """Run the retrains on one worker that keeps the base loaded: name -> seed -> loss and scores. Raises
    TrainingFailed (a retrain failed) or LoratuneError (a scorer failed) at the first that does."""
    from .executors import create_executor, run_to_end
    from .scoring import ScoringError, score_answers

    names = {spec.index: (name, seed) for name, seed, spec in jobs}
    ended: dict[str, dict[int, dict[str, float]]] = {name: {} for name in runs}

    def announce(spec: TrialSpec) -> None:
        if not quiet:
            name, seed = names[spec.index]
            print(f"retraining {name} (trial {runs[name].index}), seed {seed + 1}/{seeds}", flush=True)

    executor = create_executor(dataclasses.replace(stored.config, workers=1))
    try:
        for spec, result in run_to_end(executor, [spec for _, _, spec in jobs], announce):
            name, seed = names[spec.index]
            if result.state is not TrialState.COMPLETED:
                raise TrainingFailed(f"retraining {name} (trial {runs[name].index}), seed {seed}, failed: {result.reason}; "
                                     f"log in {spec.directory}")
            try:
                ended[name][seed] = {"loss": result.metrics["loss"],
                                     **score_answers(scorer_list, result.extra.get("answers") or [])}
            except ScoringError as exc:
                raise LoratuneError(f"retraining {name}, seed {seed}: {exc}") from None
    finally:
        executor.shutdown()
    return ended


def _keeping_the_last_comparison(paths, retrain: Callable[[], T]) -> T:
    """``retrain()`` with the last comparison's retrains set aside until it returns: restored if it raises
    (or first thing next time, if this process is killed), removed once it succeeded."""
    import shutil

    from . import checkpoint

    final, kept = paths.directory / checkpoint.COMPARISON_DIR, paths.directory / checkpoint.PREVIOUS_COMPARISON_DIR
    if kept.exists():  # a comparison killed while it ran: the one before it comes back first
        shutil.rmtree(final, ignore_errors=True)
        kept.rename(final)
    if final.exists():
        final.rename(kept)
    try:
        out = retrain()
    except BaseException:  # the last comparison stays as it was
        shutil.rmtree(final, ignore_errors=True)
        if kept.exists():
            kept.rename(final)
        raise
    shutil.rmtree(kept, ignore_errors=True)
    return out
