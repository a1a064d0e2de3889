"""loratune against what a Hugging Face user would pick instead: ``Trainer.hyperparameter_search`` with
Optuna, the same model, data and search space, one process.

    python benchmarks/peer_hf_optuna.py --pairs 2                                   # the demo, 20 trials
    python benchmarks/peer_hf_optuna.py --pairs 2 --packs 1,4                       # loratune with each pack size
    python benchmarks/peer_hf_optuna.py --setup smollm2 --trials 4 --epochs 0.25 --pairs 1
    python benchmarks/peer_hf_optuna.py --setup smollm2 --trials 4 --epochs 0.25 --pairs 1 --loratune-set scoring.subset=0 \
        --no-cross-check

The peer, as a user would write it from the transformers docs: ``model_init`` loads the base model and
wraps it with peft's LoRA (rank, alpha from the trial), ``hp_space`` suggests the learning rate (log) and
the batch size (gradient accumulation keeps the effective batch at 4), Optuna's TPE from the same seed,
1 epoch, AdamW, linear schedule with 10% warm-up, weight decay 0.01, LoRA dropout 0.05 on every linear
layer: loratune's defaults. Both train on the same tokenized rows (the loss on the assistant's tokens;
loratune's own rendering, checked against the chat template elsewhere) and are scored on the whole
validation set as the mean loss per answer token: the peer evaluates the 37 rows in one batch, and the
script first checks that figure against the definition computed token by token.

loratune runs as its users run it: ``ax_optimization.py --trials N --seed S`` (its baseline as trial 0,
task scores and the final test on the test split, the report and its plots: work the peer does not do).
The two run alternately, each in a process of its own; wall time, the peak of the whole process tree's
resident memory (sampled every 0.1 s; summed RSS counts the shared libraries once per process, which
weighs against loratune's two processes) and the best validation loss are printed, then a Markdown
table. The peer's time includes the check of its loss definition (one evaluation, one pass per row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANKS, ALPHAS, BATCH_SIZES, LR = [8, 16, 32, 64], [16, 32, 64, 128], [1, 2, 4], (1e-5, 5e-4)
EFFECTIVE_BATCH = 4


def model_path(setup: str) -> str:
    if setup == "smollm2":
        from loratune.demo.smollm2 import ensure_smollm2

        return str(ensure_smollm2())
    from loratune.model import resolve_model

    return resolve_model("builtin:tiny-qwen2")


def _peer_parts(path: str, epochs: float, seed: int, out: Path):
    """The peer's pieces as a user writes them: model_init, hp_space, the arguments, the data."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments

    from loratune.config import FinetuneConfig
    from loratune.data import load_examples
    from loratune.model import load_tokenizer

    cfg = FinetuneConfig()
    cfg.model.name = path
    tokenizer = load_tokenizer(cfg)
    train, validation = load_examples(tokenizer, cfg.data, seed)  # a trial's rows: drawn from the study's seed

    def rows(examples):
        return Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)}
                                  for e in examples])

    def model_init(trial):  # Trainer calls it before hp_space: the LoRA shape is suggested here
        rank = trial.suggest_categorical("lora_rank", RANKS) if trial is not None else 16
        alpha = trial.suggest_categorical("lora_alpha", ALPHAS) if trial is not None else 32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))

    def hp_space(trial):
        batch_size = trial.suggest_categorical("batch_size", BATCH_SIZES)
        return {"learning_rate": trial.suggest_float("learning_rate", *LR, log=True),
                "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": EFFECTIVE_BATCH // batch_size}

    def arguments(**overrides):
        return TrainingArguments(**{**dict(
            output_dir=str(out), num_train_epochs=epochs, learning_rate=2e-4, per_device_train_batch_size=1,
            gradient_accumulation_steps=EFFECTIVE_BATCH,
            per_device_eval_batch_size=len(validation),  # one batch: the mean over every answer token
            warmup_steps=0.1, weight_decay=0.01, lr_scheduler_type="linear", seed=seed, save_strategy="no",
            eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported()), **overrides})

    data = {"train_dataset": rows(train), "eval_dataset": rows(validation),
            "data_collator": DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)}
    return model_init, hp_space, arguments, data, validation


def peer(path: str, trials: int, epochs: float, seed: int, out: Path) -> dict:
    """The HF Trainer + Optuna study, in this process; returns its best loss and parameters."""
    import optuna
    from transformers import Trainer

    model_init, hp_space, arguments, data, validation = _peer_parts(path, epochs, seed, out)
    trainer = Trainer(model_init=model_init, args=arguments(), **data)
    _check_loss_definition(trainer, validation)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best = trainer.hyperparameter_search(direction="minimize", backend="optuna", hp_space=hp_space, n_trials=trials,
                                         compute_objective=lambda metrics: metrics["eval_loss"],
                                         sampler=optuna.samplers.TPESampler(seed=seed))
    return {"best_loss": best.objective, "best_params": best.hyperparameters}


def peer_train(path: str, params: dict, epochs: float, seed: int, out: Path) -> float:
    """One config trained and scored the peer's way: its validation loss."""
    from optuna.trial import FixedTrial
    from transformers import Trainer

    model_init, hp_space, arguments, data, _ = _peer_parts(path, epochs, seed, out)
    trial = FixedTrial(params)
    # train() seeds, then builds the model, as in the search
    trainer = Trainer(model_init=lambda: model_init(trial), args=arguments(**hp_space(trial)), **data)
    trainer.train()
    return trainer.evaluate()["eval_loss"]


def loratune_train(path: str, params: dict, epochs: float, seed: int) -> float:
    """One config trained and scored as a loratune trial: its validation loss (a trial trains from the
    study's seed)."""
    import tempfile

    from loratune.config import FinetuneConfig
    from loratune.training import run_training

    cfg = FinetuneConfig(output_dir=tempfile.mkdtemp(prefix="loratune-peer-"), save_adapter=False)
    cfg.model.name = path
    cfg.lora.rank, cfg.lora.alpha = params["lora_rank"], params["lora_alpha"]
    cfg.training.learning_rate, cfg.training.batch_size = params["learning_rate"], params["batch_size"]
    cfg.training.epochs, cfg.training.seed = epochs, seed
    return run_training(cfg, overwrite=True).val_loss


def _check_loss_definition(trainer, validation) -> None:
    """The peer's eval loss equals the mean loss per answer token, computed example by example."""
    import torch

    reported = trainer.evaluate()["eval_loss"]
    model = trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in validation:
            logits = model(input_ids=torch.tensor([e.input_ids], device=model.device)).logits[0, :-1]
            labels = torch.tensor(e.labels[1:], device=model.device)
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert abs(reported - total / count) < 1e-4, (reported, total / count)


def measured(command: list[str]) -> dict:
    """Run ``command``; its wall time and the peak resident memory of its whole process tree."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:  # the root has ended
                break
            total = 0
            for p in tree:  # a child that ends meanwhile counts as nothing, not the whole sample
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_mib": peak / 2**20, "output": output}


def run_peer(setup: str, trials: int, epochs: float, seed: int, tmp: Path) -> dict:
    out = tmp / "peer.json"
    m = measured([sys.executable, __file__, "--as-peer", "--setup", setup, "--trials", str(trials), "--epochs",
                  str(epochs), "--seed", str(seed), "--json", str(out)])
    return {**m, **json.loads(out.read_text())}


def run_loratune(setup: str, trials: int, epochs: float, seed: int, tmp: Path, sets: list[str] = ()) -> dict:
    out = tmp / "loratune"
    command = [sys.executable, str(ROOT / "ax_optimization.py"), "--trials", str(trials), "--seed", str(seed),
               "--output", str(out), "--overwrite", "--set", f"training.epochs={epochs}",
               *(arg for field in sets for arg in ("--set", field))]
    if setup == "smollm2":
        command += ["--model", model_path(setup)]
    m = measured(command)
    results = json.loads((out / "optimization_results.json").read_text())
    return {**m, "best_loss": results["best_loss"], "best_params": results["best_params"],
            "optimizer_s": results.get("optimizer_time_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", default="demo", choices=["demo", "smollm2"])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=2, help="peer then loratune, this many times")
    parser.add_argument("--loratune-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a --set for loratune's runs, e.g. scoring.subset=0 (no generated answers during the search)")
    parser.add_argument("--packs", default="", help="loratune runs with each of these --pack values (default: "
                        "one run with its default)")
    parser.add_argument("--no-cross-check", action="store_true", help="skip training each best config by the other tool")
    parser.add_argument("--as-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_peer:
        with tempfile.TemporaryDirectory() as tmp:
            result = peer(model_path(args.setup), args.trials, args.epochs, args.seed, Path(tmp))
        Path(args.json).write_text(json.dumps(result))
        return
    model_path(args.setup)  # built once, outside the timings
    tools = {"HF Trainer + Optuna": run_peer}
    for pack in args.packs.split(",") if args.packs else [None]:
        sets = [*args.loratune_set, *([f"pack={pack}"] if pack else [])]
        tools["loratune" + (f" (pack {pack})" if pack else "")] = lambda *a, sets=sets: run_loratune(*a, sets=sets)
    runs = {name: [] for name in tools}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for name, run in tools.items():
                r = run(args.setup, args.trials, args.epochs, args.seed, Path(tmp))
                runs[name].append(r)
                extra = f", of which Ax {r['optimizer_s']:.1f} s" if r.get("optimizer_s") else ""
                print(f"pair {pair + 1}, {name}: {r['wall_s']:.1f} s{extra}, peak {r['peak_mib']:.0f} MiB, "
                      f"best loss {r['best_loss']:.4f} {r['best_params']}", flush=True)
    # each tool's best config trained the other's way too: is the better loss a better config, or another trainer?
    path = model_path(args.setup)
    confirmed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rs in runs.items() if not args.no_cross_check else ():
            params = rs[0]["best_params"]
            confirmed[name] = {"HF Trainer + Optuna": peer_train(path, params, args.epochs, args.seed, Path(tmp)),
                               "loratune": loratune_train(path, params, args.epochs, args.seed)}
            print(f"{name}'s best {params}: {confirmed[name]}", flush=True)
    print(f"\n{args.setup}, {args.trials} trials of {args.epochs:g} epoch, seed {args.seed}, {args.pairs} pairs\n")
    print("| | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs))
    for label, key, fmt in (("wall s", "wall_s", "{:.1f}"), ("peak MiB, whole tree", "peak_mib", "{:.0f}"),
                            ("best validation loss", "best_loss", "{:.4f}")):
        cells = [", ".join(fmt.format(r[key]) for r in rs) + f" (median {fmt.format(statistics.median(r[key] for r in rs))})"
                 for rs in runs.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for name in confirmed:
        print(f"| {name}'s best, trained by HF Trainer, loratune | {confirmed[name]['HF Trainer + Optuna']:.4f}, "
              f"{confirmed[name]['loratune']:.4f} |")


if __name__ == "__main__":
    main()
