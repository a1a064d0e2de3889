"""The bundled "AI Director" demo dataset: scene description -> shot and direction plan.

Generated here, deterministically, from a few tables of film-craft rules, so that a model can learn
the mapping (mood -> lighting and pacing, cast size -> framing, place -> lens and sound, action ->
camera movement). ``python -m loratune.demo.dataset`` rewrites the shipped JSONL files; a test checks
that they match this code. 185 examples: 148 for training, as in Module 4.5, and 37 for validation;
and 37 more, by the same rules, as the test split that a study never sees (scenes of their own).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TRAIN_FILE = HERE / "ai_director_train.jsonl"
VALIDATION_FILE = HERE / "ai_director_validation.jsonl"
TEST_FILE = HERE / "ai_director_test.jsonl"
N_TRAIN, N_VALIDATION, N_TEST = 148, 37, 37
SEED = 2026

SYSTEM = "You are a film director. Turn each scene into a shot plan."

PLACES = {  # place -> (lens, ambient sound)
    "a rain-soaked alley": ("35mm", "rain on metal"),
    "a crowded night market": ("24mm", "vendors calling"),
    "an empty hospital corridor": ("50mm", "humming lights"),
    "a desert highway": ("85mm", "wind over sand"),
    "a small kitchen": ("35mm", "a kettle hissing"),
    "a mountain cabin": ("50mm", "a crackling fire"),
    "a subway platform": ("24mm", "a train braking"),
    "a school gym": ("28mm", "sneakers squeaking"),
    "a rooftop garden": ("85mm", "distant traffic"),
    "an old library": ("50mm", "pages turning"),
    "a fishing harbor": ("35mm", "gulls and waves"),
    "a neon arcade": ("24mm", "electronic chimes"),
}
TIMES = ["at dawn", "at noon", "at dusk", "at night", "in the early morning", "late in the evening"]
MOODS = {  # mood -> (lighting, pacing)
    "tense": ("low-key light with hard shadows", "quick cuts"),
    "tender": ("soft warm window light", "long takes"),
    "joyful": ("bright high-key light", "lively rhythmic cuts"),
    "melancholic": ("cool blue ambient light", "slow lingering takes"),
    "mysterious": ("pools of light in darkness", "measured reveals"),
    "chaotic": ("flickering mixed sources", "jagged handheld cuts"),
}
CASTS = {  # cast -> framing
    "A lone woman": "a single close-up",
    "A lone man": "a single close-up",
    "Two old friends": "a two-shot at medium distance",
    "Two rivals": "an over-the-shoulder pair",
    "A family of four": "a wide group shot",
    "A group of strangers": "a wide ensemble shot",
}
SINGULAR_CASTS = {"A lone woman", "A lone man", "A family of four", "A group of strangers"}
ACTIONS = {  # action (plural verb form) -> camera movement
    "wait for a phone call": "a locked-off frame",
    "argue about a lost letter": "a slow push-in",
    "run from an unseen threat": "a fast tracking shot",
    "share a quiet meal": "a gentle dolly around the table",
    "search for a missing key": "a searching pan",
    "say goodbye": "a slow pull-out",
    "discover a hidden door": "a crane up to reveal",
    "dance to an old song": "a floating steadicam",
}


def make_example(rng: random.Random) -> dict:
    place, time = rng.choice(sorted(PLACES)), rng.choice(TIMES)
    mood, cast, action = rng.choice(sorted(MOODS)), rng.choice(sorted(CASTS)), rng.choice(sorted(ACTIONS))
    lens, sound = PLACES[place]
    lighting, pacing = MOODS[mood]
    verb, rest = action.split(" ", 1)
    if cast in SINGULAR_CASTS:
        verb += "es" if verb.endswith("ch") else "s"
    scene = f"{cast} {verb} {rest} in {place} {time}. The mood is {mood}."
    plan = (
        f"Framing: {CASTS[cast]}. Lens: {lens}. Movement: {ACTIONS[action]}. "
        f"Lighting: {lighting}. Pacing: {pacing}. Sound: {sound}."
    )
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": scene},
            {"role": "assistant", "content": plan},
        ]
    }


def generate() -> tuple[list[dict], list[dict], list[dict]]:
    """Return (train, validation, test) rows; distinct scenes, always the same ones (the test rows come
    after the others, which are as they were before the demo had a test split)."""
    rng = random.Random(SEED)
    rows, seen = [], set()
    while len(rows) < N_TRAIN + N_VALIDATION + N_TEST:
        row = make_example(rng)
        scene = row["messages"][1]["content"]
        if scene not in seen:
            seen.add(scene)
            rows.append(row)
    return rows[:N_TRAIN], rows[N_TRAIN:N_TRAIN + N_VALIDATION], rows[N_TRAIN + N_VALIDATION:]


def pretraining_corpus(n: int = 3000, seed: int = 7) -> list[str]:
    """Text in the demo's vocabulary with scenes and plans paired at random.

    The tiny base model learns the words and the chat format from it, but not which plan goes with
    which scene: that is what the LoRA fine-tune has to learn.
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = make_example(rng), make_example(rng)
        texts.append(
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{a['messages'][1]['content']}<|im_end|>\n"
            f"<|im_start|>assistant\n{b['messages'][2]['content']}<|im_end|>\n"
        )
    return texts


def write_files() -> None:
    for path, rows in zip((TRAIN_FILE, VALIDATION_FILE, TEST_FILE), generate(), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write_files()
    print(f"wrote {TRAIN_FILE}, {VALIDATION_FILE} and {TEST_FILE}")
