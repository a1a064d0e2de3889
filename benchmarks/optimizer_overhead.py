"""Optimizer cost at scale: seconds Ax takes to suggest trials as a study grows, with other trials still
running, and what a long study spends in the optimizer and its checkpoint.

    python benchmarks/optimizer_overhead.py                  # both parts, ~25 minutes on 2 cores
    python benchmarks/optimizer_overhead.py --part suggest   # the suggestion table only
    python benchmarks/optimizer_overhead.py --part suggest --counts 50 --parameterization lora --warm-start

Part 1 (suggest): loratune's Optimizer over the default search space, with and without Module 4.5's
product constraint (lora_rank * batch_size <= 128). At 10, 20, 50 and 100 completed trials (attached
at random points with an instant stand-in objective, the last one suggested so that Ax's quasi-random
start hands over to Bayesian optimization), it times:
one suggestion; one suggestion while 3 and 7 others are pending (a slot frees up while the other
workers train); and a batch of 4 and of 8 suggestions at once. ``--parameterization lora``: the study
setting; ``--warm-start``: the earlier trials are an earlier study's (``warm_start``), given to the
optimizer as it is created, rather than attached one by one.

Part 2 (study): a 200-trial study through run_optimization with 4 workers and an instant objective:
wall time, time in Ax, and the checkpoint's size and writing time at the end.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from loratune.config import FinetuneConfig, default_search_space
from loratune.optimizer import Optimizer
from loratune.optimizer.variants import use_lighter_acquisition_search
from loratune.search_space import parse_search_space

CONSTRAINT = "lora_rank * batch_size <= 128"


def stand_in(p: dict) -> float:
    """A smooth LoRA-shaped surface: best near lr=3e-4, rank 32, alpha = 2 x rank, small batches."""
    return (0.5 + 0.08 * (math.log10(p["learning_rate"]) + 3.5) ** 2 + 0.02 * abs(math.log2(p["lora_rank"]) - 5)
            + 0.02 * abs(math.log2(p["lora_alpha"] / p["lora_rank"]) - 1) + 0.01 * p["batch_size"])


def random_point(space, rng: random.Random) -> dict:
    while True:
        point = {p.name: rng.choice(p.values) if p.kind != "range" else
                 math.exp(rng.uniform(math.log(p.low), math.log(p.high))) for p in space.params}
        if space.contains(point):
            return point


LIGHTER = False  # --lighter-search: 512 raw samples and 10 restarts for the acquisition search
PARAMETERIZATION = "raw"  # --parameterization
WARM_START = False  # --warm-start


def optimizer_with(n: int, constrained: bool, seed: int = 0) -> Optimizer:
    from loratune.warm_start import PriorTrial

    space = parse_search_space(default_search_space(), [CONSTRAINT] if constrained else [], FinetuneConfig(),
                               parameterization=PARAMETERIZATION)
    rng = random.Random(seed)
    points = [random_point(space, rng) for _ in range(n - 1)]
    losses = [stand_in(p) + rng.gauss(0, 0.002) for p in points]
    prior = [PriorTrial(p, {"loss": v}, f"earlier#{i}") for i, (p, v) in enumerate(zip(points, losses, strict=True))]
    # Attached trials do not count toward Ax's initial design; with a design of one point (the centre,
    # suggested last) the next suggestion is Bayesian optimization's. An earlier study's trials do count:
    # with them the design is empty and the first suggestion is Bayesian optimization's.
    opt = Optimizer.create(space, ["loss"], [True], [], seed=seed, init_trials=n if WARM_START else 1,
                           prior=prior if WARM_START else None)
    if LIGHTER:
        use_lighter_acquisition_search(opt)
    for point, loss in zip(points, losses, strict=True) if not WARM_START else ():
        index = opt.attach(point)
        opt.complete(index, {"loss": loss})
    (index, point), = opt.ask(1).items()
    opt.complete(index, {"loss": stand_in(point)})
    return opt


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def suggest(counts: list[int], constrained_only: bool = False) -> None:
    print("| completed trials | constraint | 1 suggestion (s) | 1 with 3 pending | 1 with 7 pending | batch of 4 | batch of 8 |")
    print("|---|---|---|---|---|---|---|")
    for constrained in ((True,) if constrained_only else (False, True)):
        for n in counts:
            cells = []
            opt = optimizer_with(n, constrained)
            cells.append(timed(lambda o=opt: o.ask(1)))
            for pending in (3, 7):
                opt = optimizer_with(n, constrained)
                for _ in range(pending):  # trials still running: Ax knows their points and suggests around them
                    opt.attach(random_point(opt.space, random.Random(pending)))
                cells.append(timed(lambda o=opt: o.ask(1)))
            for batch in (4, 8):
                opt = optimizer_with(n, constrained)
                cells.append(timed(lambda o=opt, b=batch: o.ask(b)))
            print(f"| {n} | {'yes' if constrained else 'no'} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


def time_methods(names: tuple[str, ...] = ("ask", "complete", "snapshot")) -> dict[str, list[float]]:
    """Wrap these Optimizer methods so that each call's seconds are recorded: {name: [seconds, ...]}."""
    import functools

    spent: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        def wrap(method, name=name):
            @functools.wraps(method)
            def timed_call(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    spent[name].append(time.perf_counter() - start)
            return timed_call
        setattr(Optimizer, name, wrap(getattr(Optimizer, name)))
    return spent


def study(trials: int, workers: int, split: bool = False) -> None:
    from loratune import run_optimization
    from loratune.checkpoint import load, save

    spent = time_methods() if split else None
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        results = run_optimization(num_trials=trials, output_dir=tmp, evaluate=stand_in, workers=workers,
                                   quiet=True, report=False, seed=0)
        wall = time.perf_counter() - started
        checkpoint = Path(tmp) / "optimization_checkpoint.json"
        paths, stored = load(tmp)
        saves = [timed(lambda: save(stored, paths)) for _ in range(3)]
        print(f"\n{trials} trials, {workers} workers, instant objective: {wall:.0f} s in all, "
              f"{results['optimizer_time_s']:.0f} s of it in Ax; checkpoint {checkpoint.stat().st_size / 1e6:.2f} MB "
              f"({checkpoint.stat().st_size / trials / 1e3:.1f} kB a trial), written in "
              f"{statistics.median(saves):.2f} s (median of 3; the snapshot of Ax's state is taken by the study)")
    if spent:
        print("time in Ax by method: " + "; ".join(f"{name} {sum(t):.0f} s in {len(t)} calls ({sum(t) / max(len(t), 1):.2f} s each)"
                                                  for name, t in spent.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["suggest", "study", "all"], default="all")
    parser.add_argument("--counts", default="10,20,50,100")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--split", action="store_true", help="study: the time of Ax's suggestions, completions and snapshots")
    parser.add_argument("--lighter-search", action="store_true",
                        help="suggest part: 512 raw samples and 10 restarts for the acquisition search (Ax: 1024 and 20)")
    parser.add_argument("--constrained-only", action="store_true", help="the suggestion table with the constraint only")
    parser.add_argument("--parameterization", choices=["raw", "lora"], default="raw")
    parser.add_argument("--warm-start", action="store_true", help="the earlier trials as a warm start's")
    args = parser.parse_args()
    global LIGHTER, PARAMETERIZATION, WARM_START
    LIGHTER, PARAMETERIZATION, WARM_START = args.lighter_search, args.parameterization, args.warm_start
    if args.part in ("suggest", "all"):
        suggest([int(c) for c in args.counts.split(",")], args.constrained_only)
    if args.part in ("study", "all"):
        study(args.trials, args.workers, args.split)


if __name__ == "__main__":
    main()
