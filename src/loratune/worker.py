"""A trial's process, and the files it shares with the study.

``python -m loratune.worker TRIAL_DIR`` runs one trial and exits (``reuse_model: false``).
``python -m loratune.worker --serve`` keeps the base model (and the tokenized data) loaded and runs
the trials whose directories arrive on its stdin, one after another, each with a fresh adapter. It
exits when stdin closes between trials, after a trial that failed (a fresh process is the safe state
after an out-of-memory or a crash), or when told to; the executor then starts a fresh one.

A trial directory holds:

- ``trial.json``: the resolved training config and what to measure (written by the executor);
- ``progress.jsonl``: one JSON line per event, ``{"kind": "eval", ...}`` per validation point and
  ``{"kind": "step", ...}`` at most once a second;
- ``STOP``: appears when the study wants the trial stopped early (it stops after its next step);
- ``result.json``: how the trial ended, always written, also on out-of-memory or a crash;
- ``log.txt``: the process's output during the trial.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: the start-up time a reused worker saves

import json  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import IO, Any  # noqa: E402

from .processes import TrialLock, kill_own_group, watch_parent  # noqa: E402
from .storage import atomic_write_json  # noqa: E402
from .trial import TrialResult, TrialState, result_from_exception  # noqa: E402

STOP_FILE, PROGRESS_FILE, RESULT_FILE, SPEC_FILE, LOG_FILE = "STOP", "progress.jsonl", "result.json", "trial.json", "log.txt"
STEP_INTERVAL_S = 1.0  # step events are written at most this often


def worker_env(threads: int, gpus: list[str] | None = None) -> dict[str, str]:
    """The environment of a trial process: its share of the CPU threads, its GPUs, unbuffered output."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


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


def metrics_from_training(m: dict) -> dict[str, float]:
    """The names the optimizer knows (``loss`` is the validation loss)."""
    out = {
        "loss": m["val_loss"], "train_loss": m["train_loss"], "train_time": m["train_time_s"],
        "peak_memory_gb": m["peak_memory_gb"], "trainable_params": float(m["trainable_params"]),
        "tokens_per_s": m["tokens_per_s"], "padding_fraction": m["padding_fraction"],
    }
    if "inference_time" in m:
        out["inference_time"] = m["inference_time"]
    return out


def base_key(config: dict) -> str:
    """Everything in a training config (as a mapping) that shapes the loaded base model: trials with
    equal keys can share one."""
    return json.dumps({"model": config.get("model"), "precision": (config.get("training") or {}).get("precision")},
                      sort_keys=True)


class Cache:
    """What a serving worker keeps between trials: the loaded base model and the tokenized data."""

    def __init__(self):
        self.base: tuple[str, Any] | None = None  # (base_key, model.Base)
        self.data: tuple[str, Any] | None = None  # (data key, (train, validation))


def run_trial(trial_dir: Path, cache: Cache | None = None, process_start: float | None = None) -> TrialResult:
    """Run the trial in ``trial_dir`` (on the cached base when its key matches); never raises.
    ``process_start``: for a process's first trial, which pays for importing torch, transformers and
    peft; the time from it to the end of those imports is the trial's ``startup_s``."""
    from . import training
    from .model import import_libraries, load_base
    from .settings import finetune_config_from_dict

    import_libraries()  # here, not where first used, so that a fresh process's start-up is timed as such
    started = time.time()
    progress = open(trial_dir / PROGRESS_FILE, "a")
    last_step = [0.0]

    def write(event: dict) -> None:
        progress.write(json.dumps(event) + "\n")
        progress.flush()

    def on_eval(point) -> bool:
        write({"kind": "eval", **asdict(point)})
        return False

    def on_step(step: int, steps: int, elapsed: float, train_loss: float) -> None:
        if time.monotonic() - last_step[0] >= STEP_INTERVAL_S or step == steps:
            last_step[0] = time.monotonic()
            write({"kind": "step", "step": step, "steps": steps, "elapsed_s": round(elapsed, 3),
                   "train_loss": train_loss})

    try:
        spec = json.loads((trial_dir / SPEC_FILE).read_text())
        cfg = finetune_config_from_dict(spec["config"], str(trial_dir / SPEC_FILE))
        base = data = None
        load_s = 0.0
        if cache is not None:
            key = base_key(spec["config"])
            if cache.base is None or cache.base[0] != key:
                cache.base = cache.data = None  # the old base goes before the new one loads
                cache.base = (key, load_base(cfg))
                load_s = cache.base[1].load_time_s
            base = cache.base[1]
            data_key = json.dumps([asdict(cfg.data), cfg.training.seed])
            if cache.data is None or cache.data[0] != data_key:
                from .data import load_examples

                cache.data = (data_key, load_examples(base.tokenizer, cfg.data, cfg.training.seed))
            data = cache.data[1]
        m = training.run_training(cfg, overwrite=True, on_eval=on_eval, on_step=on_step,
                                  stop_requested=(trial_dir / STOP_FILE).exists,
                                  measure_inference=spec.get("measure_inference", False), base=base, data=data)
    except BaseException as exc:  # every way a trial can end becomes a recorded state
        return result_from_exception(exc)
    finally:
        progress.close()
    state = TrialState.EARLY_STOPPED if m["state"] == "early_stopped" else TrialState.COMPLETED
    memory = _memory_after_trial()
    timings = {"load_s": load_s if cache is not None else m["load_time_s"], "data_s": m["data_time_s"],
               "train_s": m["train_time_s"], "eval_s": m["eval_time_s"], "inference_s": m["inference_measure_s"],
               "trial_s": time.time() - started}
    if process_start is not None:
        timings["startup_s"] = started - process_start
    extra = {k: m[k] for k in ("steps", "planned_steps", "tokens_seen", "device", "precision")}
    extra["gpus"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return TrialResult(state, metrics_from_training(m), m["curve"],
                       reason="early-stopped" if state is TrialState.EARLY_STOPPED else None,
                       extra={**extra, "timings": timings, "memory_after": memory})


def _memory_after_trial() -> dict[str, float]:
    """What this process holds once a trial is over (its adapter gone): a reused worker's memory must stay flat."""
    import gc

    import torch

    gc.collect()
    out = {"rss_gb": _rss_bytes() / 2**30}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        out["cuda_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        out["cuda_reserved_gb"] = torch.cuda.memory_reserved() / 2**30
    return out


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, where the current is not known


def _run_in(trial_dir: Path, cache: Cache | None, process_start: float | None) -> TrialResult:
    """One trial with this process's output going to the trial's log and its directory locked."""
    lock = TrialLock(trial_dir).acquire()
    log = open(trial_dir / LOG_FILE, "a")
    _redirect_output(log)
    try:
        result = run_trial(trial_dir, cache, process_start)
        atomic_write_json(trial_dir / RESULT_FILE, result.to_dict())
        if result.state.is_failure:
            print(f"trial ended: {result.state.value}: {result.reason}", file=sys.stderr)
            print(result.extra.get("traceback", ""), file=sys.stderr, flush=True)
        return result
    finally:
        lock.release()
        log.close()


def _redirect_output(log: IO) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


def serve() -> None:
    """Run trials as their directories arrive on stdin (one per line), keeping the base model loaded."""
    commands: queue.Queue[str | None] = queue.Queue()
    busy = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        if busy.is_set():  # stdin closed mid-trial: the study is gone, and so is this trial
            kill_own_group()
        commands.put(None)

    threading.Thread(target=read_stdin, name="loratune-commands", daemon=True).start()
    cache, first = Cache(), True
    while (command := commands.get()) not in (None, "exit"):
        busy.set()
        result = _run_in(Path(command), cache, PROCESS_START if first else None)  # the first pays for the imports
        first = False
        busy.clear()
        if result.state.is_failure:
            sys.exit(3)  # the executor starts a fresh worker: memory after an OOM or a crash is not trusted


def main() -> None:
    watch_parent()  # where the parent-death signal is not available
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    if len(sys.argv) != 2:
        sys.exit("usage: python -m loratune.worker TRIAL_DIR | --serve")
    _run_in(Path(sys.argv[1]), None, PROCESS_START)


if __name__ == "__main__":
    main()
