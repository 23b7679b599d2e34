"""Decoding a masked diffusion LM: exact (one token per full pass), marginal (k tokens from one pass's
distributions) and joint (one full pass, then the sampler after every sampled token; DESIGN 1.2).

`generate` is the whole algorithm, batched, top to bottom. Only positions that can still be chosen go
through the LM head, and the k-loop does no host synchronisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sampler.backbone import Backbone
from sampler.joint import JointSampler
from sampler.model import Context

MODES = ("exact", "marginal", "joint")
POLICIES = ("entropy", "confidence", "margin", "random")


@dataclass
class GenerateResult:
    prompt_ids: list[list[int]]
    tokens: list[list[int]]  # gen_length ids per row (EOS-filled after an EOS when stop_at_eos)
    text: list[str]
    order: list[list[int]]  # generated positions (0-based from the first generated one), unmask order
    full_passes: int  # batch full passes
    sampler_passes: int  # batch sampler passes
    row_full_passes: list[int] = field(default_factory=list)  # passes in which each row decoded a token
    wall_s: float = 0.0

    @property
    def decoded_tokens(self) -> int:
        return sum(len(o) for o in self.order)

    @property
    def tokens_per_pass(self) -> float:
        """Mean over rows of tokens decoded per full pass that decoded something for that row."""
        rates = [len(o) / p for o, p in zip(self.order, self.row_full_passes, strict=True) if p]
        return sum(rates) / max(len(rates), 1)


# a finite stand-in for -inf: exp() gives exactly 0 and 0 * NEG stays 0, so entropies need no clamping
NEG = -1e9


def log_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Log-probabilities after temperature and nucleus filtering (temperature 0 scores at temperature
    1); tokens outside the nucleus get NEG. One log_softmax: cheaper than softmax then log."""
    logp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
    if top_p < 1.0:
        sorted_lp, idx = logp.sort(dim=-1, descending=True)
        sorted_p = sorted_lp.exp()
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # keep the smallest prefix reaching top_p
        logp = torch.log_softmax(logp.scatter(-1, idx, sorted_lp.masked_fill(drop, NEG)), dim=-1)
    return logp


def candidate_logits(backbone: Backbone, h: Tensor, positions: Tensor) -> Tensor:
    """Logits at `positions` ([B, M] columns of the sequence); the mask token can never be sampled."""
    logits = backbone.logits(h, positions)
    logits[..., backbone.mask_id] = NEG
    return logits


def position_scores(logp: Tensor, policy: str, gen: torch.Generator | None) -> Tensor:
    """Higher = decode first. logp: [B, M, V] -> [B, M]."""
    if policy == "entropy":
        return (logp.exp() * logp).sum(-1)  # minus entropy
    if policy == "confidence":
        return logp.max(-1).values  # log of the top probability: the same order
    if policy == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    return torch.rand(logp.shape[:2], generator=gen, device=logp.device)


def _log_probs_and_scores(logits: Tensor, temperature: float, policy: str) -> tuple[Tensor, Tensor]:
    logp = log_probs(logits, temperature, 1.0)
    return logp, position_scores(logp, policy, None)


_FUSED: Callable | None = None  # the compiled _log_probs_and_scores, when compile_read_out() is on


def compile_read_out(enabled: bool = True) -> None:
    """Fuse the elementwise half of the read-out (log-softmax and position scores over [B, M, V]) into
    one kernel with torch.compile: on CPU at batch 16 it is 10x faster than the five eager passes and
    was 70% of a sampler step (benchmarks/decode_speed.py --compile). Off by default: compiling costs
    seconds per process (dynamic shapes: once, not per candidate count). Top-p < 1 and the random
    policy stay eager."""
    global _FUSED
    _FUSED = torch.compile(_log_probs_and_scores, dynamic=True) if enabled else None


def read_out(backbone: Backbone, h: Tensor, cand: Tensor, temperature: float, top_p: float, policy: str,
             gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Log-probabilities [B, M, V] at the candidate columns and their position scores [B, M]."""
    logits = candidate_logits(backbone, h, cand)
    if _FUSED is not None and top_p >= 1.0 and policy != "random":
        return _FUSED(logits, temperature, policy)
    logp = log_probs(logits, temperature, top_p)
    return logp, position_scores(logp, policy, gen)


@torch.inference_mode()
def unmask_step(backbone: Backbone, x: Tensor, cand: Tensor, valid: Tensor, *, ctx: Context,
                attn_mask: Tensor | None, sampler: JointSampler | None, k: int, temperature: float,
                top_p: float, policy: str, gen: torch.Generator,
                eos_region: Tensor | None = None) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """One full pass, then up to k tokens per row written into `x` in place (DESIGN 1.2): with a
    sampler, a sampler pass after each token but the last, so later tokens see earlier ones; without,
    all k from the full pass's distributions (marginal).

    cand [B, M]: candidate columns of x; valid [B, M]: which of them may still be chosen (updated in
    place). With `eos_region` ([B, L] bool, the generated columns), a sampled EOS ends its row: later
    masked columns of the region become EOS and leave the candidates. No host synchronisation.
    Returns ([(go, column)] per token slot: which rows decoded a token and where), sampler passes.
    """
    rows = torch.arange(x.shape[0], device=x.device)
    cols = torch.arange(x.shape[1], device=x.device)
    h = backbone.hidden(x, attn_mask, ctx)  # the full pass
    logp, scores = read_out(backbone, h, cand, temperature, top_p, policy, gen)
    picks, sampler_passes, n = [], 0, min(k, cand.shape[1])
    for j in range(n):
        go = valid.any(1)
        pick = scores.masked_fill(~valid, float("-inf")).argmax(1)  # [B]
        lp = logp[rows, pick]
        if temperature == 0:
            token = lp.argmax(-1)
        else:
            token = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)
        pos = cand[rows, pick]
        x[rows, pos] = torch.where(go, token, x[rows, pos])
        valid[rows, pick] = False
        picks.append((go, pos))
        if eos_region is not None and backbone.eos_id is not None:
            hit = go & (token == backbone.eos_id)
            after = hit[:, None] & (cols[None] > pos[:, None]) & eos_region
            x.masked_fill_(after & (x == backbone.mask_id), backbone.eos_id)
            valid &= ~torch.gather(after, 1, cand)
        if sampler is not None and j < n - 1:
            h = sampler(backbone.embed(x), h, ctx)
            sampler_passes += 1
            logp, scores = read_out(backbone, h, cand, temperature, top_p, policy, gen)
    return picks, sampler_passes


def candidates(masked: Tensor, block_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates: still-masked columns in each row's current (first unfinished) block. masked,
    block_id: [B, L]. Returns (cand [B, M] columns, valid [B, M], counts [B]); M = 0 when done.
    The one host synchronisation per full pass is here (M)."""
    big = torch.iinfo(block_id.dtype).max
    first_block = torch.where(masked, block_id, big).min(dim=1, keepdim=True).values
    allowed = masked & (block_id == first_block)
    counts = allowed.sum(1)
    M = int(counts.max())
    cand = torch.sort((~allowed).to(torch.int8), dim=1, stable=True).indices[:, :M]
    return cand, torch.gather(allowed, 1, cand), counts


def check_args(backbone: Backbone, prompts: Sequence[Sequence[int]], sampler: JointSampler | None,
               mode: str, k: int, gen_length: int, temperature: float, top_p: float, policy: str,
               block_length: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (tokens per full pass) must be an integer >= 1, got {k!r}")
    if mode == "joint" and sampler is None:
        raise ValueError("mode='joint' needs a sampler (JointSampler); none was given")
    if sampler is not None:
        sampler.check_backbone(backbone)
    if gen_length < 1:
        raise ValueError(f"gen_length must be >= 1, got {gen_length}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if block_length is not None and block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    vocab = backbone.args.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (unconditional generation starts from [BOS])")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
    longest = max(len(p) for p in prompts)
    if longest + gen_length > backbone.args.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + gen_length {gen_length} exceeds the context "
                         f"of {backbone.args.max_seq_len}")


@torch.inference_mode()
def generate(
    backbone: Backbone,
    prompts: Sequence[Sequence[int]],
    *,
    sampler: JointSampler | None = None,
    mode: str = "exact",
    k: int = 1,
    gen_length: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    policy: str = "entropy",
    block_length: int | None = None,
    stop_at_eos: bool = False,
    seed: int = 0,
    on_step: Callable[[Tensor], None] | None = None,
) -> GenerateResult:
    """Fill `gen_length` masked positions after each prompt (token ids; left-padded into a batch).

    exact: one token per full pass. marginal: k tokens per pass, all from that pass's distributions.
    joint: k tokens per pass; after each one the sampler updates the distributions of the rest.
    With `block_length`, positions are filled block by block, left to right (semi-autoregressive).
    With `stop_at_eos`, an EOS ends its row: later positions become EOS without being decoded.
    `on_step(gen_ids)` is called after every full pass with the generated region (for streaming).
    """
    check_args(backbone, prompts, sampler, mode, k, gen_length, temperature, top_p, policy, block_length)
    t0 = time.perf_counter()
    if mode == "exact":
        k = 1
    dev, mask_id, eos_id = backbone.device, backbone.mask_id, backbone.eos_id
    B, P, G = len(prompts), max(len(p) for p in prompts), gen_length
    x = torch.full((B, P + G), mask_id, dtype=torch.long, device=dev)
    attn = torch.ones(B, P + G, dtype=torch.bool, device=dev)
    for b, p in enumerate(prompts):  # left padding keeps every generated region at columns P..P+G
        x[b, : P - len(p)] = backbone.pad_id if backbone.pad_id is not None else mask_id
        x[b, P - len(p): P] = torch.tensor(list(p), dtype=torch.long)
        attn[b, : P - len(p)] = False
    attn_mask = None if bool(attn.all()) else attn
    ctx = backbone.context(x, attn_mask)  # rotary tables and mask: the same for every pass
    gen = x[:, P:]  # a view: writing it writes x
    block = block_length or G
    block_id = torch.cat([torch.full((P,), G, device=dev), torch.arange(G, device=dev) // block])
    block_id = block_id[None].expand(B, -1)
    region = torch.zeros(B, P + G, dtype=torch.bool, device=dev)
    region[:, P:] = True
    order = torch.full((B, G + 1), -1, dtype=torch.long, device=dev)  # last column: scratch
    n_done = torch.zeros(B, dtype=torch.long, device=dev)
    row_passes = torch.zeros(B, dtype=torch.long, device=dev)
    rng = torch.Generator(device=dev).manual_seed(seed)
    rows = torch.arange(B, device=dev)
    full_passes = sampler_passes = 0

    while True:
        cand, valid, counts = candidates((x == mask_id) & region, block_id)
        if cand.shape[1] == 0:
            break
        row_passes += counts > 0
        picks, n_sampler = unmask_step(
            backbone, x, cand, valid, ctx=ctx, attn_mask=attn_mask,
            sampler=sampler if mode == "joint" else None, k=k, temperature=temperature, top_p=top_p,
            policy=policy, gen=rng, eos_region=region if stop_at_eos else None)
        full_passes, sampler_passes = full_passes + 1, sampler_passes + n_sampler
        for go, pos in picks:
            order[rows, torch.where(go, n_done, G)] = pos - P
            n_done += go
        if on_step is not None:
            on_step(gen.detach().cpu())

    tokens = gen.tolist()
    orders = [o[:n] for o, n in zip(order[:, :G].tolist(), n_done.tolist(), strict=True)]
    text = []
    for row in tokens:
        if stop_at_eos and eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        text.append(backbone.tokenizer.decode(row, skip_special_tokens=True) if backbone.tokenizer else "")
    return GenerateResult(
        prompt_ids=[list(p) for p in prompts], tokens=tokens, text=text, order=orders,
        full_passes=full_passes, sampler_passes=sampler_passes, row_full_passes=row_passes.tolist(),
        wall_s=time.perf_counter() - t0,
    )


def encode_prompts(backbone: Backbone, texts: Sequence[str] | None = None, *, n: int | None = None,
                   chat: bool = False) -> list[list[int]]:
    """Token ids for text prompts (BOS first), chat messages through the tokenizer's chat template when
    `chat`, or `n` unconditional prompts ([BOS])."""
    if texts is None:
        if n is None or backbone.bos_id is None:
            raise ValueError("unconditional prompts need n and a backbone with a BOS token")
        return [[backbone.bos_id] for _ in range(n)]
    tok = backbone.tokenizer
    out = []
    for t in texts:
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # BatchEncoding is no dict
        else:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            if backbone.bos_id is not None and (not ids or ids[0] != backbone.bos_id):
                ids = [backbone.bos_id] + ids
        out.append(list(ids))
    return out

