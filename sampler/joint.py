"""The joint sampler (docs/method.md): n_layers decoder layers (1 by default, the paper's) of the backbone's
own type on top of the frozen backbone, run after each sampled token so later tokens see earlier ones.

    h' = h + RMSNorm(Block_n(..Block_1(Linear(RMSNorm(e) ++ RMSNorm(h)))))  ->  frozen LM head

The output norm's weight starts at zero, so an untrained sampler is exactly the marginal baseline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sampler.backbone import Backbone
from sampler.model import Block, Context, ModelArgs, RMSNorm, gather_cols, scatter_cols

if TYPE_CHECKING:
    from sampler.kvcache import BlockKVCache

SAMPLER_WEIGHTS = "sampler.safetensors"
SAMPLER_CONFIG = "sampler.json"

log = logging.getLogger("jointgen.sampler")


class SamplerMismatchError(ValueError):
    """A sampler used with a backbone other than the one it was trained for."""


def read_weights(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """A saved sampler's weights (`path`: its directory), keys as JointSampler names them today."""
    sd = load_file(str(Path(path) / SAMPLER_WEIGHTS), device=device)
    # saved before n_layers: the one decoder layer was `block.*`, now `blocks.0.*`
    return {("blocks.0." + k[len("block."):] if k.startswith("block.") else k): v for k, v in sd.items()}


class JointSampler(nn.Module):
    def __init__(self, args: ModelArgs, *, n_layers: int = 1, backbone_identity: str = "",
                 backbone_name: str = ""):
        super().__init__()
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}")
        self.args = replace(args, n_layers=n_layers, causal=False)  # args.n_layers: the sampler's own
        self.backbone_identity = backbone_identity
        self.backbone_name = backbone_name
        d = args.dim
        self.norm_e = RMSNorm(d, args.norm_eps)
        self.norm_h = RMSNorm(d, args.norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.blocks = nn.ModuleList(Block(self.args) for _ in range(n_layers))
        self.norm_out = RMSNorm(d, args.norm_eps)
        nn.init.zeros_(self.norm_out.weight)

    @classmethod
    def for_backbone(cls, backbone: Backbone, seed: int | None = None, init: str = "random",
                     n_layers: int = 1) -> JointSampler:
        """A new sampler of `n_layers` decoder layers for `backbone`. init "backbone": the warm start of
        `warm_start`."""
        if init not in ("random", "backbone"):
            raise ValueError(f"init must be 'random' or 'backbone', got {init!r}")
        if seed is not None:
            torch.manual_seed(seed)
        s = cls(backbone.args, n_layers=n_layers, backbone_identity=backbone.identity,
                backbone_name=backbone.name)
        s = s.to(device=backbone.device)
        return s.warm_start(backbone) if init == "backbone" else s

    @torch.no_grad()
    def warm_start(self, backbone: Backbone) -> JointSampler:
        """Start the n decoder layers from the backbone's last n layers, in order, and the input projection
        as the identity on the hidden-state half (the embedding half at zero: it still gets gradients), so
        the first layer first sees what the backbone's n-th last layer saw, roughly. The output norm stays
        at zero: step 0 is still exactly the marginal baseline."""
        n, have = len(self.blocks), len(backbone.model.layers)
        if n > have:
            raise ValueError(f"n_layers {n}: a warm start needs as many backbone layers, it has {have}")
        for block, layer in zip(self.blocks, backbone.model.layers[have - n:], strict=True):
            block.load_state_dict(layer.state_dict())
        d = self.args.dim
        self.proj.weight.zero_()
        self.proj.weight[:, d:] = torch.eye(d, dtype=self.proj.weight.dtype, device=self.proj.weight.device)
        return self

    def forward(self, e: Tensor, h: Tensor, ctx: Context, cache: BlockKVCache | None = None) -> Tensor:
        """One sampler step: embeddings of the current tokens and the previous hidden state -> new
        hidden state in the backbone's hidden space (read out by `Backbone.logits`).

        With a `cache` (sampler.kvcache), after its first pass since a refresh only `cache.cols` are
        computed, over the cached keys and values of the others, whose h passes through unchanged."""
        cols, kvs = cache.start("sampler") if cache is not None else (None, [None] * len(self.blocks))
        if len(kvs) != len(self.blocks):
            raise ValueError(f"the cache holds {len(kvs)} sampler layers, this sampler has n_layers "
                             f"{len(self.blocks)}: make the cache with this sampler")
        h_in = h
        if cols is not None:
            e, h_in, ctx = gather_cols(e, cols), gather_cols(h, cols), ctx.at(cols)
        x = self.proj(torch.cat([self.norm_e(e), self.norm_h(h_in)], dim=-1))
        for block, kv in zip(self.blocks, kvs, strict=True):
            x = block(x, ctx, kv)
        out = h_in + self.norm_out(x)
        return out if cols is None else scatter_cols(h, cols, out)

    def check_backbone(self, backbone: Backbone) -> None:
        if self.backbone_identity and backbone.identity and self.backbone_identity != backbone.identity:
            raise SamplerMismatchError(
                f"sampler was trained for backbone {self.backbone_name!r} ({self.backbone_identity}), "
                f"not {backbone.name!r} ({backbone.identity})")
        if self.args.dim != backbone.args.dim:
            raise SamplerMismatchError(f"sampler hidden size {self.args.dim} != backbone's "
                                       f"{backbone.args.dim}")

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, str(path / SAMPLER_WEIGHTS), metadata={"format": "pt"})
        cfg = {"args": self.args.to_dict(), "backbone_identity": self.backbone_identity,
               "backbone_name": self.backbone_name, **(extra or {})}
        (path / SAMPLER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | None = None) -> JointSampler:
        """Load a saved sampler; with `backbone`, refuse one trained for another backbone."""
        path = Path(path)
        for f in (SAMPLER_CONFIG, SAMPLER_WEIGHTS):
            if not (path / f).exists():
                raise FileNotFoundError(f"{path}: missing {f} (not a sampler directory)")
        cfg = json.loads((path / SAMPLER_CONFIG).read_text())
        args = ModelArgs(**cfg["args"])
        s = cls(args, n_layers=args.n_layers, backbone_identity=cfg.get("backbone_identity", ""),
                backbone_name=cfg.get("backbone_name", ""))
        missing, unexpected = s.load_state_dict(read_weights(path), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / SAMPLER_WEIGHTS}: missing {missing}, unexpected {unexpected}")
        if backbone is not None:
            s.check_backbone(backbone)
            s = s.to(device=backbone.device, dtype=backbone.dtype)
        return s.eval().requires_grad_(False)


def sampler_candidates(backbone_dir: Path) -> list[Path]:
    """Where `sampler: auto` (serve, the lm-eval model) looks for a trained sampler next to the backbone."""
    return [backbone_dir / "sampler", backbone_dir.parent / "sampler"]


def find_sampler(backbone_dir: Path, backbone: Backbone) -> JointSampler | None:
    """`sampler: auto`: the first sampler in `sampler_candidates` that loads for `backbone`, else None.
    One that does not (trained for another backbone) is skipped with a warning, and the search goes on."""
    for cand in sampler_candidates(backbone_dir):
        if (cand / SAMPLER_CONFIG).is_file():
            try:
                return JointSampler.load(cand, backbone)
            except ValueError as e:
                log.warning("ignoring sampler %s: %s", cand, e)
    return None
