"""Every figure a study prints agrees with every other: the console, OPTIMIZATION_RESULTS.md and the dict
``run_optimization`` returns say the same about the best trial and its gain over the baseline."""

import json

from loratune import run_optimization

SPACE = {"lora_rank": [8, 16, 32, 64], "lora_alpha": [16, 32, 64, 128], "learning_rate": [1e-5, 5e-4],
         "batch_size": [1, 2, 4]}


def test_a_baseline_of_zero_is_a_change_in_absolute_terms_everywhere(tmp_path, capsys):
    def evaluate(params):  # the baseline scores 0: no relative change exists
        return 0.0 if params == {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1} \
            else 0.5 + 100 * params["learning_rate"]

    results = run_optimization(num_trials=4, output_dir=tmp_path / "study", seed=0, evaluate=evaluate, search_space=SPACE)
    out = capsys.readouterr().out
    report = (tmp_path / "study" / "OPTIMIZATION_RESULTS.md").read_text()
    gain = results["improvement"]
    assert gain["baseline"] == 0.0 and gain["relative"] is None and gain["absolute"] == 0.0
    written = json.loads((tmp_path / "study" / "optimization_results.json").read_text())
    assert written["improvement"] == gain  # strict JSON: no NaN
    assert "nan" not in out.lower() and "nan%" not in report.lower()
    assert "best loss against the baseline: 0.0000 vs 0.0000 (no change)" in out
    assert "Best against baseline: 0.0000 vs 0.0000 (no change)." in report


def test_with_two_objectives_the_improvement_is_about_the_best_config(tmp_path):
    def evaluate(params):  # a higher rank lowers the loss and costs inference time
        rank = params["lora_rank"]
        return {"loss": 1.0 - 0.1 * rank.bit_length() + 100 * params["learning_rate"], "inference_time": 0.01 * rank}

    results = run_optimization(num_trials=6, output_dir=tmp_path / "study", seed=0, evaluate=evaluate, search_space=SPACE,
                               objectives=["loss", "inference_time"])
    best = next(t for t in results["trials"] if t["index"] == results["best_trial"])
    assert results["improvement"]["best"] == best["metrics"]["loss"] == results["best_loss"]
    report = (tmp_path / "study" / "OPTIMIZATION_RESULTS.md").read_text()
    assert f"**#{best['index']}**" in report and "the knee of the Pareto front" in report
    assert f"{best['metrics']['loss']:.4f} vs {results['improvement']['baseline']:.4f}" in report
