"""Every benchmark of docs/BENCHMARKS.md, one after another, with the time each takes.

    python benchmarks/run_all.py            # or: make bench

The tabular grid (tabular_grid.py, about 45 minutes of fine-tunes) is not rerun: its data file is
committed. Output goes to the terminal; the tables are copied into docs/BENCHMARKS.md by hand.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RUNS = [
    ["search_efficiency.py"],
    ["early_stopping.py"],
    ["optimizer_overhead.py"],
    ["trainer_throughput.py", "--epochs", "3", "--repeats", "5"],
    ["parallel.py"],
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
