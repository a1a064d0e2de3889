"""Parallel-trial efficiency: wall time of 16 stand-in trials on 4 workers against the ideal
(16 / 4 x trial time), with the local executor and with Ray.

    python benchmarks/parallel.py [--trial-seconds 15] [--trials 16] [--workers 4] [--skip-ray]

The stand-in trial sleeps a fixed time and prints a loss, so the figure measures loratune's own
overhead: the one-off start-up (importing Ax takes seconds), process start, polling, checkpoints
and Ax's suggestions. It is reported with quasi-random suggestions only (the executor's overhead
alone), with Ax's default Bayesian optimization after the first trials (each suggestion costs CPU
time in the driver), and on Ray. "start-up" is the time until the first trial starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from loratune import run_optimization
from loratune.config import StudyConfig

SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128], "learning_rate": [1e-5, 5e-4],
         "batch_size": [1, 2, 4]}


def first_start(results: dict, t0: float) -> float:
    return min(datetime.fromisoformat(t["started_at"]).timestamp() for t in results["trials"]) - t0


def local_run(trials: int, workers: int, seconds: float, bayesian: bool, out: Path) -> tuple[float, float]:
    script = out / "sleep_trial.py"
    script.write_text("import json, sys, time\ntime.sleep(float(sys.argv[1]))\n"
                      "print(json.dumps({'loss': float(sys.argv[2]) * 1000}))\n")
    cfg = StudyConfig(init_trials=None if bayesian else trials, search_space=SPACE)
    t0 = time.time()
    results = run_optimization(num_trials=trials, output_dir=out / ("bo" if bayesian else "sobol"), config=cfg,
                               command=f"{sys.executable} {script} {seconds} {{learning_rate}}", workers=workers,
                               quiet=True, report=False, seed=0)
    return time.time() - t0, first_start(results, t0)


def ray_run(trials: int, workers: int, seconds: float, out: Path) -> tuple[float, float]:
    """The Ray executor's loop (an actor per slot) with the fine-tune swapped for a sleeping one."""
    import ray

    from loratune.checkpoint import StoredStudy, StudyPaths
    from loratune.console import StudyConsole
    from loratune.executors.ray import RayExecutor
    from loratune.optimizer import Optimizer
    from loratune.search_space import parse_search_space
    from loratune.study import Study

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)

    class SleepActor:
        def run(self, payload, shared_dir, progress, flags):
            time.sleep(seconds)
            return {"result": {"state": "completed", "metrics": {"loss": payload["params"]["learning_rate"] * 1000}},
                    "files": None}

    executor = RayExecutor(workers)
    executor.actor_class = ray.remote(SleepActor).options(num_cpus=1)
    executor.actor_args = ()
    cfg = StudyConfig(init_trials=trials, search_space=SPACE, trials=trials, workers=workers, report=False, executor="ray")
    space = parse_search_space(cfg.search_space, cfg.constraints, cfg.base())
    t0 = time.time()
    optimizer = Optimizer.create(space, cfg.objectives, cfg.minimize, [], 0, cfg.init_trials)
    study = Study(StoredStudy(cfg, [], "finetune"), StudyPaths.from_output(out / "ray"), optimizer,
                  StudyConsole(quiet=True), executor=executor)
    results = study.run()
    elapsed = time.time() - t0
    ray.shutdown()
    return elapsed, first_start(results, t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trial-seconds", type=float, default=15.0)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    ideal = args.trials / args.workers * args.trial_seconds
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, fn in [("local, quasi-random suggestions", lambda: local_run(args.trials, args.workers, args.trial_seconds, False, out)),
                         ("local, Bayesian optimization", lambda: local_run(args.trials, args.workers, args.trial_seconds, True, out)),
                         ("ray (local instance), quasi-random", lambda: ray_run(args.trials, args.workers, args.trial_seconds, out))]:
            if args.skip_ray and name.startswith("ray"):
                continue
            wall, startup = fn()
            rows.append({"setup": name, "wall_s": round(wall, 1), "ideal_s": ideal, "startup_s": round(startup, 1),
                         "over_ideal": f"{(wall / ideal - 1) * 100:+.0f}%",
                         "over_ideal_after_startup": f"{((wall - startup) / ideal - 1) * 100:+.0f}%"})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| setup | wall (s) | ideal (s) | over ideal | start-up (s) | over ideal after start-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['wall_s']} | {r['ideal_s']:g} | {r['over_ideal']} | {r['startup_s']} | "
              f"{r['over_ideal_after_startup']} |")


if __name__ == "__main__":
    main()
