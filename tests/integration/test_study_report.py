"""OPTIMIZATION_RESULTS.md of real (fake-objective) studies: under each heading the figures of the study it
reports, and links only to files that exist. The report's arithmetic on hand-made records is in
tests/unit/test_report.py."""

import json
import re

import pytest
from conftest import fake_loss

from loratune import run_optimization
from loratune.report import write_report

SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64], "learning_rate": [1e-5, 5e-4], "batch_size": [1, 2]}
BASELINE = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1}


def under(text: str, heading: str) -> str:
    """The text under ``heading``, up to the next heading of its level or above."""
    body = text.split(f"\n{heading}\n", 1)[1]
    end = re.search(rf"^#{{1,{heading.index(' ')}}} ", body, re.M)
    return body[:end.start()] if end else body


def rows(block: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``block``, as cells."""
    table = [line for line in block.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]


def groups(trials: list[dict], key) -> dict[str, list[str]]:
    """What a key-insights table says of each value of ``key``: trials, mean loss, best loss."""
    losses: dict[float, list[float]] = {}
    for t in trials:
        losses.setdefault(key(t["params"]), []).append(t["metrics"]["loss"])
    return {f"{value:g}": [str(len(v)), f"{sum(v) / len(v):.4g}", f"{min(v):.4g}"] for value, v in sorted(losses.items())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 6-trial study whose baseline is not its best (it scores 0.1 worse than the fake objective says)."""
    out = tmp_path_factory.mktemp("finished")
    results = run_optimization(num_trials=6, output_dir=out, search_space=SPACE, quiet=True, seed=0,
                               evaluate=lambda p: {"loss": fake_loss(p) + (0.1 if p == BASELINE else 0.0)})
    return out, results, (out / "OPTIMIZATION_RESULTS.md").read_text()


def test_the_report_of_a_finished_study_gives_its_figures_under_each_heading(finished):
    _, results, text = finished
    trials = results["trials"]
    loss = {t["index"]: t["metrics"]["loss"] for t in trials}
    best, second = sorted(loss, key=loss.get)[:2]
    assert best == results["best_trial"] != 0 and trials[0]["params"] == BASELINE
    assert text.startswith(f"# Optimization results\n\nStudy of {len(trials)} trials: callable evaluation, objective "
                           "minimize loss, seed 0,")

    settings = under(text, "## Settings")
    for name, values in SPACE.items():
        assert f"- `{name}`: {values}\n" in settings
    assert "States: completed 6\n" in settings

    result = under(text, "## Result")
    assert f"Best trial: **#{best}**, " in result and f", loss **{loss[best]:.4f}**." in result
    assert "Baseline (#0, rank=16, alpha=32, lr=0.0002, bs=1): loss " f"{loss[0]:.4f}." in result
    assert f"Best against baseline: {loss[best]:.4f} vs {loss[0]:.4f} ({(loss[0] - loss[best]) / loss[0]:.1%} better)" \
           in result
    assert (f"Retrain with `best_config.yaml` (trial #{best}). The next best trial scored {loss[second]:.4f}, "
            f"{loss[second] - loss[best]:.4f} away.") in under(text, "### Recommendation")

    every = {r[0]: r for r in rows(under(text, "## Every trial"))}
    assert set(every) == {f"★ {best}", "◆ 0", *(str(i) for i in loss if i not in (0, best))}
    for key, row in every.items():
        assert row[6] == f"{loss[int(key.split()[-1])]:.4f}" and row[7] == "completed", row

    insights = {"### LoRA rank vs loss": lambda p: p["lora_rank"], "### Batch size impact": lambda p: p["batch_size"],
                "### Alpha/rank ratio": lambda p: p["lora_alpha"] / p["lora_rank"]}
    for heading, key in insights.items():
        assert {r[0]: r[1:] for r in rows(under(text, heading))} == groups(trials, key), heading
    bins = rows(under(text, "### Learning-rate sweet spot"))
    assert sum(int(r[1]) for r in bins) == 6 and min(float(r[3]) for r in bins) == pytest.approx(loss[best], abs=1e-4)

    importance = {r[0]: float(r[1]) for r in rows(under(text, "## Parameter importance"))}
    assert set(importance) == set(SPACE) and all(0 <= v <= 1 for v in importance.values())
    assert "No trial was stopped early." in under(text, "## Early stopping")


def test_the_report_of_a_finished_study_links_only_files_that_exist(finished):
    out, _, text = finished
    links = re.findall(r"\]\((plots/[^)]+)\)", text)
    assert {"plots/trace.png", "plots/contour_lora_rank_learning_rate.png", "plots/importance.png",
            "plots/sensitivity.html"} <= set(links)
    for link in links:
        assert (out / link).stat().st_size > 1000, link
    assert (out / "plots" / "plotly.min.js").exists()  # the HTML plots open offline


def test_report_of_a_crashed_study_from_its_checkpoint(tmp_path):
    run_optimization(num_trials=3, output_dir=tmp_path, evaluate=fake_loss, quiet=True, report=False)
    (tmp_path / "optimization_results.json").unlink()  # as if the process died before writing it
    checkpoint = json.loads((tmp_path / "optimization_checkpoint.json").read_text())
    loss = {r["index"]: r["metrics"]["loss"] for r in checkpoint["records"]}
    best = min(loss, key=loss.get)
    checkpoint["records"].append({**checkpoint["records"][-1], "index": 3, "state": "running", "metrics": {}})
    (tmp_path / "optimization_checkpoint.json").write_text(json.dumps(checkpoint))
    text = write_report(tmp_path, interactive=False).read_text()
    assert "Study of 4 trials, 1 still running or interrupted: " in text
    assert "States: running 1, completed 3\n" in under(text, "## Settings")
    assert f"Best trial: **#{best}**, " in text and f", loss **{loss[best]:.4f}**." in text
    running = [r for r in rows(under(text, "## Every trial")) if r[0] == "3"]
    assert [(r[6], r[7]) for r in running] == [("", "running")]  # listed, with no loss


def test_a_study_that_ended_before_ax_had_a_model_says_so_plainly(tmp_path):
    run_optimization(num_trials=3, output_dir=tmp_path, evaluate=fake_loss, quiet=True, seed=0)
    text = (tmp_path / "OPTIMIZATION_RESULTS.md").read_text()
    assert "fitted once Bayesian optimization starts" in text and "RandomAdapter" not in text
