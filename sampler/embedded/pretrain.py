"""Pretrain the embedded default backbone (a masked diffusion LM, Dream layout) and its autoregressive
judge (causal Qwen2 layout) on this machine's CPU. Resumable, time-budgeted, deterministic.

    jointgen pretrain backbone --minutes 80   # masked diffusion LM -> sampler/assets/backbone
    jointgen pretrain judge --minutes 20      # causal LM, same tokenizer -> sampler/assets/judge
    jointgen pretrain prompts                 # held-out prompt files (sampler/assets/prompts)
    jointgen pretrain check                   # acceptance check of the shipped checkpoints

(`python -m sampler.embedded.pretrain ...` is the same.)

Backbone objective (LLaDA / MDLM): per row t ~ U(eps, 1), each maskable token is replaced by [MASK]
with probability t, loss = sum over masked tokens of CE / t, divided by the number of maskable
tokens. Dream's shift: the hidden state at p-1 predicts token p, so a masked position p is read
from row p-1 (exactly what `Backbone.logits` does at decode time); position 0 is always BOS and is
never masked. Training mix per step: language windows (records packed `<bos> r <eos> <bos> r ...`,
every token maskable) and task examples (`<bos> prompt answer <eos>...`, left-padded; only the
answer and its EOS tail are maskable, as in LLaDA's SFT, because at generation time the prompt is
always given and the model must learn to end answers).

The judge trains with causal attention and next-token loss on the language windows only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sampler.backbone import DEFAULT_BACKBONE, DEFAULT_JUDGE, load_tokenizer, save_backbone
from sampler.embedded.corpus import load_corpus
from sampler.embedded.tasks import TASKS, task_training_pair
from sampler.embedded.tokenizer import BOS
from sampler.model import ModelArgs, Transformer

# the embedded model has no chat roles: a chat is the concatenation of its messages after BOS,
# so a chat request carrying a task prompt reads exactly like the raw prompt
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@dataclass
class Config:
    kind: str  # "backbone" | "judge"
    run_dir: Path
    export_dir: Path
    tokenizer_dir: Path | None
    vocab: int
    seq_len: int
    task_len: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    batch: int
    task_batch: int
    lr: float
    min_lr_ratio: float
    warmup: int
    total_steps: int
    weight_decay: float
    seed: int
    minutes: float
    eval_every: int
    export_minutes: float
    save_minutes: float
    autocast: bool
    threads: int
    task_weights: dict[str, float] | None = None  # sampling weight of each task (None: uniform)
    keep_best: bool = False  # export only when the validation metric improves (the judge overfits)
    eps: float = 1e-3

    @property
    def causal(self) -> bool:
        return self.kind == "judge"


# ---------------------------------------------------------------------------------------------
# Tokenizer and data
# ---------------------------------------------------------------------------------------------


def build_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE over corpus + task text; prepends BOS on encode (as LLaDA's tokenizer does) so
    every caller that tokenizes a prompt gets the BOS the model was trained to see at position 0."""
    from tokenizers import processors

    from sampler.embedded.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts, vocab, chat_template=CHAT_TEMPLATE)
    bos_id = tok.convert_tokens_to_ids(BOS)
    tok.backend_tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def task_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(task_training_pair(rng)) for _ in range(n)]


class LanguageData:
    """Random windows of `seq_len` tokens that start at a record's BOS. The packing order of records
    is reshuffled each epoch (seeded), so following records are not memorised as context."""

    def __init__(self, records: list[str], tok, seq_len: int, seed: int):
        enc = tok(records, add_special_tokens=False)["input_ids"]
        self.docs = [[tok.bos_token_id, *ids, tok.eos_token_id] for ids in enc]
        self.seq_len, self.seed = seq_len, seed
        self.n_tokens = sum(len(d) for d in self.docs)
        self.n_chars = sum(len(r) for r in records)
        self._epoch = -1

    def _pack(self, epoch: int) -> None:
        order = list(range(len(self.docs)))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        stream, starts = [], []
        for i in order:
            starts.append(len(stream))
            stream.extend(self.docs[i])
        stream.extend(self.docs[order[0]] * (self.seq_len // len(self.docs[order[0]]) + 1))  # tail
        self.stream = torch.tensor(stream, dtype=torch.long)
        self.starts = torch.tensor(starts, dtype=torch.long)
        self._epoch = epoch

    def batch(self, step: int, batch: int) -> Tensor:
        # about one epoch of window starts per len(docs)/batch steps; deterministic in (seed, step)
        epoch = step * batch // len(self.docs)
        if epoch != self._epoch:
            self._pack(epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = self.starts[torch.randint(len(self.starts), (batch,), generator=g)]
        return self.stream[idx[:, None] + torch.arange(self.seq_len)]

    def fixed_windows(self, n: int) -> Tensor:
        """Deterministic evaluation windows: each record from its BOS, packed with the next ones."""
        stream: list[int] = []
        starts = []
        for d in self.docs:
            starts.append(len(stream))
            stream.extend(d)
        stream.extend(self.docs[0] * (self.seq_len // len(self.docs[0]) + 1))
        s = torch.tensor(stream)
        pick = torch.linspace(0, len(starts) - 1, min(n, len(starts))).long()
        st = torch.tensor(starts)[pick]
        return s[st[:, None] + torch.arange(self.seq_len)]


def task_batch(tok, step: int, batch: int, task_len: int, seed: int,
               weights: dict[str, float] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded task rows `<pad>.. <bos> prompt answer <eos> x e`, e >= 1 random, total length of
    the real part <= task_len. Returns ids, attention mask, and the maskable (answer + EOS) positions."""
    rng = random.Random(seed * 1_000_003 + step + 17)
    ids = torch.full((batch, task_len), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros(batch, task_len, dtype=torch.bool)
    ans = torch.zeros(batch, task_len, dtype=torch.bool)
    names = sorted(weights or TASKS)
    w = [(weights or {}).get(n, 1.0) for n in names]
    pairs = []
    for _ in range(batch):
        task = TASKS[rng.choices(names, w)[0]]
        ex = task.make_prompt(rng)
        pairs.append((ex["prompt"], task.reference_answer(ex, rng)))
    p_ids = tok([p for p, _ in pairs])["input_ids"]
    a_ids = tok([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    for i, (p, a) in enumerate(zip(p_ids, a_ids, strict=True)):
        room = task_len - len(p) - len(a)
        if room < 1:
            raise ValueError(f"task example longer than task_len={task_len}: {pairs[i]}")
        n_eos = rng.randint(1, room)
        row = p + a + [tok.eos_token_id] * n_eos
        ids[i, task_len - len(row):] = torch.tensor(row)
        att[i, task_len - len(row):] = True
        ans[i, task_len - len(a) - n_eos:] = True
    return ids, att, ans


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------


def masked_diffusion_loss(model: Transformer, ids: Tensor, maskable: Tensor, mask_id: int,
                          gen: torch.Generator, eps: float, attention_mask: Tensor | None = None,
                          t: Tensor | None = None) -> tuple[Tensor, dict]:
    """LLaDA loss with Dream's shift. Returns (loss, stats with summed unweighted CE and counts)."""
    B, L = ids.shape
    if t is None:
        t = eps + (1 - eps) * torch.rand(B, generator=gen)
    masked = (torch.rand(B, L, generator=gen) < t[:, None]) & maskable
    masked[:, 0] = False
    x = torch.where(masked, torch.full_like(ids, mask_id), ids)
    h = model(x, attention_mask)
    b, p = masked.nonzero(as_tuple=True)
    logits = model.lm_head(h[b, p - 1])  # Dream: hidden at p-1 predicts token p
    ce = F.cross_entropy(logits.float(), ids[b, p], reduction="none")
    n_maskable = maskable[:, 1:].sum().clamp_min(1)
    loss = (ce / t[b]).sum() / n_maskable
    return loss, {"ce_sum": ce.sum().item(), "n_masked": len(ce),
                  "elbo_sum": (ce / t[b]).sum().item(), "n_maskable": n_maskable.item()}


def causal_loss(model: Transformer, ids: Tensor) -> tuple[Tensor, dict]:
    h = model(ids)
    logits = model.lm_head(h[:, :-1])
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                         reduction="none")
    return ce.mean(), {"ce_sum": ce.sum().item(), "n": ce.numel()}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def lr_at(cfg: Config, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.total_steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def model_args(cfg: Config, vocab_size: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab_size, dim=cfg.dim, n_layers=cfg.layers, n_heads=cfg.heads,
                     n_kv_heads=cfg.kv_heads, intermediate_size=cfg.ffn, qkv_bias=True,
                     tie_embeddings=False, causal=cfg.causal, max_seq_len=max(cfg.seq_len, 512))


def get_tokenizer(cfg: Config, splits: dict[str, list[str]]):
    tok_dir = cfg.tokenizer_dir or (cfg.run_dir / "tokenizer")
    if (tok_dir / "tokenizer.json").exists():
        return load_tokenizer(tok_dir)
    if cfg.kind == "judge":
        raise SystemExit(f"{tok_dir}: no tokenizer; the judge must reuse the backbone's "
                         "(--tokenizer-dir runs/pretrain_backbone/tokenizer or sampler/assets/backbone)")
    tok = build_tokenizer(splits["train"] + task_texts(20000, cfg.seed), cfg.vocab)
    tok.save_pretrained(str(tok_dir))
    return load_tokenizer(tok_dir)


@torch.no_grad()
def evaluate(cfg: Config, model: Transformer, tok, val: Tensor, val_tasks) -> dict:
    """Fixed-seed validation: masked-token CE and ELBO (backbone), or next-token NLL (judge)."""
    model.eval()
    out: dict = {}
    gen = torch.Generator().manual_seed(1234)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.autocast else nullcontext()
    with ctx:
        if cfg.causal:
            tot, n = 0.0, 0
            for chunk in val.split(64):
                _, s = causal_loss(model, chunk)
                tot, n = tot + s["ce_sum"], n + s["n"]
            out["val_nll"] = tot / n
        else:
            agg = {"ce_sum": 0.0, "n_masked": 0, "elbo_sum": 0.0, "n_maskable": 0}
            for chunk in val.split(64):
                # t on a fixed grid so that evaluations are comparable across checkpoints
                t = torch.linspace(cfg.eps, 1.0, len(chunk))
                _, s = masked_diffusion_loss(model, chunk, torch.ones_like(chunk, dtype=torch.bool),
                                             tok.mask_token_id, gen, cfg.eps, t=t)
                for k in agg:
                    agg[k] += s[k]
            out["val_masked_ce"] = agg["ce_sum"] / max(1, agg["n_masked"])
            out["val_elbo_per_token"] = agg["elbo_sum"] / max(1, agg["n_maskable"])
            ids, att, ans = val_tasks
            t = torch.linspace(cfg.eps, 1.0, len(ids))
            _, s = masked_diffusion_loss(model, ids, ans, tok.mask_token_id, gen, cfg.eps, att, t=t)
            out["val_task_masked_ce"] = s["ce_sum"] / max(1, s["n_masked"])
    model.train()
    return out


def export(cfg: Config, model: Transformer, tok, step: int) -> None:
    """Write the checkpoint to a temporary directory, then swap it in, so readers never see half."""
    tmp = cfg.export_dir.with_name(cfg.export_dir.name + ".tmp")
    old = cfg.export_dir.with_name(cfg.export_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    a = model.args
    extra = {"embedded_pretrain": {"step": step, "seq_len": cfg.seq_len, "task_len": cfg.task_len,
                                   "seed": cfg.seed, "corpus": "debian fortunes + sampler.embedded.tasks"}}
    if cfg.causal:
        save_backbone(model, tmp, layout="qwen2", mask_id=None, bos_id=tok.bos_token_id,
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, tokenizer=tok,
                      name=f"embedded-judge-{a.dim}x{a.n_layers}", extra=extra)
    else:
        save_backbone(model, tmp, layout="dream", mask_id=tok.mask_token_id, bos_id=tok.bos_token_id,
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, tokenizer=tok,
                      name=f"embedded-dream-{a.dim}x{a.n_layers}", extra=extra)
    if cfg.export_dir.exists():
        cfg.export_dir.rename(old)
    tmp.rename(cfg.export_dir)
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    splits = load_corpus()
    tok = get_tokenizer(cfg, splits)
    lang = LanguageData(splits["train"], tok, cfg.seq_len, cfg.seed)
    val_lang = LanguageData(splits["val"], tok, cfg.seq_len, cfg.seed)
    val = val_lang.fixed_windows(512)
    val_tasks = task_batch(tok, 0, 256, cfg.task_len, cfg.seed + 999)
    print(f"[pretrain] {cfg.kind}: {len(lang.docs)} train records, {lang.n_tokens} tokens "
          f"({lang.n_chars / lang.n_tokens:.2f} chars/token), {len(val_lang.docs)} val records, "
          f"vocab {len(tok)}", flush=True)

    torch.manual_seed(cfg.seed)
    args = model_args(cfg, len(tok))
    model = Transformer(args)
    for name, p in model.named_parameters():  # GPT-2 style small init keeps the early loss sane
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.layers) if name.endswith(
                ("o_proj.weight", "down_proj.weight")) else 1.0))
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    n_params = sum(p.numel() for p in model.parameters())
    state_path = cfg.run_dir / "state.pt"
    step, elapsed, best = 0, 0.0, math.inf
    metric = "val_nll" if cfg.causal else "val_masked_ce"
    if state_path.exists():
        st = torch.load(state_path, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed = int(st["step"]), float(st["elapsed"])
        best = float(st.get("best", math.inf))
        print(f"[pretrain] resumed from {state_path} at step {step} ({elapsed / 60:.1f} min trained)",
              flush=True)
    print(f"[pretrain] {n_params / 1e6:.2f}M params, args {args.to_dict()}", flush=True)
    (cfg.run_dir / "config.json").write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}, indent=1))

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed, "best": best}, tmp)
        os.replace(tmp, state_path)

    def log(rec: dict) -> None:
        with open(cfg.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    from tqdm import tqdm

    budget = cfg.minutes * 60
    t_start = time.time() - elapsed
    last_export = last_save = time.time()
    bar = tqdm(total=cfg.total_steps, initial=step, dynamic_ncols=True, mininterval=5, file=sys.stdout)
    ema = None
    model.train()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.autocast else nullcontext
    session_start = time.time()
    stop = {"signal": None}

    def on_signal(signum, _frame):  # finish the step, save state and export, then exit
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while step < cfg.total_steps and time.time() - session_start < budget and stop["signal"] is None:
        if step % cfg.eval_every == 0:
            rec = {"step": step, "minutes": round((time.time() - t_start) / 60, 2), **evaluate(
                cfg, model, tok, val, val_tasks)}
            if cfg.keep_best and rec[metric] < best:
                best = rec[metric]
                export(cfg, model, tok, step)
                rec["exported"] = True
            bar.write(json.dumps(rec))
            log(rec)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        gen = torch.Generator().manual_seed(cfg.seed * 7 + step)
        with ctx():
            x = lang.batch(step, cfg.batch)
            if cfg.causal:
                loss, _ = causal_loss(model, x)
            else:
                loss, _ = masked_diffusion_loss(model, x, torch.ones_like(x, dtype=torch.bool),
                                                tok.mask_token_id, gen, cfg.eps)
                if cfg.task_batch:
                    ids, att, ans = task_batch(tok, step, cfg.task_batch, cfg.task_len, cfg.seed,
                                               cfg.task_weights)
                    tl, _ = masked_diffusion_loss(model, ids, ans, tok.mask_token_id, gen, cfg.eps, att)
                    # weight by token share so the task rows count like language rows of their size
                    w = cfg.task_batch * cfg.task_len / (cfg.batch * cfg.seq_len)
                    loss = (loss + w * tl) / (1 + w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = time.time() - t_start
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr_at(cfg, step):.2e}", refresh=False)
        if time.time() - last_save > cfg.save_minutes * 60:
            save_state()
            last_save = time.time()
        if not cfg.keep_best and time.time() - last_export > cfg.export_minutes * 60:
            export(cfg, model, tok, step)
            last_export = time.time()
    bar.close()
    rec = {"step": step, "minutes": round(elapsed / 60, 2), "final": True,
           **evaluate(cfg, model, tok, val, val_tasks)}
    if not cfg.keep_best or rec[metric] < best:
        best = rec[metric]
        export(cfg, model, tok, step)
        rec["exported"] = True
        print(f"[pretrain] exported {cfg.export_dir} at step {step}", flush=True)
    print(json.dumps(rec), flush=True)
    log(rec)
    save_state()


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="jointgen pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["backbone", "judge"])
    p.add_argument("--run-dir", type=Path, default=None,
                   help="state, log, tokenizer (default runs/pretrain_<kind>)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help=f"checkpoint export (default {DEFAULT_BACKBONE} / {DEFAULT_JUDGE})")
    p.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="reuse this tokenizer (the judge: the backbone's); default <run-dir>/tokenizer")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--task-len", type=int, default=32)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--task-batch", type=int, default=32, help="task rows per step (backbone only)")
    p.add_argument("--task-weights", default="",
                   help="e.g. city=1,distinct=1.5,shuffle=2.5 (default: uniform); copying the shuffle "
                        "items is the slowest task to learn")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--total-steps", type=int, default=9000, help="cosine schedule length")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=80.0, help="training time budget for this session")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--export-minutes", type=float, default=8.0)
    p.add_argument("--save-minutes", type=float, default=4.0)
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="train in float32 instead of bf16 autocast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-best", action="store_true",
                   help="export only at evaluations that improve the validation metric")
    a = p.parse_args(argv)
    run_dir = a.run_dir or Path("runs") / f"pretrain_{a.kind}"
    export_dir = a.export_dir or (DEFAULT_BACKBONE if a.kind == "backbone" else DEFAULT_JUDGE)
    if a.kind == "judge":
        a.task_batch = 0
    return Config(kind=a.kind, run_dir=run_dir, export_dir=export_dir, tokenizer_dir=a.tokenizer_dir,
                  vocab=a.vocab, seq_len=a.seq_len, task_len=a.task_len, dim=a.dim, layers=a.layers,
                  heads=a.heads, kv_heads=a.kv_heads, ffn=a.ffn, batch=a.batch, task_batch=a.task_batch,
                  lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup=a.warmup, total_steps=a.total_steps,
                  weight_decay=a.weight_decay, seed=a.seed, minutes=a.minutes, eval_every=a.eval_every,
                  export_minutes=a.export_minutes, save_minutes=a.save_minutes, autocast=a.autocast,
                  threads=a.threads, task_weights=_weights(a.task_weights), keep_best=a.keep_best)


def _weights(spec: str) -> dict[str, float] | None:
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, _, val = part.partition("=")
        if name not in TASKS:
            raise SystemExit(f"--task-weights: unknown task {name!r}; known: {sorted(TASKS)}")
        out[name] = float(val)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prompts":
        from sampler.embedded.acceptance import write_prompt_files

        write_prompt_files()
    elif argv and argv[0] == "check":
        from sampler.embedded.acceptance import main as check_main

        check_main(argv[1:])
    else:
        train(parse_args(argv))


if __name__ == "__main__":
    main()
