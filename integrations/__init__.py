"""Bridges to other tools (lm-evaluation-harness); `sampler/` stays plain PyTorch and imports none of them."""
