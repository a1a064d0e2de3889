"""Trainer throughput: loratune's loop against a plain transformers ``Trainer`` + peft on the same
model, data and settings, in one run.

    python benchmarks/trainer_throughput.py [--batch-size 4] [--epochs 1] [--repeats 2]   # make bench: --epochs 3 --repeats 5

Both train the same LoRA adapter (rank 16, alpha 32, lr 2e-4, AdamW, warmup 10%, weight decay 0.01)
on the demo data with the loss on response tokens only, from the same seed, and are scored with the
same validation function. Throughput counts real (non-padding) tokens per second of training; the
padding fraction is the share of padded positions that are padding. The baselines are the two usual
ways of feeding ``Trainer``: ``DataCollatorForSeq2Seq`` (pads each random batch to its longest
example) and padding every example to ``max_length`` (the common tutorial recipe).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def loratune_run(cfg) -> dict:
    from loratune.training import run_training

    cfg.output_dir, cfg.save_adapter = "/tmp/loratune-throughput", False
    m = run_training(cfg, overwrite=True)
    return {"trainer": "loratune (length-grouped batches)", "tokens_per_s": m.tokens_seen / m.train_time_s,
            "train_time_s": m.train_time_s, "padding_fraction": m.padding_fraction, "val_loss": m.val_loss}


def hf_run(cfg, pad_to_max: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from loratune.data import load_examples
    from loratune.losses import mean_losses
    from loratune.model import attach_adapter, load_base

    base = load_base(cfg)
    train, validation = load_examples(base.tokenizer, cfg.data, cfg.training.seed)
    model = attach_adapter(base, cfg)
    t = cfg.training
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)} for e in train]
    width = cfg.data.max_length if pad_to_max else None
    collator = DataCollatorForSeq2Seq(base.tokenizer, padding="max_length" if pad_to_max else True, max_length=width,
                                      label_pad_token_id=-100)
    args = TrainingArguments(
        output_dir="/tmp/loratune-hf-baseline", per_device_train_batch_size=t.batch_size, num_train_epochs=t.epochs,
        learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler, max_grad_norm=t.max_grad_norm, seed=t.seed, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator)
    real = sum(len(r["input_ids"]) for r in rows) * t.epochs
    padded = []
    for batch in trainer.get_train_dataloader():
        padded.append(batch["input_ids"].numel())
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    name = "transformers Trainer, padding to max_length" if pad_to_max else "transformers Trainer, DataCollatorForSeq2Seq"
    return {"trainer": name, "tokens_per_s": real / elapsed, "train_time_s": elapsed,
            "padding_fraction": 1 - sum(len(r["input_ids"]) for r in rows) / sum(padded),
            "val_loss": mean_losses(model, base, validation, t.eval_batch_size, [None])[None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of runs of each trainer; the medians are reported")
    args = parser.parse_args()
    from loratune.config import FinetuneConfig

    cfg = FinetuneConfig(save_adapter=False)
    cfg.training.batch_size, cfg.training.gradient_accumulation = args.batch_size, 1
    cfg.training.epochs, cfg.training.eval_points = args.epochs, 1
    runs = {"loratune": lambda: loratune_run(cfg), "seq2seq": lambda: hf_run(cfg, False),
            "max_length": lambda: hf_run(cfg, True)}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every trainer
        for name, run in runs.items():
            results[name].append(run())
            print(json.dumps(results[name][-1]), flush=True)
    rows = [{**r[0], "tokens_per_s": statistics.median(x["tokens_per_s"] for x in r),
             "train_time_s": statistics.median(x["train_time_s"] for x in r)} for r in results.values()]
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["loratune"], results["seq2seq"], strict=True)]
    base = rows[1]["tokens_per_s"]
    print(f"\nmedians of {args.repeats} interleaved runs; loratune / Seq2Seq per round: "
          + ", ".join(f"{x:.2f}x" for x in ratios))
    print("\n| trainer | tokens/s | vs Seq2Seq collator | padding | train time (s) | validation loss |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['padding_fraction']:.1%} | {r['train_time_s']:.1f} | {r['val_loss']:.4f} |")

if __name__ == "__main__":
    main()
