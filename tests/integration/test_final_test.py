"""The improvement a study reports holds on data the search never saw: a test split no trial reads, task
scores of generated answers, and the best config against the baseline on both."""

import json
import sys

import pytest

from loratune import run_optimization
from loratune.config import DEMO_TRAIN, DataConfig, FinetuneConfig, StudyConfig
from loratune.data import load_examples, load_test_examples, split_rows
from loratune.errors import LoratuneError
from loratune.scoring import exact_match, load, plan_accuracy, rouge_l, score, token_f1

PLAN = ("Framing: a single close-up. Lens: 50mm. Movement: a slow pull-out. Lighting: soft warm window light. "
        "Pacing: long takes. Sound: pages turning.")


def test_built_in_scores():
    assert plan_accuracy(PLAN, PLAN) == 1.0
    assert plan_accuracy(PLAN.replace("50mm", "85mm").replace("pages turning", "rain"), PLAN) == pytest.approx(4 / 6)
    assert plan_accuracy("no plan at all", PLAN) == 0.0
    assert exact_match(" Paris. ", "paris") == 1.0 and exact_match("Paris is", "Paris") == 0.0
    assert token_f1("the capital is Paris", "Paris") == pytest.approx(2 * 0.25 / 1.25)
    assert rouge_l("a b c d", "a b x d") == pytest.approx(0.75)


def test_scorers_receive_each_prediction_with_its_reference_in_order():
    seen = []

    def per_example(prediction, reference):
        seen.append((prediction, reference))
        return float(prediction == reference)

    def corpus(predictions, references):
        return len(predictions) / 10

    scorers = [load("mine", per_example, "scorers"), load("whole", corpus, "scorers")]
    assert score(scorers, ["a", "b", "c"], ["a", "x", "c"]) == {"mine": pytest.approx(2 / 3), "whole": 0.3}
    assert seen == [("a", "a"), ("b", "x"), ("c", "c")]


def content(examples) -> set[tuple]:
    return {tuple(e.input_ids) for e in examples}


def test_the_three_splits_are_disjoint_and_a_test_size_leaves_the_validation_rows_as_they_were(tokenizer, tmp_path):
    train, validation = load_examples(tokenizer, DataConfig(), seed=0)
    test, source = load_test_examples(tokenizer, DataConfig(), seed=0)
    assert source == "builtin:ai_director_test" and len(test) == 37
    assert not content(test) & (content(train) | content(validation)) and not content(train) & content(validation)
    rows = [{"prompt": f"Scene {i}.", "completion": f"Plan {i}."} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = DataConfig(path=str(path), validation_size=0.2)
    held = DataConfig(path=str(path), validation_size=0.2, test_size=0.25)
    assert split_rows(40, held, 3, True)[1] == split_rows(40, plain, 3, True)[1]  # the same validation rows
    train, validation = load_examples(tokenizer, held, seed=3)
    test, source = load_test_examples(tokenizer, held, seed=3)
    assert (len(train), len(validation), len(test)) == (22, 8, 10) and "0.25 of its rows" in source
    assert not content(test) & (content(train) | content(validation))


@pytest.mark.parametrize("test", [{"test_path": "TEST"}, {"test_split": "test"}, {"test_size": 0.25}])
def test_a_trial_never_reads_the_test_split(tokenizer, tmp_path, monkeypatch, test):
    """What every trial calls to get its data: it neither opens a test file or split nor tokenizes a held-out row."""
    from loratune import data
    from loratune.data import chat

    rows = [{"prompt": f"Scene {i}.", "completion": f"Plan {i}."} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"prompt": "Secret.", "completion": "Never."}) + "\n"))
    opened, tokenized = [], []
    real_rows, real_tokenize = data.load_rows, chat.tokenize_row
    monkeypatch.setattr(data, "load_rows", lambda *a, **k: opened.append((a[0], k.get("split"))) or real_rows(*a, **k))
    monkeypatch.setattr(chat, "tokenize_row", lambda tok, row, *a: tokenized.append(row["prompt"]) or real_tokenize(tok, row, *a))
    settings = {k: (str(tmp_path / "t.jsonl") if v == "TEST" else v) for k, v in test.items()}
    cfg = DataConfig(path=str(tmp_path / "d.jsonl"), validation_size=0.2, **settings)
    load_examples(tokenizer, cfg, seed=0)
    assert opened == [(str(tmp_path / "d.jsonl"), None)]  # the training file alone, its own split
    held_out = {f"Scene {i}." for i in split_rows(20, cfg, 0, True)[2]}
    assert not held_out & set(tokenized) and len(tokenized) == 20 - len(held_out)
    assert load_test_examples(tokenizer, cfg, seed=0) is not None  # which the final test does read


@pytest.mark.slow
def test_a_study_scores_its_best_and_baseline_on_test_with_the_answers_its_scorers_saw(tiny_model, tmp_path):
    pairs = []

    def longer(prediction, reference):  # a user's score, as a function
        pairs.append((prediction, reference))
        return len(prediction) / max(len(reference), 1)

    results = run_optimization(num_trials=3, output_dir=tmp_path / "study", quiet=True, seed=0, report=True,
                               search_space={"learning_rate": [1e-4, 1e-3], "lora_rank": [8, 16]},
                               training={"epochs": 0.25, "eval_points": 1}, scoring={"subset": 6},
                               objectives=["loss", "longer"], minimize=[True, False], scorers={"longer": longer})
    trials = results["trials"]
    assert all(t["state"] == "completed" for t in trials)
    for t in trials:  # each trial answered 6 validation prompts, scored in the study's process
        answers = json.loads((tmp_path / "study" / t["directory"] / "metrics.json").read_text())["answers"]
        assert len(answers) == 6 and t["metrics"]["generation_s"] > 0
        assert t["metrics"]["longer"] == pytest.approx(sum(len(a["prediction"]) / len(a["reference"]) for a in answers) / 6)
        assert t["metrics"]["plan_accuracy"] >= 0 if "plan_accuracy" in t["metrics"] else True
        for a in answers:  # generation stopped at the end of the turn, with nothing of the template left
            assert "<|im_end|>" not in a["prediction"] and "<|im_start|>" not in a["prediction"]
            assert not a["prediction"].startswith(("assistant", "\n")) and a["prediction"] == a["prediction"].strip()
    validation = load_examples(__import__("transformers").AutoTokenizer.from_pretrained(tiny_model), DataConfig(), 0)[1]
    from loratune.training import answer_subset

    assert pairs[0][1] == "Framing: a close-up. Lens: 35mm."  # the check before the study: a made-up answer
    assert [r for _, r in pairs[1:7]] == [e.reference for e in answer_subset(validation, 6, 0)]  # trial 0's, in order
    test = results["test"]
    assert test["examples"] == 37 and test["source"] == "builtin:ai_director_test"
    assert test["best"]["trial"] == results["best_trial"] and test["baseline"]["trial"] == 0
    assert set(test["improvement"]) == {"loss", "longer"} and set(test["validation"]) == {"loss", "longer"}
    for side in ("best", "baseline"):
        answers = [json.loads(line) for line in (tmp_path / "study" / "test" / side / "answers.jsonl").read_text().splitlines()]
        assert len(answers) == 37 and test[side]["longer"] == pytest.approx(
            sum(len(a["prediction"]) / len(a["reference"]) for a in answers) / 37)
    report = (tmp_path / "study" / "OPTIMIZATION_RESULTS.md").read_text()
    assert "### Validation versus test" in report and "test: never seen" in report


@pytest.mark.slow
def test_without_kept_adapters_the_final_test_retrains_and_a_trial_that_read_the_test_split_would_fail(
        tiny_model, tmp_path, monkeypatch):
    """The test file is deleted once the checks have read it: every trial still completes (none reads it), and
    only the final test, which does, says so."""
    from loratune import preflight

    test_file = tmp_path / "test.jsonl"
    test_file.write_text((__import__("loratune.demo.dataset", fromlist=["x"]).TEST_FILE).read_text())
    checked = preflight.check_training_inputs

    def check_then_delete(*args, **kwargs):
        warnings = checked(*args, **kwargs)
        test_file.unlink()
        return warnings

    monkeypatch.setattr(preflight, "check_training_inputs", check_then_delete)
    results = run_optimization(num_trials=2, output_dir=tmp_path / "study", quiet=True, report=False,
                               search_space={"lora_rank": [4, 8]}, training={"epochs": 0.1, "eval_points": 1},
                               data={"path": DEMO_TRAIN, "test_path": str(test_file)}, keep_adapters="none")
    assert [t["state"] for t in results["trials"]] == ["completed", "completed"]
    assert "error" in results["test"] and "test.jsonl" in results["test"]["error"]
    test_file.write_text((__import__("loratune.demo.dataset", fromlist=["x"]).TEST_FILE).read_text())
    from loratune import evaluate

    test = evaluate(tmp_path / "study")  # the adapters were not kept: both are retrained from their configs
    assert test["best"]["retrained"] and test["examples"] == 37
    assert json.loads((tmp_path / "study" / "optimization_results.json").read_text())["test"] == test


@pytest.mark.parametrize(("scoring", "message"), [
    ({"scores": ["bleu"]}, "scoring.scores: unknown field 'bleu'"),
    ({"scorers": {"mine": "no_such_module_xyz:score"}}, "scoring.scorers.mine: cannot import no_such_module_xyz"),
    ({"scorers": {"mine": "json:no_such_function"}}, "scoring.scorers.mine: json has no function no_such_function"),
    ({"scorers": {"mine": "os.path:join"}}, "scoring: scorer mine (os.path:join) returned 'Framing: a close-up."),
    ({"scorers": {"mine": "math:log"}}, "scoring: scorer mine (math:log) raised TypeError"),
    ({"scorers": {"loss": "math:log"}}, "scoring.scorers: 'loss' cannot name a score"),
    ({"subset": 0}, "scoring.subset: 0 answers no validation prompt during the search"),
])
def test_bad_scorers_are_one_line_before_the_study(tiny_model, tmp_path, scoring, message):
    objectives = ["mine"] if "mine" in scoring.get("scorers", {}) or scoring.get("subset") == 0 else ["loss"]
    if scoring.get("subset") == 0:
        objectives = ["rouge_l"]
    with pytest.raises(LoratuneError) as err:
        run_optimization(num_trials=2, output_dir=tmp_path / "study", quiet=True, scoring=scoring,
                         objectives=objectives, minimize=[False] if objectives != ["loss"] else [True])
    assert message in str(err.value), str(err.value)
    assert not (tmp_path / "study").exists()


def test_a_user_scorer_from_a_module_path_is_an_objective(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text("def words(prediction, reference):\n    return len(prediction.split())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from loratune.preflight import resolve_scorers
    from loratune.settings import load_study_config

    cfg, _ = load_study_config(None, [("scoring.scorers", {"words": "my_scores:words"}, "--set"),
                                      ("objectives", ["words"], "--set"), ("minimize", [False], "--set")])
    (scorer,) = resolve_scorers(cfg, None)
    assert scorer.source == "my_scores:words" and score([scorer], ["a b c"], ["x"]) == {"words": 3.0}
    assert StudyConfig().scoring.subset == 64 and FinetuneConfig().data.test_size == 0
    assert sys.modules["my_scores"]
