"""Warm start: earlier studies' completed trials as prior data of a new study's Ax model. Every test but one
runs real Ax studies (tests/unit holds none); the variant only the benchmarks use is marked slow."""

import pytest
from conftest import fake_loss

from loratune import resume_optimization, run_optimization
from loratune.checkpoint import load as load_checkpoint
from loratune.errors import LoratuneError
from loratune.optimizer import Optimizer, seam

SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128], "learning_rate": [1e-5, 5e-4],
         "batch_size": [1, 2, 4]}


def study(out, trials, **kwargs):
    kwargs.setdefault("evaluate", fake_loss)
    kwargs.setdefault("search_space", SPACE)
    return run_optimization(num_trials=trials, output_dir=out, seed=kwargs.pop("seed", 0), quiet=kwargs.pop("quiet", True),
                            report=False, **kwargs)


def node_names(out) -> list[str]:
    stored = load_checkpoint(out)[1]
    experiment = seam.experiment(Optimizer.restore(stored.ax, stored.space, 0).client)
    return [seam.node_name(t.generator_runs[0]) for _, t in sorted(experiment.trials.items())]


def test_a_warm_started_study_learns_from_the_earlier_trials_and_keeps_its_own(tmp_path):
    earlier = study(tmp_path / "v1", 7)
    seen = []

    def evaluate(params):
        seen.append(params)
        return fake_loss(params)

    results = study(tmp_path / "v2", 4, evaluate=evaluate, warm_start=[str(tmp_path / "v1")], seed=1)
    assert len(seen) == len(results["trials"]) == 4  # the earlier trials are not run again, nor its records
    assert [t["index"] for t in results["trials"]] == [7, 8, 9, 10]  # Ax trials 0-6 are the earlier study's
    assert results["trials"][0]["baseline"] and results["warm_start"] == {"studies": [str(tmp_path / "v1")], "trials": 7}
    assert results["best_trial"] in {7, 8, 9, 10}
    # 7 earlier points cover the initial design (5): Bayesian optimization from the first suggestion on
    names = node_names(tmp_path / "v2")
    assert names[7:] == [None, "MBM", "MBM", "MBM"]  # the baseline (attached), then the model
    stored = load_checkpoint(tmp_path / "v2")[1]
    assert stored.warm_start == {t["index"]: f"{tmp_path / 'v1'}#{t['index']}" for t in earlier["trials"]}
    # and it resumes: the earlier trials stay Ax's data, never a record
    resumed = resume_optimization(tmp_path / "v2", additional_trials=1, evaluate=evaluate, quiet=True)
    assert [t["index"] for t in resumed["trials"]] == [7, 8, 9, 10, 11] and len(seen) == 5


def test_earlier_trials_outside_the_new_space_are_left_out_and_said(tmp_path, capsys):
    wide = dict(SPACE, learning_rate=[1e-6, 1e-3], batch_size=[1, 2, 4, 8])
    earlier = study(tmp_path / "v1", 8, search_space=wide)
    def inside(t):
        return 1e-5 <= t["params"]["learning_rate"] <= 5e-4 and t["params"]["batch_size"] <= 4

    narrow = {k: v for k, v in SPACE.items() if k != "lora_alpha"}  # alpha fixed at 32: other alphas are other configs
    other = [t for t in earlier["trials"] if t["params"]["lora_alpha"] != 32]
    kept = [t for t in earlier["trials"] if t["params"]["lora_alpha"] == 32 and inside(t)]
    outside = 8 - len(other) - len(kept)
    assert outside and other and kept
    study(tmp_path / "v2", 2, search_space=narrow, warm_start=[str(tmp_path / "v1")], quiet=False)
    out = " ".join(capsys.readouterr().out.split())
    assert f"note: warm start: {len(kept)} completed trial{'' if len(kept) == 1 else 's'} from {tmp_path / 'v1'} (" in out
    assert f"{outside} outside this search space or its constraints" in out
    assert f"{len(other)} with a parameter this study fixes at another value" in out
    assert len(load_checkpoint(tmp_path / "v2")[1].warm_start) == len(kept)


def test_a_warm_start_from_a_study_of_other_objectives_is_refused_before_anything_is_written(tmp_path):
    study(tmp_path / "v1", 3)
    with pytest.raises(LoratuneError, match=r"warm_start\[0\]: .*v1 optimized min loss, this study max accuracy: "
                                            "a warm start needs the same objectives"):
        study(tmp_path / "v2", 3, evaluate=lambda p: {"accuracy": 1 - fake_loss(p)}, objectives=["accuracy"],
              minimize=[False], warm_start=[str(tmp_path / "v1")])
    assert not (tmp_path / "v2").exists()
    with pytest.raises(LoratuneError, match=r"warm_start\[0\]: .*nowhere does not exist"):
        study(tmp_path / "v2", 3, warm_start=[str(tmp_path / "nowhere")])


def test_a_warm_start_from_two_studies_that_share_points_and_name_parameters_their_own_way(tmp_path):
    """Two studies of one base config share their baseline (one Ax arm for both); `lora.rank` in one is
    `lora_rank` in the other; the study's results file stands for its directory."""
    study(tmp_path / "v1", 3)
    aliased = {"lora.rank": SPACE["lora_rank"], "lora.alpha": SPACE["lora_alpha"],
               "training.learning_rate": SPACE["learning_rate"], "training.batch_size": SPACE["batch_size"]}
    study(tmp_path / "v2", 3, search_space=aliased, seed=1)
    results = study(tmp_path / "v3", 2, warm_start=[str(tmp_path / "v1"), str(tmp_path / "v2" / "optimization_results.json")])
    assert results["warm_start"]["trials"] == 6 and [t["index"] for t in results["trials"]] == [6, 7]


def test_the_command_line_takes_several_earlier_studies(tmp_path, capsys):
    import ax_optimization
    from loratune.cli import build_parser

    args = build_parser().parse_args(["optimize", "--warm-start", "runs/v1,runs/v2"])
    assert args.warm_start == ["runs/v1", "runs/v2"]
    assert ax_optimization.main(["--warm-start", str(tmp_path / "nowhere"), "--output", str(tmp_path / "v2")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --warm-start[0]: {tmp_path / 'nowhere'} does not exist"


@pytest.mark.slow  # the benchmarks' variant: two fits of a multi-task GP
def test_earlier_trials_modelled_as_a_task_of_their_own_fit_a_multi_task_model_once_this_study_has_data():
    """The variant the benchmarks compare (``optimizer.variants.MultiTaskOptimizer``): Ax's TrialAsTask
    transform gives the earlier study's trials their own task, and BoTorch a MultiTaskGP."""
    from loratune.config import FinetuneConfig, default_search_space
    from loratune.optimizer.variants import MultiTaskOptimizer
    from loratune.search_space import parse_search_space
    from loratune.warm_start import PriorTrial

    space = parse_search_space(default_search_space(), [], FinetuneConfig())
    points = [{"lora_rank": r, "lora_alpha": a, "learning_rate": lr, "batch_size": b}
              for r, a, lr, b in [(8, 16, 1e-5, 1), (16, 32, 1e-4, 2), (32, 64, 3e-4, 4), (64, 128, 5e-4, 1),
                                  (8, 128, 2e-5, 2), (64, 16, 4e-4, 4)]]
    prior = [PriorTrial(p, {"value": fake_loss(p) + 0.05}, f"v1#{i}") for i, p in enumerate(points)]
    opt = MultiTaskOptimizer.create(space, ["value"], [True], [], seed=0, prior=prior)
    opt.model_earlier_studies_as_tasks({i: "earlier study" for i in range(len(prior))})

    def model() -> str:
        (spec,) = opt._model_specs()
        return type(spec.fitted_adapter.generator.surrogate.model).__name__

    (index, params), = opt.ask(1).items()  # no data of its own yet: the earlier trials are modelled as this study's
    assert model() == "SingleTaskGP" and space.contains(params)
    opt.complete(index, {"value": fake_loss(params)})
    (index, params), = opt.ask(1).items()
    assert model() == "MultiTaskGP" and space.contains(params) and index == len(prior) + 1
