"""How far the curve's intermediate points, computed on a fixed subset of the validation set, are from
the whole set's loss at the same point: real fine-tunes of the demo model over a spread of the default
search space, each evaluated on both at every point.

The difference splits into an offset (the same subset at every point of every trial, so much of it is
shared) and what is left from trial to trial. The early-stopping benchmark replays recorded whole-set
curves with this difference added, so that it measures the rules on the curve a study now computes.

    python benchmarks/curve_subset.py      # about 2 minutes on 2 cores; writes data/curve_subset_noise.json
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from pathlib import Path

DATA = Path(__file__).parent / "data" / "curve_subset_noise.json"
POINTS = 10


def measure(rank: int, alpha: int, lr: float, bs: int) -> list[dict]:
    from loratune.config import FinetuneConfig
    from loratune.data import load_examples
    from loratune.model import load_base
    from loratune.pack import Hooks, Pack, curve_subset

    cfg = FinetuneConfig()
    cfg.lora.rank, cfg.lora.alpha, cfg.training.learning_rate, cfg.training.batch_size = rank, alpha, lr, bs
    cfg.training.eval_points = POINTS
    base = load_base(cfg)
    train, validation = load_examples(base.tokenizer, cfg.data, cfg.training.seed)
    pack = Pack(base, (train, validation))
    subset = curve_subset(cfg, validation)
    rows = []

    class FullLossToo(Hooks):
        def on_point(self, point) -> bool:
            rows.append({"progress": point.progress, "subset": point.val_loss,
                         "full": pack.validation_losses([trial], validation)["trial"]})
            return False

    trial = pack.add("trial", cfg, FullLossToo())
    while not trial.done:
        pack.round()
    pack.close()
    assert all(len(subset) < len(validation) for _ in rows)
    return rows


def main() -> None:
    started = time.perf_counter()
    grid = list(itertools.product([8, 64], [16, 128], [2e-5, 3e-4], [1, 4]))  # 16 corners of the default space
    trials = [measure(*point) for point in grid]
    diffs = [[r["subset"] - r["full"] for r in t] for t in trials]
    by_point = list(zip(*diffs, strict=True))
    offset = [statistics.fmean(d) for d in by_point]
    residual = [d - offset[i] for t in diffs for i, d in enumerate(t)]
    relative = [abs(r["subset"] - r["full"]) / r["full"] for t in trials for r in t]
    result = {"points": POINTS, "trials": len(trials), "offset_by_point": offset,
              "residual_sd": statistics.pstdev(residual), "median_relative_difference": statistics.median(relative),
              "whole_set_sd_across_trials_by_point": [statistics.pstdev([t[i]["full"] for t in trials])
                                                     for i in range(POINTS - 1)]}
    DATA.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(trials)} fine-tunes in {time.perf_counter() - started:.0f} s; wrote {DATA}")
    print(f"offset (subset - whole set) by point: {', '.join(f'{o:+.4f}' for o in offset)}")
    print(f"trial-to-trial sd of the difference around it: {result['residual_sd']:.4f}; median |difference| "
          f"{result['median_relative_difference']:.2%} of the loss")
    print("sd of the whole-set loss across these trials by point (the signal): "
          + ", ".join(f"{v:.3f}" for v in result["whole_set_sd_across_trials_by_point"]))


if __name__ == "__main__":
    sys.exit(main())
