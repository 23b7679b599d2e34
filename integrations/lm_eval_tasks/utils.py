"""The `jointgen_tasks` task's documents and metric (lm-eval loads this file through `!function`)."""

from __future__ import annotations

import json

from sampler.embedded.acceptance import TASK_PROMPTS
from sampler.embedded.tasks import validate


def load_docs(**_: object) -> dict:
    """{"test": the held-out task prompts} as a `datasets.Dataset`; lm-eval passes the task's metadata as
    keywords, which the prompts do not need."""
    import datasets

    rows = [json.loads(line) for line in TASK_PROMPTS.read_text().splitlines() if line.strip()]
    keys = sorted({k for r in rows for k in r})  # tasks have different fields: absent ones are None
    return {"test": datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"valid": float(validate(doc, results[0]))}
