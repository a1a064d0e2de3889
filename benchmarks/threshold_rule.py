"""The threshold rule against Ax's own ThresholdEarlyStoppingStrategy, on the same recorded learning curves.

    python benchmarks/threshold_rule.py [--runs 60] [--check-at 0.3] [--seed 0]

Issue 34 asks whether Ax's ``ThresholdEarlyStoppingStrategy`` (with ``OrEarlyStoppingStrategy`` beside the
percentile rule) can replace loratune's ``EarlyStoppingCallback``. Both judge the same curves here: ``--runs``
recorded fine-tunes drawn from data/tabular_lora.csv (real 10-point validation curves of the default
space), each a trial of an Ax experiment built by loratune's own optimizer. loratune's rule decides once,
at the first point at or past ``check_at``: stop when the loss there is above the threshold. Ax's strategy
(``metric_threshold``, ``min_progression`` at ``check_at``, ``min_curves=0`` so that it may stop the first
trials as ours does) is asked at every point from ``check_at`` on, as a study would ask it. The threshold
is the runs' median loss at ``check_at``, so that about half of them are stopped.

Printed: how many runs each stops, at which progress, where they disagree, the training share each
spends, and the time one decision takes (Ax: ``should_stop_trial_early`` on the client; ours: the
callback's ``should_stop``). The baseline variant (``threshold: baseline``, loratune's recommended
setting) has no Ax counterpart and is not measured here.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tabular import Tabular  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--check-at", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from ax.early_stopping.strategies import ThresholdEarlyStoppingStrategy

    from loratune.early_stopping import EarlyStoppingCallback
    from loratune.optimizer import PROGRESSION_SCALE, Optimizer
    from loratune.search_space import study_space
    from loratune.settings import load_study_config

    table, rng = Tabular(), random.Random(args.seed)
    keys = sorted(table.rows)
    runs = [(key, rng.choice(table.rows[key])) for key in (rng.choice(keys) for _ in range(args.runs))]
    curves = [[((i + 1) / len(run["curve"]), loss) for i, loss in enumerate(run["curve"])] for _, run in runs]
    at_check = [next(loss for p, loss in curve if p >= args.check_at - 1e-9) for curve in curves]
    threshold = statistics.median(at_check)

    cfg, _ = load_study_config(None)
    opt = Optimizer.create(study_space(cfg), ["loss"], [True], [], seed=args.seed)
    opt.client.set_early_stopping_strategy(ThresholdEarlyStoppingStrategy(
        metric_signatures=["loss"], metric_threshold=threshold, min_progression=round(args.check_at * PROGRESSION_SCALE),
        min_curves=0))
    ours_rule = EarlyStoppingCallback(threshold, args.check_at)

    ours, axs, ours_s, axs_s = [], [], [], []
    for (key, _), curve in zip(runs, curves, strict=True):
        params = dict(zip(("lora_rank", "lora_alpha", "batch_size", "learning_rate"), key, strict=True))
        index = opt.attach(params)
        seen, stop_ours, stop_ax = [], None, None
        for progress, loss in curve:
            seen.append({"progress": progress, "loss": loss})
            if stop_ours is None:
                start = time.perf_counter()
                if ours_rule.should_stop(seen):
                    stop_ours = progress
                ours_s.append(time.perf_counter() - start)
            if stop_ax is None:
                opt.progress(index, {"loss": loss}, max(1, round(progress * PROGRESSION_SCALE)))
                if progress >= args.check_at - 1e-9 and progress < 1:
                    start = time.perf_counter()
                    if opt.should_stop(index):
                        stop_ax = progress
                    axs_s.append(time.perf_counter() - start)
        if stop_ax is not None:
            opt.early_stopped(index)
        else:
            opt.complete(index, {"loss": curve[-1][1]})
        ours.append(stop_ours)
        axs.append(stop_ax)

    def spent(stops: list) -> float:
        return statistics.fmean(1.0 if s is None else s for s in stops)

    disagree = [(i, o, a) for i, (o, a) in enumerate(zip(ours, axs, strict=True)) if o != a]
    print(f"{len(runs)} recorded runs, threshold {threshold:.4f} (median loss at {args.check_at:.0%}), seed {args.seed}")
    print("| rule | stopped | at progress | training spent | one decision |")
    print("|---|---|---|---|---|")
    for name, stops, times in (("loratune EarlyStoppingCallback", ours, ours_s),
                               ("Ax ThresholdEarlyStoppingStrategy", axs, axs_s)):
        at = sorted({s for s in stops if s is not None})
        print(f"| {name} | {sum(s is not None for s in stops)} | {', '.join(f'{p:.1f}' for p in at) or '-'} | "
              f"{spent(stops):.1%} | {statistics.median(times) * 1e3:.3f} ms (median of {len(times)}) |")
    print(f"disagreements: {len(disagree)}" + "".join(
        f"\n  run {i}: loratune {'stops at ' + format(o, '.1f') if o else 'runs on'}, "
        f"Ax {'stops at ' + format(a, '.1f') if a else 'runs on'}" for i, o, a in disagree[:10]))


if __name__ == "__main__":
    main()
