"""What workers that keep the base model loaded, and a cheap validation curve, save: the same studies run
side by side with `reuse_model` on and off.

- The demo study (tiny model, 20 trials): wall time with reuse against a fresh process per trial.
- A SmolLM2-135M-Instruct study (4 trials, 1 epoch of the demo data): wall time and each trial's time
  split (process start-up, model load, data, training, validation curve, inference measurement), for
  the old way (a fresh process per trial, 10 curve points on the whole validation set) against the
  new (reuse, 5 curve points, those before the last on the `eval_subset`, the last on the whole set).
- The per-trial validation losses of both runs, which must be equal: neither reuse nor the curve's
  subset changes what a trial trains or its final loss.
- Memory of one reused worker over 20 demo trials: its resident set after each trial.

    python benchmarks/trial_runner.py                 # both parts, ~23 min on 2 cores
    python benchmarks/trial_runner.py --part demo     # ~3 min
    python benchmarks/trial_runner.py --part smollm2 --arms old   # one of the two SmolLM2 studies
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loratune import run_optimization  # noqa: E402

SPLIT = ("startup_s", "load_s", "data_s", "train_s", "eval_s", "inference_s")


def study(label: str, out: Path, trials: int, reuse: bool, **settings) -> dict:
    started = time.perf_counter()
    results = run_optimization(num_trials=trials, output_dir=out / label, quiet=True, report=False, seed=0,
                               reuse_model=reuse, **settings)
    results["bench_wall_s"] = time.perf_counter() - started
    bad = [t for t in results["trials"] if t["state"] != "completed"]
    assert not bad, [t["reason"] for t in bad]
    return results


def losses(results: dict) -> list[float]:
    return [t["metrics"]["loss"] for t in sorted(results["trials"], key=lambda t: t["index"])]


def split_rows(results: dict) -> list[list[str]]:
    rows = []
    for t in sorted(results["trials"], key=lambda t: t["index"]):
        timing = t["extra"]["timings"]
        rows.append([str(t["index"]), *[f"{timing.get(k, 0.0):.1f}" for k in SPLIT], f"{t['duration_s']:.1f}",
                     f"{t['metrics']['loss']:.4f}"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows])


def demo(out: Path) -> None:
    fresh = study("demo_fresh", out, 20, reuse=False)
    reused = study("demo_reused", out, 20, reuse=True)
    same = losses(fresh) == losses(reused)
    print("\n### Demo study, 20 trials (tiny model)\n")
    print(table(["", "fresh process per trial", "reused worker", "speed-up"], [
        ["wall time (s)", f"{fresh['bench_wall_s']:.0f}", f"{reused['bench_wall_s']:.0f}",
         f"{fresh['bench_wall_s'] / reused['bench_wall_s']:.2f}x"],
        ["mean trial (s)", f"{statistics.fmean(t['duration_s'] for t in fresh['trials']):.1f}",
         f"{statistics.fmean(t['duration_s'] for t in reused['trials']):.1f}", ""],
        ["best loss", f"{fresh['best_loss']:.4f}", f"{reused['best_loss']:.4f}", ""],
    ]))
    print(f"\nPer-trial validation losses equal in both runs: {same} (20 of 20 bit for bit: "
          f"{sum(a == b for a, b in zip(losses(fresh), losses(reused), strict=True))})")
    rss = [t["extra"]["memory_after"]["rss_gb"] for t in sorted(reused["trials"], key=lambda t: t["index"])]
    print(f"\nReused worker's resident memory after trials 1, 5, 10, 20: "
          f"{', '.join(f'{rss[i] * 1024:.0f} MB' for i in (0, 4, 9, 19))}; after 20 it is "
          f"{rss[-1] / rss[0] - 1:+.1%} of after 1 (max {max(rss) / rss[0] - 1:+.1%}).")


def smollm2(out: Path, arms: list[str]) -> None:
    """``old``: as trials ran before workers kept the model and the curve became cheap (a fresh process
    per trial, 10 curve points on the whole validation set); ``new``: the defaults (a reused worker, 5
    points, those before the last on the curve subset)."""
    from loratune.demo.smollm2 import ensure_smollm2

    model = str(ensure_smollm2())
    common = {"model": {"name": model}}
    runs = {}
    if "old" in arms:
        runs["fresh process per trial, 10 points on the whole validation set"] = old = study(
            "smollm2_old", out, 4, reuse=False, **common, training={"epochs": 1.0, "eval_subset": 1.0, "eval_points": 10})
    if "new" in arms:
        runs["reused worker, 5 points, the curve subset before the last"] = new = study(
            "smollm2_new", out, 4, reuse=True, **common, training={"epochs": 1.0})
    print("\n### SmolLM2-135M-Instruct study, 4 trials of 1 epoch (148 examples, 37 for validation)\n")
    header = ["trial", *[k.removesuffix("_s") for k in SPLIT], "trial wall", "loss"]
    for name, results in runs.items():
        print(f"\n{name}: study wall time {results['bench_wall_s']:.0f} s\n")
        print(table(header, split_rows(results)))
        trials = results["trials"]
        curve = sum(t["extra"]["timings"]["eval_s"] for t in trials)
        whole = sum(t["duration_s"] for t in trials)
        print(f"\nvalidation curve: {curve:.0f} s of {whole:.0f} s of trials ({curve / whole:.0%})")
    if len(runs) == 2:
        print(f"\nspeed-up of the study: {old['bench_wall_s'] / new['bench_wall_s']:.2f}x; per-trial losses equal: "
              f"{losses(old) == losses(new)} ({losses(old)} vs {losses(new)})")
    else:
        print(f"\nper-trial losses: {losses(next(iter(runs.values())))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["demo", "smollm2", "all"], default="all")
    parser.add_argument("--out", help="where the studies go (default: a temporary directory)")
    parser.add_argument("--arms", default="old,new", help="the SmolLM2 studies to run: old, new or both")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="loratune-bench-"))
    if args.part in ("demo", "all"):
        demo(out)
    if args.part in ("smollm2", "all"):
        smollm2(out, args.arms.split(","))


if __name__ == "__main__":
    main()
