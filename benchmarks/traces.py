"""Figures drawn from regret traces saved by search_efficiency.py or ablation.py (``--save FILE``):
median and mean regret at each checkpoint, wins and losses seed by seed against one method, and how
many runs end in each band of regret.

    python benchmarks/traces.py FILE [FILE ...] --problem lora_scale --against loratune [--at 10,15,20] [--bands 0.0038,0.0058,0.0075]

Traces are keyed "problem/method" and hold one list per seed, in seed order (both scripts write them
so), so the i-th traces of two methods come from the same seed. A difference under 1e-9 is a tie.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--problem", required=True)
    parser.add_argument("--against", required=True, help="the method the others are compared with, seed by seed")
    parser.add_argument("--at", default="10,15,20", help="checkpoints (trials)")
    parser.add_argument("--bands", help="edges of regret bands, counted at the last checkpoint")
    args = parser.parse_args()
    traces: dict[str, list[list[float]]] = {}
    for file in args.files:
        for key, runs in json.loads(Path(file).read_text()).items():
            problem, _, method = key.partition("/")
            if problem == args.problem:
                traces[method] = runs
    if args.against not in traces:
        raise SystemExit(f"{args.against!r} not in {sorted(traces)} for {args.problem}")
    at = [int(k) for k in args.at.split(",")]
    reference = traces[args.against]
    print(f"| method | seeds | median at {' / '.join(map(str, at))} | mean | {args.against} better-worse(-ties) |")
    print("|---|---|---|---|---|")
    for method, runs in traces.items():
        medians = " / ".join(f"{statistics.median(r[k - 1] for r in runs):.5f}" for k in at)
        means = " / ".join(f"{statistics.mean(r[k - 1] for r in runs):.5f}" for k in at)
        record = []
        for k in at:
            pairs = list(zip((r[k - 1] for r in reference), (r[k - 1] for r in runs), strict=True))
            better, worse = sum(a < b - 1e-9 for a, b in pairs), sum(a > b + 1e-9 for a, b in pairs)
            record.append(f"{better}-{worse}-{len(pairs) - better - worse}")
        print(f"| {method} | {len(runs)} | {medians} | {means} | {' / '.join(record) if method != args.against else '-'} |")
    if args.bands:
        edges = [float(e) for e in args.bands.split(",")]
        names = [f"< {edges[0]}"] + [f"{a}-{b}" for a, b in itertools.pairwise(edges)] + [f">= {edges[-1]}"]
        print(f"\nruns by regret after {at[-1]} trials: " + "; ".join(
            f"{method}: " + ", ".join(f"{name} {sum(bisect.bisect_right(edges, r[at[-1] - 1]) == i for r in runs)}"
                                      for i, name in enumerate(names)) for method, runs in traces.items()))


if __name__ == "__main__":
    main()
