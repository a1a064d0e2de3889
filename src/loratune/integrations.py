"""A user's own Hugging Face ``Trainer`` or TRL ``SFTTrainer`` script as a loratune trial (``--command``).

Add one callback and the script's evaluations become the trial's learning curve: early stopping, the
live view, the report and MLflow see it as they see loratune's own fine-tunes::

    from loratune.integrations import LoratuneCallback, trial_params

    params = trial_params()  # {"learning_rate": 0.0003, "lora_rank": 16, ...} in a trial; {} outside one
    trainer = Trainer(..., callbacks=[LoratuneCallback()])

The trial's directory reaches the script in ``LORATUNE_TRIAL_DIR``; outside a study the callback does
nothing. What it writes there is the trial's protocol (``trial_dir.py``): a curve point per evaluation
in ``progress.jsonl``, at most one training tick a second, and the last evaluation's metrics, which are
the trial's result when the script prints no JSON line of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .storage import atomic_write_json
from .trial_dir import (
    EVAL,
    LAST_EVAL_FILE,
    PROGRESS_FILE,
    STEP,
    STEP_INTERVAL_S,
    STOP_FILE,
    TRIAL_DIR_ENV,
    TrialSpec,
    await_verdict,
    awaits_verdict,
)

# what Trainer.evaluate adds to every evaluation: timings, not metrics of the model
_TIMINGS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def trial_dir() -> Path | None:
    """The directory of the loratune trial this process runs, or None outside a study."""
    value = os.environ.get(TRIAL_DIR_ENV)
    return Path(value) if value else None


def trial_params() -> dict[str, Any]:
    """The trial's searched parameters by name, in their own types (ints, floats, strings), as Ax proposed
    them: ``{}`` outside a study, so a script runs on its own defaults there."""
    directory = trial_dir()
    if directory is None:
        return {}
    spec = _spec(directory)
    return dict(spec.params) if spec else {}


def eval_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """An evaluation's ``eval_*`` numbers without their prefix (``eval_loss`` -> ``loss``, also ``val_loss``,
    the name of loratune's curves), its timings left out."""
    out = {}
    for name, value in metrics.items():
        short = name.removeprefix("eval_")
        if name.startswith("eval_") and short not in _TIMINGS and isinstance(value, int | float) and not isinstance(value, bool):
            out[short] = float(value)
    if "loss" in out:
        out["val_loss"] = out["loss"]
    return out


def _spec(directory: Path) -> TrialSpec | None:
    try:
        return TrialSpec.read(directory)
    except (OSError, ValueError, TypeError):
        return None


class LoratuneCallback(TrainerCallback):
    """Reports a ``Trainer``'s evaluations to the loratune study that runs the script, and stops training
    when the study says so.

    Each evaluation (``eval_strategy="steps"`` gives a curve; one at the end gives a single point) is a
    curve point at ``state.global_step`` of ``state.max_steps``: ``eval_loss`` as ``val_loss`` and ``loss``,
    every other ``eval_*`` metric without its prefix. Where an early-stopping rule may stop the trial,
    training waits at each point before the last for the study's verdict, so where it stops depends on
    its curve alone; when told to stop it sets ``control.should_training_stop`` and reports nothing after.
    Outside a study (no ``LORATUNE_TRIAL_DIR``) it does nothing."""

    def __init__(self) -> None:
        self.directory = trial_dir()
        spec = _spec(self.directory) if self.directory else None
        self.awaits = bool(spec and spec.await_verdict)
        self.judged = 0  # curve points the study has been asked to judge
        self.stopped = False
        self.train_loss: float | None = None
        self.started = time.monotonic()
        self.last_tick = 0.0

    @property
    def active(self) -> bool:
        return self.directory is not None and not self.stopped

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and isinstance(logs.get("loss"), int | float):
            self.train_loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        if not self.active:
            return
        if (self.directory / STOP_FILE).exists():  # a stop that came between two evaluations
            self._stop(control)
            return
        now = time.monotonic()
        if state.is_world_process_zero and (now - self.last_tick >= STEP_INTERVAL_S or state.global_step == state.max_steps):
            self.last_tick = now
            tick = {"kind": STEP, "step": state.global_step, "steps": state.max_steps, "elapsed_s": round(now - self.started, 3)}
            self._write(tick if self.train_loss is None else {**tick, "train_loss": self.train_loss})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.active:
            return
        values = eval_metrics(metrics or {})
        steps = max(state.max_steps or 0, 1)
        point = {"step": state.global_step, "progress": round(min(state.global_step / steps, 1.0), 6), **values}
        if self.train_loss is not None:
            point["train_loss"] = self.train_loss
        if state.is_world_process_zero:
            atomic_write_json(self.directory / LAST_EVAL_FILE, values)
            self._write({"kind": EVAL, **point})
        if self.awaits and awaits_verdict(point):
            self.judged += 1
            if await_verdict(self.directory, self.judged):
                self._stop(control)

    def _stop(self, control) -> None:
        self.stopped = True
        control.should_training_stop = True

    def _write(self, event: dict) -> None:
        with open(self.directory / PROGRESS_FILE, "a") as f:
            f.write(json.dumps(event) + "\n")
