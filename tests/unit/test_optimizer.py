"""The optimizer package: the generation strategy loratune builds, and every private name of Ax, BoTorch and
torch that loratune uses (optimizer/seam.py) where the seam expects it on the installed versions: an upgrade
that moves one fails here, naming it. Its search for real (the design, Bayesian optimization, the snapshot
against Ax's own encoding) is in tests/integration/test_optimizer_search.py."""

import json

import pytest

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


def _acquisition_search(opt: Optimizer) -> list[dict]:
    return [spec.generator_gen_kwargs.get("model_gen_options", {}).get("optimizer_kwargs") for spec in opt._model_specs()]


def test_the_acquisition_search_is_axs_own_with_or_without_constraints():
    from loratune.optimizer.variants import LIGHTER_ACQUISITION_SEARCH, use_lighter_acquisition_search
    from loratune.search_space import parse_search_space

    free = parse_search_space(SPACE, [], StudyConfig().base())
    assert _acquisition_search(Optimizer.create(free, ["loss"], [True], [], seed=0)) == [None]
    constrained = parse_search_space(SPACE, ["lora_rank * batch_size <= 128"], StudyConfig().base())
    opt = Optimizer.create(constrained, ["loss"], [True], [], seed=0)
    assert _acquisition_search(opt) == [None]
    assert _acquisition_search(Optimizer.restore(json.loads(json.dumps(opt.snapshot())), constrained, seed=0)) == [None]
    use_lighter_acquisition_search(opt)  # what the benchmarks compare it with: saved with the strategy
    restored = Optimizer.restore(json.loads(json.dumps(opt.snapshot())), constrained, seed=0)
    assert _acquisition_search(restored) == [LIGHTER_ACQUISITION_SEARCH]


