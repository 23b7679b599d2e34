"""The training objective (docs/method.md) and held-out metrics per unroll depth.

Backbone on s_i gives h; the sampler is unrolled K times with teacher forcing (embeddings of s_{i+1}
.. s_{i+K}); the loss is KL(backbone(s_{i+K}) || sampler) over the positions still masked in s_{i+K}.
The target is recomputed by the frozen backbone, so trajectories store tokens, never hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sampler.backbone import Backbone
from sampler.joint import JointSampler
from sampler.trajectory import Trajectory, WindowBatch, build_windows


def _unroll(backbone: Backbone, sampler: JointSampler, batch: WindowBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (sampler log-probs, marginal log-probs, target log-probs) at the target positions, after
    each row's own K steps."""
    s0 = batch.states[:, 0]
    ctx = backbone.context(s0, batch.attention_mask)
    with torch.no_grad():
        h0 = backbone.hidden(s0, batch.attention_mask, ctx)
        final = batch.states[torch.arange(len(s0)), batch.ks]
        target = F.log_softmax(backbone.logits(backbone.hidden(final, batch.attention_mask, ctx),
                                               batch.target_pos).float(), -1)
        marginal = F.log_softmax(backbone.logits(h0, batch.target_pos).float(), -1)
    h = h0
    for j in range(1, int(batch.ks.max()) + 1):
        live = (batch.ks >= j).nonzero().squeeze(1)  # rows stop at their own K: step only the others
        with torch.no_grad():
            e = backbone.embed(batch.states[live, j])
        h = h.index_copy(0, live, sampler(e, h[live], ctx.rows(live)))
    pred = F.log_softmax(backbone.logits(h, batch.target_pos).float(), -1)
    return pred, marginal, target


def _kl(target: Tensor, pred: Tensor) -> Tensor:
    """KL(target || pred) per position, from log-probabilities."""
    return (target.exp() * (target - pred)).sum(-1)


def _unroll_every_depth(backbone: Backbone, sampler: JointSampler,
                        batch: WindowBatch) -> tuple[Tensor, Tensor]:
    """KL to the backbone after every unroll depth j = 1..K of each row (one more backbone pass per
    depth for its target), at the final state's target positions: ([B, P] the mean over a row's depths,
    [B, P] the marginal baseline's KL at the final state)."""
    s0 = batch.states[:, 0]
    ctx = backbone.context(s0, batch.attention_mask)
    with torch.no_grad():
        h = backbone.hidden(s0, batch.attention_mask, ctx)
        marginal = F.log_softmax(backbone.logits(h, batch.target_pos).float(), -1)
    total = torch.zeros(batch.target_pos.shape, device=s0.device)
    base = torch.zeros_like(total)
    for j in range(1, int(batch.ks.max()) + 1):
        live = batch.ks >= j
        with torch.no_grad():
            e = backbone.embed(batch.states[:, j])
            target = F.log_softmax(backbone.logits(backbone.hidden(batch.states[:, j], batch.attention_mask,
                                                                   ctx), batch.target_pos).float(), -1)
            base = torch.where((batch.ks == j)[:, None], _kl(target, marginal), base)
        h = torch.where(live[:, None, None], sampler(e, h, ctx), h)
        pred = F.log_softmax(backbone.logits(h, batch.target_pos).float(), -1)
        total = total + _kl(target, pred) * live[:, None]
    return total / batch.ks[:, None].clamp_min(1), base


def joint_loss(backbone: Backbone, sampler: JointSampler, batch: WindowBatch,
               depths: str = "last") -> tuple[Tensor, dict]:
    """Mean KL over all target positions in the batch; also the marginal baseline's KL (no grad).
    depths "last": the KL after each row's K steps (the paper's loss); "all": the mean over its depths
    1..K, so every step of the unroll gets its own signal (costs one backbone pass per depth)."""
    if depths not in ("last", "all"):
        raise ValueError(f"depths must be 'last' or 'all', got {depths!r}")
    pred, marginal, target = _unroll(backbone, sampler, batch) if depths == "last" else (None,) * 3
    valid = batch.target_valid.float()
    n = valid.sum().clamp_min(1)
    if depths == "last":
        loss = (_kl(target, pred) * valid).sum() / n
        with torch.no_grad():
            base = (_kl(target, marginal) * valid).sum() / n
        return loss, {"loss": float(loss.detach()), "kl_marginal": float(base), "positions": int(n)}
    per_depth, base = _unroll_every_depth(backbone, sampler, batch)
    loss = (per_depth * valid).sum() / n
    return loss, {"loss": float(loss.detach()), "kl_marginal": float((base * valid).sum() / n),
                  "positions": int(n)}


@torch.no_grad()
def depth_metrics(backbone: Backbone, sampler: JointSampler, trajs: Sequence[Trajectory], k_max: int,
                  windows_per_depth: int = 64, seed: int = 0, batch_size: int = 32) -> dict[int, dict]:
    """Held-out KL and top-1 agreement to the backbone for the sampler and the marginal baseline, for
    each unroll depth K = 1..k_max, on a fixed set of windows (same seed, same windows)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(1, k_max + 1):
        usable = [t for t in trajs if len(t.order) > k]
        if not usable:
            continue
        picks = [usable[int(rng.integers(len(usable)))] for _ in range(windows_per_depth)]
        starts = [int(rng.integers(0, len(t.order) - k)) for t in picks]
        sums = dict(kl_sampler=0.0, kl_marginal=0.0, top1_sampler=0.0, top1_marginal=0.0)
        n = 0.0
        for a in range(0, len(picks), batch_size):
            batch = build_windows(picks[a:a + batch_size], starts[a:a + batch_size],
                                  [k] * len(picks[a:a + batch_size]), backbone.mask_id,
                                  backbone.pad_id).to(backbone.device)
            pred, marginal, target = _unroll(backbone, sampler, batch)
            v = batch.target_valid.float()
            top = target.argmax(-1)
            sums["kl_sampler"] += float((_kl(target, pred) * v).sum())
            sums["kl_marginal"] += float((_kl(target, marginal) * v).sum())
            sums["top1_sampler"] += float(((pred.argmax(-1) == top).float() * v).sum())
            sums["top1_marginal"] += float(((marginal.argmax(-1) == top).float() * v).sum())
            n += float(v.sum())
        out[k] = {key: val / max(n, 1.0) for key, val in sums.items()} | {"positions": int(n)}
    return out
