"""LoRA-shaped synthetic surfaces: validation loss as a function of the default search space's four parameters.

Every surface is defined on the default search space:
``learning_rate`` in [1e-5, 5e-4] (log scale), ``lora_rank`` in {8, 16, 32, 64}, ``lora_alpha`` in
{16, 32, 64, 128}, ``batch_size`` in {1, 2, 4}. They share what makes LoRA tuning hard and what the
project's tabular grid does not show (its optimum is a corner of the space):

- the best learning rate moves with LoRA's update scale ``s`` (``alpha / rank``, or
  ``alpha / sqrt(rank)`` with rsLoRA): the loss depends on ``lr * s``, so the optimum is a line of
  points (one learning rate per rank/alpha pair) and several (rank, alpha) pairs share it;
- rank and batch size add small penalties away from their best values, which lie inside the space;
- the optimum is inside the space, never at a corner.

Write ``x = ln(lr * s / K)`` for the distance, in e-folds, from the best effective step ``K``.
Each surface's value at its optimum is the constant term; ``OPTIMA`` lists it and the optimal
points. ``noise`` adds Gaussian observation noise of that standard deviation (the seed-to-seed
spread of a real fine-tune on the tabular benchmark is about 0.002); the true value, on which
regret is measured, is always the noiseless one.

    >>> from surfaces import SURFACES
    >>> SURFACES["lora_scale"]({"learning_rate": 2.5e-5, "lora_rank": 32, "lora_alpha": 64, "batch_size": 2})
    0.6
"""

from __future__ import annotations

import math
import random

SPACE = [("lora_rank", "choice", [8, 16, 32, 64]), ("lora_alpha", "choice", [16, 32, 64, 128]),
         ("learning_rate", "float", 1e-5, 5e-4, True), ("batch_size", "choice", [1, 2, 4])]
BASELINE = {"lora_rank": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch_size": 1}  # a study's trial 0


def lora_scale(p: dict) -> float:
    """Quadratic valley along ``lr * alpha / rank = 5e-5``: the best learning rates lie below the
    centre of the range.

    ``f = 0.60 + 0.05 x^2 + 0.004 (log2 rank - 5)^2 + 0.006 (log2 batch_size - 1)^2`` with
    ``x = ln(lr * (alpha / rank) / 5e-5)``.

    Optimum 0.60 at rank 32, batch size 2 and ``lr = 5e-5 * 32 / alpha`` for every alpha: (16, 1e-4),
    (32, 5e-5), (64, 2.5e-5), (128, 1.25e-5): four optimal points, all inside the learning-rate
    range. The centre of the space (rank 32, alpha 64, lr 7.1e-5, bs 2) is 0.054 above the optimum,
    the baseline (rank 16, alpha 32, lr 2e-4, bs 1) 0.226 above it.
    """
    x = math.log(p["learning_rate"] * p["lora_alpha"] / p["lora_rank"] / 5e-5)
    return 0.60 + 0.05 * x ** 2 + 0.004 * (math.log2(p["lora_rank"]) - 5) ** 2 \
        + 0.006 * (math.log2(p["batch_size"]) - 1) ** 2


def rslora_asymmetric(p: dict) -> float:
    """rsLoRA scale ``s = alpha / sqrt(rank)``; a steep wall above the best step (training diverges),
    a gentle slope below it (training is merely slow), saturating far from the optimum. The best
    learning rates lie above the centre of the range, at the larger alphas.

    ``f = 0.90 + 0.30 (1 - exp(-w x^2)) + 0.005 (log2 rank - 4)^2 + 0.004 (log2 batch_size - 1)^2``
    with ``x = ln(lr * s / 4e-3)``, ``w = 0.10`` below the best step (x < 0) and ``w = 0.60`` above.

    Optimum 0.90 at rank 16 (s = alpha / 4), batch size 2 and ``lr = 1.6e-2 / alpha``: (32, 5e-4),
    (64, 2.5e-4), (128, 1.25e-4): three optimal points, two of them inside the learning-rate range
    and one on its upper bound (alpha 16 would need 1e-3). The centre is 0.073 above the optimum,
    the baseline 0.028 above it.
    """
    x = math.log(p["learning_rate"] * p["lora_alpha"] / math.sqrt(p["lora_rank"]) / 4e-3)
    w = 0.60 if x > 0 else 0.10
    return 0.90 + 0.30 * (1 - math.exp(-w * x * x)) + 0.005 * (math.log2(p["lora_rank"]) - 4) ** 2 \
        + 0.004 * (math.log2(p["batch_size"]) - 1) ** 2


def batch_scaled(p: dict) -> float:
    """A narrow basin whose best learning rate also grows with the square root of the batch size
    (the square-root scaling rule of adaptive optimizers), so batch size interacts with the learning
    rate as well as adding its own penalty. The best step lies between the centre's and the
    baseline's.

    ``f = 0.70 + 0.25 (1 - exp(-x^2 / 0.72)) + 0.006 (log2 rank - 4)^2 + 0.008 (log2 batch_size - 1)^2``
    with ``x = ln(lr * (alpha / rank) / (2e-4 * sqrt(batch_size)))`` (a Gaussian well of width
    0.6 e-folds: a factor of 1.8 in learning rate).

    Optimum 0.70 at rank 16, batch size 2 and ``lr = 2e-4 * sqrt(2) * 16 / alpha``: (16, 2.83e-4),
    (32, 1.41e-4), (64, 7.07e-5), (128, 3.54e-5): four optimal points inside the space. The centre
    is 0.128 above the optimum, the baseline 0.130 above it.
    """
    x = math.log(p["learning_rate"] * p["lora_alpha"] / p["lora_rank"] / (2e-4 * math.sqrt(p["batch_size"])))
    return 0.70 + 0.25 * (1 - math.exp(-x * x / 0.72)) + 0.006 * (math.log2(p["lora_rank"]) - 4) ** 2 \
        + 0.008 * (math.log2(p["batch_size"]) - 1) ** 2


def step_rank_drift(p: dict) -> float:
    """(Written after loratune's defaults were chosen: never used to tune them.) The best effective step
    falls with the rank (larger adapters want smaller steps: ``K = 8e-5 / sqrt(rank / 16)``), so the
    scale alone does not line the optimum up; the best batch size is the largest.

    ``f = 0.80 + 0.20 (1 - exp(-x^2 / 1.28)) + 0.005 (log2 rank - 5)^2 + 0.004 (log2 batch_size - 2)^2``
    with ``x = ln(lr * (alpha / rank) / K)``.

    Optimum 0.80 at rank 32, batch size 4 and ``lr * alpha / rank = 5.66e-5``: (16, 1.13e-4),
    (32, 5.66e-5), (64, 2.83e-5), (128, 1.41e-5).
    """
    x = math.log(p["learning_rate"] * p["lora_alpha"] / p["lora_rank"] / (8e-5 / math.sqrt(p["lora_rank"] / 16)))
    return 0.80 + 0.20 * (1 - math.exp(-x * x / 1.28)) + 0.005 * (math.log2(p["lora_rank"]) - 5) ** 2 \
        + 0.004 * (math.log2(p["batch_size"]) - 2) ** 2


def wide_plateau(p: dict) -> float:
    """(Written after loratune's defaults were chosen: never used to tune them.) A flat-bottomed basin in
    the effective step (any step within a factor of 2 of ``8e-5`` is as good), a penalty on large scales
    (``alpha / rank`` above 4 trains unstably) that the step does not capture, and the smallest rank and
    the largest batch size best.

    ``f = 0.50 + 0.04 d^2 + 0.01 max(0, log2(alpha / rank) - 2)^2 + 0.006 (log2 rank - 3)^2 + 0.005 (log2 batch_size - 2)^2``
    with ``d = max(0, |x| - 0.7)``, ``x = ln(lr * (alpha / rank) / 8e-5)``.

    Optimum 0.50 (a plateau) at rank 8, batch size 4, alpha 16 (lr 2e-5 to 8e-5) or 32 (lr 1e-5 to 4e-5).
    """
    x = math.log(p["learning_rate"] * p["lora_alpha"] / p["lora_rank"] / 8e-5)
    d = max(0.0, abs(x) - 0.7)
    return 0.50 + 0.04 * d * d + 0.01 * max(0.0, math.log2(p["lora_alpha"] / p["lora_rank"]) - 2) ** 2 \
        + 0.006 * (math.log2(p["lora_rank"]) - 3) ** 2 + 0.005 * (math.log2(p["batch_size"]) - 2) ** 2


def earlier(name: str, step_factor: float = 1.6, offset: float = 0.05):
    """The surface of an earlier study of a related job (another version of the data): the same shape with
    its best effective step ``step_factor`` times larger and every value ``offset`` higher; for warm starts."""
    f = SURFACES[name]

    def related(p: dict) -> float:
        return f({**p, "learning_rate": p["learning_rate"] / step_factor}) + offset

    return related


SURFACES = {"lora_scale": lora_scale, "rslora_asymmetric": rslora_asymmetric, "batch_scaled": batch_scaled,
            "step_rank_drift": step_rank_drift, "wide_plateau": wide_plateau}
OPTIMA = {"lora_scale": 0.60, "rslora_asymmetric": 0.90, "batch_scaled": 0.70, "step_rank_drift": 0.80, "wide_plateau": 0.50}
BEST_POINTS = {
    "lora_scale": [{"lora_rank": 32, "lora_alpha": a, "learning_rate": 5e-5 * 32 / a, "batch_size": 2}
                   for a in (16, 32, 64, 128)],
    "rslora_asymmetric": [{"lora_rank": 16, "lora_alpha": a, "learning_rate": 1.6e-2 / a, "batch_size": 2}
                          for a in (32, 64, 128)],
    "batch_scaled": [{"lora_rank": 16, "lora_alpha": a, "learning_rate": 2e-4 * math.sqrt(2) * 16 / a, "batch_size": 2}
                     for a in (16, 32, 64, 128)],
    "step_rank_drift": [{"lora_rank": 32, "lora_alpha": a, "learning_rate": 8e-5 / math.sqrt(2) * 32 / a, "batch_size": 4}
                        for a in (16, 32, 64, 128)],
    "wide_plateau": [{"lora_rank": 8, "lora_alpha": a, "learning_rate": 8e-5 * 8 / a, "batch_size": 4} for a in (16, 32)],
}
CENTRE = {"lora_rank": 32, "lora_alpha": 64, "learning_rate": math.sqrt(1e-5 * 5e-4), "batch_size": 2}  # Ax's first point


def observe(name: str, noise: float = 0.0):
    """The objective a search sees: ``(params, rng) -> value``, with Gaussian noise of sd ``noise``."""
    f = SURFACES[name]

    def objective(p: dict, rng: random.Random | None = None) -> float:
        value = f(p)
        return value + rng.gauss(0.0, noise) if noise and rng is not None else value

    return objective


def check() -> None:
    """Each documented optimum is the minimum of a fine grid and is not at a corner of the space."""
    lrs = [math.exp(math.log(1e-5) + (math.log(5e-4) - math.log(1e-5)) * i / 400) for i in range(401)]
    for name, f in SURFACES.items():
        best = min(f({"lora_rank": r, "lora_alpha": a, "learning_rate": lr, "batch_size": b})
                   for r in (8, 16, 32, 64) for a in (16, 32, 64, 128) for b in (1, 2, 4) for lr in lrs)
        assert OPTIMA[name] <= best + 1e-12 and best - OPTIMA[name] < 1e-3, (name, best)
        for point in BEST_POINTS[name]:
            assert abs(f(point) - OPTIMA[name]) < 1e-12 and 1e-5 < point["learning_rate"] <= 5e-4, (name, point)
        print(f"{name}: optimum {OPTIMA[name]}, centre {f(CENTRE) - OPTIMA[name]:+.4f}, "
              f"baseline {f(BASELINE) - OPTIMA[name]:+.4f}, grid minimum {best:.6f}")


if __name__ == "__main__":
    check()
