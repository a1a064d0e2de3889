"""Packed trials against the same trials one after another, on one loaded base (docs/benchmarks.md, "Packed trials").

For each K: K trials of the default search space (rank, alpha, learning rate and batch size drawn from a
fixed seed, dropout 0.05) trained one after another (a pack of one each, as a worker without packing
runs them), then together in one pack; the training tokens per second and trials per hour of both, and the
largest relative difference between a trial's curve points packed and alone. Where the time of a pack
goes: the shared forward and backward passes, the trials' optimizer steps, the curve points.

    python benchmarks/packing.py                       # the demo model, K = 1, 2, 4, 8
    python benchmarks/packing.py --model smollm2 --epochs 0.25 --ks 1,4
    python benchmarks/packing.py --ks 1,4,8 --precision bf16 --quantization 4bit   # on a GPU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import random
import time


def configs(k: int, model: str, epochs: float, seed: int = 0, precision: str = "auto", quantization: str = "none"):
    from loratune.config import FinetuneConfig

    rng = random.Random(seed)
    out = []
    for i in range(k):
        cfg = FinetuneConfig(output_dir=f"/tmp/loratune-packing/{i}", save_adapter=False)
        cfg.model.name, cfg.model.quantization, cfg.training.precision = model, quantization, precision
        cfg.lora.rank, cfg.lora.alpha = rng.choice([8, 16, 32, 64]), rng.choice([16, 32, 64, 128])
        cfg.training.learning_rate = 10 ** rng.uniform(-5, -3.3)
        cfg.training.batch_size, cfg.training.epochs = rng.choice([1, 2, 4]), epochs
        out.append(cfg)
    return out


def run(pack_cls, base, data, cfgs, together: bool) -> tuple[float, list[list[float]], int, dict]:
    """(seconds, each trial's curve, training tokens, where the time went)."""
    start = time.perf_counter()
    curves, tokens = [], 0
    groups = [cfgs] if together else [[c] for c in cfgs]
    spent = {"train_s": 0.0, "eval_s": 0.0}
    for group in groups:
        pack = pack_cls(base, data)
        trials = [pack.add(f"t{i}", c) for i, c in enumerate(group)]
        while pack.active:
            pack.round()
        for t in trials:
            curves.append([p.val_loss for p in t.curve])
            tokens += t.tokens
        spent["train_s"] += max(t.train_time_s for t in trials)
        spent["eval_s"] += max(t.eval_time_s for t in trials)
        pack.close()
    return time.perf_counter() - start, curves, tokens, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-qwen2", help="builtin:tiny-qwen2, smollm2, or a model directory")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--precision", default="auto", help="training.precision: auto, fp32, bf16, fp16")
    parser.add_argument("--quantization", default="none", help="model.quantization: none, 4bit, 8bit")
    args = parser.parse_args()
    settings = {"precision": args.precision, "quantization": args.quantization}
    from loratune.data import load_examples
    from loratune.model import load_base
    from loratune.pack import Pack

    model = args.model
    if model == "smollm2":
        from loratune.demo.smollm2 import ensure_smollm2

        model = str(ensure_smollm2())
    first = configs(1, model, args.epochs, **settings)[0]
    base = load_base(first)
    data = load_examples(base.tokenizer, first.data, first.training.seed)
    run(Pack, base, data, configs(1, model, 0.1, **settings), together=True)  # warm-up: the first passes allocate
    rows = []
    for k in [int(x) for x in args.ks.split(",")]:
        cfgs = configs(k, model, args.epochs, **settings)
        alone_s, alone, tokens, alone_spent = run(Pack, base, data, cfgs, together=False)
        packed_s, packed, _, packed_spent = run(Pack, base, data, cfgs, together=True)
        diff = max(abs(a - b) / abs(a) for ca, cb in zip(alone, packed, strict=True) for a, b in zip(ca, cb, strict=True))
        row = {"k": k, **settings, "alone_s": round(alone_s, 2), "packed_s": round(packed_s, 2),
               "alone_tokens_per_s": round(tokens / alone_s), "packed_tokens_per_s": round(tokens / packed_s),
               "alone_trials_per_hour": round(3600 * k / alone_s), "packed_trials_per_hour": round(3600 * k / packed_s),
               "speedup": round(alone_s / packed_s, 2), "max_relative_loss_difference": f"{diff:.1e}",
               "alone": {k: round(v, 2) for k, v in alone_spent.items()},
               "packed": {k: round(v, 2) for k, v in packed_spent.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
