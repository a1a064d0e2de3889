"""The seam between loratune and the insides of Ax and BoTorch: every private name of theirs that loratune
uses, each behind a function here, and nowhere else (the architecture test checks it). Ax 1.3.1 has no
public accessor for these. ``PINNED`` lists them; tests/unit/test_optimizer.py checks each against the installed
Ax and BoTorch, so that an upgrade that moves one fails there, naming it, not in a user's resumed study.
"""

from __future__ import annotations

from typing import Any

# (the private name, what loratune uses it for)
PINNED = [
    ("ax.Client._experiment", "the experiment: its trials, data and optimization config"),
    ("ax.Client._generation_strategy", "the generation strategy: its nodes, its fitted model (adapter)"),
    ("ax.Client._maybe_generation_strategy", "the generation strategy, or None before one is set"),
    ("ax.Client._to_json_snapshot", "Ax's own JSON of a client, when the incremental snapshot does not apply"),
    ("ax.Client._from_json_snapshot", "a client from that JSON (what load_from_json_file reads)"),
    ("ax.Client._random_seed", "the seed of new candidates, which Ax does not save"),
    ("ax.generation_strategy.generation_strategy.GenerationStrategy._nodes", "the Bayesian-optimization node's specs"),
    ("ax.core.data.Data._data_rows", "the data rows a trial's encoding is kept with"),
    ("ax.core.generator_run.GeneratorRun._generation_node_name", "which node made a trial (tests, benchmarks)"),
    ("botorch.acquisition.multi_objective.logei._load_attempted", "that BoTorch tried its fused kernel"),
    ("botorch.acquisition.multi_objective.logei._try_load_fused_kernel", "load that kernel, once built"),
    ("torch.utils.cpp_extension._get_build_directory", "where that kernel is built, and its lock"),
]


def experiment(client: Any) -> Any:
    return client._experiment


def generation_strategy(client: Any, maybe: bool = False) -> Any:
    """The client's generation strategy (``maybe``: None where it has none yet)."""
    return client._maybe_generation_strategy if maybe else client._generation_strategy


def generation_nodes(client: Any) -> list:
    return client._generation_strategy._nodes


def data_rows(data: Any) -> list:
    return data._data_rows


def node_name(generator_run: Any) -> str | None:
    return generator_run._generation_node_name


def to_json_snapshot(client: Any) -> dict:
    return client._to_json_snapshot()


def from_json_snapshot(snapshot: dict) -> Any:
    from ax import Client

    return Client._from_json_snapshot(snapshot)


def set_random_seed(client: Any, seed: int | None) -> None:
    client._random_seed = seed


def fused_kernel() -> Any:
    """BoTorch's module of the fused multi-objective kernel (its ``_load_attempted`` flag and loader)."""
    import botorch.acquisition.multi_objective.logei as logei

    return logei


def kernel_tried(logei: Any) -> bool:
    return logei._load_attempted


def give_up_kernel(logei: Any) -> None:
    logei._load_attempted = True  # BoTorch then uses its pure-Python implementation


def load_kernel(logei: Any) -> None:
    logei._try_load_fused_kernel()


def kernel_build_directory(name: str) -> str:
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, verbose=False)
