"""A packed study with early stopping: a stopped trial's slot left empty until its pack ends (loratune's
batch fill) against the slot refilled at once with a new trial, Ax choosing its point with the pack's
others pending (docs/benchmarks-history.md, "Filling a pack: batch fill against refill").

    python benchmarks/pack_fill.py                          # the early-stopping config, 20 trials, pack 4, seeds 0 and 1

Both run the shipped ``configs/optimization_early_stopping.yaml`` (threshold and percentile rules) on
the demo model, one study at a time in this process. Refill is the study loop with the pack guard off:
a free slot asks Ax for one point, which joins the running pack between two rounds. Printed per run:
wall time, Ax's share, trials stopped early and the best validation loss.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def refill(fill):
    def _fill(self, executor, running):
        pack, self.pack = self.pack, 1  # as without packing: each free slot gets a suggestion of its own
        try:
            return fill(self, executor, running)
        finally:
            self.pack = pack
    return _fill


def study(out: Path, seed: int, trials: int, pack: int) -> dict:
    from loratune import run_optimization

    start = time.perf_counter()
    results = run_optimization(num_trials=trials, output_dir=out, config=ROOT / "configs/optimization_early_stopping.yaml",
                               seed=seed, pack=pack, quiet=True, report=False, overwrite=True)
    wall = time.perf_counter() - start
    states = [t["state"] for t in results["trials"]]
    return {"wall_s": wall, "ax_s": results["optimizer_time_s"], "stopped": states.count("early_stopped"),
            "completed": states.count("completed"), "best_loss": results["best_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pack", type=int, default=4)
    args = parser.parse_args()
    from loratune.study import Study

    batch_fill = Study._fill
    rows: dict[str, list[dict]] = {"batch fill": [], "refill": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in rows:  # alternated: the same machine state for both
                Study._fill = batch_fill if name == "batch fill" else refill(batch_fill)
                r = study(Path(tmp) / f"{name}-{seed}", seed, args.trials, args.pack)
                rows[name].append(r)
                print(f"seed {seed}, {name}: {r['wall_s']:.1f} s (Ax {r['ax_s']:.1f} s), {r['completed']} completed, "
                      f"{r['stopped']} stopped, best loss {r['best_loss']:.4f}", flush=True)
    Study._fill = batch_fill
    print(f"\n{args.trials} trials, pack {args.pack}, seeds {args.seeds}\n\n| | wall s (median) | Ax s | stopped | best loss |\n|---|---|---|---|---|")
    for name, rs in rows.items():
        def cells(key, fmt, rs=rs):
            return ", ".join(fmt.format(r[key]) for r in rs)
        median = statistics.median(r["wall_s"] for r in rs)
        print(f"| {name} | {cells('wall_s', '{:.1f}')} ({median:.1f}) | {cells('ax_s', '{:.1f}')} | "
              f"{cells('stopped', '{}')} | {cells('best_loss', '{:.4f}')} |")


if __name__ == "__main__":
    main()
