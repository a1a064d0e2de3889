"""The one definition of the gain over the baseline (``results.Gain``) and of the best trial."""

import pytest

from loratune.results import Gain, best_record, improvement
from loratune.trial import TrialRecord, TrialState


@pytest.mark.parametrize("best, baseline, minimize, absolute, relative, text", [
    (0.6, 0.8, True, 0.2, 0.25, "0.6000 vs 0.8000 (25.0% better)"),
    (0.9, 0.8, True, -0.1, -0.125, "0.9000 vs 0.8000 (12.5% worse)"),
    (0.9, 0.8, False, 0.1, 0.125, "0.9000 vs 0.8000 (12.5% better)"),
    (0.5, 0.0, True, -0.5, None, "0.5000 vs 0.0000 (0.5000 worse, absolute)"),
    (0.0, 0.0, True, 0.0, None, "0.0000 vs 0.0000 (no change)"),
    (-0.2, -0.4, False, 0.2, 0.5, "-0.2000 vs -0.4000 (50.0% better)"),
])
def test_a_gain_has_its_sign_its_relative_change_and_its_words(best, baseline, minimize, absolute, relative, text):
    gain = Gain(best, baseline, minimize)
    assert gain.absolute == pytest.approx(absolute)
    assert gain.relative == (None if relative is None else pytest.approx(relative))
    assert gain.text() == text and "nan" not in gain.text()
    assert Gain.from_dict(gain.to_dict()) == gain


def test_a_gain_saved_without_its_direction_reads_it_from_its_sign():
    assert Gain.from_dict({"best": 0.9, "baseline": 0.8, "absolute": 0.1}).minimize is False
    assert Gain.from_dict({"best": 0.9, "baseline": 0.8, "absolute": -0.1}).minimize is True


def record(index, loss, time, baseline=False):
    return TrialRecord(index, {}, TrialState.COMPLETED, baseline, {"loss": loss, "inference_time": time})


def test_with_two_objectives_the_gain_is_about_the_trial_chosen_as_best():
    records = [record(0, 1.0, 1.0, baseline=True), record(1, 0.5, 9.0), record(2, 0.6, 1.1), record(3, 0.9, 0.5)]
    objectives, minimize = ["loss", "inference_time"], [True, True]
    best = best_record(records, objectives, minimize)
    assert best.index == 2  # the knee, not the lowest loss (trial 1)
    gain = improvement(records, objectives, minimize)
    assert (gain.best, gain.baseline) == (0.6, 1.0)


def test_the_share_held_on_test_compares_the_relative_gains_the_lines_print():
    """Validation 0.60 vs 0.80 (25.0% better), test 0.90 vs 1.00 (10.0% better): 40% held, as the two lines read
    (the absolute gains, 0.20 and 0.10, would say 50%)."""
    validation, test = Gain(0.60, 0.80), Gain(0.90, 1.00)
    assert validation.held_on(test) == pytest.approx(0.4)
    assert Gain(0.5, 0.0).held_on(Gain(0.2, 0.0)) is None  # a validation "gain" that is no gain
    assert Gain(-0.5, 0.0).held_on(Gain(-0.2, 0.0)) == pytest.approx(0.4)  # zero baselines: the absolute ratio
    assert Gain(0.9, 0.8).held_on(test) is None
