"""Does a lighter acquisition search under parameter constraints (512 raw samples, 10 restarts; Ax's
settings, which loratune keeps: 1024 and 20) choose other points than Ax's settings? The same constrained studies,
each at the same state, asked once with either setting.

    python benchmarks/acquisition_search.py [--states 10] [--trials 20]

A state is a study over the default search space with Module 4.5's product constraint after
``--trials`` trials at random points of the stand-in LoRA surface of optimizer_overhead.py (seed s
for state s). For each state: both suggestions, the seconds each took, and the stand-in's value at
each (lower is better).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import optimizer_overhead as oo  # noqa: E402


def suggest(n: int, seed: int, lighter: bool) -> tuple[dict, float]:
    oo.LIGHTER = lighter
    opt = oo.optimizer_with(n, constrained=True, seed=seed)
    start = time.perf_counter()
    (_, point), = opt.ask(1).items()
    return point, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=10)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    print("| state | same point | lighter (s) | Ax's settings (s) | value, lighter | value, Ax's settings |")
    print("|---|---|---|---|---|---|")
    same, light_s, ax_s, diffs = 0, [], [], []
    for seed in range(args.states):
        light, t_light = suggest(args.trials, seed, lighter=True)
        heavy, t_heavy = suggest(args.trials, seed, lighter=False)
        equal = light == heavy or all(abs(light[k] - heavy[k]) <= 1e-6 * abs(heavy[k]) for k in heavy)
        same += equal
        light_s.append(t_light), ax_s.append(t_heavy)
        diffs.append(oo.stand_in(light) - oo.stand_in(heavy))
        print(f"| {seed} | {'yes' if equal else 'no'} | {t_light:.1f} | {t_heavy:.1f} | "
              f"{oo.stand_in(light):.4f} | {oo.stand_in(heavy):.4f} |", flush=True)
    print(f"\nsame point in {same} of {args.states} states; median seconds {statistics.median(light_s):.1f} against "
          f"{statistics.median(ax_s):.1f}; value difference (lighter - Ax's settings) median "
          f"{statistics.median(diffs):+.4f}, worst {max(diffs):+.4f}")


if __name__ == "__main__":
    main()
