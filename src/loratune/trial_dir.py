"""A trial's directory: the files a trial's process shares with whoever runs it (the local executor, a
Ray actor), and the environment that process gets. Nothing here imports torch: the study's process and
a Ray actor read these files without the training libraries.

- ``trial.json``: the resolved training config and what to measure (written before the trial starts);
- ``.lock``: held by the process running the trial (``processes.TrialLock``);
- ``progress.jsonl``: one JSON line per event. Its first line, ``{"kind": "started", "pid": ...}``, is
  the worker taking the trial: a trial whose worker ended before that line never started. Then
  ``{"kind": "eval", ...}`` per validation point and ``{"kind": "step", ...}`` at most once a second;
- ``STOP``: appears when the study wants the trial stopped early (at the curve point just judged, for a
  trial that awaits verdicts; else after its next optimizer step);
- ``verdicts``: for a trial the study may stop early, one ``go`` line per curve point before the last
  that the study judged and let go on; such a trial waits at each of those points for its line or
  ``STOP``, so where it stops never depends on how fast the study answers;
- ``CANCEL``: the study ends the trial now (a timeout), its reason inside: a worker that packs several
  trials ends this one as failed and goes on with the others (one running a trial alone is killed);
- ``result.json``: how the trial ended, written by the worker on every ending it lives through;
- ``last_eval.json``: a user's training command with ``LoratuneCallback``: its last evaluation's metrics,
  the trial's result when the command prints no JSON line of its own;
- ``log.txt``: the process's output during the trial; ``previous_log.txt``: that of its last run, when it
  ran again (its pack out of memory, an interrupted study).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .storage import atomic_write_json

STOP_FILE, PROGRESS_FILE, RESULT_FILE, SPEC_FILE, LOG_FILE = "STOP", "progress.jsonl", "result.json", "trial.json", "log.txt"
PREVIOUS_LOG_FILE = "previous_log.txt"
VERDICTS_FILE, CANCEL_FILE, LAST_EVAL_FILE = "verdicts", "CANCEL", "last_eval.json"
TRIAL_DIR_ENV = "LORATUNE_TRIAL_DIR"  # a user's command finds its trial's directory here (integrations.py)
STEP_INTERVAL_S = 1.0  # ``step`` events are written at most this often (and at a trial's last step)
VERDICT_POLL_S = 0.005  # how often a trial waiting for a verdict looks for it
STARTED, EVAL, STEP = "started", "eval", "step"  # kinds of progress events


@dataclass
class TrialSpec:
    """What a trial runs and measures: written as its directory's ``trial.json`` before it starts, and read
    back only through this class (``read``), by the worker, a Ray actor or a user's ``LoratuneCallback``."""

    index: int
    params: dict[str, Any]
    directory: Path  # where the trial's files live; not in trial.json (it is the file's own directory)
    config: dict | None = None  # the resolved training config, for fine-tune trials
    measure_inference: bool = False  # time generation (when inference_time is an objective or a constraint)
    answer: int = 0  # validation prompts to answer, for task scores (scoring.subset)
    max_new_tokens: int | None = None  # the longest answer (scoring.max_new_tokens)
    test: bool = False  # a final test job: score the trial's adapter on the test split (retrained without one)
    adapter: str | None = None  # for a test job, the trial's saved adapter
    await_verdict: bool = False  # the study may stop it early: it waits for the verdict at each curve point

    def payload(self) -> dict:
        """The fields ``trial.json`` holds (all but the directory)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "directory"}

    @classmethod
    def from_payload(cls, payload: dict, directory: Path) -> TrialSpec:
        names = {f.name for f in dataclasses.fields(cls)} - {"directory"}
        return cls(directory=Path(directory), **{k: v for k, v in payload.items() if k in names})

    def write(self) -> None:
        atomic_write_json(self.directory / SPEC_FILE, self.payload())

    @classmethod
    def read(cls, directory: Path) -> TrialSpec:
        """The spec in ``directory``'s ``trial.json``; raises OSError or ValueError where there is none to read."""
        return cls.from_payload(json.loads((Path(directory) / SPEC_FILE).read_text()), directory)

    @property
    def quantized(self) -> bool:
        """Whether its training config loads the base quantized (the worker imports bitsandbytes then)."""
        return ((self.config or {}).get("model") or {}).get("quantization", "none") != "none"


def started(trial_dir: Path) -> bool:
    """Whether a worker took the trial (its first progress line is written as it does)."""
    try:
        return (trial_dir / PROGRESS_FILE).stat().st_size > 0
    except FileNotFoundError:
        return False


def awaits_verdict(point: dict) -> bool:
    """Whether a trial that awaits verdicts waits for the study's at this curve point: every point but the
    last (the study never stops a trial that has finished training)."""
    return point.get("progress", 1.0) < 1.0


def go_on(trial_dir: Path) -> None:
    """The study judged the trial's latest curve point and lets it train on."""
    with open(trial_dir / VERDICTS_FILE, "a") as f:
        f.write("go\n")


def verdict(trial_dir: Path, point: int) -> bool | None:
    """The study's verdict on the trial's ``point``-th curve point (from 1), if it has come: True to stop,
    False to go on, None while there is none."""
    if (trial_dir / STOP_FILE).exists():
        return True
    try:
        if (trial_dir / VERDICTS_FILE).read_bytes().count(b"\n") >= point:
            return False
    except FileNotFoundError:
        pass
    return None


def await_verdict(trial_dir: Path, point: int) -> bool:
    """Wait for the study's verdict on the trial's ``point``-th curve point (from 1): True when it asked
    the trial to stop, False when it lets it go on. The trial's process dies with the study's, so this
    never waits on a study that has gone."""
    while (said := verdict(trial_dir, point)) is None:
        time.sleep(VERDICT_POLL_S)
    return said


def worker_env(threads: int, gpus: list[str] | None = None) -> dict[str, str]:
    """The environment of a trial process: its share of the CPU threads, its GPUs, unbuffered output."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def base_key(config: dict) -> str:
    """Everything in a training config (as a mapping) that shapes the loaded base model: trials with
    equal keys can share one worker."""
    return json.dumps({"model": config.get("model"), "precision": (config.get("training") or {}).get("precision")},
                      sort_keys=True)


def pack_key(config: dict) -> str:
    """What trials must share to train in one pack: the loaded base (``base_key``), the data and the seed
    that splits and tokenizes it (the rows every trial of a pack reads)."""
    return json.dumps({"base": base_key(config), "data": config.get("data"),
                       "seed": (config.get("training") or {}).get("seed")}, sort_keys=True)


class ProgressReader:
    """Reads the events a trial appended to its ``progress.jsonl`` since the last call."""

    def __init__(self, trial_dir: Path):
        self.path, self.offset = trial_dir / PROGRESS_FILE, 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        events = []
        for line in complete.decode(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events
