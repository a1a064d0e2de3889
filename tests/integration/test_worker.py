"""Workers that keep the base model loaded give the same results as a fresh process per trial."""

import time
from dataclasses import replace
from pathlib import Path

import pytest

from loratune.config import FinetuneConfig, to_dict
from loratune.executors.base import TrialSpec
from loratune.executors.local import LocalExecutor

# different ranks, alphas, batch sizes, dropouts and target modules: everything a fresh adapter changes
TRIALS = [
    {"lora": {"rank": 32, "alpha": 128, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}, "training": {"batch_size": 2}},
    {"lora": {"rank": 16, "alpha": 32, "dropout": 0.0}, "training": {"batch_size": 4, "learning_rate": 5e-4}},
    {"lora": {"rank": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["gate_proj", "up_proj", "down_proj"],
              "use_rslora": True}, "training": {"batch_size": 1}},
]


def trial_config(i: int, directory: Path) -> dict:
    cfg = FinetuneConfig(output_dir=str(directory))
    cfg.training.epochs, cfg.training.eval_points = 0.1, 2
    for section, values in TRIALS[i].items():
        setattr(cfg, section, replace(getattr(cfg, section), **values))
    return to_dict(cfg)


def run_all(executor: LocalExecutor, order: list[int], root: Path) -> list:
    """Run the trials one after another, in this order (a trial may come again); their results in order."""
    out = []
    try:
        for n, i in enumerate(order):
            d = root / f"{n}-{i}"
            executor.submit(TrialSpec(i, {}, d, trial_config(i, d)))
            deadline, result = time.monotonic() + 300, None
            while result is None and time.monotonic() < deadline:
                for event in executor.poll(0.5):
                    if event.result is not None:
                        assert event.result.state.value == "completed", event.result.reason
                        result = event.result
            out.append(result)
    finally:
        executor.shutdown()
    return out


@pytest.mark.slow
def test_a_reused_worker_trains_exactly_as_a_fresh_process(tiny_model, tmp_path):
    fresh = run_all(LocalExecutor(reuse_model=False), [0, 1, 2], tmp_path / "fresh")
    # one worker, the trials forwards then backwards: nothing of a trial stays behind for the next
    reused = run_all(LocalExecutor(reuse_model=True), [0, 1, 2, 2, 1, 0], tmp_path / "reused")
    backwards = dict(zip([2, 1, 0], reused[3:], strict=True))
    for i in range(len(TRIALS)):  # bit for bit, at every point of the curve
        assert fresh[i].metrics["loss"] == reused[i].metrics["loss"] == backwards[i].metrics["loss"], i
        assert fresh[i].curve == reused[i].curve == backwards[i].curve, i
        assert fresh[i].metrics["trainable_params"] == reused[i].metrics["trainable_params"]
    # one model load for the reused worker, against one per trial
    assert [r.extra["timings"]["load_s"] > 0 for r in reused] == [True] + [False] * 5
    assert all(r.extra["timings"]["load_s"] > 0 for r in fresh)
    # importing torch, transformers and peft (well over 0.1 s): every fresh process pays it, a reused worker once
    assert ["startup_s" in r.extra["timings"] for r in reused] == [True] + [False] * 5
    assert all(r.extra["timings"]["startup_s"] > 0.1 for r in fresh)
    assert {r.metrics["trainable_params"] for r in fresh} == {r.metrics["trainable_params"] for r in backwards.values()}
