"""Early-stopping savings: training spent and final regret of a 20-trial study on the tabular LoRA
benchmark, with and without each early-stopping mode.

    python benchmarks/early_stopping.py [--reps 15] [--trials 20] [--jobs 2]

Each repetition runs a real study (``run_optimization`` with the embedded default: the default
search space, the baseline as trial 1) whose evaluation replays a recorded fine-tune from
data/tabular_lora.csv: one random seed's run of the nearest grid point, reporting its 10-point validation
curve as training would, and stopping when the study says so. Training spent is the recorded
training time up to the point where the trial ended. Final regret is the true value (mean over
seeds) of the study's best trial minus the grid optimum. Repetition r uses seed r in every mode.

The intermediate points of a replayed curve carry the difference a study's fixed curve subset makes
(``training.eval_subset``), measured on real fine-tunes by curve_subset.py: its offset at each point plus
trial-to-trial noise of the measured spread (``--whole-set`` replays the whole-set curves as recorded).

Modes: the threshold rule relative to the baseline (``threshold: baseline``: stop a trial whose
loss after 10% of training is above the baseline's loss at that point), Ax's percentile rule with
loratune's defaults (median, from 30% of training, 5 curves), and both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tabular import Tabular  # noqa: E402

CHECK_AT = 0.1
MODES = ("none", "threshold", "percentile", "both")


SUBSET = json.loads((Path(__file__).parent / "data" / "curve_subset_noise.json").read_text())


def run_study(mode: str, seed: int, trials: int, whole_set: bool = False, **percentile_settings) -> dict:
    from loratune.api import run_optimization
    from loratune.early_stopping import EarlyStoppingCallback

    table = Tabular()
    rng, noise, spent = random.Random(seed), random.Random(seed + 10_000), [0.0]

    def replay(params: dict, report) -> float:
        run = table.run(params, rng)
        curve = run["curve"]
        for i, loss in enumerate(curve):
            progress = (i + 1) / len(curve)
            seen = loss if whole_set or progress == 1 else \
                loss + SUBSET["offset_by_point"][i] + noise.gauss(0, SUBSET["residual_sd"])
            if report(progress, {"loss": seen}) and progress < 1:
                spent[0] += run["train_time_s"] * progress
                return loss  # a stopped trial's last point is computed on the whole set
        spent[0] += run["train_time_s"]
        return curve[-1]

    callback = EarlyStoppingCallback("baseline", CHECK_AT) if mode in ("threshold", "both") else None
    es = {"percentile": 50.0} if mode in ("percentile", "both") else {}
    with tempfile.TemporaryDirectory() as tmp:
        from loratune.settings import load_study_config

        cfg, _ = load_study_config(None, custom_metrics=True)
        cfg.early_stopping.percentile = es.get("percentile")
        for name, value in percentile_settings.items():  # percentile, min_progression, min_curves
            setattr(cfg.early_stopping, name, value)
        results = run_optimization(num_trials=trials, config=cfg, seed=seed, evaluate=replay, early_stopping=callback,
                                   output_dir=tmp, quiet=True, report=False)
    stopped = sum(t["state"] == "early_stopped" for t in results["trials"])
    return {"mode": mode, "seed": seed, "spent_s": spent[0],
            "regret": table.true_value(results["best_params"]) - table.optimum, "stopped": stopped}


def _task(args: tuple) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    return run_study(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)  # 4 modes x 15 studies: about 10 minutes on 2 cores
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--whole-set", action="store_true", help="replay the recorded whole-set curves as they are")
    args = parser.parse_args()
    modes = args.modes.split(",")
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(_task, [(m, r, args.trials, args.whole_set) for m in modes for r in range(args.reps)]))
    print(f"{len(runs)} studies in {time.perf_counter() - start:.0f} s with {args.jobs} jobs\n")
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in modes}
    reference = statistics.fmean(r["spent_s"] for r in by_mode["none"]) if "none" in by_mode else None
    print("| early stopping | training spent (s, mean) | vs none | trials stopped (mean) | final regret median [q1, q3] | reps at the optimum |")
    print("|---|---|---|---|---|---|")
    for mode, rs in by_mode.items():
        spent = statistics.fmean(r["spent_s"] for r in rs)
        q1, med, q3 = statistics.quantiles([r["regret"] for r in rs], n=4, method="inclusive")
        at_opt = sum(r["regret"] <= 1e-12 for r in rs)
        saving = f"{spent / reference - 1:+.0%}" if reference else "-"
        print(f"| {mode} | {spent:.1f} | {saving} | {statistics.fmean(r['stopped'] for r in rs):.1f} "
              f"| {med:.4f} [{q1:.4f}, {q3:.4f}] | {at_opt}/{len(rs)} |")


if __name__ == "__main__":
    main()
