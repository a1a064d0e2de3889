"""Task scores of generated answers: the built-in scorers, the user's own, and the check made before a
study starts. Scores are computed in the study's process from the answers a trial generated (so a
scorer given to the Python API as a function works as well as one named by ``module:function``), and
become metrics like any other: objectives, outcome constraints, report columns.

A scorer is ``fn(prediction: str, reference: str) -> float``, averaged over the examples, or, for a
corpus-level score, ``fn(predictions: list[str], references: list[str]) -> float`` (told apart by its
parameter names).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LoratuneError, first_line


def _normalize(text: str) -> str:
    """Lower case, punctuation and surrounding spaces dropped, runs of spaces as one (as SQuAD compares answers)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1 when the answer is the reference, up to case, punctuation and spacing; else 0."""
    return float(_normalize(prediction) == _normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the words the answer shares with the reference (SQuAD's token F1)."""
    ours, theirs = _normalize(prediction).split(), _normalize(reference).split()
    if not ours or not theirs:
        return float(ours == theirs)
    common = sum((Counter(ours) & Counter(theirs)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), from Google's ``rouge-score``."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"])
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


PLAN_FIELD = re.compile(r"(Framing|Lens|Movement|Lighting|Pacing|Sound):\s*([^.]*(?:\.\d[^.]*)*)\.")


def plan_accuracy(prediction: str, reference: str) -> float:
    """The demo's score: the share of a shot plan's fields (framing, lens, movement, lighting, pacing,
    sound) that the generated plan gets exactly right."""
    want = dict(PLAN_FIELD.findall(reference))
    got = dict(PLAN_FIELD.findall(prediction))
    return sum(got.get(k, "").strip() == v.strip() for k, v in want.items()) / len(want) if want else 0.0


BUILTIN: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "plan_accuracy": plan_accuracy,
}
SCORE_DIRECTION = {name: "maximize" for name in BUILTIN}  # every built-in score: higher is better


@dataclass
class Scorer:
    name: str
    fn: Callable
    corpus: bool  # fn(predictions, references) rather than fn(prediction, reference)
    source: str  # "builtin", "module:function" or "function" (given to the API)


def load(name: str, spec: str | Callable | None, where: str) -> Scorer:
    """The scorer ``name``: a built-in one (``spec`` None), ``module:function``, or a function."""
    if spec is None:
        if name not in BUILTIN:
            raise LoratuneError(f"{where}: '{name}' is not a built-in score ({', '.join(BUILTIN)}); define it in "
                                f"scoring.scorers as {name}: 'package.module:function'")
        return Scorer(name, BUILTIN[name], False, "builtin")
    if callable(spec):
        return Scorer(name, spec, _is_corpus(spec), "function")
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise LoratuneError(f"{where}.{name}: expected 'package.module:function', got {spec!r}")
    module, function = spec.split(":")
    try:
        fn = getattr(importlib.import_module(module), function)
    except ImportError as exc:
        raise LoratuneError(f"{where}.{name}: cannot import {module} ({first_line(exc)})") from None
    except AttributeError:
        raise LoratuneError(f"{where}.{name}: {module} has no function {function}") from None
    except Exception as exc:  # the module's own code failed while it was imported
        raise LoratuneError(f"{where}.{name}: importing {module} failed: {type(exc).__name__}: {first_line(exc)}") from None
    if not callable(fn):
        raise LoratuneError(f"{where}.{name}: {spec} is not a function")
    return Scorer(name, fn, _is_corpus(fn), spec)


def _is_corpus(fn: Callable) -> bool:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["predictions", "references"]


def score(scorers: list[Scorer], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Each scorer's score of the answers; raises ScoringError (a line naming the scorer) when one raises
    or returns something other than a finite number."""
    out = {}
    for s in scorers:
        try:
            value = s.fn(predictions, references) if s.corpus else \
                sum(_number(s, s.fn(p, r)) for p, r in zip(predictions, references, strict=True)) / max(len(predictions), 1)
        except ScoringError:
            raise
        except Exception as exc:
            raise ScoringError(f"scorer {s.name} ({s.source}) raised {type(exc).__name__}: {first_line(exc)}") from None
        out[s.name] = _number(s, value)
    return out


def score_answers(scorers: list[Scorer], answers: list[dict]) -> dict[str, float]:
    """``score`` of the answers a worker generated (``{"prediction", "reference"}`` each): a trial's, a final
    test's, a retrain's. Raises ScoringError as ``score``."""
    return score(scorers, [a["prediction"] for a in answers], [a["reference"] for a in answers])


def check(scorers: list[Scorer], where: str) -> None:
    """Call each scorer once on a made-up answer before a study starts: a scorer that raises or does not
    return a number is one line now, not a failure in every trial."""
    try:
        score(scorers, ["Framing: a close-up. Lens: 50mm."], ["Framing: a close-up. Lens: 35mm."])
    except ScoringError as exc:
        raise LoratuneError(f"{where}: {exc}") from None


class ScoringError(Exception):
    """A scorer that raised or returned something other than a finite number."""


def _number(s: Scorer, value) -> float:
    from .trial import as_number

    number = as_number(value)
    if number is None or not math.isfinite(number):
        raise ScoringError(f"scorer {s.name} ({s.source}) returned {value!r}, not a finite number")
    return number
