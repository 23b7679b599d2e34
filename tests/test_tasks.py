"""Parallel-decoding tasks: prompts, reference answers and validators (valid and invalid answers)."""

from __future__ import annotations

import json
import random

import pytest

from sampler.embedded.tasks import CATEGORIES, CITIES, TASKS, make_task_examples, task_training_pair, validate


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_answers_are_valid_and_varied(name):
    task = TASKS[name]
    rng = random.Random(0)
    answers = set()
    for _ in range(200):
        ex = task.make_prompt(rng)
        assert ex["task"] == name and ex["prompt"]
        ans = task.reference_answer(ex, rng)
        assert validate(ex, ans), (ex, ans)
        assert ans.startswith(" ")  # answers follow the prompt after one space, as in training
        answers.add((ex["prompt"], ans))
    # many correct answers: the point of the tasks (the city list is closed: all of it)
    assert len(answers) >= (len(CITIES) if name == "city" else 100)


@pytest.mark.parametrize("answer,ok", [
    (" San Francisco", True), ("San Diego", True), (" Salt Lake City ", True), (" Rio de Janeiro", True),
    (" San York", False), (" New Francisco", False), (" Los Vegas", False), (" San", False), ("", False),
    (" San Francisco San Diego", False), (" san francisco", False), (" Salt Lake", False),
])
def test_city_validator(answer, ok):
    assert validate({"task": "city", "prompt": "Name a city:"}, answer) is ok


@pytest.mark.parametrize("answer,ok", [
    (" fox cat owl", True), (" cat fox owl", True), (" owl fox cat", True),
    (" fox fox owl", False), (" fox cat", False), (" fox cat owl dog", False), (" fox cat owls", False),
    ("", False), (" fox, cat, owl", False),
])
def test_shuffle_validator(answer, ok):
    ex = {"task": "shuffle", "prompt": "Shuffle: cat fox owl =", "items": ["cat", "fox", "owl"]}
    assert validate(ex, answer) is ok


@pytest.mark.parametrize("answer,ok", [
    (" cat, dog, owl", True), (" bear, hen, fox", True), ("cat,dog,owl", True),
    (" cat, cat, owl", False), (" cat, dog", False), (" cat, dog, owl, fox", False),
    (" cat, dog, red", False), (" cat dog owl", False), ("", False), (" cat, dog,", False),
])
def test_distinct_validator(answer, ok):
    ex = {"task": "distinct", "prompt": "Name three different animals:", "category": "animals", "n": 3}
    assert validate(ex, answer) is ok


def test_marginal_style_mixtures_are_invalid():
    """What sampling answer tokens independently produces: mixed city names, repeated items."""
    firsts = {c.split()[0] for c in CITIES}
    seconds = {c.split()[-1] for c in CITIES}
    mixed = {f"{a} {b}" for a in firsts for b in seconds} - set(CITIES)
    assert len(mixed) > 50
    assert not any(validate({"task": "city"}, " " + m) for m in mixed)
    for cat, items in CATEGORIES.items():
        ex = {"task": "distinct", "category": cat, "n": 2}
        assert not validate(ex, f" {items[0]}, {items[0]}")
        assert validate(ex, f" {items[0]}, {items[1]}")


def test_make_task_examples_is_deterministic_and_round_robin():
    a = make_task_examples(30, seed=5)
    assert a == make_task_examples(30, seed=5)
    assert a != make_task_examples(30, seed=6)
    assert [e["task"] for e in a[:3]] == sorted(TASKS)
    assert {e["task"] for e in make_task_examples(10, seed=1, tasks=["city"])} == {"city"}
    json.dumps(a)  # prompt files are JSONL
    with pytest.raises(KeyError):
        make_task_examples(3, seed=0, tasks=["nope"])
    with pytest.raises(KeyError):
        validate({"task": "nope"}, "x")


def test_training_pairs_cover_every_task():
    rng = random.Random(3)
    prompts = {task_training_pair(rng)[0].split()[0] for _ in range(100)}
    assert {"Name", "Shuffle:"} <= prompts
