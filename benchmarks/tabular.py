"""The tabular LoRA benchmark as an objective: look up a point of the default space in
``data/tabular_lora.csv`` (made by tabular_grid.py) instead of fine-tuning it.

A learning rate between grid values is read at the nearest grid value in log space. An
observation is one random seed's fine-tune, drawn at random (the run-to-run noise a real search sees);
the true value of a point, which regret is measured on, is the mean over the seeds.
"""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
from pathlib import Path

DATA = Path(__file__).parent / "data" / "tabular_lora.csv"
KEY = ("lora_rank", "lora_alpha", "batch_size", "learning_rate")


class Tabular:
    def __init__(self, path: Path = DATA):
        self.rows: dict[tuple, list[dict]] = {}
        with open(path) as f:
            for r in csv.DictReader(f):
                key = (int(r["lora_rank"]), int(r["lora_alpha"]), int(r["batch_size"]), float(r["learning_rate"]))
                self.rows.setdefault(key, []).append(
                    {"seed": int(r["seed"]), "val_loss": float(r["val_loss"]), "train_time_s": float(r["train_time_s"]),
                     "curve": json.loads(r["curve"])})
        self.learning_rates = sorted({k[3] for k in self.rows})
        self.seeds = sorted({s["seed"] for runs in self.rows.values() for s in runs})
        self.optimum_key = min(self.rows, key=self.true_value_of)
        self.optimum = self.true_value_of(self.optimum_key)

    def key(self, p: dict) -> tuple:
        lr = min(self.learning_rates, key=lambda v: abs(math.log(v) - math.log(p["learning_rate"])))
        return (int(p["lora_rank"]), int(p["lora_alpha"]), int(p["batch_size"]), lr)

    def true_value_of(self, key: tuple) -> float:
        return statistics.fmean(r["val_loss"] for r in self.rows[key])

    def true_value(self, p: dict) -> float:
        return self.true_value_of(self.key(p))

    def run(self, p: dict, rng: random.Random) -> dict:
        """One random seed's fine-tune of this point: {seed, val_loss, train_time_s, curve}."""
        return rng.choice(self.rows[self.key(p)])

    def observe(self, p: dict, rng: random.Random) -> float:
        return self.run(p, rng)["val_loss"]
