import json
from dataclasses import replace

import pytest

from loratune.compare import compare_runs
from loratune.errors import LoratuneError
from loratune.report import write_report
from loratune.report.findings import (
    alpha_ratio_insight,
    compute,
    effective_scale,
    learning_rate_insight,
    spearman,
    trace,
)
from loratune.trial import TrialRecord, TrialState


def record(index, loss, state="completed", baseline=False, **params) -> TrialRecord:
    return TrialRecord(index, params, TrialState(state), baseline, {"loss": loss} if loss is not None else {},
                       duration_s=1.0)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties share their rank
    assert spearman([1, 2, 3], [1, 2, 3]) is None  # too few points
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None  # no spread


def test_effective_scale():
    assert effective_scale({"lora_rank": 16, "lora_alpha": 32}) == 2
    assert effective_scale({"lora_rank": 16, "lora_alpha": 32}, rslora=True) == 8
    assert effective_scale({"lora_rank": 16}) is None


def test_learning_rate_insight_finds_the_sweet_spot_and_the_edge():
    rows = [record(i, loss, learning_rate=lr) for i, (lr, loss) in
            enumerate([(1e-5, 0.9), (3e-5, 0.8), (1e-4, 0.6), (2e-4, 0.55), (5e-4, 0.7)])]
    ins = learning_rate_insight(rows, "loss", True, (1e-5, 5e-4))
    assert "from 0.0001 to 0.0002" in ins.finding and "best one 0.0002" in ins.finding
    assert "top of the range" not in ins.finding
    edge = learning_rate_insight(rows[:2] + [record(9, 0.3, learning_rate=5e-4)], "loss", True, (1e-5, 5e-4))
    assert "top of the range" in edge.finding
    assert [g.n for g in ins.groups] == [2, 2, 1]  # half-decade bins, in order
    assert [round(g.value[0], 6) for g in ins.groups] == [1e-5, 1e-4, 0.000316]


def test_findings_read_as_sentences_when_there_are_too_few_trials_to_tell():
    few = [record(0, 0.9, learning_rate=1e-4, lora_rank=8, lora_alpha=16),
           record(1, 0.8, learning_rate=3e-4, lora_rank=16, lora_alpha=16)]
    assert learning_rate_insight(few, "loss", True, None).finding.endswith(
        "Too few distinct trials to tell how loss moves with the learning rate (on a log scale).")
    assert alpha_ratio_insight(few, "loss", True, rslora=False).finding == \
        "Too few distinct trials to tell how loss moves with the effective scale alpha/rank."


def test_alpha_ratio_insight_uses_alpha_over_rank():
    rows = [record(i, 1.0 / (a / r), lora_rank=r, lora_alpha=a, learning_rate=1e-4)
            for i, (r, a) in enumerate([(8, 16), (16, 16), (8, 64), (32, 32), (16, 128)])]
    ins = alpha_ratio_insight(rows, "loss", True, rslora=False)
    assert ins.correlation == pytest.approx(-1.0)
    assert "alpha/rank matters" in ins.finding
    assert [g.value for g in ins.groups] == [1.0, 2.0, 8.0]


def test_compute_and_trace_over_records_with_failures():
    records = [record(0, 0.8, baseline=True, lora_rank=16, learning_rate=2e-4),
               record(1, 0.9, lora_rank=8, learning_rate=1e-5),
               record(2, None, state="failed", lora_rank=64, learning_rate=1e-4),
               record(3, 0.6, lora_rank=32, learning_rate=3e-4),
               replace(record(4, 0.7, state="early_stopped", lora_rank=8, learning_rate=2e-5), training_saved=0.6)]
    data = compute({"trials": [r.to_dict() for r in records], "objectives": ["loss"], "minimize": [True]})
    assert data.best.index == 3 and data.baseline.index == 0
    assert data.improvement.absolute == pytest.approx(0.2) and data.improvement.relative == pytest.approx(0.25)
    assert data.early_stopping == {"stopped": 1, "trials_saved": 0.6, "share_saved": 0.15}
    assert trace(records, "loss", True) == [(0, 0.8, 0.8), (1, 0.9, 0.8), (2, None, 0.8), (3, 0.6, 0.6), (4, None, 0.6)]


def test_comparison_arithmetic():
    c = compare_runs([0.50, 0.52, 0.51], [0.60, 0.62, 0.61])
    assert (c.best_mean, c.baseline_mean) == (pytest.approx(0.51), pytest.approx(0.61))
    assert c.best_std == pytest.approx(0.01) and c.difference == pytest.approx(0.10)
    assert c.relative == pytest.approx(0.10 / 0.61)
    # Welch's t = 0.1 / sqrt(2 * 0.01**2 / 3) = 12.25 with 4 degrees of freedom
    assert c.p_value == pytest.approx(0.000255, rel=0.01) and c.beyond_noise
    noisy = compare_runs([0.50, 0.60, 0.55], [0.56, 0.52, 0.62])
    assert not noisy.beyond_noise and "within the seed-to-seed noise" in noisy.verdict()
    assert compare_runs([0.5], [0.6]).p_value is None


def test_report_with_no_completed_trial(tmp_path):
    (tmp_path / "optimization_results.json").write_text(json.dumps({"trials": [record(0, None, state="running").to_dict()]}))
    text = write_report(tmp_path).read_text()
    assert "## Result\n\nNo trial has completed yet, so there is no best configuration.\n" in text
    assert "Best trial" not in text and "\n| 0 |  |  | running | 1.0 |\n" in text  # listed, with no loss
    assert "## Key insights\n\nToo few completed trials to say anything yet.\n" in text
    assert "Study of 1 trial, 1 still running or interrupted:" in text


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "{target}: no such directory"),
    ("empty", "{target}: holds no loratune study (no optimization_results.json or optimization_checkpoint.json)"),
    ("foreign", "{target}/optimization_results.json: not a loratune results file"),
])
def test_report_on_a_directory_without_a_study(tmp_path, setup, message):
    target = tmp_path / "nothing" if setup == "missing" else tmp_path
    if setup == "foreign":
        (tmp_path / "optimization_results.json").write_text('{"hello": 1}')
    with pytest.raises(LoratuneError) as err:
        write_report(target)
    assert str(err.value) == message.format(target=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["optimization_results.json"] if setup == "foreign" else [])


def test_insights_read_parameters_by_the_field_they_set_whatever_the_study_called_them():
    """A search space that names its parameters lora.rank, lora.alpha and training.learning_rate gets the
    same insights as one that names them lora_rank, lora_alpha and learning_rate."""
    from loratune.report.findings import compute

    def summary(rank, alpha, lr):
        trials = [record(i, 0.5 + 0.01 * i, **{rank: r, alpha: 2 * r, lr: 1e-4 * (i + 1)}).to_dict()
                  for i, r in enumerate([8, 16, 32, 64, 8, 16])]
        return {"trials": trials, "search_space": {rank: [8, 16, 32, 64], alpha: [16, 128], lr: [1e-5, 1e-3]}}

    plain = compute(summary("lora_rank", "lora_alpha", "learning_rate")).insights
    dotted = compute(summary("lora.rank", "lora.alpha", "training.learning_rate")).insights
    assert [i.title for i in dotted] == [i.title for i in plain] and len(plain) >= 3
    assert [(i.finding, i.correlation) for i in dotted] == [(i.finding, i.correlation) for i in plain]
