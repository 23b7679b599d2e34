"""One bidirectional (or causal) transformer, readable top to bottom, in the spirit of gpt-fast.

Module names follow the Qwen2 / Dream layout (`embed_tokens`, `layers.N.self_attn.q_proj`, ...) so a
Dream checkpoint loads by stripping its `model.` prefix; other layouts (LLaDA) map onto these names in
`sampler.backbone`. RMSNorm, RoPE (rotate-half), grouped-query attention through SDPA, SwiGLU MLP.
A pass can also compute only some columns over cached keys and values (`sampler.kvcache`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from sampler.kvcache import BlockKVCache


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2/Dream: True; LLaDA/LLaMA: False
    tie_embeddings: bool = False
    causal: bool = False  # the autoregressive judge; masked diffusion backbones are bidirectional
    max_seq_len: int = 4096

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # float32 statistics, as Qwen2 and LLaDA do, so bf16 runs stay close to the reference
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [B, L, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, L, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class Context:
    """What every layer needs besides its input: rotary tables and the attention mask."""

    cos: Tensor
    sin: Tensor
    mask: Tensor | None  # bool [B, 1, L|1, L], True = may attend; None = full (or plain causal)
    causal: bool
    cols: Tensor | None = None  # [B, Q]: the only columns a pass computes (KV cache); None = all

    def rows(self, idx: Tensor) -> Context:
        """The context of the batch rows `idx` (a pass over some rows only)."""
        mask = None if self.mask is None else self.mask[idx]
        cols = None if self.cols is None else self.cols[idx]
        return Context(self.cos[idx], self.sin[idx], mask, self.causal, cols)

    def at(self, cols: Tensor) -> Context:
        """The context of a pass that computes only `cols` ([B, Q]) and reads the other columns' keys
        and values from a KV cache: rotary tables at those columns' positions, the same key mask."""
        if self.causal:
            raise ValueError("a KV cache pass needs a bidirectional model (causal=False)")
        idx = cols[:, None, :, None].expand(-1, 1, -1, self.cos.shape[-1])
        return Context(self.cos.gather(2, idx), self.sin.gather(2, idx), self.mask, False, cols)


def gather_cols(x: Tensor, cols: Tensor) -> Tensor:
    """x[b, cols[b]]: [B, L, D], [B, Q] -> [B, Q, D]."""
    return x.gather(1, cols[..., None].expand(-1, -1, x.shape[-1]))


def scatter_cols(x: Tensor, cols: Tensor, src: Tensor) -> Tensor:
    """A copy of x ([B, L, D]) with rows cols[b] ([B, Q]) replaced by src ([B, Q, D])."""
    return x.scatter(1, cols[..., None].expand(-1, -1, x.shape[-1]), src)


def store_kv(kv: tuple[Tensor, Tensor], k: Tensor, v: Tensor, cols: Tensor | None) -> tuple[Tensor, Tensor]:
    """Write a pass's keys and values ([B, n_kv, Q, hd]) into a layer's cache ([B, n_kv, L, hd]) at
    every column (cols None) or at `cols` ([B, Q]; repeated columns carry equal values), and return
    the whole cache: the pass attends over its own fresh keys and everyone else's cached ones."""
    cache_k, cache_v = kv
    if cols is None:
        cache_k.copy_(k)
        cache_v.copy_(v)
    else:
        idx = cols[:, None, :, None].expand_as(k)
        cache_k.scatter_(2, idx, k)
        cache_v.scatter_(2, idx, v)
    return cache_k, cache_v


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x: Tensor, ctx: Context, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, L, _ = x.shape  # L: the computed columns (all of them unless ctx.cols)
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * ctx.cos + rotate_half(q) * ctx.sin
        k = k * ctx.cos + rotate_half(k) * ctx.sin
        if kv is not None:  # KV cache: keep this pass's keys and values, attend over every column's
            k, v = store_kv(kv, k, v, ctx.cols)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, is_causal=ctx.causal and ctx.mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.dim, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.mlp = MLP(a)

    def forward(self, x: Tensor, ctx: Context, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Left padding: real tokens count from 0, pads get position 0 (they are never attended to)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(a.head_dim, a.rope_theta)

    def context(self, attention_mask: Tensor | None, seq_len: int, batch: int, dtype: torch.dtype,
                device: torch.device) -> Context:
        """Rotary tables and mask for a batch; shared by the backbone and the sampler's layer."""
        if attention_mask is None:
            pos = torch.arange(seq_len, device=device).expand(batch, seq_len)
            mask = None
        else:
            am = attention_mask.bool()
            pos = positions_from_mask(am)
            if bool(am.all()):
                mask = None
            else:
                mask = am[:, None, None, :]  # keys only: padding is never attended to
                if self.args.causal:
                    tril = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
                    mask = mask & tril
        cos, sin = self.rotary(pos, dtype)
        return Context(cos, sin, mask, self.args.causal)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None,
                ctx: Context | None = None, cache: BlockKVCache | None = None) -> Tensor:
        """Last-layer hidden states after the final norm, [B, L, dim].

        With a `cache` (sampler.kvcache): the first pass after a refresh computes every column and stores
        every layer's keys and values; later ones compute only `cache.cols` over the cached keys and
        values of the rest, and return the stored hidden states with those columns replaced."""
        if ctx is None:
            ctx = self.context(attention_mask, ids.shape[1], ids.shape[0], self.embed_tokens.weight.dtype,
                               ids.device)
        cols, kvs = cache.start("backbone") if cache is not None else (None, [None] * len(self.layers))
        if cols is not None:
            ids, ctx = ids.gather(1, cols), ctx.at(cols)
        x = self.embed_tokens(ids)
        for layer, kv in zip(self.layers, kvs, strict=True):
            x = layer(x, ctx, kv)
        x = self.norm(x)
        return x if cache is None else cache.merge(x, cols)
