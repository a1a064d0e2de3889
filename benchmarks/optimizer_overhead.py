"""Optimizer overhead: seconds Ax takes to suggest the next trial as a study grows, on this machine.

    python benchmarks/optimizer_overhead.py [--trials 50]

Runs loratune's Optimizer over the default search space (with Module 4.5's constraint, as the
multi-parameter case users run) with an instant stand-in evaluation, and times every ``ask``.
Reported at 10, 20 and 50 completed trials (the median of the three asks around each point).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from loratune.config import FinetuneConfig, default_search_space
from loratune.optimizer import Optimizer
from loratune.search_space import parse_search_space


def stand_in(p: dict) -> float:
    return (0.5 + 0.08 * (math.log10(p["learning_rate"]) + 3.5) ** 2 + 0.02 * abs(math.log2(p["lora_rank"]) - 5)
            + 0.02 * abs(math.log2(p["lora_alpha"] / p["lora_rank"]) - 1) + 0.01 * p["batch_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--constraint", default="lora_rank * batch_size <= 128")
    args = parser.parse_args()
    space = parse_search_space(default_search_space(), [args.constraint] if args.constraint else [], FinetuneConfig())
    opt = Optimizer.create(space, ["loss"], [True], [], seed=0)
    times = []
    for n in range(args.trials):
        start = time.perf_counter()
        (index, params), = opt.ask(1).items()
        times.append(time.perf_counter() - start)
        opt.complete(index, {"loss": stand_in(params)})
        print(f"trial {n + 1}: ask {times[-1]:.2f} s", flush=True)
    print("\n| completed trials | seconds per suggestion |\n|---|---|")
    for at in (10, 20, 50):
        if at <= len(times):
            around = times[max(0, at - 2): at + 1]
            print(f"| {at} | {statistics.median(around):.2f} |")
    print(f"\ntotal {sum(times):.1f} s over {len(times)} suggestions")


if __name__ == "__main__":
    main()
