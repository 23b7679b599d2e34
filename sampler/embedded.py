"""The embedded default backbone's held-out prompt files and its acceptance check.

    python -m sampler.pretrain prompts      # (re)write sampler/assets/prompts/*.jsonl
    python -m sampler.pretrain check        # task validity and judge NLL, exact vs marginal k=4

The check shows the method's premise on the shipped checkpoint: exact decoding (one token per full
pass) answers the parallel-decoding tasks validly, marginal decoding at k=4 breaks the dependencies
between answer tokens, and the autoregressive judge prefers exact language samples.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPTS_DIR = Path(__file__).parent / "assets" / "prompts"
LANGUAGE_PROMPTS = PROMPTS_DIR / "language.jsonl"
TASK_PROMPTS = PROMPTS_DIR / "tasks.jsonl"
PROMPT_SEED = 20250927
TASK_GEN_LENGTH = 16  # answers are at most ~12 tokens; the rest is the EOS tail the model learnt
LANGUAGE_GEN_LENGTH = 63  # BOS + 63 = the 64-token training window


def write_prompt_files(n_language: int = 200, n_tasks: int = 300) -> None:
    """Held-out prompts: the start (3-6 words) of validation-split fortunes, and fresh task prompts."""
    from sampler.corpus import load_corpus
    from sampler.tasks import make_task_examples

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


def load_prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def answer_text(tokenizer, tokens: list[int], eos_id: int) -> str:
    """The generated answer: the text before the first EOS."""
    if eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def mean_se(xs: list[float]) -> dict:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan")
    return {"mean": m, "se": math.sqrt(var / n), "n": n}


@torch.no_grad()
def judge_nll(judge, prompts: list[list[int]], gens: list[list[int]], batch: int = 64) -> list[float]:
    """Per-sample mean NLL (nats/token) of the generated tokens under the causal judge."""
    out = []
    for a in range(0, len(gens), batch):
        rows = [p + g for p, g in zip(prompts[a:a + batch], gens[a:a + batch], strict=True)]
        L = max(map(len, rows))
        ids = torch.full((len(rows), L), judge.pad_id, dtype=torch.long)
        att = torch.zeros(len(rows), L, dtype=torch.bool)
        scored = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, (r, p) in enumerate(zip(rows, prompts[a:a + batch], strict=True)):
            ids[i, L - len(r):] = torch.tensor(r)
            att[i, L - len(r):] = True
            scored[i, L - len(r) + len(p):] = True
        h = judge.hidden(ids, None if bool(att.all()) else att)
        logp = F.log_softmax(judge.logits(h).float(), -1)
        nll = -logp.gather(-1, ids[..., None]).squeeze(-1)
        out += ((nll * scored).sum(1) / scored.sum(1)).tolist()
    return out


def check(backbone_path: Path | None, judge_path: Path | None, *, n_task: int, n_lang: int, k: int,
          seed: int, batch: int, show: int) -> dict:
    from sampler.backbone import DEFAULT_JUDGE, load_backbone
    from sampler.decode import generate
    from sampler.tasks import make_task_examples, validate

    bb = load_backbone(backbone_path)
    tok = bb.tokenizer
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
    prompts = [tok(ex["prompt"])["input_ids"] for ex in examples]
    report["tasks"] = {}
    for mode, kk in (("exact", 1), ("marginal", k)):
        t0 = time.time()
        toks = run(prompts, mode, kk, TASK_GEN_LENGTH)
        answers = [answer_text(tok, t, bb.eos_id) for t in toks]
        per: dict[str, list[float]] = {}
        for ex, ans in zip(examples, answers, strict=True):
            per.setdefault(ex["task"], []).append(float(validate(ex, ans)))
        key = f"{mode}_k{kk}"
        report["tasks"][key] = {"all": mean_se(sum(per.values(), [])),
                                **{t: mean_se(v) for t, v in sorted(per.items())},
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
        prompts = [[bb.bos_id] for _ in range(n_lang)]
        for mode, kk in (("exact", 1), ("marginal", k)):
            t0 = time.time()
            toks = run(prompts, mode, kk, LANGUAGE_GEN_LENGTH)
            key = f"{mode}_k{kk}"
            entry: dict = {"seconds": round(time.time() - t0, 1),
                           "samples": [tok.decode(t, skip_special_tokens=False) for t in toks[:show]]}
            if judge is not None:
                entry["judge_nll_per_token"] = mean_se(judge_nll(judge, prompts, toks))
            report["language"][key] = entry
            print(json.dumps({key: {a: b for a, b in entry.items() if a != "samples"}}), flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sampler.pretrain check", description=__doc__,
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
