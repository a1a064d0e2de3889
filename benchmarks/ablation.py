"""Ablations of loratune's search: how the baseline is attached, how Ax's initialization is set up, the
encoding, noise and outcome transform, the acquisition search and the product constraint, each
measured as search_efficiency.py measures loratune (same problems, seeds, budget and tables).

    python benchmarks/ablation.py --variants shipped,baseline_counted,init3 [--problems lora_scale,...] [--reps 20]

A variant is loratune's ``Optimizer`` with its generation strategy and baseline handling replaced
by the settings below (everything else, the encoding of the search space included, is loratune's).
"shipped" is the Optimizer as it is. The runs go through search_efficiency.py's machinery; the
regret trace includes the baseline trial where one is attached.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import search_efficiency as se  # noqa: E402

# name -> settings: "gs": keyword arguments for Client.configure_generation_strategy (absent: the
# Optimizer's own), "attach": how the baseline is attached ("baseline" | "trial" | None),
# "exponents": power-of-two choices given to Ax as base-2 exponents, "constraint": a parameter
# constraint of the space, "lighter_search": 512 raw samples and 10 restarts for the acquisition
# search instead of Ax's 1024 and 20, "sem": the standard error reported with every observation
# (absent: none, Ax infers the noise)
ALLOW = {"allow_exceeding_initialization_budget": True}
VARIANTS: dict[str, dict] = {
    "shipped": {"attach": "baseline"},
    "no_baseline": {"attach": None},
    "baseline_as_trial": {"attach": "trial"},
    # loratune before this ablation: the baseline counted toward the initialization, so the centre
    # of the space was skipped and 4 Sobol points followed it; initN: the same with N initial trials
    "baseline_counted": {"gs": ALLOW, "attach": "baseline"},
    "init2": {"gs": {**ALLOW, "initialization_budget": 2}, "attach": "baseline"},
    "init3": {"gs": {**ALLOW, "initialization_budget": 3}, "attach": "baseline"},
    "init4": {"gs": {**ALLOW, "initialization_budget": 4}, "attach": "baseline"},
    "init6": {"gs": {**ALLOW, "initialization_budget": 6}, "attach": "baseline"},
    "init8": {"gs": {**ALLOW, "initialization_budget": 8}, "attach": "baseline"},
    # the baseline on top of a design of 5 Sobol points, without the centre of the space
    "no_centre": {"gs": {**ALLOW, "use_existing_trials_for_initialization": False, "initialize_with_center": False},
                  "attach": "baseline"},
    "strict_budget": {"gs": {"use_existing_trials_for_initialization": False}, "attach": "baseline"},
    "exponents": {"attach": "baseline", "exponents": True},
    "noiseless": {"attach": "baseline", "sem": 0.0},
    # the product constraint of Module 4.5 (it cuts rank 64 with batch size 4, never an optimum), with
    # Ax's acquisition search (loratune's) and with the lighter one
    "constrained": {"attach": "baseline", "constraint": "lora_rank * batch_size <= 128"},
    "constrained_lighter": {"attach": "baseline", "constraint": "lora_rank * batch_size <= 128",
                            "lighter_search": True},
    "lighter_search": {"attach": "baseline", "lighter_search": True},
    # the model sees the objective through a Yeo-Johnson power transform (Ax's PowerTransformY)
    "power_y": {"attach": "baseline", "power_y": True},
}


def run_variant(problem: se.Problem, trials: int, seed: int, variant: str) -> list[tuple[dict, float]]:
    from loratune.config import FinetuneConfig, default_search_space
    from loratune.constraints import parse_constraint
    from loratune.optimizer import Optimizer, seam
    from loratune.optimizer.variants import use_lighter_acquisition_search
    from loratune.search_space import SearchSpace, _encode_for_products, parse_search_space

    v = VARIANTS[variant]
    gs, attach, exponents, sem = v.get("gs"), v.get("attach"), v.get("exponents", False), v.get("sem")

    class Variant(Optimizer):
        def _configure_generation(self, init_trials):
            if gs is None:
                super()._configure_generation(init_trials)
            else:
                self.client.configure_generation_strategy(**{"initialization_random_seed": self.seed, **gs})
            if v.get("power_y"):
                from ax.adapter.registry import MBM_X_trans
                from ax.adapter.transforms.derelativize import Derelativize
                from ax.adapter.transforms.power_transform_y import PowerTransformY
                from ax.adapter.transforms.standardize_y import StandardizeY
                from ax.adapter.transforms.winsorize import Winsorize

                for node in seam.generation_nodes(self.client):
                    if node.name == "MBM":
                        node.generator_specs[0].generator_kwargs["transforms"] = [
                            *MBM_X_trans, Derelativize, Winsorize, PowerTransformY, StandardizeY]

    constraints = [v["constraint"]] if "constraint" in v else []
    if problem.name == "tabular":
        space = parse_search_space(default_search_space(), constraints, FinetuneConfig())
    else:
        params = [se._loratune_param(p) for p in problem.params]
        space = SearchSpace(params, [parse_constraint(c, [p.name for p in params]) for c in constraints])
        _encode_for_products(space)
    if exponents:  # power-of-two choices as base-2 exponents, as a product constraint would have them
        for p in space.params:
            if p.kind == "choice" and p.integer and all(v > 0 and v & (v - 1) == 0 for v in p.values):
                p.log2_encoded = True
    opt = Variant.create(space, ["value"], [True], [], seed=seed)
    if v.get("lighter_search"):
        use_lighter_acquisition_search(opt)
    rng, history = random.Random(seed), []
    if attach and problem.baseline is not None:
        index = opt.attach(problem.baseline, baseline=attach == "baseline")
        value = problem.objective(problem.baseline, rng)
        opt.complete(index, {"value": value if sem is None else (value, sem)})
        history.append((problem.baseline, value))
    while len(history) < trials:
        for index, params in opt.ask(1).items():
            value = problem.objective(params, rng)
            opt.complete(index, {"value": value if sem is None else (value, sem)})
            history.append((params, value))
    return history


def run_task(task: tuple[str, str, int, int]) -> tuple[str, str, int, list[float], float]:
    problem_name, method, seed, trials = task
    problem = se._problem(problem_name)
    start = time.perf_counter()
    if method in se.RUNNERS:
        history = se.RUNNERS[method](problem, trials, seed)
    else:
        history = run_variant(problem, trials, seed, method)
    return problem_name, method, seed, se.regret_trace(problem, history), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="shipped,baseline_counted,init3")
    parser.add_argument("--problems", default="lora_scale,rslora_asymmetric,batch_scaled")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + reps - 1")
    parser.add_argument("--save", help="write every regret trace to this JSON file")
    args = parser.parse_args()
    problems, variants = args.problems.split(","), args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS and v not in se.RUNNERS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: {', '.join(VARIANTS)} (or a search_efficiency method)")
    start = time.perf_counter()
    results, seconds = se.measure(problems, variants, args.reps, args.trials, args.jobs, task=run_task,
                                  first_seed=args.first_seed)
    print(f"{len(problems) * len(variants) * args.reps} runs in {time.perf_counter() - start:.0f} s with {args.jobs} jobs\n")
    if args.save:
        import json

        Path(args.save).write_text(json.dumps({f"{p}/{m}": t for (p, m), t in results.items()}))
    se.print_tables(problems, variants, results, seconds, args.reps, args.trials)


if __name__ == "__main__":
    main()
