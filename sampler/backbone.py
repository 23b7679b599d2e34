"""Load a masked diffusion LM (Dream or LLaDA on-disk layout) into our own `Transformer`.

Everything above this module speaks of "the distribution at position p": the Dream shift (the hidden
state at p-1 predicts token p) is applied here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sampler.model import Context, ModelArgs, Transformer

if TYPE_CHECKING:
    from sampler.kvcache import BlockKVCache

DEFAULT_BACKBONE = Path(__file__).parent / "assets" / "backbone"
DEFAULT_JUDGE = Path(__file__).parent / "assets" / "judge"
LLADA_MASK_ID = 126336


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the problem."""


# ---------------------------------------------------------------------------------------------
# Hugging Face hub ids: "owner/name" or "owner/name@revision", resolved through the local hub cache.
# ---------------------------------------------------------------------------------------------

# config, weights and tokenizer files only: never pickles (*.bin, *.pt) nor remote code (*.py)
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
_HUB_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})")


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `name` has the form owner/name[@revision], else None."""
    m = _HUB_ID.fullmatch(name)
    return (m["repo"], m["revision"]) if m else None


def hub_source(path: Path) -> dict[str, str]:
    """{"repo", "revision"} of a snapshot directory of the hub cache (models--owner--name/snapshots/<commit>),
    {} for any other directory."""
    m = _HUB_SNAPSHOT.search(Path(path).as_posix())
    return {"repo": f"{m['owner']}/{m['name']}", "revision": m["commit"]} if m else {}


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The directory a checkpoint argument names: None, "" or "embedded" = the embedded backbone; an existing
    directory; else a hub id "owner/name[@revision]", downloaded into (or, with HF_HUB_OFFLINE=1, found in)
    the Hugging Face cache, only the files of HUB_FILES. CheckpointError naming it when it is neither."""
    if path in (None, "", "embedded"):
        return DEFAULT_BACKBONE
    p = Path(path)
    hub = parse_hub_id(str(path)) if not p.is_dir() else None
    if hub is None:
        if not p.is_dir():
            raise CheckpointError(f"{p}: checkpoint directory does not exist")
        return p.resolve()
    from huggingface_hub import constants, snapshot_download

    repo, revision = hub
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # not cached offline, unknown repo or revision, no network: one message says which
        cache = constants.HF_HUB_CACHE
        why = (f"it is not in the local cache {cache} (HF_HUB_OFFLINE is set: nothing is downloaded)"
               if constants.HF_HUB_OFFLINE else f"neither the hub nor the local cache {cache} has it")
        raise CheckpointError(f"{path}: checkpoint directory does not exist, and as a Hugging Face hub id "
                              f"{why}: {type(e).__name__}: {e}") from e


def checkpoint_name(path: Path, cfg: dict) -> str:
    """A checkpoint's name: its hub repo id, else config.json's `_name_or_path`, else the directory name."""
    return hub_source(path).get("repo") or cfg.get("_name_or_path") or path.name


# ---------------------------------------------------------------------------------------------
# Layouts: how a checkpoint's config keys and parameter names map onto ModelArgs / our names.
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    name: str
    shift: int  # 1: hidden at p-1 predicts p (Dream, causal LMs); 0: same position (LLaDA)
    args: ModelArgs
    mask_id: int | None
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None
    rename: dict[str, str] = field(default_factory=dict)  # our name -> name in the file


def _need(cfg: dict, key: str, path: Path) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{path / 'config.json'}: missing config key {key!r}")
    return cfg[key]


def _qwen2_like(cfg: dict, path: Path, *, name: str, shift: int, causal: bool,
                qkv_bias: bool) -> Layout:
    a = ModelArgs(
        vocab_size=_need(cfg, "vocab_size", path),
        dim=_need(cfg, "hidden_size", path),
        n_layers=_need(cfg, "num_hidden_layers", path),
        n_heads=_need(cfg, "num_attention_heads", path),
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        intermediate_size=_need(cfg, "intermediate_size", path),
        rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get(
            "rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        causal=causal,
        max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
    )
    rename = {k: "model." + k for k in _our_names(a) if not k.startswith("lm_head")}
    if not a.tie_embeddings:  # tied checkpoints (Qwen2-0.5B style) carry no separate head
        rename["lm_head.weight"] = "lm_head.weight"
    return Layout(name, shift, a, cfg.get("mask_token_id"), cfg.get("eos_token_id"),
                  cfg.get("bos_token_id"), cfg.get("pad_token_id"), rename)


def _llada(cfg: dict, path: Path) -> Layout:
    for key, want in (("block_type", "llama"), ("layer_norm_type", "rms"), ("activation_type", "silu")):
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{path}: LLaDA {key}={cfg[key]!r} is not supported (only {want!r})")
    if cfg.get("alibi"):
        raise CheckpointError(f"{path}: LLaDA with alibi=true is not supported (RoPE only)")
    d, n_heads = _need(cfg, "d_model", path), _need(cfg, "n_heads", path)
    a = ModelArgs(
        vocab_size=cfg.get("embedding_size") or _need(cfg, "vocab_size", path),
        dim=d,
        n_layers=_need(cfg, "n_layers", path),
        n_heads=n_heads,
        n_kv_heads=cfg.get("n_kv_heads") or n_heads,
        intermediate_size=cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(cfg.get("include_qkv_bias", False) or cfg.get("include_bias", False)),
        tie_embeddings=bool(cfg.get("weight_tying", False)),
        max_seq_len=int(cfg.get("max_sequence_length", 4096)),
    )
    rename = {"embed_tokens.weight": "model.transformer.wte.weight",
              "norm.weight": "model.transformer.ln_f.weight",
              "lm_head.weight": "model.transformer.ff_out.weight"}
    per_layer = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
                 "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
                 "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
                 "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}
    for ours in _our_names(a):
        if ours.startswith("layers."):
            _, i, rest = ours.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            rename[ours] = f"model.transformer.blocks.{i}.{per_layer[mod]}.{leaf}"
    mask_id = cfg.get("mask_token_id", LLADA_MASK_ID)
    return Layout("llada", 0, a, mask_id, cfg.get("eos_token_id"), cfg.get("bos_token_id"),
                  cfg.get("pad_token_id"), rename)


def _our_names(a: ModelArgs) -> list[str]:
    with torch.device("meta"):
        names = list(Transformer(a).state_dict().keys())
    if a.tie_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    return names


def detect_layout(cfg: dict, path: Path) -> Layout:
    archs = cfg.get("architectures") or []
    mtype = str(cfg.get("model_type", "")).lower()
    if mtype == "dream" or "DreamModel" in archs:
        return _qwen2_like(cfg, path, name="dream", shift=1, causal=False, qkv_bias=True)
    if mtype == "llada" or "LLaDAModelLM" in archs:
        return _llada(cfg, path)
    if mtype == "qwen2" or "Qwen2ForCausalLM" in archs:
        # a causal Qwen2 LM (the evaluation judge); `is_causal: false` marks a bidirectional one
        return _qwen2_like(cfg, path, name="qwen2", shift=1, causal=cfg.get("is_causal", True),
                           qkv_bias=True)
    if mtype == "llama" or "LlamaForCausalLM" in archs:
        return _qwen2_like(cfg, path, name="llama", shift=1, causal=cfg.get("is_causal", True),
                           qkv_bias=bool(cfg.get("attention_bias", False)))
    raise CheckpointError(
        f"{path}: unknown architecture (model_type={cfg.get('model_type')!r}, architectures={archs}); "
        "supported: Dream (DreamModel), LLaDA (LLaDAModelLM), Qwen2/Llama causal LMs")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {index.name} are missing: {missing}")
        return [path / f for f in files]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weights (*.bin/*.pt) found; safetensors required "
                              "(pickled weights from outside are never loaded)")
    raise CheckpointError(f"{path}: missing model.safetensors (or model.safetensors.index.json)")


def _load_weights(model: Transformer, layout: Layout, files: list[Path], path: Path) -> None:
    want = model.state_dict()
    have: dict[str, tuple[Path, list[int]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                have[k] = (f, sf.get_slice(k).get_shape())
    problems = []
    for ours, theirs in layout.rename.items():
        if theirs not in have:
            problems.append(f"missing parameter {theirs!r}")
        elif list(have[theirs][1]) != list(want[ours].shape):
            problems.append(f"shape mismatch for {theirs!r}: checkpoint {list(have[theirs][1])}, "
                            f"config implies {list(want[ours].shape)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems[:8])
                              + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, theirs in layout.rename.items():
        by_file.setdefault(have[theirs][0], []).append((ours, theirs))
    with torch.no_grad():
        for f, pairs in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for ours, theirs in pairs:
                    want[ours].copy_(sf.get_tensor(theirs))


def fingerprint(path: Path, full_hash_limit: int = 1 << 30) -> str:
    """Identity of a checkpoint: sha256 of config.json and the weights. Checkpoints over 1 GiB hash
    each file's safetensors header, size and 64 strided 64 KiB blocks (a 7B model in seconds)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    files = _weight_files(path)
    total = sum(f.stat().st_size for f in files)
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            if total <= full_hash_limit:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))
                for i in range(64):
                    fh.seek(size * i // 64)
                    h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: Path):
    """transformers tokenizer without remote code: tokenizer.json if present, else vocab+merges."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns that "Dream" is not a model type it knows: expected
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as first:  # custom tokenizer classes (DreamTokenizer) need remote code
        kwargs = {}
        tc = path / "tokenizer_config.json"
        if tc.exists():
            conf = json.loads(tc.read_text())
            kwargs = {k: v for k, v in conf.items() if k.endswith("_token") and isinstance(v, str)}
            if conf.get("chat_template"):
                kwargs["chat_template"] = conf["chat_template"]
        if (path / "tokenizer.json").exists():
            return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **kwargs)
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            from transformers import Qwen2TokenizerFast

            return Qwen2TokenizerFast(vocab_file=str(path / "vocab.json"),
                                      merges_file=str(path / "merges.txt"), **kwargs)
        raise CheckpointError(f"{path}: no usable tokenizer files (tokenizer.json or "
                              f"vocab.json+merges.txt): {first}") from first
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A frozen masked diffusion LM. `hidden()` runs the full pass; `logits()` reads the distribution
    at requested positions with the layout's shift applied, so the LM head runs only where needed."""

    def __init__(self, model: Transformer, layout: Layout, *, tokenizer=None, config=None,
                 name: str = "", identity: str = "", source: dict[str, str] | None = None):
        super().__init__()
        self.model = model
        self.shift = layout.shift
        self.layout = layout.name
        self.mask_id = layout.mask_id
        self.eos_id = layout.eos_id
        self.bos_id = layout.bos_id
        self.pad_id = layout.pad_id if layout.pad_id is not None else layout.eos_id
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.identity = identity  # fingerprint of config + weights; samplers record it
        self.repo = (source or {}).get("repo")  # hub repo id and commit when loaded from the hub cache
        self.revision = (source or {}).get("revision")

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def context(self, ids: Tensor, attention_mask: Tensor | None = None) -> Context:
        return self.model.context(attention_mask, ids.shape[1], ids.shape[0], self.dtype, ids.device)

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.embed_tokens(ids)

    def lm_head(self, h: Tensor) -> Tensor:
        return self.model.lm_head(h)

    def hidden(self, ids: Tensor, attention_mask: Tensor | None = None,
               ctx: Context | None = None, cache: BlockKVCache | None = None) -> Tensor:
        """Last-layer hidden states after the final norm, [B, L, H]; with a `cache` (sampler.kvcache),
        the columns it does not compute come from it."""
        return self.model(ids, attention_mask, ctx, cache)

    def shifted(self, h: Tensor) -> Tensor:
        """Hidden states re-indexed so that row p predicts the token at position p."""
        if self.shift == 0:
            return h
        return torch.cat([h[:, :1], h[:, :-1]], dim=1)  # position 0 has no predecessor: reuse 0

    def logits(self, h: Tensor, positions: Tensor | None = None) -> Tensor:
        """Logits of the distribution at `positions` ([B, P] long; None = every position)."""
        if positions is None:
            return self.lm_head(self.shifted(h))
        src = (positions - self.shift).clamp_min(0)
        rows = torch.gather(h, 1, src[..., None].expand(-1, -1, h.shape[-1]))
        return self.lm_head(rows)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.hidden(ids, attention_mask)
        return h, self.logits(h)


Dtype = Literal["float32", "bfloat16", "float16"]  # weights' dtype names in configs and requests


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A dtype name (`Dtype`) as a torch dtype; None and "auto" stay None (the checkpoint's own dtype)."""
    if name in (None, "auto"):
        return None
    if name not in get_args(Dtype):
        raise ValueError(f"dtype must be one of {', '.join(get_args(Dtype))}, auto or null, got {name!r}")
    return getattr(torch, name)


def backbone_dir(path: str | Path | None) -> Path:
    """The checkpoint directory a backbone argument names (`resolve_checkpoint`: None, "" or "embedded" =
    the embedded backbone; a directory; a hub id). FileNotFoundError (naming the path) when it has no
    config.json."""
    try:
        p = resolve_checkpoint(path)
    except CheckpointError as e:
        raise FileNotFoundError(str(e)) from e
    if not (p / "config.json").is_file():
        hint = " (the embedded backbone is not built: pass --backbone DIR)" if p == DEFAULT_BACKBONE else ""
        raise FileNotFoundError(f"backbone checkpoint {p} not found: no config.json{hint}")
    return p


def load_backbone(path: str | Path | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, *, require_mask: bool = True) -> Backbone:
    """Load a Dream / LLaDA (or causal Qwen2/Llama judge) checkpoint: a directory, a hub id
    "owner/name[@revision]" (`resolve_checkpoint`), or None = the embedded backbone."""
    from transformers import PretrainedConfig

    path = resolve_checkpoint(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from e
    layout = detect_layout(cfg, path)
    if require_mask and layout.mask_id is None:
        raise CheckpointError(f"{path}: config has no mask_token_id; a masked diffusion LM needs one")
    files = _weight_files(path)
    if dtype is None:
        named = str(cfg.get("torch_dtype") or cfg.get("dtype"))
        dtype = parse_dtype(named) if named in get_args(Dtype) else torch.float32
        if torch.device(device).type == "cpu" and dtype == torch.float16:
            dtype = torch.float32
    with torch.device("meta"):
        model = Transformer(layout.args)
    model = model.to_empty(device=device)
    model.rotary.__init__(layout.args.head_dim, layout.args.rope_theta)  # buffers are not saved
    model.rotary.to(device)
    if layout.args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _load_weights(model, layout, files, path)
    model = model.to(dtype).eval().requires_grad_(False)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(path)
    if tokenizer is not None and layout.eos_id is None:
        layout.eos_id = tokenizer.eos_token_id
    if tokenizer is not None and layout.bos_id is None:
        layout.bos_id = tokenizer.bos_token_id
    config = PretrainedConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    return Backbone(model, layout, tokenizer=tokenizer, config=config, name=checkpoint_name(path, cfg),
                    identity=fingerprint(path), source=hub_source(path))


def save_backbone(model: Transformer, path: str | Path, *, layout: str = "dream", mask_id: int | None,
                  bos_id: int | None, eos_id: int | None, pad_id: int | None, tokenizer=None,
                  name: str = "", dtype: torch.dtype = torch.bfloat16, extra: dict | None = None) -> Path:
    """Write our Transformer in a standard on-disk layout: "dream" (masked diffusion, shifted) or
    "qwen2" (a causal LM that transformers and vLLM load as Qwen2ForCausalLM)."""
    a = model.args
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "hidden_size": a.dim, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "intermediate_size": a.intermediate_size,
        "vocab_size": a.vocab_size, "rope_theta": a.rope_theta, "rms_norm_eps": a.norm_eps,
        "tie_word_embeddings": a.tie_embeddings, "max_position_embeddings": a.max_seq_len,
        "hidden_act": "silu", "attention_dropout": 0.0, "use_sliding_window": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "_name_or_path": name,
    }
    if layout == "dream":
        if not a.qkv_bias or a.causal:
            raise ValueError("the Dream layout needs qkv_bias=True and causal=False")
        cfg.update(architectures=["DreamModel"], model_type="Dream", mask_token_id=mask_id)
    elif layout == "qwen2":
        if not a.qkv_bias or not a.causal:
            raise ValueError("the qwen2 (causal LM) layout needs qkv_bias=True and causal=True")
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    else:
        raise ValueError(f"unknown layout {layout!r}: expected 'dream' or 'qwen2'")
    cfg.update(extra or {})
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if a.tie_embeddings:
        sd.pop("lm_head.weight")
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in sd.items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
