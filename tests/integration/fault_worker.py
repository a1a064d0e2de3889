"""loratune's worker process (``loratune.worker``: its serve loop, trial lock, log, progress and result
files) with the training replaced by a scripted trial, so that a test makes each way a worker can end
happen on purpose, in milliseconds. Run as ``python fault_worker.py --serve`` or ``... TRIAL_DIR``, the
way executors run the worker module. The trial's parameter ``act`` chooses what it does:

- ``complete`` (the default): one validation point, then completed with a loss computed from the
  parameters (``loss`` when given);
- ``fail``: reports a failed trial, as a non-finite loss does;
- ``oom``: reports an out-of-memory trial;
- ``bad_result``: completes, with a curve point whose loss is not a number: its result file (or a Ray
  actor's reply) does not read back;
- ``crash``: the process dies in the middle of the trial (``os._exit(1)``);
- ``hang``: trains "forever": ends early-stopped when asked to stop, or is killed;
- ``curve``: three validation points before the last; a trial that awaits verdicts waits at each for
  the study's (``trial_dir.await_verdict``) and ends early-stopped at the point it was told to stop.

With ``pid_file`` among the parameters it first writes its pid there, so that a test can kill it or
freeze it; every result carries the pid that ran the trial.
"""

import json
import math
import os
import time
from pathlib import Path

from loratune import worker
from loratune.trial import TrialResult, TrialState
from loratune.trial_dir import await_verdict


def scripted_loss(params: dict) -> float:
    lr, rank = params.get("learning_rate", 2e-4), params.get("lora_rank", 16)
    return 0.5 + 0.08 * (math.log10(lr) + 3.5) ** 2 + 0.02 * abs(math.log2(rank) - 5)


def scripted_trial(trial_dir: Path, cache=None, process_start=None) -> TrialResult:
    spec = json.loads((trial_dir / "trial.json").read_text())
    params = spec["params"]
    if params.get("pid_file"):
        Path(params["pid_file"]).write_text(str(os.getpid()))
    act = params.get("act", "complete")
    extra, curve = {"pid": os.getpid()}, []
    with open(trial_dir / "progress.jsonl", "a") as progress:
        progress.write(json.dumps({"kind": "step", "step": 1, "steps": 2, "elapsed_s": 0.0, "train_loss": 1.0}) + "\n")
        progress.flush()
        if act == "crash":
            os._exit(1)
        if act == "hang":
            while not (trial_dir / "STOP").exists():
                time.sleep(0.02)
            point = {"step": 1, "progress": 0.5, "val_loss": 2.0, "train_loss": 2.0, "subset": 8}
            progress.write(json.dumps({"kind": "eval", **point}) + "\n")
            return TrialResult(TrialState.EARLY_STOPPED, {"loss": 2.0}, [point], "early-stopped", extra)
        if act == "curve":
            for judged, share in enumerate((0.25, 0.5, 0.75), start=1):
                curve.append({"step": judged, "progress": share, "val_loss": 2.0 - share, "train_loss": 2.0, "subset": 8})
                progress.write(json.dumps({"kind": "eval", **curve[-1]}) + "\n")
                progress.flush()
                if spec.get("await_verdict") and await_verdict(trial_dir, judged):
                    return TrialResult(TrialState.EARLY_STOPPED, {"loss": curve[-1]["val_loss"]}, curve, "early-stopped", extra)
        if act == "fail":
            return TrialResult(TrialState.FAILED, reason="non-finite loss: validation loss is nan at step 1", extra=extra)
        if act == "oom":
            return TrialResult(TrialState.OUT_OF_MEMORY, reason="OutOfMemoryError: CUDA out of memory", extra=extra)
        if act == "bad_result":
            point = {"step": 2, "progress": 1.0, "val_loss": "low", "train_loss": 1.0, "subset": 37}
            return TrialResult(TrialState.COMPLETED, {"loss": 1.0}, [point], extra=extra)
        loss = float(params.get("loss", scripted_loss(params)))
        point = {"step": 2, "progress": 1.0, "val_loss": loss, "train_loss": loss, "subset": 37}
        progress.write(json.dumps({"kind": "eval", **point}) + "\n")
        return TrialResult(TrialState.COMPLETED, {"loss": loss}, [*curve, point], extra=extra)


if __name__ == "__main__":
    worker.run_trial = scripted_trial
    worker.main()
