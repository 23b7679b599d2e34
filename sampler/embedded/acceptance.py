"""The embedded default backbone's held-out prompt files and its acceptance check.

    jointgen pretrain prompts      # (re)write sampler/assets/prompts/*.jsonl
    jointgen pretrain check        # task validity and judge NLL, exact vs marginal k=4

The check shows the method's premise on the shipped checkpoint: exact decoding (one token per full
pass) answers the parallel-decoding tasks validly, marginal decoding at k=4 breaks the dependencies
between answer tokens, and the autoregressive judge prefers exact language samples. Scores come from
`sampler.metrics`, the same code the evaluation job uses.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from sampler.backbone import DEFAULT_BACKBONE, DEFAULT_JUDGE, load_backbone
from sampler.decode import encode_prompts, generate
from sampler.embedded.corpus import load_corpus
from sampler.embedded.tasks import make_task_examples, validate
from sampler.metrics import judge_score, mean_se, per_token_nll, truncate_at_eos, validity

PROMPTS_DIR = DEFAULT_BACKBONE.parent / "prompts"
LANGUAGE_PROMPTS = PROMPTS_DIR / "language.jsonl"
TASK_PROMPTS = PROMPTS_DIR / "tasks.jsonl"
PROMPT_SEED = 20250927
TASK_GEN_LENGTH = 16  # answers are at most ~12 tokens; the rest is the EOS tail the model learnt
LANGUAGE_GEN_LENGTH = 63  # BOS + 63 = the 64-token training window


def write_prompt_files(n_language: int = 200, n_tasks: int = 300) -> None:
    """Held-out prompts: the start (3-6 words) of validation-split fortunes, and fresh task prompts."""
    PROMPTS_DIR.mkdir(parents=True, exist_ok=True)
    val = load_corpus()["val"]
    rng = random.Random(PROMPT_SEED)
    rows = []
    for i, rec in enumerate(rng.sample(val, min(n_language, len(val)))):
        words = rec.split()
        k = min(len(words) - 1, rng.randint(3, 6))
        rows.append({"id": f"lang-{i:04d}", "prompt": " ".join(words[:k]), "reference": rec,
                     "source": "fortunes/val"})
    LANGUAGE_PROMPTS.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = make_task_examples(n_tasks, seed=PROMPT_SEED)
    TASK_PROMPTS.write_text("".join(json.dumps({"id": f"task-{i:04d}", **ex}) + "\n"
                                    for i, ex in enumerate(tasks)))
    print(f"wrote {len(rows)} prompts to {LANGUAGE_PROMPTS} and {len(tasks)} to {TASK_PROMPTS}")


def answer_texts(backbone, tokens: list[list[int]]) -> list[str]:
    """The generated answers: text before the first EOS (decoding drops the EOS itself)."""
    return [backbone.tokenizer.decode(truncate_at_eos(t, backbone.eos_id), skip_special_tokens=True)
            for t in tokens]


def check(backbone_path: Path | None, judge_path: Path | None, *, n_task: int, n_lang: int, k: int,
          seed: int, batch: int, show: int) -> dict:
    bb = load_backbone(backbone_path)
    report: dict = {"backbone": bb.name, "identity": bb.identity, "k": k, "seed": seed}

    def run(prompts: list[list[int]], mode: str, kk: int, gen_length: int) -> list[list[int]]:
        toks = []
        for a in range(0, len(prompts), batch):
            r = generate(bb, prompts[a:a + batch], mode=mode, k=kk, gen_length=gen_length,
                         seed=seed + a)
            toks += r.tokens
        return toks

    # --- tasks -----------------------------------------------------------------------------------
    examples = make_task_examples(n_task, seed=seed)
    prompts = encode_prompts(bb, [ex["prompt"] for ex in examples])
    report["tasks"] = {}
    for mode, kk in (("exact", 1), ("marginal", k)):
        t0 = time.time()
        answers = answer_texts(bb, run(prompts, mode, kk, TASK_GEN_LENGTH))
        v = validity(examples, answers)
        key = f"{mode}_k{kk}"
        report["tasks"][key] = {"all": {a: v[a] for a in ("mean", "se", "n")}, **v["per_task"],
                                "seconds": round(time.time() - t0, 1),
                                "samples": [{"prompt": ex["prompt"], "answer": ans,
                                             "valid": validate(ex, ans)}
                                            for ex, ans in list(zip(examples, answers, strict=True))[:show]]}
        print(json.dumps({key: {t: v for t, v in report["tasks"][key].items() if t != "samples"}}),
              flush=True)

    # --- language: unconditional samples from [BOS], scored by the judge ------------------------
    judge_path = judge_path or DEFAULT_JUDGE
    judge = load_backbone(judge_path, require_mask=False) if (Path(judge_path) / "config.json").exists() \
        else None
    report["language"] = {}
    if n_lang:
        prompts = encode_prompts(bb, n=n_lang)
        for mode, kk in (("exact", 1), ("marginal", k)):
            t0 = time.time()
            toks = run(prompts, mode, kk, LANGUAGE_GEN_LENGTH)
            key = f"{mode}_k{kk}"
            entry: dict = {"seconds": round(time.time() - t0, 1),
                           "samples": [bb.tokenizer.decode(t, skip_special_tokens=False)
                                       for t in toks[:show]]}
            if judge is not None:
                s = judge_score(judge, prompts, toks, batch_size=batch, features=False)
                entry["judge_nll_per_token"] = mean_se(per_token_nll(s["nll_sum"], s["n_tokens"]))
            report["language"][key] = entry
            print(json.dumps({key: {a: b for a, b in entry.items() if a != "samples"}}), flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="jointgen pretrain check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", type=Path, default=None, help="default: the embedded backbone")
    p.add_argument("--judge", type=Path, default=None, help="default: the embedded judge")
    p.add_argument("--n-task", type=int, default=300, help="task prompts (round-robin over tasks)")
    p.add_argument("--n-lang", type=int, default=200, help="unconditional language samples per mode")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--show", type=int, default=10, help="samples kept in the report per set")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rep = check(a.backbone, a.judge, n_task=a.n_task, n_lang=a.n_lang, k=a.k, seed=a.seed,
                batch=a.batch, show=a.show)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rep, indent=1) + "\n")
    for key, v in rep["tasks"].items():
        print(f"\n== tasks {key}")
        for s in v["samples"]:
            print(f"  [{'ok' if s['valid'] else 'XX'}] {s['prompt']!r} -> {s['answer']!r}")
    for key, v in rep["language"].items():
        print(f"\n== language {key}")
        for s in v["samples"]:
            print("  " + repr(s))
