"""One trial's fine-tune, in its own process: ``python -m loratune.worker TRIAL_DIR``.

Reads ``TRIAL_DIR/trial.json`` (the resolved training config), streams each validation point to
``progress.jsonl``, stops at the next point after ``STOP`` appears, and always ends by writing
``result.json``, even on out-of-memory or a crash. A fresh process per trial means no GPU memory
leaks from one trial into the next.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from .config import finetune_config_from_dict
from .processes import TrialLock, watch_parent
from .storage import atomic_write_json
from .trial import TrialResult, TrialState, result_from_exception

STOP_FILE, PROGRESS_FILE, RESULT_FILE, SPEC_FILE = "STOP", "progress.jsonl", "result.json", "trial.json"


def metrics_from_finetune(m: dict) -> dict[str, float]:
    """The names the optimizer knows (``loss`` is the validation loss)."""
    out = {
        "loss": m["val_loss"], "train_loss": m["train_loss"], "train_time": m["train_time_s"],
        "peak_memory_gb": m["peak_memory_gb"], "trainable_params": float(m["trainable_params"]),
        "tokens_per_s": m["tokens_per_s"], "padding_fraction": m["padding_fraction"],
    }
    if "inference_time" in m:
        out["inference_time"] = m["inference_time"]
    return out


def run(trial_dir: Path) -> TrialResult:
    from .training import finetune

    spec = json.loads((trial_dir / SPEC_FILE).read_text())
    cfg = finetune_config_from_dict(spec["config"], str(trial_dir / SPEC_FILE))
    progress = open(trial_dir / PROGRESS_FILE, "a")

    def on_eval(point) -> bool:
        progress.write(json.dumps(asdict(point)) + "\n")
        progress.flush()
        return False

    try:
        m = finetune(cfg, quiet=True, overwrite=True, on_eval=on_eval,
                     stop_requested=(trial_dir / STOP_FILE).exists,
                     measure_inference=spec.get("measure_inference", False))
    except BaseException as exc:  # every way a trial can end becomes a recorded state
        return result_from_exception(exc)
    finally:
        progress.close()
    state = TrialState.EARLY_STOPPED if m["state"] == "early_stopped" else TrialState.COMPLETED
    extra = {k: m[k] for k in ("steps", "planned_steps", "tokens_seen", "wall_time_s", "device", "precision")}
    return TrialResult(state, metrics_from_finetune(m), m["curve"],
                       reason="early-stopped" if state is TrialState.EARLY_STOPPED else None, extra=extra)


def main() -> None:
    trial_dir = Path(sys.argv[1])
    TrialLock(trial_dir).acquire()  # held until this process ends
    watch_parent()  # where the parent-death signal is not available
    result = run(trial_dir)
    atomic_write_json(trial_dir / RESULT_FILE, result.to_dict())
    if result.reason and result.state in (TrialState.FAILED, TrialState.OUT_OF_MEMORY):
        print(f"trial ended: {result.state.value}: {result.reason}", file=sys.stderr)
        print(result.extra.get("traceback", ""), file=sys.stderr)


if __name__ == "__main__":
    main()
