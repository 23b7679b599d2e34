"""Decoding a masked diffusion LM: exact (one token per full pass), marginal (k tokens from one pass's
distributions), joint (one full pass, then the sampler after every sampled token) and their
confidence-threshold forms (docs/method.md). The generated span follows the prompt and, when infilling,
comes before a suffix.

`generate` is the whole algorithm, batched, top to bottom. Only positions that can still be chosen go
through the LM head, and the k-loop does no host synchronisation (with a threshold: one per pass, and
one per sampler pass, to stop as soon as no row takes another token and to compute only the rows
that go on).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sampler.backbone import Backbone
from sampler.joint import JointSampler
from sampler.kvcache import BlockKVCache
from sampler.model import Context
from sampler.settings import DecodeSettings


@dataclass
class GenerateResult:
    prompt_ids: list[list[int]]
    tokens: list[list[int]]  # the span: gen_length ids per row (EOS-filled after an EOS when stop_at_eos)
    text: list[str]  # the span's text (cut at EOS when stop_at_eos); never the suffix
    order: list[list[int]]  # span positions (0-based from the span's first column), unmask order
    full_passes: int  # batch full passes
    sampler_passes: int  # batch sampler passes
    row_full_passes: list[int] = field(default_factory=list)  # passes in which each row decoded a token
    wall_s: float = 0.0
    suffix_ids: list[list[int]] = field(default_factory=list)  # what followed each span ([] without)

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


def position_scores(logp: Tensor, policy: str, rng: torch.Generator | None) -> Tensor:
    """Higher = decode first. logp: [B, M, V] -> [B, M]."""
    if policy == "entropy":
        return (logp.exp() * logp).sum(-1)  # minus entropy
    if policy == "confidence":
        return logp.max(-1).values  # log of the top probability: the same order
    if policy == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    return torch.rand(logp.shape[:2], generator=rng, device=logp.device)


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
             rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """Log-probabilities [B, M, V] at the candidate columns and their position scores [B, M]."""
    logits = candidate_logits(backbone, h, cand)
    if _FUSED is not None and top_p >= 1.0 and policy != "random":
        return _FUSED(logits, temperature, policy)
    logp = log_probs(logits, temperature, top_p)
    return logp, position_scores(logp, policy, rng)


@torch.inference_mode()
def unmask_step(backbone: Backbone, x: Tensor, cand: Tensor, valid: Tensor, *, ctx: Context,
                attn_mask: Tensor | None, settings: DecodeSettings, sampler: JointSampler | None,
                rng: torch.Generator, eos_region: Tensor | None = None, cache: BlockKVCache | None = None,
                ) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """One full pass, then up to k tokens per row written into `x` in place (docs/method.md).

    Fixed k: with a sampler, a sampler pass after each token but the last, so later tokens see earlier
    ones; without, all k from the full pass's distributions (marginal). With a threshold: every
    candidate whose top probability is >= threshold (and at least the best one) comes from the full
    pass; in joint mode the sampler then decides the uncertain ones one at a time, up to k in all, and
    the loop stops as soon as no row takes another token.

    cand [B, M]: candidate columns of x; valid [B, M]: which of them may still be chosen (updated in
    place). With `eos_region` ([B, L] bool, the generated columns), a sampled EOS ends its row: later
    masked columns of the region become EOS and leave the candidates.
    Returns ([(go, column)] per token slot: which rows decoded a token and where), sampler passes.
    """
    s = settings
    use_sampler = sampler if s.mode == "joint" else None
    rows = torch.arange(x.shape[0], device=x.device)
    cols = torch.arange(x.shape[1], device=x.device)
    used = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # tokens written per row

    def write(allowed: Tensor, logp: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        """The best allowed candidate of each row that has one: sample its token, write it."""
        pick = scores.masked_fill(~allowed, float("-inf")).argmax(1)  # [B]
        return write_at(allowed.any(1), pick, logp[rows, pick])

    def write_at(go: Tensor, pick: Tensor, lp: Tensor) -> tuple[Tensor, Tensor]:
        """Sample a token from `lp` ([B, V]) at candidate `pick` ([B]) of the rows that `go`, write it."""
        if s.temperature == 0:
            token = lp.argmax(-1)
        else:
            token = torch.multinomial(lp.exp(), 1, generator=rng).squeeze(1)
        pos = cand[rows, pick]
        x[rows, pos] = torch.where(go, token, x[rows, pos])
        valid[rows, pick] &= ~go
        used.add_(go.long())
        if eos_region is not None and backbone.eos_id is not None:
            hit = go & (token == backbone.eos_id)
            after = hit[:, None] & (cols[None] > pos[:, None]) & eos_region
            x.masked_fill_(after & (x == backbone.mask_id), backbone.eos_id)
            valid.logical_and_(~torch.gather(after, 1, cand))
        return go, pos

    def planned_read(h: Tensor, pick: Tensor) -> tuple[Tensor, Tensor]:
        """order 'planned': a sampler pass, then the read-out at one planned candidate per row ([B, V])."""
        h = use_sampler(backbone.embed(x), h, ctx, cache)
        logits = candidate_logits(backbone, h, cand[rows, pick][:, None])
        return h, log_probs(logits, s.temperature, s.top_p)[:, 0]

    def sampler_read(h: Tensor, logp: Tensor, scores: Tensor, live: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A sampler pass and its read-out. Without a cache only the rows that go on (`live` [B] bool)
        are computed: the others' h, logp and scores stay as they were, and none of them is read."""
        idx = None if cache is not None else live.nonzero().squeeze(1)  # a cache holds every row
        if idx is None or idx.numel() == live.numel():
            h = use_sampler(backbone.embed(x), h, ctx, cache)
            return (h, *read_out(backbone, h, cand, s.temperature, s.top_p, s.policy, rng))
        h_live = use_sampler(backbone.embed(x[idx]), h[idx], ctx.rows(idx))
        lp, sc = read_out(backbone, h_live, cand[idx], s.temperature, s.top_p, s.policy, rng)
        return h.index_copy(0, idx, h_live), logp.index_copy_(0, idx, lp), scores.index_copy_(0, idx, sc)

    h = backbone.hidden(x, attn_mask, ctx, cache)  # the full pass (with a cache: its planned columns)
    logp, scores = read_out(backbone, h, cand, s.temperature, s.top_p, s.policy, rng)
    picks, sampler_passes, k = [], 0, min(s.k, cand.shape[1])
    if s.threshold is None and use_sampler is not None and s.order == "planned":
        # the full pass's scores fix this pass's k positions: a sampler step reads out only the next one
        plan = scores.masked_fill(~valid, float("-inf")).topk(k, dim=1).indices  # [B, k]
        lp = logp[rows, plan[:, 0]]
        for j in range(k):
            picks.append(write_at(valid[rows, plan[:, j]], plan[:, j], lp))  # an EOS may have ended the row
            if j < k - 1:
                h, lp = planned_read(h, plan[:, j + 1])
        return picks, k - 1
    if s.threshold is None:
        for j in range(k):
            picks.append(write(valid, logp, scores))
            if use_sampler is not None and j < k - 1:
                h = use_sampler(backbone.embed(x), h, ctx, cache)
                sampler_passes += 1
                logp, scores = read_out(backbone, h, cand, s.temperature, s.top_p, s.policy, rng)
        return picks, sampler_passes

    # threshold: the sure candidates (and each row's best) from the full pass, in score order
    def sure(logp: Tensor) -> Tensor:
        return valid & (logp.max(-1).values >= math.log(s.threshold)) if s.threshold > 0 else valid.clone()

    def take(allowed: Tensor, logp: Tensor, scores: Tensor) -> None:
        for _ in range(min(k, int(allowed.sum(1).max()))):  # one host synchronisation
            picks.append(write(allowed & valid & (used < k)[:, None], logp, scores))

    first = sure(logp)
    best = scores.masked_fill(~valid, float("-inf")).argmax(1)
    first[rows, best] |= valid[rows, best]
    take(first, logp, scores)
    if use_sampler is not None and s.order == "planned":
        # the rest of each row's k, planned from the full pass's scores: one read-out per sampler pass
        room = k - used
        plan = scores.masked_fill(~valid, float("-inf")).topk(min(int(room.max()), valid.shape[1]), 1).indices
        for j in range(plan.shape[1]):
            h, lp = planned_read(h, plan[:, j])
            picks.append(write_at(valid[rows, plan[:, j]] & (j < room), plan[:, j], lp))
        return picks, sampler_passes + plan.shape[1]
    # joint: the sampler decides the uncertain ones, one per sampler pass that sees every token written so
    # far, and takes at once any candidate it made sure; a row stops at k, the loop when no row goes on
    more = valid.any(1) & (used < k)
    while use_sampler is not None and bool(more.any()):
        h, logp, scores = sampler_read(h, logp, scores, more)  # only the rows that go on
        sampler_passes += 1
        now_sure = sure(logp)
        if s.fill == "sure":  # only what the sampler made sure; a row with nothing sure waits for a full pass
            more &= (now_sure & more[:, None]).any(1)
        else:
            picks.append(write(valid & more[:, None], logp, scores))
        take(now_sure & valid & more[:, None], logp, scores)
        more &= valid.any(1) & (used < k)
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


def check_inputs(backbone: Backbone, prompts: Sequence[Sequence[int]], settings: DecodeSettings,
                 sampler: JointSampler | None, gen_length: int,
                 suffixes: Sequence[Sequence[int]] | None = None) -> None:
    """What the settings cannot check alone: the prompts, the suffixes, the sampler and the context
    length."""
    if settings.mode == "joint" and sampler is None:
        raise ValueError("mode='joint' needs a sampler (JointSampler); none was given")
    if sampler is not None:
        sampler.check_backbone(backbone)
    if not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length must be an integer >= 1, got {gen_length!r}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    vocab = backbone.args.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (unconditional generation starts from [BOS])")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
    if suffixes is not None:
        if len(suffixes) != len(prompts):
            raise ValueError(f"suffixes has {len(suffixes)} rows for {len(prompts)} prompts (one per prompt)")
        for i, sfx in enumerate(suffixes):
            if sfx and (min(sfx) < 0 or max(sfx) >= vocab):
                raise ValueError(f"suffix {i} has token ids outside [0, {vocab})")
            if backbone.mask_id in sfx:  # it would stay a mask: only the span is decoded
                raise ValueError(f"suffix {i} contains the mask token id {backbone.mask_id}")
    lengths = [len(p) + (len(suffixes[i]) if suffixes is not None else 0) for i, p in enumerate(prompts)]
    if max(lengths) + gen_length > backbone.args.max_seq_len:
        what = "prompt and suffix" if suffixes is not None else "prompt"
        raise ValueError(f"{what} of {max(lengths)} tokens + gen_length {gen_length} exceeds the context "
                         f"of {backbone.args.max_seq_len}")


NOT_GENERATED = 1 << 30  # block id of the columns outside the span: padding, prompt, suffix


def pack_rows(backbone: Backbone, prompts: Sequence[Sequence[int]], gen_length: int,
              width: int | None = None, *, suffixes: Sequence[Sequence[int]] | None = None,
              block_length: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of [left padding, prompt, gen_length masks (the span), suffix], right-aligned to `width`
    columns (default: the fewest that fit every row), their attention masks (False on padding) and block
    ids ([B, width]: the span's blocks of `block_length`, 0, 1, ... from the span's first column;
    NOT_GENERATED elsewhere). Right alignment needs no right padding: a row's span ends where its suffix
    starts (without suffixes: the last gen_length columns of every row)."""
    suffixes = suffixes if suffixes is not None else [[] for _ in prompts]
    lengths = [len(p) + len(sfx) for p, sfx in zip(prompts, suffixes, strict=True)]
    width = width or max(lengths) + gen_length
    pad = backbone.pad_id if backbone.pad_id is not None else backbone.mask_id
    x = torch.full((len(prompts), width), backbone.mask_id, dtype=torch.long)
    attn = torch.ones(len(prompts), width, dtype=torch.bool)
    block_id = torch.full((len(prompts), width), NOT_GENERATED, dtype=torch.long)
    blocks = torch.arange(gen_length) // (block_length or gen_length)
    for b, (p, sfx) in enumerate(zip(prompts, suffixes, strict=True)):
        start = width - len(sfx) - gen_length  # the span's first column
        n_pad = start - len(p)
        if n_pad < 0:
            raise ValueError(f"row {b}: prompt and suffix of {lengths[b]} tokens + {gen_length} do not fit "
                             f"{width} columns")
        x[b, :n_pad] = pad
        x[b, n_pad:start] = torch.tensor(list(p), dtype=torch.long)
        x[b, start + gen_length:] = torch.tensor(list(sfx), dtype=torch.long)
        attn[b, :n_pad] = False
        block_id[b, start:start + gen_length] = blocks
    dev = backbone.device
    return x.to(dev), attn.to(dev), block_id.to(dev)


@torch.inference_mode()
def generate(
    backbone: Backbone,
    prompts: Sequence[Sequence[int]],
    settings: DecodeSettings | None = None,
    *,
    sampler: JointSampler | None = None,
    gen_length: int = 64,
    seed: int = 0,
    on_step: Callable[[Tensor], None] | None = None,
    suffixes: Sequence[Sequence[int]] | None = None,
    **fields: Any,
) -> GenerateResult:
    """Fill `gen_length` masked positions (the span) after each prompt (token ids; left-padded into a
    batch) and, with `suffixes` (token ids, one list per prompt), before that row's suffix: infilling.

    The decoding is `settings` with any `DecodeSettings` field given as a keyword on top
    (`generate(bb, prompts, mode="joint", k=4, sampler=s)`):
    exact: one token per full pass. marginal: k tokens per pass, all from that pass's distributions.
    joint: k tokens per pass; after each one the sampler updates the distributions of the rest.
    threshold: the confident candidates of a pass all at once (Fast-dLLM's rule), k at most.
    With `block_length`, the span is filled block by block, left to right (semi-autoregressive).
    With `stop_at_eos`, an EOS ends its row's span: its later positions become EOS without being decoded,
    the suffix stays, and the text is the span before the EOS.
    `on_step(span_ids)` is called after every full pass with each row's span, [B, gen_length] (streaming).
    """
    s = settings or DecodeSettings()
    if fields:
        s = s.replace(**fields)
    check_inputs(backbone, prompts, s, sampler, gen_length, suffixes)
    t0 = time.perf_counter()
    dev, mask_id, eos_id = backbone.device, backbone.mask_id, backbone.eos_id
    B, G = len(prompts), gen_length
    x, attn, block_id = pack_rows(backbone, prompts, G, suffixes=suffixes, block_length=s.block_length)
    attn_mask = None if bool(attn.all()) else attn
    ctx = backbone.context(x, attn_mask)  # rotary tables and mask: the same for every pass
    region = block_id < NOT_GENERATED  # each row's span
    span = region.long().argmax(1, keepdim=True) + torch.arange(G, device=dev)  # [B, G]: its columns
    order = torch.full((B, G + 1), -1, dtype=torch.long, device=dev)  # last column: scratch
    n_done = torch.zeros(B, dtype=torch.long, device=dev)
    row_passes = torch.zeros(B, dtype=torch.long, device=dev)
    rng = torch.Generator(device=dev).manual_seed(seed)
    rows = torch.arange(B, device=dev)
    full_passes = sampler_passes = 0
    cache = BlockKVCache.for_decoding(backbone, s, B, x.shape[1], sampler)

    while True:
        masked = (x == mask_id) & region
        cand, valid, counts = candidates(masked, block_id)
        if cand.shape[1] == 0:
            break
        live = counts > 0
        row_passes += live
        if cache is not None:  # a new block: refresh; else compute only the block (prefix: and after it)
            cache.plan(masked, block_id)
        sub = None if cache is not None or bool(live.all()) else live.nonzero().squeeze(1)
        if sub is None:  # every row still has candidates (or a KV cache holds every row)
            xs, c, v, cx, am, reg = x, cand, valid, ctx, attn_mask, region
        else:  # a finished row costs nothing: the pass runs over the rows that still have candidates
            xs, c, v, cx, reg = x[sub], cand[sub], valid[sub], ctx.rows(sub), region[sub]
            am = None if attn_mask is None else attn_mask[sub]
        picks, n_sampler = unmask_step(backbone, xs, c, v, ctx=cx, attn_mask=am, settings=s, sampler=sampler,
                                       rng=rng, eos_region=reg if s.stop_at_eos else None, cache=cache)
        if sub is not None:
            x[sub] = xs
            picks = [(live.new_zeros(B).index_copy(0, sub, go), pos.new_zeros(B).index_copy(0, sub, pos))
                     for go, pos in picks]
        full_passes, sampler_passes = full_passes + 1, sampler_passes + n_sampler
        for go, pos in picks:
            order[rows, torch.where(go, n_done, G)] = pos - span[:, 0]
            n_done += go
        if on_step is not None:
            on_step(x.gather(1, span).cpu())

    tokens = x.gather(1, span).tolist()
    orders = [o[:n] for o, n in zip(order[:, :G].tolist(), n_done.tolist(), strict=True)]
    text = []
    for row in tokens:
        if s.stop_at_eos and eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        text.append(backbone.tokenizer.decode(row, skip_special_tokens=True) if backbone.tokenizer else "")
    return GenerateResult(
        prompt_ids=[list(p) for p in prompts], tokens=tokens, text=text, order=orders,
        full_passes=full_passes, sampler_passes=sampler_passes, row_full_passes=row_passes.tolist(),
        wall_s=time.perf_counter() - t0, suffix_ids=[list(sfx) for sfx in suffixes or [[] for _ in prompts]],
    )


def encode_text(backbone: Backbone, text: str, *, bos: bool = True) -> list[int]:
    """Token ids of a text prompt, BOS first (added when the tokenizer does not put it there); with
    bos=False, of text that continues a sequence (an infilling suffix): no BOS."""
    if backbone.tokenizer is None:
        raise ValueError(f"backbone {backbone.name!r} has no tokenizer: give token ids, not text")
    ids = list(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])
    return with_bos(backbone, ids) if bos else ids


def with_bos(backbone: Backbone, ids: Sequence[int]) -> list[int]:
    """`ids` with BOS first: added when the model has a BOS token and `ids` does not start with it."""
    ids = list(ids)
    return ids if backbone.bos_id is None or ids[:1] == [backbone.bos_id] else [backbone.bos_id, *ids]


def encode_chat(backbone: Backbone, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (rendered as text, then
    tokenized like any text prompt, so BOS is handled one way); ValueError when the model has no
    template or the template refuses the conversation."""
    tok = backbone.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"backbone {backbone.name!r} has no chat template: use text prompts")
    try:
        text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template refuses this conversation (e.g. role order)
        raise ValueError(f"the model's chat template refused the messages: {e}") from None
    return encode_text(backbone, text)


def encode_prompts(backbone: Backbone, texts: Sequence[str] | None = None, *, n: int | None = None,
                   chat: bool = False) -> list[list[int]]:
    """Token ids for text prompts (BOS first), each as one user message through the chat template when
    `chat`, or `n` unconditional prompts ([BOS])."""
    if texts is None:
        if n is None or backbone.bos_id is None:
            raise ValueError("unconditional prompts need n and a backbone with a BOS token")
        return [[backbone.bos_id] for _ in range(n)]
    if chat:
        return [encode_chat(backbone, [{"role": "user", "content": t}]) for t in texts]
    return [encode_text(backbone, t) for t in texts]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first of the `stops` it contains, and whether it had one."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
