"""The optimizer package: the generation strategy loratune builds, its snapshot (equal to Ax's own
encoding), and every private name of Ax, BoTorch and torch that loratune uses (optimizer/seam.py) where
the seam expects it on the installed versions: an upgrade that moves one fails here, naming it."""

import json

import pytest
from conftest import fake_loss

from loratune.config import FinetuneConfig, StudyConfig
from loratune.optimizer import Optimizer, seam
from loratune.search_space import parse_search_space


def test_every_private_name_the_seam_uses_is_where_it_was():
    import ax
    import botorch

    space = parse_search_space({"learning_rate": [1e-5, 1e-3], "lora_rank": [8, 16]}, [], FinetuneConfig())
    opt = Optimizer.create(space, ["loss"], [True], [], 0, init_trials=2)
    (index, _), = opt.ask(1).items()
    opt.complete(index, {"loss": 1.0})
    client = opt.client
    checks = {
        "ax.Client._experiment": lambda: seam.experiment(client).trials[index],
        "ax.Client._generation_strategy": lambda: seam.generation_strategy(client).name,
        "ax.Client._maybe_generation_strategy": lambda: seam.generation_strategy(client, maybe=True),
        "ax.Client._to_json_snapshot": lambda: seam.to_json_snapshot(client)["experiment"],
        "ax.Client._from_json_snapshot": lambda: seam.experiment(
            seam.from_json_snapshot(json.loads(json.dumps(seam.to_json_snapshot(client))))).trials[index],
        "ax.Client._random_seed": lambda: "_random_seed" in vars(client),
        "ax.generation_strategy.generation_strategy.GenerationStrategy._nodes":
            lambda: seam.generation_nodes(client)[-1].generator_specs,
        "ax.core.data.Data._data_rows": lambda: seam.data_rows(seam.experiment(client).data)[0].trial_index == index,
        "ax.core.generator_run.GeneratorRun._generation_node_name":
            lambda: seam.node_name(seam.experiment(client).trials[index].generator_runs[0]),
        "botorch.acquisition.multi_objective.logei._load_attempted":
            lambda: isinstance(seam.kernel_tried(seam.fused_kernel()), bool),
        "botorch.acquisition.multi_objective.logei._try_load_fused_kernel":
            lambda: callable(getattr(seam.fused_kernel(), "_try_load_fused_kernel", None)),
        "torch.utils.cpp_extension._get_build_directory": lambda: seam.kernel_build_directory("logei_fused_ext"),
    }
    assert set(checks) == {name for name, _ in seam.PINNED}  # every pinned name is checked here
    for name, check in checks.items():
        try:
            value = check()
        except Exception as exc:  # noqa: BLE001 - whatever moved, say which name
            pytest.fail(f"Ax {ax.__version__} / BoTorch {botorch.__version__}: {name} is not as optimizer/seam.py uses "
                        f"it ({type(exc).__name__}: {exc})")
        assert value is not None and value is not False, f"{name} is not as optimizer/seam.py uses it"


SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128], "learning_rate": [1e-5, 5e-4],
         "batch_size": [1, 2, 4]}


def _node_names(opt: Optimizer) -> list[str]:
    trials = seam.experiment(opt.client).trials
    return [seam.node_name(trials[i].generator_runs[0]) for i in sorted(trials)]


def test_the_baseline_comes_on_top_of_the_initial_design_and_bayesian_optimization_follows():
    from loratune.search_space import parse_search_space

    space = parse_search_space(SPACE, [], StudyConfig().base())
    opt = Optimizer.create(space, ["loss"], [True], [], seed=0)
    index = opt.attach({"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1}, baseline=True)
    opt.complete(index, {"loss": 1.0})
    for _ in range(6):
        (index, params), = opt.ask(1).items()
        opt.complete(index, {"loss": fake_loss(params)})
    # the baseline is not one of the 5 points of the design (the centre of the space, then 4 Sobol points)
    assert _node_names(opt)[1:] == ["CenterOfSearchSpace"] + ["Sobol"] * 4 + ["MBM"]


def test_under_the_lora_parameterization_ax_proposes_only_points_in_the_users_box():
    """Ax searches the effective step; every trial it proposes, the baseline it was given and the ones it
    restores are the user's values, inside the bounds and the product constraint."""
    space = parse_search_space(SPACE, ["lora_rank * batch_size <= 32"], StudyConfig().base(), parameterization="lora")
    opt = Optimizer.create(space, ["loss"], [True], [], seed=0)
    baseline = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1}
    index = opt.attach(baseline, baseline=True)
    opt.complete(index, {"loss": fake_loss(baseline)})
    proposed = {}
    for _ in range(9):  # the centre, 4 Sobol points, then Bayesian optimization
        (index, params), = opt.ask(1).items()
        assert space.contains(params), params
        opt.complete(index, {"loss": fake_loss(params)})
        proposed[index] = params
    assert _node_names(opt)[-1] == "MBM"
    assert opt.trial_parameters()[0] == baseline
    restored = Optimizer.restore(json.loads(json.dumps(opt.snapshot())), space, seed=0)
    assert restored.trial_parameters() == {0: baseline, **proposed}


def _acquisition_search(opt: Optimizer) -> list[dict]:
    return [spec.generator_gen_kwargs.get("model_gen_options", {}).get("optimizer_kwargs") for spec in opt._model_specs()]


def test_the_acquisition_search_is_axs_own_with_or_without_constraints():
    from loratune.optimizer import LIGHTER_ACQUISITION_SEARCH
    from loratune.search_space import parse_search_space

    free = parse_search_space(SPACE, [], StudyConfig().base())
    assert _acquisition_search(Optimizer.create(free, ["loss"], [True], [], seed=0)) == [None]
    constrained = parse_search_space(SPACE, ["lora_rank * batch_size <= 128"], StudyConfig().base())
    opt = Optimizer.create(constrained, ["loss"], [True], [], seed=0)
    assert _acquisition_search(opt) == [None]
    assert _acquisition_search(Optimizer.restore(json.loads(json.dumps(opt.snapshot())), constrained, seed=0)) == [None]
    opt.use_lighter_acquisition_search()  # what the benchmarks compare it with: saved with the strategy
    restored = Optimizer.restore(json.loads(json.dumps(opt.snapshot())), constrained, seed=0)
    assert _acquisition_search(restored) == [LIGHTER_ACQUISITION_SEARCH]


def _as_ax_writes_it(opt: Optimizer) -> dict:
    """Ax's own encoding of the client, less the strategy's copy of the experiment (as the snapshot leaves it)."""
    snapshot = seam.to_json_snapshot(opt.client)
    snapshot["generation_strategy"]["experiment"] = None
    return json.loads(json.dumps(snapshot, sort_keys=True))


def test_the_snapshot_reuses_finished_trials_and_equals_axs_own_encoding():
    from loratune.search_space import parse_search_space

    space = parse_search_space(SPACE, ["lora_rank * batch_size <= 128"], StudyConfig().base())
    opt = Optimizer.create(space, ["loss"], [True], [], seed=0)
    opt.complete(opt.attach({"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1},
                            baseline=True), {"loss": 1.0})
    for end in ("completed", "running", "completed", "early_stopped", "failed", "abandoned"):  # trials 1-6
        (index, params), = opt.ask(1).items()
        if end != "failed":
            opt.progress(index, {"loss": fake_loss(params) + 0.1}, 500)
        if end == "completed":
            opt.complete(index, {"loss": fake_loss(params)})
        elif end == "early_stopped":
            opt.early_stopped(index)
        elif end == "failed":
            opt.failed(index, "out of memory")
        elif end == "abandoned":
            opt.abandoned(index)
    running = 2
    first = opt.snapshot()
    assert json.loads(json.dumps(first, sort_keys=True)) == _as_ax_writes_it(opt)

    opt.progress(running, {"loss": 0.6}, 800)  # a trial before the finished ones gains a point, then stops
    opt.early_stopped(running)
    opt.progress(3, {"loss": 0.3}, 500)  # a finished trial's point is replaced (Ax accepts it): same row count
    (index, params), = opt.ask(1).items()
    opt.complete(index, {"loss": fake_loss(params)})
    second = opt.snapshot()
    assert json.loads(json.dumps(second, sort_keys=True)) == _as_ax_writes_it(opt)
    trials, data = second["experiment"]["trials"], second["experiment"]["data_by_trial"]
    was = first["experiment"]
    # finished trials are encoded once; the one that was running and the one whose data changed again
    assert trials[1] is was["trials"][1] and data[1] is was["data_by_trial"][1]
    assert trials[4] is was["trials"][4] and data[4] is was["data_by_trial"][4]
    assert trials[running] is not was["trials"][running] and data[running] is not was["data_by_trial"][running]
    assert data[3] is not was["data_by_trial"][3]
    assert trials[running]["status"] == {"__type": "TrialStatus", "name": "EARLY_STOPPED"}

    for snapshot in (second, json.loads(json.dumps(second))):  # from memory and as read from the file
        restored = Optimizer.restore(snapshot, space, seed=0)
        assert len(seam.experiment(restored.client).trials) == len(seam.experiment(opt.client).trials)
        assert restored.ask(1)
