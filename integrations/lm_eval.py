"""lm-evaluation-harness model `jointgen`: generate_until tasks decoded by `sampler.generate`.

    jointgen lm-eval --model jointgen --model_args mode=joint,k=4,batch_size=32 \\
        --include_path integrations/lm_eval_tasks --tasks jointgen_tasks --limit 20
    python -m integrations.lm_eval ...           # the same without the jointgen command

lm-eval knows only the models in its registry, which is filled at import; it has no plugin entry point.
So, like Dream's, LLaDA's and Fast-dLLM's own evaluation scripts, this module registers its model class
when imported, and `main` hands the rest of the command line to lm-eval's own CLI (every lm-eval flag
works). In Python, `import integrations.lm_eval` before `lm_eval.simple_evaluate(model="jointgen", ...)`.

model_args: `backbone` (as `load_backbone`: a checkpoint dir or hub id; default: the embedded backbone),
`sampler` (auto: a trained sampler next to the backbone; none; or a sampler directory), `device` (the
CPU when CUDA is absent, whatever lm-eval's CLI says), `dtype`, `batch_size` (sequences per `generate`
call), `max_gen_toks` (when a task sets none), `seed`, and every field of `sampler.settings.DecodeSettings`
(mode, k, temperature, top_p, policy, block_length, stop_at_eos, threshold, kv_cache, order, fill),
validated there; `stop_at_eos` defaults to true. The decoding is the method under evaluation, so it comes
from model_args alone: a task's `until` and `max_gen_toks` are honoured, its sampling keys (do_sample,
temperature, ...) are ignored with a warning.

Log-likelihood requests (multiple-choice and perplexity tasks) are refused: see LOGLIKELIHOOD_REFUSED.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

try:
    import lm_eval.models  # noqa: F401  (the stock models: lm-eval imports them only into an empty registry)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"{e}: lm-evaluation-harness is not installed; pip install -e '.[lm-eval]'") from None
from tqdm import tqdm

from sampler import JointSampler, load_backbone
from sampler.backbone import backbone_dir, parse_dtype
from sampler.decode import cut_at_stop, encode_text, generate
from sampler.joint import find_sampler, sampler_candidates
from sampler.metrics import truncate_at_eos
from sampler.settings import DecodeSettings

log = logging.getLogger("jointgen.lm_eval")

LOGLIKELIHOOD_REFUSED = (
    "the jointgen model answers generate_until requests only: a masked diffusion LM has no cheap exact "
    "likelihood (only a Monte Carlo bound over masking ratios), so loglikelihood and "
    "loglikelihood_rolling requests (multiple-choice and perplexity tasks) are refused; evaluate "
    "generative tasks (e.g. gsm8k, jointgen_tasks)")
TASK_KEYS_HONOURED = ("until", "max_gen_toks")


def settings_from_args(decode: dict[str, Any]) -> DecodeSettings:
    """The decoding settings among model_args; ValueError naming each bad or unknown key."""
    try:
        return DecodeSettings(**{"stop_at_eos": True, **decode})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'model_args'}: {err['msg']}"
                             for err in e.errors())
        raise ValueError(f"jointgen model_args: {problems}") from None


def resolve_sampler(choice: str | None, checkpoint: Path, backbone) -> JointSampler | None:
    """auto: the first sampler next to the backbone that was trained for it (else none); none; a dir."""
    if choice is None or str(choice).lower() == "none":
        return None
    if choice == "auto":
        return find_sampler(checkpoint, backbone)
    return JointSampler.load(choice, backbone)  # refuses another backbone's sampler


@register_model("jointgen")
class JointGenLM(LM):
    def __init__(self, backbone: str | None = None, sampler: str | None = "auto", *,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 16,
                 max_batch_size: int | None = None, max_gen_toks: int = 256, seed: int = 0, **decode: Any):
        super().__init__()
        self.settings = settings_from_args(decode)
        if str(batch_size).startswith("auto"):  # nothing to tune: one generate call holds any batch
            batch_size = max_batch_size or 64
        if int(batch_size) < 1 or int(max_gen_toks) < 1:
            raise ValueError(f"jointgen model_args: batch_size ({batch_size}) and max_gen_toks "
                             f"({max_gen_toks}) must be >= 1")
        self.batch_size, self.max_gen_toks, self.seed = int(batch_size), int(max_gen_toks), int(seed)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's CLI says cuda:0 unless told otherwise
                log.warning("device %s: CUDA is not available, decoding on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoint = backbone_dir(backbone)  # where `sampler=auto` looks
        self.backbone = load_backbone(backbone, device=device, dtype=parse_dtype(dtype))
        self._device = self.backbone.device
        self.sampler = resolve_sampler(sampler, checkpoint, self.backbone)
        if self.settings.mode == "joint" and self.sampler is None:
            looked = [str(p) for p in sampler_candidates(checkpoint)]
            raise ValueError(f"jointgen model_args: mode=joint needs a trained sampler; sampler={sampler!r} "
                             f"gave none (looked in {looked}): pass sampler=DIR")
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> JointGenLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict | None = None) -> JointGenLM:
        # lm-eval's CLI always passes batch_size (default 1): model_args win, where the base class would
        # fail on the key given twice
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # ---- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        bb, limit = self.backbone, self.backbone.args.max_seq_len
        jobs = []  # (prompt ids, gen_length, stop strings) per request
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            ignored = sorted(set(gen_kwargs) - set(TASK_KEYS_HONOURED))
            if ignored:
                self._warn_once(f"ignoring the task's generation keys {ignored}: the decoding comes from "
                                f"model_args ({self.settings.model_dump()})")
            kw = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks)
            gen_length = kw["max_gen_toks"]
            if gen_length >= limit:
                raise ValueError(f"max_gen_toks {gen_length} leaves no room for a prompt in the context of "
                                 f"{limit} tokens")
            ids = encode_text(bb, context)
            if len(ids) + gen_length > limit:  # as lm-eval's HF model: keep the end of the context
                self._warn_once(f"contexts longer than {limit} - max_gen_toks tokens are cut on the left")
                ids = ids[len(ids) + gen_length - limit:]
            jobs.append((ids, gen_length, [s for s in kw["until"] if s]))

        # one generate call per chunk of equal gen_length; similar prompt lengths pad least
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i][1], len(jobs[i][0])))
        out: list[str] = [""] * len(jobs)
        bar = tqdm(total=len(jobs), disable=disable_tqdm, desc="jointgen generate_until")
        start = 0
        while start < len(order):
            gen_length = jobs[order[start]][1]
            chunk = [i for i in order[start:start + self.batch_size] if jobs[i][1] == gen_length]
            r = generate(bb, [jobs[i][0] for i in chunk], self.settings, sampler=self.sampler,
                         gen_length=gen_length, seed=self.seed + start)
            for i, tokens in zip(chunk, r.tokens, strict=True):
                answer = truncate_at_eos(tokens, bb.eos_id)  # the text ends at EOS in every mode
                text = bb.tokenizer.decode(answer, skip_special_tokens=True)
                out[i], _ = cut_at_stop(text, jobs[i][2])
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            bar.update(len(chunk))
            start += len(chunk)
        bar.close()
        return out

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        raise NotImplementedError(LOGLIKELIHOOD_REFUSED)

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        raise NotImplementedError(LOGLIKELIHOOD_REFUSED)

    # ---- chat template (--apply_chat_template) ------------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        tok = self.backbone.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError(f"backbone {self.backbone.name!r} has no chat template: "
                             "run without --apply_chat_template")
        return tok.apply_chat_template(chat_history, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.backbone.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.backbone.tokenizer, "chat_template", None) if chat_template else None

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning(message)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI (`lm-eval run ...`, or the flags alone) with the `jointgen` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval's parser reads sys.argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
