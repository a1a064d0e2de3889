"""Every benchmark of docs/benchmarks.md, one after another, with the time each takes.

    python benchmarks/run_all.py            # or: make bench

The tabular grid (tabular_grid.py, about 45 minutes of fine-tunes) is not rerun: its data file is
committed; curve_subset.py writes a data file the early-stopping benchmark reads, also committed.
Nor are the longer follow-ups whose commands docs/benchmarks.md gives in their sections (lora_scale
with 60 seeds, the ablations against the current default: about 2 h more). About 1 h 50 min on 2
cores. Output goes to the terminal; the tables are copied into docs/benchmarks.md by hand
(an earlier figure they replace moves to docs/benchmarks-history.md).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RUNS = [
    ["search_efficiency.py", "--problems", "lora_scale,rslora_asymmetric,batch_scaled,tabular,branin,hartmann6"],
    ["ablation.py", "--variants", "shipped,baseline_counted,no_baseline"],
    ["early_stopping.py"],
    ["optimizer_overhead.py"],
    ["acquisition_search.py"],
    ["trial_runner.py"],
    ["trainer_throughput.py", "--epochs", "3", "--repeats", "5"],
    ["parallel.py"],
    ["worker_startup.py"],
]


def main() -> None:
    took = []
    for args in RUNS:
        print(f"\n## python benchmarks/{' '.join(args)}\n", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], check=True)
        took.append((" ".join(args), time.perf_counter() - start))
    print("\n| benchmark | minutes |\n|---|---|")
    for name, seconds in took:
        print(f"| {name} | {seconds / 60:.1f} |")
    print(f"| all | {sum(s for _, s in took) / 60:.1f} |")


if __name__ == "__main__":
    main()
