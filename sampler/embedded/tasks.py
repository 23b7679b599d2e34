"""Parallel-decoding tasks: short prompts with many correct answers whose tokens depend on each other.

Sampling several answer tokens from one pass's marginals breaks them (a city called "San York", a
"permutation" that repeats an item, a list of "different" animals that names the same one twice),
while sampling from the joint, one token per pass, does not. Each task generates fresh prompts from
a seeded `random.Random`, draws one random valid answer (training data for the embedded backbone),
and validates an answer. Pure Python: the evaluation and the tests use it without torch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Closed list of multi-word city names; many share a first word, so marginals mix them up.
CITIES: tuple[str, ...] = (
    "San Francisco", "San Diego", "San Jose", "San Antonio", "New York", "New Orleans",
    "New Delhi", "Los Angeles", "Las Vegas", "Santa Fe", "Santa Monica", "Salt Lake City",
    "Hong Kong", "Buenos Aires", "Cape Town", "Tel Aviv", "Rio de Janeiro", "Mexico City",
    "Kuala Lumpur", "Saint Louis",
)

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "fox", "owl", "cow", "pig", "bee", "rat", "hen", "bear"),
    "colors": ("red", "blue", "green", "gold", "pink", "black", "white", "gray", "brown", "purple"),
    "fruits": ("apple", "pear", "plum", "lime", "lemon", "mango", "peach", "grape", "melon", "kiwi"),
}

# items for permutations: short words, one or two tokens each
SHUFFLE_ITEMS: tuple[str, ...] = (
    "cat", "dog", "fox", "owl", "red", "blue", "green", "gold", "sun", "moon", "star", "tree",
    "king", "queen", "ship", "rock", "fish", "bird", "rain", "snow", "milk", "salt", "bread", "wine",
)

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def _words(answer: str) -> list[str]:
    return answer.split()


@dataclass(frozen=True)
class Task:
    """A task: `make_prompt(rng)` -> example dict with `task` and `prompt` (and what the validator
    needs); `reference_answer(example, rng)` -> one random valid answer; `is_valid(example, answer)`."""

    name: str
    description: str
    make_prompt: Callable[[random.Random], dict]
    reference_answer: Callable[[dict, random.Random], str]
    is_valid: Callable[[dict, str], bool]


# --- one name from a closed list of multi-token names ----------------------------------------------

def _city_prompt(rng: random.Random) -> dict:
    return {"task": "city", "prompt": "Name a city:"}


def _city_answer(example: dict, rng: random.Random) -> str:
    return " " + rng.choice(CITIES)


def _city_valid(example: dict, answer: str) -> bool:
    return " ".join(_words(answer)) in CITIES


# --- a random permutation of n given items ------------------------------------------------------------

def _shuffle_prompt(rng: random.Random) -> dict:
    items = rng.sample(SHUFFLE_ITEMS, rng.randint(3, 5))
    return {"task": "shuffle", "prompt": "Shuffle: " + " ".join(items) + " =", "items": items}


def _shuffle_answer(example: dict, rng: random.Random) -> str:
    items = list(example["items"])
    rng.shuffle(items)
    return " " + " ".join(items)


def _shuffle_valid(example: dict, answer: str) -> bool:
    return sorted(_words(answer)) == sorted(example["items"])


# --- n distinct items from a named category ---------------------------------------------------------

def _distinct_prompt(rng: random.Random) -> dict:
    category = rng.choice(sorted(CATEGORIES))
    n = rng.randint(2, 4)
    return {"task": "distinct", "prompt": f"Name {NUMBER_WORDS[n]} different {category}:",
            "category": category, "n": n}


def _distinct_answer(example: dict, rng: random.Random) -> str:
    return " " + ", ".join(rng.sample(CATEGORIES[example["category"]], example["n"]))


def _distinct_valid(example: dict, answer: str) -> bool:
    parts = [p.strip() for p in answer.split(",")]
    allowed = CATEGORIES[example["category"]]
    return (len(parts) == example["n"] and len(set(parts)) == len(parts)
            and all(p in allowed for p in parts))


TASKS: dict[str, Task] = {
    "city": Task("city", "one city from a closed list of multi-word names", _city_prompt,
                 _city_answer, _city_valid),
    "shuffle": Task("shuffle", "a permutation of 3-5 given words", _shuffle_prompt,
                    _shuffle_answer, _shuffle_valid),
    "distinct": Task("distinct", "2-4 different items of a named category", _distinct_prompt,
                     _distinct_answer, _distinct_valid),
}


def validate(example: dict, answer: str) -> bool:
    """Is `answer` (the generated text after the prompt, up to EOS) a valid answer to `example`?"""
    if example.get("task") not in TASKS:
        raise KeyError(f"unknown task {example.get('task')!r}; known: {sorted(TASKS)}")
    return bool(TASKS[example["task"]].is_valid(example, answer))


def make_task_examples(n: int, seed: int, tasks: Iterable[str] | None = None) -> list[dict]:
    """n prompts (round-robin over `tasks`, default all), deterministic in `seed`, without answers."""
    names = list(tasks) if tasks is not None else sorted(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    rng = random.Random(seed)
    return [TASKS[names[i % len(names)]].make_prompt(rng) for i in range(n)]


def task_training_pair(rng: random.Random, tasks: Iterable[str] | None = None) -> tuple[str, str]:
    """(prompt, answer) of a random task with a random valid answer: the backbone's task data."""
    names = sorted(tasks) if tasks is not None else sorted(TASKS)
    task = TASKS[rng.choice(names)]
    ex = task.make_prompt(rng)
    return ex["prompt"], task.reference_answer(ex, rng)
