"""Byte-level BPE tokenizers trained with `tokenizers`, with the special tokens a masked diffusion LM
needs (BOS, EOS, PAD, MASK). Used for the embedded backbone and for the small test checkpoints."""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, PAD, MASK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, MASK]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, chat_template: str | None = None,
                        extra_special: list[str] | None = None):
    """Train a byte-level BPE and wrap it as a transformers fast tokenizer (saved as tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS + list(extra_special or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   mask_token=MASK, additional_special_tokens=list(extra_special or []))
    if chat_template:
        fast.chat_template = chat_template
    return fast
