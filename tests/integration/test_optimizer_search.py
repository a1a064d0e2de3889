"""The optimizer's search on Ax for real: the initial design and Bayesian optimization after it, the points
it proposes under the lora parameterization, and the snapshot of a study's Ax state against Ax's own
encoding. Each asks Ax for trials (the model fitted again for every one), which is why they are not in
tests/unit/test_optimizer.py; the two slowest are marked slow."""

import json

import pytest
from conftest import fake_loss

from loratune.config import StudyConfig
from loratune.optimizer import Optimizer, seam
from loratune.search_space import parse_search_space

SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128], "learning_rate": [1e-5, 5e-4],
         "batch_size": [1, 2, 4]}


def _node_names(opt: Optimizer) -> list[str]:
    trials = seam.experiment(opt.client).trials
    return [seam.node_name(trials[i].generator_runs[0]) for i in sorted(trials)]


def _as_ax_writes_it(opt: Optimizer) -> dict:
    """Ax's own encoding of the client, less the strategy's copy of the experiment (as the snapshot leaves it)."""
    snapshot = seam.to_json_snapshot(opt.client)
    snapshot["generation_strategy"]["experiment"] = None
    return json.loads(json.dumps(snapshot, sort_keys=True))


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


@pytest.mark.slow  # Ax fits its model for every trial it proposes: 15-25 s
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


@pytest.mark.slow  # Ax fits its model for every trial it proposes: 15-25 s
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
