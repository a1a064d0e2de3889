"""A trial's process.

``python -m loratune.worker TRIAL_DIR`` runs one trial and exits (``reuse_model: false``).
``python -m loratune.worker --serve`` keeps the base model (and the tokenized data) loaded and runs
the trials whose directories arrive on its stdin, one after another, each with a fresh adapter, until
stdin closes; with ``--preload`` it imports its libraries before the first trial arrives. When it is
replaced (after a failed trial, after ``trials_per_worker`` trials, for another base model) is decided
by whoever runs it (``executors/serving.py``). The files it shares with them are described in ``trial_dir.py``.
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
from .trial_dir import (  # noqa: E402
    EVAL,
    LOG_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    SPEC_FILE,
    STARTED,
    STEP,
    STEP_INTERVAL_S,
    STOP_FILE,
    TrialSpec,
    await_verdict,
    awaits_verdict,
    base_key,
)


class Cache:
    """What a serving worker keeps between trials: the loaded base model and the tokenized data."""

    def __init__(self):
        self.base: tuple[str, Any] | None = None  # (base_key, model.Base)
        self.data: tuple[str, Any] | None = None  # (data key, (train, validation))

    def base_and_data(self) -> tuple[Any, Any]:
        return self.base[1], self.data[1]

    def load_base(self, cfg, key: str) -> float:
        """The base model for ``key`` (``trial_dir.base_key``), loaded unless held; the seconds loading took."""
        from .model import load_base

        if self.base is not None and self.base[0] == key:
            return 0.0
        self.base = self.data = None  # the old base goes before the new one loads
        self.base = (key, load_base(cfg))
        return self.base[1].load_time_s

    def load_data(self, cfg) -> Any:
        """The tokenized (train, validation) rows of ``cfg``'s data and seed, on the held base's tokenizer."""
        key = json.dumps([asdict(cfg.data), cfg.training.seed])
        if self.data is None or self.data[0] != key:
            from .data import load_examples

            self.data = (key, load_examples(self.base[1].tokenizer, cfg.data, cfg.training.seed))
        return self.data[1]


class _Progress:
    """A trial's progress file as it trains: its curve points, its steps (at most one a
    ``STEP_INTERVAL_S``), and the verdicts it waits for at a point the study judges."""

    def __init__(self, trial_dir: Path, spec: TrialSpec):
        self.trial_dir, self.spec = trial_dir, spec
        self.file = open(trial_dir / PROGRESS_FILE, "a")
        self.last_step = 0.0
        self.judged = 0  # curve points before the last that the study has been asked to judge

    def write(self, event: dict) -> None:
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def on_eval(self, point) -> bool:
        self.write({"kind": EVAL, **asdict(point)})
        if not self.spec.await_verdict or not awaits_verdict(asdict(point)):
            return False
        self.judged += 1
        return await_verdict(self.trial_dir, self.judged)  # stop exactly here when the study says so

    def on_step(self, step: int, steps: int, elapsed: float, train_loss: float) -> None:
        if time.monotonic() - self.last_step >= STEP_INTERVAL_S or step == steps:
            self.last_step = time.monotonic()
            self.write({"kind": STEP, "step": step, "steps": steps, "elapsed_s": round(elapsed, 3),
                        "train_loss": train_loss})

    def close(self) -> None:
        self.file.close()


def run_trial(trial_dir: Path, cache: Cache | None = None, process_start: float | None = None) -> TrialResult:
    """Run the trial in ``trial_dir`` (on the cached base when its key matches); never raises.
    ``process_start``: for a process's first trial, which pays for importing torch, transformers and
    peft; the time from it to the end of those imports is the trial's ``startup_s``."""
    from . import training
    from .settings import finetune_config_from_dict

    try:
        spec = _read_spec(trial_dir)
    except BaseException as exc:
        return result_from_exception(exc)
    started = time.time()
    progress = _Progress(trial_dir, spec)
    try:
        cfg = finetune_config_from_dict(spec.config, str(trial_dir / SPEC_FILE))
        if cache is None and spec.test:
            cache = Cache()  # a test job with a base of its own: loaded once for the examples and the adapter
        base, data, load_s = _cached_base_and_data(cache, cfg, spec)
        if spec.test:
            return _test_job(cfg, spec, base, data, started)
        m = training.run_training(cfg, overwrite=True, on_eval=progress.on_eval, on_step=progress.on_step,
                                  stop_requested=(trial_dir / STOP_FILE).exists,
                                  measure_inference=spec.measure_inference, base=base, data=data,
                                  answer=spec.answer, max_new_tokens=spec.max_new_tokens)
    except BaseException as exc:  # every way a trial can end becomes a recorded state
        return result_from_exception(exc)
    finally:
        progress.close()
    return _training_result(m, load_s if cache is not None else m.load_time_s, started, process_start)


def _read_spec(trial_dir: Path) -> TrialSpec:
    """The trial's spec, with the libraries it needs imported: here, not where first used, so that a fresh
    process's start-up is timed as such."""
    from .model import import_libraries

    spec = TrialSpec.read(trial_dir)
    import_libraries(quantized=spec.quantized)
    return spec


def _cached_base_and_data(cache: Cache | None, cfg, spec: TrialSpec) -> tuple[Any, Any, float]:
    """(base, data, seconds loading the base took) from ``cache``; (None, None, 0.0) without one, for the
    training to load its own."""
    if cache is None:
        return None, None, 0.0
    load_s = cache.load_base(cfg, base_key(spec.config))
    data = None
    if not (spec.test and spec.adapter):  # scoring a saved adapter needs no training data
        data = cache.load_data(cfg)
    return cache.base[1], data, load_s


def _training_result(m, load_s: float, started: float, process_start: float | None) -> TrialResult:
    """A trained trial's result: its state, metrics and curve, with its timings, memory and what it ran on."""
    from . import training

    memory = training.memory_after_trial()
    timings = {"load_s": load_s, "data_s": m.data_time_s,
               "train_s": m.train_time_s, "eval_s": m.eval_time_s, "inference_s": m.inference_measure_s,
               "trial_s": time.time() - started}
    if process_start is not None:
        timings["startup_s"] = started - process_start
    extra = {"steps": m.steps, "planned_steps": m.planned_steps, "tokens_seen": m.tokens_seen, "device": m.device,
             "precision": m.precision, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if m.answers is not None:  # scored in the study's process, by its scorers
        extra["answers"] = m.answers
    return TrialResult(m.state, m.objective_metrics(), m.curve,
                       reason="early-stopped" if m.state is TrialState.EARLY_STOPPED else None,
                       extra={**extra, "timings": timings, "memory_after": memory})


def _test_job(cfg, spec: TrialSpec, base, data, started: float) -> TrialResult:
    """The final test of a study (the only job that reads the test split): a saved adapter, or a retrain of
    the trial's config where its adapter was not kept, scored on the test split; the answers go back to the
    study's scorers."""
    from . import training
    from .data import load_test_examples

    found = load_test_examples(base.tokenizer, cfg.data, cfg.training.seed)
    if found is None:
        raise ValueError("the study's data has no test split")
    examples, source = found
    answer = bool(spec.answer)  # answers are generated only for a study's scorers
    if spec.adapter:
        scored = training.score_adapter(cfg, base, spec.adapter, examples, answer, spec.max_new_tokens)
    else:
        trained = training.run_training(cfg, overwrite=True, base=base, data=data, test=examples, test_answers=answer,
                                        max_new_tokens=spec.max_new_tokens)
        scored = {**trained.test, "validation_loss": trained.val_loss}
    metrics = {"loss": scored["loss"], **{k: scored[k] for k in ("generation_s", "validation_loss") if k in scored}}
    return TrialResult(TrialState.COMPLETED, metrics, extra={
        "answers": scored.get("answers", []), "examples": scored["examples"], "source": source,
        "retrained": not spec.adapter, "timings": {"trial_s": time.time() - started}})


def _run_in(trial_dir: Path, cache: Cache | None, process_start: float | None) -> TrialResult:
    """One trial with this process's output going to the trial's log and its directory locked. The
    first progress line says the trial is taken; the result is written last, once the log holds
    everything (whoever runs the worker may end it as soon as the result is there)."""
    lock = TrialLock(trial_dir).acquire()
    log = open(trial_dir / LOG_FILE, "a")
    _redirect_output(log)
    try:
        with open(trial_dir / PROGRESS_FILE, "a") as progress:
            progress.write(json.dumps({"kind": STARTED, "pid": os.getpid()}) + "\n")
        result = run_trial(trial_dir, cache, process_start)
        if result.state.is_failure:
            print(f"trial ended: {result.state.value}: {result.reason}", file=sys.stderr)
            print(result.extra.get("traceback", ""), file=sys.stderr, flush=True)
        atomic_write_json(trial_dir / RESULT_FILE, result.to_dict())
        return result
    finally:
        lock.release()
        log.close()


def _redirect_output(log: IO) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


def read_commands(fd: int, commands: queue.Queue) -> None:
    """Put the trial directories that arrive on ``fd`` on ``commands`` until it closes, the lines of one
    read as one list. By read, not by line: the study writes a pack's trials at once, so they start
    together whenever this thread is scheduled (``--seed``: the same packs, the same losses)."""
    rest = b""
    while chunk := os.read(fd, 65536):
        *lines, rest = (rest + chunk).split(b"\n")
        if lines:
            commands.put([d for line in lines if (d := line.decode(errors="replace").strip())])


def serve(preload: bool = False, quantized: bool = False, pack: int = 1) -> None:
    """Run trials as their directories arrive on stdin (one per line; the lines of one write arrive
    together, so a pack handed over at once starts together), keeping the base model loaded.
    ``preload``: import torch, transformers and peft before the first trial arrives (a worker started
    while the study sets up); a failure there is left for the first trial to meet and report. ``pack``:
    train up to this many trials at once (packed_worker.py), else one after another."""
    commands: queue.Queue[list[str] | None] = queue.Queue()
    busy = threading.Event()

    def read_stdin() -> None:
        read_commands(sys.stdin.fileno(), commands)
        if busy.is_set():  # stdin closed mid-trial: the study is gone, and so is this trial
            kill_own_group()
        commands.put(None)

    threading.Thread(target=read_stdin, name="loratune-commands", daemon=True).start()
    process_start = PROCESS_START
    if preload:
        from .model import import_libraries

        try:
            import_libraries(quantized)
        except BaseException:  # noqa: BLE001 - the first trial imports again and reports it in its own log
            pass
        imported = time.time()
    if pack > 1:
        from .packed_worker import PackedWorker

        PackedWorker(pack, Cache(), run_trial, process_start, imported if preload else None).serve(commands)
        return
    cache, first = Cache(), True
    while (command := commands.get()) is not None:
        for trial_dir in command:
            if first and preload:  # the first trial's start-up: the imports, not the wait for it
                process_start += time.time() - imported
            busy.set()
            _run_in(Path(trial_dir), cache, process_start if first else None)  # the first pays for the imports
            first = False
            busy.clear()


def main() -> None:
    watch_parent()  # where the parent-death signal is not available
    args = sys.argv[1:]
    pack = 1
    if "--pack" in args[:-1] and args[args.index("--pack") + 1].isdigit():
        pack = int(args.pop(args.index("--pack") + 1))
        args.remove("--pack")
    if args[:1] == ["--serve"] and set(args[1:]) <= {"--preload", "--quantized"}:
        serve(preload="--preload" in args, quantized="--quantized" in args, pack=pack)
        return
    if len(args) != 1 or args[0].startswith("--"):
        sys.exit("usage: python -m loratune.worker TRIAL_DIR | --serve [--preload [--quantized]] [--pack K]")
    _run_in(Path(sys.argv[1]), None, PROCESS_START)


if __name__ == "__main__":
    main()
