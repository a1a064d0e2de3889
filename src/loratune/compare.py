"""Retrain the best config and the baseline for the full number of epochs with several seeds, and
say whether the difference exceeds the seed-to-seed noise. With ~150 examples it often does not."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import LoratuneError, TrainingFailed
from .storage import atomic_write_json, read_json


@dataclass
class Comparison:
    best: list[float]
    baseline: list[float]
    best_mean: float
    best_std: float
    baseline_mean: float
    baseline_std: float
    difference: float  # baseline_mean - best_mean: positive when the best config is better
    relative: float
    p_value: float | None  # Welch's t-test, two-sided; None with fewer than two runs a side
    beyond_noise: bool

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
    diff = am - bm
    return Comparison(best, baseline, bm, bs, am, as_, diff, diff / am if am else math.nan, p,
                      bool(p is not None and p < alpha and diff > 0))


def retrain_and_compare(study_dir: str | Path, seeds: int = 3, epochs: float | None = None,
                        quiet: bool = False) -> Comparison:
    """Retrain the best config and the baseline ``seeds`` times each (fresh processes), write
    ``comparison.json`` (tied to this study and its best trial) and return the comparison. The retrains
    run in a folder of their own that replaces ``comparison/`` only once all of them succeeded: a
    comparison that fails leaves the last one as it was."""
    import shutil

    from . import checkpoint
    from .config import to_dict
    from .processes import die_with_parent
    from .settings import dump_yaml

    directory = Path(study_dir)
    paths, stored = checkpoint.load(directory)
    best, base = stored.best(), next((r for r in stored.records if r.baseline), None)
    if best is None or stored.evaluation != "finetune":
        raise LoratuneError(f"{directory}: no completed fine-tune trial to retrain")
    if base is None:
        raise LoratuneError(f"{directory}: the study has no baseline trial to compare with")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise LoratuneError(f"seeds: must be a positive integer, got {seeds!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int | float)
                               or not math.isfinite(epochs) or epochs <= 0):
        raise LoratuneError(f"epochs: must be a number > 0, got {epochs!r}")
    runs = {"best": best, "baseline": base}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    final, kept = paths.directory / checkpoint.COMPARISON_DIR, paths.directory / checkpoint.PREVIOUS_COMPARISON_DIR
    if kept.exists():  # a comparison killed while it ran: the one before it comes back first
        shutil.rmtree(final, ignore_errors=True)
        kept.rename(final)
    if final.exists():
        final.rename(kept)
    try:
        for name, record in runs.items():
            for seed in range(seeds):
                run_dir = final / f"{name}_seed{seed}"
                cfg = checkpoint.training_config(stored, paths, record)
                cfg.training.seed, cfg.output_dir = seed, str(run_dir)
                if epochs is not None:
                    cfg.training.epochs = epochs
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "config.yaml").write_text(dump_yaml(to_dict(cfg)))
                if not quiet:
                    print(f"retraining {name} (trial {record.index}), seed {seed + 1}/{seeds}", flush=True)
                proc = subprocess.run([sys.executable, "-m", "loratune.cli", "finetune", "--config",
                                       str(run_dir / "config.yaml"), "--overwrite", "--quiet"],
                                      capture_output=True, text=True, preexec_fn=die_with_parent())
                if proc.returncode != 0:
                    last = (proc.stderr.strip().splitlines() or ["?"])[-1].removeprefix("error: ")
                    raise TrainingFailed(f"retraining {name} (trial {record.index}), seed {seed}, failed: {last}")
                losses[name].append(read_json(run_dir / "metrics.json", "metrics")["val_loss"])
    except BaseException:  # the last comparison stays as it was
        shutil.rmtree(final, ignore_errors=True)
        if kept.exists():
            kept.rename(final)
        raise
    shutil.rmtree(kept, ignore_errors=True)
    result = compare_runs(losses["best"], losses["baseline"])
    atomic_write_json(paths.comparison, {**asdict(result), "seeds": seeds, "epochs": cfg.training.epochs,
                                         "study_id": stored.study_id, "best_trial": best.index,
                                         "baseline_trial": base.index, "verdict": result.verdict()})
    return result
