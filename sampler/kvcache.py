"""A block-wise approximate KV cache for semi-autoregressive decoding (Fast-dLLM, arXiv 2505.22618).

At the start of each block one full pass over the whole sequence stores every layer's keys and values
(a refresh); the full passes inside the block then compute only some columns, attending over the cached
keys and values of the others:

- prefix: the current block and everything after it (the rest of the span and, when infilling, the
  suffix), [block start - shift, L); columns before it are read from the cache;
- dual: the current block only, [block start - shift, block end); columns before and after it (later
  blocks, the suffix) are read from the cache.

With the Dream shift (1) the distribution at the block's first position comes from the hidden state just
before it, so that column is computed too. Cached columns go stale as the block's tokens change (in a
bidirectional model every layer but the first sees them): that is the approximation, and the next block
refreshes it. Rows may be in different blocks; when any unfinished row's block changed, every row is
refreshed. The joint sampler's layers (one pair of keys and values each) work the same way: its first
pass after a refresh computes and stores every column, its later passes only the computed columns (its
input outside them stays that of the first pass), so a sampler step costs in proportion to the block.

Memory, allocated once per batch, per row: keys and values 2 x (n_layers + sampler layers) x n_kv_heads
x L x head_dim x bytes, plus the last hidden states L x dim x bytes (the uncached loop holds those too).
Dream-7B (28 layers, 4 KV heads, head_dim 128, dim 3584, bf16) at L = 512 tokens, a one-layer sampler:
2*28*4*512*128*2 = 29,360,128 B (28 MiB) for the backbone + 1,048,576 B (1 MiB) per sampler layer
+ 512*3584*2 = 3,670,016 B (3.5 MiB) of hidden states = 34,078,720 B = 32.5 MiB a row (520 MiB at 16 rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sampler.model import ModelArgs, scatter_cols
from sampler.settings import KV_CACHES, DecodeSettings

if TYPE_CHECKING:
    from sampler.backbone import Backbone
    from sampler.joint import JointSampler

KINDS = tuple(k for k in KV_CACHES if k != "none")


class BlockKVCache:
    """Keys and values of every backbone layer (and of the sampler's `sampler_layers` layers, with
    `sampler_dtype`) at all L columns of a batch, the backbone's last hidden states, and the columns the
    next passes compute.

    Use: `plan(masked, block_id)` before each full pass (it refreshes at a new block), then pass the cache
    to `Backbone.hidden` and `JointSampler.forward`, which return full [B, L, dim] hidden states."""

    def __init__(self, args: ModelArgs, batch: int, seq_len: int, *, kind: str = "prefix", shift: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 sampler_dtype: torch.dtype | None = None, sampler_layers: int = 1):
        if kind not in KINDS:
            raise ValueError(f"kv_cache must be one of {KINDS} for a BlockKVCache, got {kind!r}")
        if args.causal:
            raise ValueError("a KV cache needs a bidirectional model (causal=False)")
        self.kind, self.shift = kind, shift
        shape = (batch, args.n_kv_heads, seq_len, args.head_dim)
        self.k = torch.zeros(args.n_layers, *shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.layers = {"backbone": list(zip(self.k.unbind(0), self.v.unbind(0), strict=True)), "sampler": []}
        if sampler_dtype is not None:  # one (keys, values) pair per sampler layer
            self.layers["sampler"] = [(torch.zeros(shape, dtype=sampler_dtype, device=device),
                                       torch.zeros(shape, dtype=sampler_dtype, device=device))
                                      for _ in range(sampler_layers)]
        self.stored = {"backbone": False, "sampler": False}  # every column stored since the last refresh
        self.cols: Tensor | None = None  # [B, Q]: the columns the passes compute once stored
        self.h: Tensor | None = None  # the backbone's last hidden states [B, L, dim]
        self.blocks: Tensor | None = None  # each row's current block at the last refresh
        self.refreshes = 0

    @classmethod
    def for_backbone(cls, backbone: Backbone, batch: int, seq_len: int, kind: str,
                     sampler: JointSampler | None = None) -> BlockKVCache:
        """A cache for `batch` rows of `seq_len` columns (with the layers of `sampler` if given)."""
        return cls(backbone.args, batch, seq_len, kind=kind, shift=backbone.shift, dtype=backbone.dtype,
                   device=backbone.device,
                   sampler_dtype=None if sampler is None else sampler.proj.weight.dtype,
                   sampler_layers=1 if sampler is None else sampler.args.n_layers)

    @classmethod
    def for_decoding(cls, backbone: Backbone, settings: DecodeSettings, batch: int, seq_len: int,
                     sampler: JointSampler | None = None) -> BlockKVCache | None:
        """The cache `settings.kv_cache` asks for (None for "none"), with the sampler's layers in joint
        mode: what `generate` and a serving lane allocate for a batch."""
        if settings.kv_cache == "none":
            return None
        return cls.for_backbone(backbone, batch, seq_len, settings.kv_cache,
                                sampler if settings.mode == "joint" else None)

    def refresh(self) -> None:
        """The next pass of the backbone and of the sampler each computes and stores every column."""
        self.stored = dict.fromkeys(self.stored, False)
        self.refreshes += 1

    def start(self, part: str) -> tuple[Tensor | None, list[tuple[Tensor, Tensor]]]:
        """Begin a pass of `part` ("backbone" or "sampler"): the columns it computes (None: every column,
        its first pass since a refresh, which stores them all) and its layers' (keys, values)."""
        if not self.layers[part]:
            raise ValueError(f"this cache has no {part} layer (make it with the sampler: "
                             "for_backbone(..., sampler=s) or sampler_dtype=...)")
        cols = self.cols if self.stored[part] else None
        self.stored[part] = True
        return cols, self.layers[part]

    def merge(self, h: Tensor, cols: Tensor | None) -> Tensor:
        """The backbone's full hidden states after a pass that computed `cols` (None: all), [B, L, dim]."""
        self.h = h if cols is None else scatter_cols(self.h, cols, h)
        return self.h

    def plan(self, masked: Tensor, block_id: Tensor) -> bool:
        """Before a full pass. masked, block_id: [B, L]; a row's current block is its first block with a
        masked column (as `sampler.decode.candidates`); blocks are contiguous runs of columns. Refreshes
        when any unfinished row's current block changed since the last refresh (or at the first pass), and
        sets the columns computed: [block start - shift, L) (prefix) or [.., block end) (dual), a short row
        padded with its own last column; one column for a finished row. Returns whether it refreshed."""
        L = masked.shape[1]
        big = torch.iinfo(block_id.dtype).max
        cur = torch.where(masked, block_id, big).min(1).values
        live = cur < big
        col = torch.arange(L, device=masked.device)
        in_block = block_id == cur[:, None]
        start = torch.where(in_block, col, L).amin(1)
        end = torch.where(in_block, col + 1, 0).amax(1) if self.kind == "dual" else torch.full_like(cur, L)
        lo = torch.where(live, (start - self.shift).clamp_min(0), L - 1)
        hi = torch.where(live, end, L)
        if self.blocks is None or self.blocks.shape != cur.shape:
            q, changed = int((hi - lo).max()), True
        else:  # one host synchronisation for both
            q, changed = torch.stack([(hi - lo).max(), ((cur != self.blocks) & live).any().long()]).tolist()
        if changed:
            self.refresh()
            self.blocks = cur
        self.cols = torch.minimum(lo[:, None] + torch.arange(q, device=masked.device), hi[:, None] - 1)
        return bool(changed)
