"""One bidirectional (or causal) transformer, readable top to bottom, in the spirit of gpt-fast.

Module names follow the Qwen2 / Dream layout (`embed_tokens`, `layers.N.self_attn.q_proj`, ...) so a
Dream checkpoint loads by stripping its `model.` prefix; other layouts (LLaDA) map onto these names in
`sampler.backbone`. RMSNorm, RoPE (rotate-half), grouped-query attention through SDPA, SwiGLU MLP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * ctx.cos + rotate_half(q) * ctx.sin
        k = k * ctx.cos + rotate_half(k) * ctx.sin
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

    def forward(self, x: Tensor, ctx: Context) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
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
                ctx: Context | None = None) -> Tensor:
        """Last-layer hidden states after the final norm, [B, L, dim]."""
        x = self.embed_tokens(ids)
        if ctx is None:
            ctx = self.context(attention_mask, ids.shape[1], ids.shape[0], x.dtype, ids.device)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)
