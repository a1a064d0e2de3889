"""Search efficiency: loratune's search against a plain Ax ``Client``, random search, grid search in
declaration order and Optuna's TPE sampler, on the tabular LoRA benchmark, on LoRA-shaped synthetic
surfaces (surfaces.py) and on Branin and Hartmann6 with a mix of continuous and discrete parameters.

    pip install -e ".[bench]"                  # Optuna, for the TPE rows
    python benchmarks/search_efficiency.py [--reps 20] [--trials 20] [--jobs 2] [--problems tabular,branin,hartmann6]
    python benchmarks/search_efficiency.py --problems lora_scale,rslora_asymmetric,batch_scaled --methods loratune,ax,ax_baseline,random,optuna_tpe
    python benchmarks/search_efficiency.py --problems lora_scale --reps 40 --first-seed 20 --save more.json   # seeds 20-59

loratune's search is its ``Optimizer`` used as a study uses it: on the problems over the default
search space (tabular and the surfaces) the baseline (rank 16, alpha 32, lr 2e-4, batch size 1) is trial 0,
attached as Ax's baseline, then one trial is asked and completed at a time; ``--no-baseline`` leaves
it out. **ax**: a plain ``ax.Client`` with its defaults, the parameters written as an Ax user would
(ordered int choices, log-scale learning rate); **ax_baseline**: the same with the baseline attached
first, as loratune does. **loratune_ahead**: loratune's search with each point asked for while the
trial before it still runs (pending in Ax), as a study that overlaps the suggestion with training
would; measured and not adopted (docs/benchmarks-history.md, "Choosing the next point while a
trial trains"; not among the default methods). **loratune_pack4**: loratune's search as a study with
``pack: 4`` runs it: four points chosen in one call, each pack once the last has completed.
**loratune_lora**: loratune with ``parameterization: lora``
(the learning rate searched as LoRA's effective step). **loratune_warm**: loratune warm-started from an
earlier study of a related surface (``surfaces.earlier``: best step 1.6x larger, values 0.05 higher,
noise of sd 0.003; 20 trials of loratune with seed + 1000); **loratune_warm_task**: the same with the
earlier study's trials a task of their own (a multi-task GP; measured, not adopted). Every method gets ``--trials`` evaluations per repetition,
the baseline included where there is one; repetition r seeds every method with r. Regret after k trials is the
true value of the best point observed so far minus the optimum (on the tabular benchmark an
observation is one random seed's fine-tune and the true value the mean over seeds; a surface named
``lora_scale:0.002`` adds Gaussian observation noise of sd 0.002). "Within 1%" means
regret <= 1% of |optimum|. ``--save`` writes every regret trace as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import surfaces  # noqa: E402

CHECKPOINTS = (5, 10, 15, 20)
METHODS = ("loratune", "ax", "ax_baseline", "random", "grid", "optuna_tpe")


# ---------------------------------------------------------------------------------------------
# Problems: parameters as (name, kind, spec), an observation, a true value and the optimum


@dataclass
class Problem:
    name: str
    params: list[tuple]  # (name, "choice", [values]) | (name, "float", low, high, log) | (name, "int", low, high)
    grid: list[dict]  # the grid a user would write, in declaration order
    optimum: float
    objective: object = field(repr=False)  # (params, rng) -> observed value
    truth: object = field(repr=False)  # params -> true value
    baseline: dict | None = None  # a study's trial 0 (the current config), where the problem has one


def branin(x1: float, x2: float) -> float:
    b, c, r, s, t = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 6, 10, 1 / (8 * math.pi)
    return (x2 - b * x1 ** 2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s


HARTMANN_A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
HARTMANN_P = [[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
              [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]]
HARTMANN_ALPHA = [1.0, 1.2, 3.0, 3.2]


def hartmann6(x: list[float]) -> float:
    return -sum(a * math.exp(-sum(HARTMANN_A[i][j] * (x[j] - HARTMANN_P[i][j] * 1e-4) ** 2 for j in range(6)))
                for i, a in enumerate(HARTMANN_ALPHA))


TENTHS = [round(0.1 * i, 1) for i in range(11)]


def make_problem(name: str) -> Problem:
    if name == "tabular":
        from tabular import Tabular

        t = Tabular()
        params = [("lora_rank", "choice", [8, 16, 32, 64]), ("lora_alpha", "choice", [16, 32, 64, 128]),
                  ("learning_rate", "float", 1e-5, 5e-4, True), ("batch_size", "choice", [1, 2, 4])]
        grid = [dict(zip(("lora_rank", "lora_alpha", "learning_rate", "batch_size"), g, strict=True))
                for g in itertools.product([8, 16, 32, 64], [16, 32, 64, 128], t.learning_rates, [1, 2, 4])]
        return Problem(name, params, grid, t.optimum, t.observe, t.true_value, baseline=dict(surfaces.BASELINE))
    if name.split(":")[0] in surfaces.SURFACES:  # "lora_scale" or "lora_scale:0.002" (noise sd)
        surface, _, noise = name.partition(":")
        grid = [dict(zip(("lora_rank", "lora_alpha", "learning_rate", "batch_size"), g, strict=True))
                for g in itertools.product([8, 16, 32, 64], [16, 32, 64, 128], [1e-5, 5e-5, 1e-4, 5e-4], [1, 2, 4])]
        return Problem(name, surfaces.SPACE, grid, surfaces.OPTIMA[surface], surfaces.observe(surface, float(noise or 0)),
                       surfaces.SURFACES[surface], baseline=dict(surfaces.BASELINE))
    if name == "branin":  # x1 continuous, x2 an integer
        def f(p, rng=None):
            return branin(p["x1"], p["x2"])

        # the mixed optimum: the best x1 for each integer x2, by a fine scan refined with golden section
        best = min(_minimize_1d(lambda x1, x2=x2: branin(x1, x2), -5, 10) for x2 in range(16))
        grid = [{"x1": x1, "x2": x2} for x1, x2 in itertools.product([-5 + i for i in range(16)], range(16))]
        return Problem(name, [("x1", "float", -5.0, 10.0, False), ("x2", "int", 0, 15)], grid, best, f, f)
    if name == "hartmann6":  # x1..x3 continuous in [0, 1], x4..x6 on a 0.1 grid
        def f(p, rng=None):
            return hartmann6([p[f"x{i}"] for i in range(1, 7)])

        params = [(f"x{i}", "float", 0.0, 1.0, False) for i in (1, 2, 3)] + [(f"x{i}", "choice", TENTHS) for i in (4, 5, 6)]
        grid = [dict(zip([f"x{i}" for i in range(1, 7)], g, strict=True)) for g in itertools.product([0.0, 0.5, 1.0], repeat=6)]
        return Problem(name, params, grid, _hartmann6_mixed_optimum(), f, f)
    raise SystemExit(f"unknown problem '{name}' (tabular, branin, hartmann6, {', '.join(surfaces.SURFACES)}; "
                     "a surface may carry noise: lora_scale:0.002)")


def _minimize_1d(fn, low: float, high: float) -> float:
    xs = [low + (high - low) * i / 3000 for i in range(3001)]
    x = min(xs, key=fn)
    a, b = max(low, x - (high - low) / 3000), min(high, x + (high - low) / 3000)
    for _ in range(60):  # golden section inside the best cell
        c, d = b - (b - a) * 0.618, a + (b - a) * 0.618
        a, b = (a, d) if fn(c) < fn(d) else (c, b)
    return min(fn(x), fn((a + b) / 2))


def _hartmann6_mixed_optimum() -> float:
    """The continuous optimum is at x4..x6 = (0.2753, 0.3117, 0.6573): the mixed one is at a
    neighbouring 0.1-grid corner, with x1..x3 optimised by L-BFGS-B from several starts."""
    from scipy.optimize import minimize

    best = math.inf
    for x4, x5, x6 in itertools.product((0.2, 0.3), (0.3, 0.4), (0.6, 0.7)):
        for start in itertools.product((0.1, 0.2, 0.5), (0.15, 0.5, 0.9), (0.3, 0.48, 0.8)):
            r = minimize(lambda z, c=(x4, x5, x6): hartmann6([*z, *c]), start, bounds=[(0, 1)] * 3, method="L-BFGS-B")
            best = min(best, float(r.fun))
    return best


# ---------------------------------------------------------------------------------------------
# Methods: each returns the list of observed (params, value) in order


def run_loratune(problem: Problem, trials: int, seed: int, ahead: bool = False,
                 parameterization: str = "raw", prior: list | None = None, tasks: bool = False,
                 pack: int = 1) -> list[tuple[dict, float]]:
    """loratune's ``Optimizer`` as a study with one worker uses it. ``ahead``: each suggestion is asked for
    while the trial before it still runs (pending in Ax), as a study that overlaps the suggestion with
    training would; otherwise after it completed. ``parameterization``: the study setting; ``prior``: an
    earlier study's trials (``warm_start.PriorTrial``), as ``warm_start`` gives them; ``tasks``: modelled as
    a task of their own (``variants.MultiTaskOptimizer``); ``pack``: as a packed study, the
    points of each pack asked for in one call once the last pack has completed (in index order)."""
    from loratune.config import FinetuneConfig, default_search_space
    from loratune.optimizer import Optimizer
    from loratune.optimizer.variants import MultiTaskOptimizer
    from loratune.search_space import SearchSpace, parse_search_space

    if problem.name == "tabular" or (parameterization != "raw" and problem.params == surfaces.SPACE):
        # the default search space: exactly what a study builds from it
        space = parse_search_space(default_search_space(), [], FinetuneConfig(), parameterization=parameterization)
    else:
        space = SearchSpace([_loratune_param(p) for p in problem.params])
    opt = (MultiTaskOptimizer if tasks else Optimizer).create(space, ["value"], [True], [], seed=seed, prior=prior)
    if tasks:
        opt.model_earlier_studies_as_tasks({i: "earlier study" for i in range(len(prior or []))})
    rng, history, running = random.Random(seed), [], []  # running: (index, params) in the order they started
    if problem.baseline is not None:  # as a study: the current config is trial 0, attached as Ax's baseline
        running.append((opt.attach(problem.baseline, baseline=True), problem.baseline))
    while len(history) < trials and pack > 1:
        free = min(pack - len(running), trials - len(history) - len(running))
        running += list(opt.ask(free).items()) if free > 0 else []
        if not running:
            break
        for index, params in running:  # the pack's trials end together
            value = problem.objective(params, rng)
            opt.complete(index, {"value": value})
            history.append((params, value))
        running = []
    while len(history) < trials:
        if not running or (ahead and len(history) + len(running) < trials and len(running) < 2):
            asked = list(opt.ask(1).items())
            running += asked
            if asked and ahead and len(running) < 2:
                continue  # the trial just asked for starts; the next one is asked for while it runs
        if not running:  # Ax proposes nothing more
            break
        index, params = running.pop(0)
        value = problem.objective(params, rng)
        opt.complete(index, {"value": value})
        history.append((params, value))
    return history


def run_loratune_ahead(problem: Problem, trials: int, seed: int) -> list[tuple[dict, float]]:
    return run_loratune(problem, trials, seed, ahead=True)


def run_loratune_pack4(problem: Problem, trials: int, seed: int) -> list[tuple[dict, float]]:
    return run_loratune(problem, trials, seed, pack=4)


def run_loratune_lora(problem: Problem, trials: int, seed: int) -> list[tuple[dict, float]]:
    return run_loratune(problem, trials, seed, parameterization="lora")


def run_loratune_warm(problem: Problem, trials: int, seed: int, tasks: bool = False) -> list[tuple[dict, float]]:
    """A warm start from an earlier study of a related job: loratune's 20 trials (seed + 1000) on the
    surface's ``earlier`` version (best step 1.6x larger, every value 0.05 higher, observation noise of
    sd 0.003), whose trials the new study gets as ``warm_start`` gives them (``tasks``: as a task of their
    own in a multi-task GP)."""
    from loratune.warm_start import PriorTrial

    name = problem.name.split(":")[0]
    related = Problem(f"{name} (earlier)", problem.params, [], problem.optimum + 0.05,
                      lambda p, rng=None: surfaces.earlier(name)(p) + (rng.gauss(0.0, 0.003) if rng else 0.0),
                      surfaces.earlier(name), baseline=problem.baseline)
    earlier = run_loratune(related, 20, seed + 1000)
    prior = [PriorTrial(params, {"value": value}, f"earlier#{i}") for i, (params, value) in enumerate(earlier)]
    return run_loratune(problem, trials, seed, prior=prior, tasks=tasks)


def run_loratune_warm_task(problem: Problem, trials: int, seed: int) -> list[tuple[dict, float]]:
    return run_loratune_warm(problem, trials, seed, tasks=True)


def _loratune_param(spec: tuple):
    from loratune.search_space import Param

    name, kind = spec[0], spec[1]
    if kind == "choice":
        return Param(name, name, "choice", list(spec[2]), integer=all(isinstance(v, int) for v in spec[2]))
    return Param(name, name, "range", low=spec[2], high=spec[3], log=kind == "float" and spec[4], integer=kind == "int")


def run_ax(problem: Problem, trials: int, seed: int, baseline: bool = False) -> list[tuple[dict, float]]:
    """A plain Ax ``Client`` with its defaults, the parameters written as an Ax user would."""
    from ax import ChoiceParameterConfig, Client, RangeParameterConfig

    from loratune.optimizer import quiet_ax as _quiet_ax

    _quiet_ax()
    params = []
    for spec in problem.params:
        name, kind = spec[0], spec[1]
        if kind == "choice":
            ptype = "int" if all(isinstance(v, int) for v in spec[2]) else "float"
            params.append(ChoiceParameterConfig(name=name, values=list(spec[2]), parameter_type=ptype))
        elif kind == "int":
            params.append(RangeParameterConfig(name=name, bounds=(spec[2], spec[3]), parameter_type="int"))
        else:
            params.append(RangeParameterConfig(name=name, bounds=(spec[2], spec[3]), parameter_type="float",
                                               scaling="log" if spec[4] else "linear"))
    client = Client(random_seed=seed)
    client.configure_experiment(parameters=params, name="plain_ax")
    client.configure_optimization(objective="-value")
    rng, history = random.Random(seed), []
    if baseline and problem.baseline is not None:
        index = client.attach_baseline(dict(problem.baseline))
        value = problem.objective(problem.baseline, rng)
        client.complete_trial(index, raw_data={"value": value})
        history.append((problem.baseline, value))
    while len(history) < trials:
        for index, params_ in client.get_next_trials(max_trials=1).items():
            value = problem.objective(dict(params_), rng)
            client.complete_trial(index, raw_data={"value": value})
            history.append((dict(params_), value))
    return history


def run_ax_baseline(problem: Problem, trials: int, seed: int) -> list[tuple[dict, float]]:
    return run_ax(problem, trials, seed, baseline=True)


def run_random(problem: Problem, trials: int, seed: int) -> list[tuple[dict, float]]:
    rng, history = random.Random(seed), []
    for _ in range(trials):
        params = {}
        for spec in problem.params:
            name, kind = spec[0], spec[1]
            if kind == "choice":
                params[name] = rng.choice(spec[2])
            elif kind == "int":
                params[name] = rng.randint(spec[2], spec[3])
            elif spec[4]:
                params[name] = math.exp(rng.uniform(math.log(spec[2]), math.log(spec[3])))
            else:
                params[name] = rng.uniform(spec[2], spec[3])
        history.append((params, problem.objective(params, rng)))
    return history


def run_grid(problem: Problem, trials: int, seed: int) -> list[tuple[dict, float]]:
    rng = random.Random(seed)
    return [(p, problem.objective(p, rng)) for p in problem.grid[:trials]]


def run_optuna_tpe(problem: Problem, trials: int, seed: int) -> list[tuple[dict, float]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng, history = random.Random(seed), []

    def objective(trial):
        params = {}
        for spec in problem.params:
            name, kind = spec[0], spec[1]
            if kind == "choice" and _evenly_spaced(spec[2]):  # an ordered grid: how Optuna users write it
                step = round(spec[2][1] - spec[2][0], 12)
                params[name] = round(trial.suggest_float(name, spec[2][0], spec[2][-1], step=step), 12)
            elif kind == "choice":
                params[name] = trial.suggest_categorical(name, spec[2])
            elif kind == "int":
                params[name] = trial.suggest_int(name, spec[2], spec[3])
            else:
                params[name] = trial.suggest_float(name, spec[2], spec[3], log=spec[4])
        value = problem.objective(params, rng)
        history.append((params, value))
        return value

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return history


def _evenly_spaced(values: list) -> bool:
    steps = {round(b - a, 9) for a, b in itertools.pairwise(values)}
    return len(values) > 2 and len(steps) == 1 and all(isinstance(v, float) for v in values)


RUNNERS = {"loratune": run_loratune, "loratune_ahead": run_loratune_ahead, "loratune_pack4": run_loratune_pack4, "loratune_lora": run_loratune_lora, "loratune_warm": run_loratune_warm,
           "loratune_warm_task": run_loratune_warm_task, "ax": run_ax, "ax_baseline": run_ax_baseline, "random": run_random,
           "grid": run_grid, "optuna_tpe": run_optuna_tpe}


# ---------------------------------------------------------------------------------------------
# Regret


def regret_trace(problem: Problem, history: list[tuple[dict, float]]) -> list[float]:
    """Regret after each trial, of the point with the best observed value so far."""
    trace, best_observed, best_true = [], math.inf, math.inf
    for params, value in history:
        if value < best_observed:
            best_observed, best_true = value, problem.truth(params)
        trace.append(best_true - problem.optimum)
    return trace


def run_task(task: tuple[str, str, int, int]) -> tuple[str, str, int, list[float], float]:
    problem_name, method, seed, trials = task
    problem = _problem(problem_name)
    start = time.perf_counter()
    history = RUNNERS[method](problem, trials, seed)
    return problem_name, method, seed, regret_trace(problem, history), time.perf_counter() - start


_PROBLEMS: dict[str, Problem] = {}


def _problem(name: str) -> Problem:
    if name not in _PROBLEMS:
        _PROBLEMS[name] = make_problem(name)
        if os.environ.get("LORATUNE_BENCH_NO_BASELINE"):
            _PROBLEMS[name].baseline = None
    return _PROBLEMS[name]


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


def measure(problems: list[str], methods: list[str], reps: int, trials: int, jobs: int, task=run_task, first_seed: int = 0):
    """Every method on every problem, ``reps`` seeds each: ({(problem, method): traces}, {...: seconds})."""
    tasks = [(p, m, r, trials) for p in problems for m in methods for r in range(first_seed, first_seed + reps)]
    tasks.sort(key=lambda t: t[1] in ("random", "grid", "optuna_tpe"))  # the slow ones first, so the pool ends together
    results: dict[tuple[str, str], list[list[float]]] = {}
    seconds: dict[tuple[str, str], float] = {}
    with ProcessPoolExecutor(jobs, initializer=_init_worker) as pool:
        for problem_name, method, _seed, trace, took in pool.map(task, tasks):
            results.setdefault((problem_name, method), []).append(trace)
            seconds[(problem_name, method)] = seconds.get((problem_name, method), 0.0) + took
    return results, seconds


def print_tables(problems: list[str], methods: list[str], results: dict, seconds: dict, reps: int, trials: int) -> None:
    for problem_name in problems:
        problem = _problem(problem_name)
        within = 0.01 * abs(problem.optimum)
        at = [k for k in CHECKPOINTS if k <= trials]
        print(f"### {problem_name} (optimum {problem.optimum:.6g}; regret median [q1, q3]; {reps} repetitions)\n")
        print("| method | " + " | ".join(f"after {k}" for k in at) + " | trials to within 1% (median) | reached by 15 | s per run |")
        print("|---|" + "---|" * (len(at) + 3))
        for method in methods:
            traces = results[(problem_name, method)]
            cells = []
            for k in at:
                q1, med, q3 = quartiles([t[k - 1] for t in traces])
                cells.append(f"{med:.3g} [{q1:.3g}, {q3:.3g}]")
            firsts = [next((i + 1 for i, r in enumerate(t) if r <= within), math.inf) for t in traces]
            median_first = statistics.median(firsts)
            reached = sum(f <= 15 for f in firsts)
            print(f"| {method} | " + " | ".join(cells)
                  + f" | {'>' + str(trials) if math.isinf(median_first) else f'{median_first:g}'}"
                  + f" | {reached}/{len(traces)} | {seconds[(problem_name, method)] / len(traces):.1f} |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--problems", default="tabular,branin,hartmann6")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + reps - 1")
    parser.add_argument("--save", help="write every regret trace to this JSON file")
    parser.add_argument("--no-baseline", action="store_true",
                        help="run loratune without the baseline trial (as this benchmark did before the surfaces)")
    args = parser.parse_args()
    problems, methods = args.problems.split(","), args.methods.split(",")
    if args.no_baseline:
        os.environ["LORATUNE_BENCH_NO_BASELINE"] = "1"  # read by the workers, which build their own problems
    start = time.perf_counter()
    results, seconds = measure(problems, methods, args.reps, args.trials, args.jobs, first_seed=args.first_seed)
    print(f"{len(problems) * len(methods) * args.reps} runs in {time.perf_counter() - start:.0f} s with {args.jobs} jobs\n")
    if args.save:
        Path(args.save).write_text(json.dumps({f"{p}/{m}": t for (p, m), t in results.items()}))
    print_tables(problems, methods, results, seconds, args.reps, args.trials)


if __name__ == "__main__":
    main()
