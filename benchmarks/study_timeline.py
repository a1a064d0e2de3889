"""Where a study's wall time and memory go: the demo study as users run it, cut into its phases.

    python benchmarks/study_timeline.py [--trials 20] [--seed 0] [--repeats 2] [--config YAML] [--set FIELD=VALUE ...]

Runs ``ax_optimization.py --trials N --seed S`` in a child process tree, samples every process's
resident memory each 0.1 s (the study's own process apart from its workers), and reads the trials'
start and end times from the results. Printed per run: the set-up before the first trial starts, the
trials' own time, the time between one trial's end and the next one's start (the optimizer's
suggestion, the checkpoint, a worker's turnover: time no trial trains), the end (the final test and
the report, after the last trial), the optimizer's own seconds, and the peak memory of the study's
process, of its workers and of the whole tree. ``--set reuse_model=false`` and the like compare
settings run for run (alternated, so that a change of the machine's load hits both); ``--config``
runs another study than the demo's default (both variants). Runs that ran the same trials (parameters,
state, steps trained) are said to. To compare commits, run it from a worktree of the older one with ``PYTHONPATH=<worktree>/src``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sampled(command: list[str]) -> dict:
    """Run ``command``; its wall time, its start as a Unix time, and peak RSS (MiB) of the root, of its
    descendants together, and of the tree, each taken over the same 0.1 s samples."""
    import psutil

    launched, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks, done = {"study": 0, "workers": 0, "tree": 0, "tree_at_s": 0.0}, threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                children = root.children(recursive=True)
                own = root.memory_info().rss
            except psutil.Error:  # the root has ended
                break
            workers = 0
            for p in children:  # a child that ends meanwhile counts as nothing, not the whole sample
                try:
                    workers += p.memory_info().rss
                except psutil.Error:
                    pass
            peaks["study"], peaks["workers"] = max(peaks["study"], own), max(peaks["workers"], workers)
            if own + workers > peaks["tree"]:
                peaks["tree"], peaks["tree_at_s"] = own + workers, time.perf_counter() - start
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    mib = {k: v / 2**20 for k, v in peaks.items() if k != "tree_at_s"}
    return {"wall_s": time.perf_counter() - start, "launched": launched, "tree_at_s": peaks["tree_at_s"], **mib}


def timeline(trials: int, seed: int, sets: list[str], tmp: Path, config: str | None = None) -> dict:
    out = tmp / "study"
    command = [sys.executable, str(ROOT / "ax_optimization.py"), "--trials", str(trials), "--seed", str(seed),
               "--output", str(out), "--overwrite", *(["--config", config] if config else []),
               *(arg for s in sets for arg in ("--set", s))]
    m = sampled(command)
    results = json.loads((out / "optimization_results.json").read_text())
    runs = sorted(((_unix(t["started_at"]), _unix(t["ended_at"])) for t in results["trials"]), key=lambda r: r[0])
    first_start, last_end = runs[0][0], max(end for _, end in runs)
    # with one worker the trials follow each other: what lies between one's end and the next one's start
    idle = sum(max(0.0, runs[i + 1][0] - runs[i][1]) for i in range(len(runs) - 1))
    return {**m, "setup_s": first_start - m["launched"], "first_end_s": runs[0][1] - m["launched"], "trials_s": sum(end - s for s, end in runs),
            "between_s": idle, "end_s": m["launched"] + m["wall_s"] - last_end,
            "optimizer_s": results["optimizer_time_s"], "best_loss": results["best_loss"],
            "points": [(t["params"], t["state"], t["extra"].get("steps")) for t in results["trials"]],
            "stopped": sum(t["state"] == "early_stopped" for t in results["trials"])}


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", help="a study config (YAML) for both variants; default: the demo's")
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        help="a study setting for a second variant, run alternately with the defaults")
    args = parser.parse_args()
    variants = {"defaults": []} | ({"with " + " ".join(args.sets): args.sets} if args.sets else {})
    rows = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, sets in variants.items():
                r = timeline(args.trials, args.seed, sets, Path(tmp), args.config)
                rows[name].append(r)
                print(f"{name}: wall {r['wall_s']:.1f} s = set-up {r['setup_s']:.1f} + trials {r['trials_s']:.1f} + "
                      f"between trials {r['between_s']:.1f} + end {r['end_s']:.1f} (Ax {r['optimizer_s']:.1f} s; first trial "
                      f"ended at {r['first_end_s']:.1f} s); "
                      f"peak MiB: study {r['study']:.0f}, workers {r['workers']:.0f}, tree {r['tree']:.0f} at "
                      f"{r['tree_at_s']:.0f} s; best loss {r['best_loss']:.4f}; early-stopped {r['stopped']}", flush=True)
    print("\n| variant | wall s | set-up s | trials s | between trials s | end s | Ax s | peak MiB study / workers / tree | best loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        def cell(key: str, fmt: str = ".1f", rs: list = rs) -> str:
            return ", ".join(f"{r[key]:{fmt}}" for r in rs)
        print(f"| {name} | {cell('wall_s')} | {cell('setup_s')} | {cell('trials_s')} | {cell('between_s')} | "
              f"{cell('end_s')} | {cell('optimizer_s')} | {statistics.median(r['study'] for r in rs):.0f} / "
              f"{statistics.median(r['workers'] for r in rs):.0f} / {statistics.median(r['tree'] for r in rs):.0f} | "
              f"{cell('best_loss', '.4f')} |")
    every = [r["points"] for rs in rows.values() for r in rs]
    print(f"\nthe same trials (parameters, state, steps) in every run: {'yes' if all(p == every[0] for p in every) else 'no'}")


if __name__ == "__main__":
    main()
