"""How much of a study's validation gain holds on data the search never saw (the winner's curse), and
whether choosing by a task score beats choosing by loss on that score.

    python benchmarks/selection_bias.py --setups demo --seeds 0,1,2,3,4
    python benchmarks/selection_bias.py --setups smollm2 --seeds 0,1 --trials 6 --epochs 0.5 --score rouge_l

For each search seed, two studies on the same data: one chooses by validation loss, one by a task score of
the generated answers on validation (``--score``: the demo's plan accuracy, the share of a shot plan's six
fields a generated plan gets right; or ROUGE-L).
Each ends with its final test: the chosen config and the baseline scored on the 37 test scenes that no
trial read. Printed: the chosen trial's improvement over the baseline on validation (what chose it) and on
test, the share of the validation gain that held, the test plan accuracy of the config each way of
choosing picked, and what generation costs a trial. A Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from loratune import run_optimization

SETUPS = {
    "demo": {"model_name": "builtin:tiny-qwen2"},
    "smollm2": {"model_name": None},  # built from a PyPI wheel (loratune.demo.smollm2)
}


def study(setup: str, seed: int, objective: str, score: str, trials: int, epochs: float, out: Path) -> dict:
    model = SETUPS[setup]["model_name"]
    if model is None:
        from loratune.demo.smollm2 import ensure_smollm2

        model = str(ensure_smollm2())
    minimize = [objective == "loss"]
    return run_optimization(num_trials=trials, model_name=model, output_dir=out, seed=seed, quiet=True, report=False,
                            objectives=[objective], minimize=minimize, training={"epochs": epochs},
                            scoring={"scores": [score]})


def row(setup: str, seed: int, score: str, by_loss: dict, by_score: dict, seconds: float) -> dict:
    test = by_loss["test"]
    val, tst = test["validation"]["loss"], test["improvement"]["loss"]
    completed = [t for t in by_loss["trials"] if t["state"] == "completed"]
    return {
        "setup": setup, "seed": seed, "best": by_loss["best_trial"],
        "val_gain": val["relative"], "test_gain": tst["relative"], "held": test.get("held"),
        "acc_loss_chosen": test["best"][score], "acc_score_chosen": by_score["test"]["best"][score],
        "acc_baseline": test["baseline"][score],
        "generation_s": statistics.fmean(t["metrics"]["generation_s"] for t in completed),
        "trial_s": statistics.fmean(t["duration_s"] for t in completed), "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="demo", help="comma-separated: demo, smollm2")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--score", default="plan_accuracy", help="the task score: plan_accuracy or rouge_l")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in args.setups.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                start = time.perf_counter()
                by_loss = study(setup, seed, "loss", args.score, args.trials, args.epochs, Path(tmp) / f"{setup}-{seed}-loss")
                by_score = study(setup, seed, args.score, args.score, args.trials, args.epochs, Path(tmp) / f"{setup}-{seed}-s")
                rows.append(row(setup, seed, args.score, by_loss, by_score, time.perf_counter() - start))
                r = rows[-1]
                print(f"{setup} seed {seed}: validation gain {r['val_gain']:+.1%}, test gain {r['test_gain']:+.1%}, "
                      f"test {args.score} {r['acc_loss_chosen']:.3f} (by loss) vs {r['acc_score_chosen']:.3f} (by score)",
                      flush=True)
    print(f"\n| setup | seed | best trial | validation gain (loss) | test gain (loss) | held | test {args.score}: "
          f"baseline / chosen by loss / chosen by {args.score} | generation s per trial (of trial s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        held = "-" if r["held"] is None else f"{r['held']:.0%}"
        print(f"| {r['setup']} | {r['seed']} | {r['best']} | {r['val_gain']:+.1%} | {r['test_gain']:+.1%} | {held} | "
              f"{r['acc_baseline']:.3f} / {r['acc_loss_chosen']:.3f} / {r['acc_score_chosen']:.3f} | "
              f"{r['generation_s']:.2f} ({r['trial_s']:.1f}) |")
    for setup in args.setups.split(","):
        mine = [r for r in rows if r["setup"] == setup]
        print(f"\n{setup}: median validation gain {statistics.median(r['val_gain'] for r in mine):+.1%}, median test "
              f"gain {statistics.median(r['test_gain'] for r in mine):+.1%}; test {args.score} chosen by {args.score} "
              f"higher in {sum(r['acc_score_chosen'] > r['acc_loss_chosen'] for r in mine)}, equal in "
              f"{sum(r['acc_score_chosen'] == r['acc_loss_chosen'] for r in mine)} of {len(mine)} seeds")


if __name__ == "__main__":
    main()
