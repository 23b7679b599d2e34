"""Small random checkpoints in real on-disk layouts, for tests and benchmarks that must not wait for
the embedded backbone. They go through exactly the same loading code as a 7B checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from sampler.backbone import load_tokenizer, save_backbone
from sampler.embedded.tokenizer import train_bpe_tokenizer
from sampler.model import ModelArgs, Transformer

TOY_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "San Francisco, New York, Los Angeles and San Diego are cities.",
    "All that glitters is not gold; all who wander are not lost.",
    "To be, or not to be, that is the question.",
    "Name three fruits: apple, banana, cherry.",
] * 20

TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|bos|>' if loop.first }}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def make_toy_backbone(path: str | Path, *, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                      n_kv_heads: int = 2, vocab_size: int = 320, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write a random Dream-layout masked diffusion LM with a trained byte-level BPE tokenizer."""
    tok = train_bpe_tokenizer(TOY_TEXT, vocab_size, chat_template=TOY_CHAT_TEMPLATE)
    args = ModelArgs(vocab_size=len(tok), dim=dim, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, intermediate_size=2 * dim, max_seq_len=512)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():  # larger-than-default logits so the toy has confident, varied distributions
        model.lm_head.weight.mul_(4.0)
    return save_backbone(model, path, layout="dream", mask_id=tok.mask_token_id, bos_id=tok.bos_token_id,
                         eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, tokenizer=tok,
                         name=f"toy-dream-{dim}x{n_layers}", dtype=dtype)


def make_toy_judge(path: str | Path, backbone_dir: str | Path, *, dim: int = 64, n_layers: int = 2,
                   n_heads: int = 4, n_kv_heads: int = 2, seed: int = 3) -> Path:
    """Write a random causal judge (Qwen2 layout) that shares the tokenizer of the toy backbone in
    `backbone_dir`, as the embedded judge shares the embedded backbone's."""
    tok = load_tokenizer(Path(backbone_dir))
    torch.manual_seed(seed)
    judge = Transformer(ModelArgs(vocab_size=len(tok), dim=dim, n_layers=n_layers, n_heads=n_heads,
                                  n_kv_heads=n_kv_heads, intermediate_size=2 * dim, causal=True,
                                  max_seq_len=256))
    return save_backbone(judge, path, layout="qwen2", mask_id=None, bos_id=tok.bos_token_id,
                         eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, tokenizer=tok,
                         dtype=torch.float32)
