"""The tabular LoRA benchmark: loratune's own trainer on the demo model over a grid of the default
space (rank x alpha x batch size x 8 log-spaced learning rates, 2 seeds each), stored as a CSV.

    python benchmarks/tabular_grid.py [--shard 0/2] [--threads 1]

Its best point is the known optimum, so search methods can be compared on the same real numbers
in seconds (benchmarks/search_efficiency.py). Resumable: rows already in the file are skipped, so
shards can run side by side and a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "data" / "tabular_lora.csv"
RANKS, ALPHAS, BATCH_SIZES, SEEDS = [8, 16, 32, 64], [16, 32, 64, 128], [1, 2, 4], [0, 1]
LEARNING_RATES = [float(f"{1e-5 * (50 ** (i / 7)):.3g}") for i in range(8)]  # 1e-5 .. 5e-4, log-spaced
FIELDS = ["lora_rank", "lora_alpha", "batch_size", "learning_rate", "seed", "val_loss", "train_time_s", "curve"]


def grid() -> list[tuple]:
    return list(itertools.product(RANKS, ALPHAS, BATCH_SIZES, LEARNING_RATES, SEEDS))


def done_keys() -> set[tuple]:
    if not OUT.exists():
        return set()
    with open(OUT) as f:
        return {(int(r["lora_rank"]), int(r["lora_alpha"]), int(r["batch_size"]), float(r["learning_rate"]), int(r["seed"]))
                for r in csv.DictReader(f)}


def run_point(rank: int, alpha: int, bs: int, lr: float, seed: int) -> dict:
    from loratune.config import FinetuneConfig
    from loratune.training import run_training

    cfg = FinetuneConfig(save_adapter=False)
    cfg.training.eval_points, cfg.training.eval_subset = 10, 1.0  # the whole-set curve at 10 points, as recorded
    cfg.lora.rank, cfg.lora.alpha = rank, alpha
    cfg.training.batch_size, cfg.training.learning_rate, cfg.training.seed = bs, lr, seed
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = tmp
        m = run_training(cfg, overwrite=True).to_dict()
    return {"lora_rank": rank, "lora_alpha": alpha, "batch_size": bs, "learning_rate": lr, "seed": seed,
            "val_loss": m["val_loss"], "train_time_s": round(m["train_time_s"], 3),
            "curve": json.dumps([round(p["val_loss"], 6) for p in m["curve"]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th point starting at i")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    i, n = map(int, args.shard.split("/"))
    todo = [p for k, p in enumerate(grid()) if k % n == i and p not in done_keys()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for k, point in enumerate(todo):
        row = run_point(*point)
        new = not OUT.exists()
        with open(OUT, "a", newline="") as f:  # one line per point, appended whole
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        rate = (time.perf_counter() - start) / (k + 1)
        print(f"{k + 1}/{len(todo)} {point} -> {row['val_loss']:.4f}  (~{rate * (len(todo) - k - 1) / 60:.0f} min left)",
              flush=True)
    print(f"grid complete: {len(done_keys())} of {len(grid())} points in {OUT}")


if __name__ == "__main__":
    main()
