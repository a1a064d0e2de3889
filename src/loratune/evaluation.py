"""The final test: once a study has chosen, its best config and its baseline are scored on the test split
that no trial ever read, the one figure the choice did not touch.

The best trial was picked as the minimum of many noisy validation measurements, so its validation margin
over the baseline is biased upwards (the winner's curse); the test margin is not. Both are reported side by
side, with the share of the validation gain that held on test. Each adapter is scored in a worker process
(the trial's saved adapter, or a retrain of its config where the adapter was not kept), the answers it
generated are scored here by the study's scorers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from . import checkpoint, results
from .checkpoint import StoredStudy, StudyPaths
from .config import to_dict
from .data import test_source
from .errors import LoratuneError, first_line
from .scoring import Scorer, ScoringError, score_answers
from .trial import Evaluation, TrialRecord, TrialState

TEST_DIR = checkpoint.TEST_DIR


def test_jobs(stored: StoredStudy, paths: StudyPaths) -> dict[str, TrialRecord]:
    """The trials the final test scores: the best (as ``best_config.yaml`` took it) and the baseline."""
    best, baseline = stored.best(), results.baseline_record(stored.records)
    jobs = {"best": best} if best is not None else {}
    if baseline is not None and baseline.state is TrialState.COMPLETED:
        jobs["baseline"] = baseline
    return jobs


def final_test(stored: StoredStudy, paths: StudyPaths, scorers: list[Scorer], executor=None) -> dict | None:
    """Score the best trial and the baseline on the test split; return the ``test`` section of the results
    (None when the study has no test split or no completed trial). ``executor``: the study's own, whose
    workers hold the base model already; else one of its own. Raises LoratuneError when a job fails."""
    from .executors import create_executor

    cfg = stored.config
    source = test_source(cfg.data)
    jobs = test_jobs(stored, paths)
    if stored.evaluation is not Evaluation.FINETUNE or source is None or "best" not in jobs:
        return None
    started = time.time()
    own = executor is None
    executor = executor or create_executor(dataclasses.replace(cfg, workers=1))
    try:
        scored = _run_jobs(stored, paths, jobs, scorers, executor)
    finally:
        if own:
            executor.shutdown()
    section = {"examples": next(iter(scored.values()))["examples"], "source": source,
               "seconds": round(time.time() - started, 1)}
    for name, record in jobs.items():
        section[name] = {"trial": record.index, **{k: v for k, v in scored[record.index].items() if k != "examples"}}
    if "baseline" in jobs:
        metrics = ["loss", *(s.name for s in scorers)]
        section["improvement"] = {m: _gain(section["best"][m], section["baseline"][m], _minimized(stored, m))
                                  for m in metrics if m in section["best"] and m in section["baseline"]}
        section["validation"] = {m: _gain(jobs["best"].metrics[m], jobs["baseline"].metrics[m], _minimized(stored, m))
                                 for m in metrics if m in jobs["best"].metrics and m in jobs["baseline"].metrics}
        validation, test = section["validation"].get("loss"), section["improvement"].get("loss")
        held = results.Gain.from_dict(validation).held_on(results.Gain.from_dict(test)) if validation and test else None
        if held is not None:
            section["held"] = held
    return section


def _run_jobs(stored: StoredStudy, paths: StudyPaths, jobs: dict[str, TrialRecord], scorers: list[Scorer],
              executor) -> dict[int, dict]:
    """Each job's loss and scores on the test split, by trial index (the best may be the baseline)."""
    from .executors import TrialSpec, run_to_end

    cfg = stored.config
    specs, names = [], {}
    for name, record in jobs.items():
        if record.index in names:
            continue
        names[record.index] = name
        directory = paths.directory / TEST_DIR / name
        adapter = paths.directory / record.directory / "adapter"
        config = checkpoint.trial_config(cfg, stored.space, record.params, directory)
        config.save_adapter = True  # a retrain keeps its adapter: a later `loratune evaluate` need not retrain
        specs.append(TrialSpec(record.index, dict(record.params), directory, to_dict(config), test=True,
                               adapter=str(adapter.resolve()) if (adapter / "adapter_config.json").exists() else None,
                               answer=int(bool(scorers)), max_new_tokens=cfg.scoring.max_new_tokens))
    ended = {spec.index: result for spec, result in run_to_end(executor, specs)}
    out = {}
    for index, result in ended.items():
        name, directory = names[index], paths.directory / TEST_DIR / names[index]
        if result.state is not TrialState.COMPLETED:
            raise LoratuneError(f"the final test of the {name} trial ({index}) failed: {result.reason}; log in {directory}")
        answers = result.extra.get("answers") or []
        (directory / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
        out[index] = {"loss": result.metrics["loss"], "examples": result.extra.get("examples"),
                      "retrained": result.extra.get("retrained", False)}
        if answers:
            out[index]["generation_s"] = result.metrics.get("generation_s")
        try:
            out[index].update(score_answers(scorers, answers))
        except ScoringError as exc:
            raise LoratuneError(f"the final test of the {name} trial ({index}): {exc}") from None
    return out


def _minimized(stored: StoredStudy, metric: str) -> bool:
    """Whether lower is better: as the study optimizes it, else lower for the loss, higher for a score."""
    cfg = stored.config
    if metric in cfg.objectives:
        return cfg.minimize[cfg.objectives.index(metric)]
    return metric == "loss"


def _gain(best: float, baseline: float, minimize: bool) -> dict:
    return results.Gain(best, baseline, minimize).to_dict()


def evaluate_study(study_dir: str | Path, scorers: list[Scorer]) -> dict:
    """``loratune evaluate DIR``: run a finished study's final test again (or for the first time) and save it."""
    paths, stored = checkpoint.load(study_dir)
    if stored.evaluation is not Evaluation.FINETUNE:
        raise LoratuneError(f"{paths.directory}: this study ran its own evaluation, so it has no adapters to test")
    if test_source(stored.config.data) is None:
        raise LoratuneError(f"{paths.directory}: the study's data has no test split; set data.test_path, data.test_split "
                            "or data.test_size when you start a study")
    if "best" not in test_jobs(stored, paths):
        raise LoratuneError(f"{paths.directory}: no completed trial to test")
    try:
        stored.test = final_test(stored, paths, scorers)
    except LoratuneError as exc:
        raise LoratuneError(f"{paths.directory}: {first_line(str(exc), 400)}") from None
    checkpoint.save(stored, paths)
    return stored.test
