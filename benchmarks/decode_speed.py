"""Decoding speed: exact vs marginal vs joint at several k and batch sizes, measured in one run.

For each batch size it prints tokens/s, full and sampler passes, the speed-up over exact and how
close joint decoding comes to its ideal speed-up k / (1 + (k-1) c) (docs/system.md), with two costs
measured in the same run on the same input:

- c       = one sampler forward / one backbone forward (the paper's definition: model compute only);
- c_step  = (sampler forward + LM head, softmax and position scores at the candidates)
            / (backbone forward + the same): what one iteration of the decode loop must do.

"ideal" and "of ideal" use c (the strict figure); "of ideal(step)" uses c_step, so the gap between
the two is the cost of reading out distributions, the rest is loop overhead.

With --kv-cache the rows are each mode without a KV cache and with the prefix and dual caches
(sampler.kvcache), block by block: tokens/s, the speed-up over exact without a cache and over the same
mode without a cache, and c without and with each cache (a cached sampler step over a cached full pass,
the current block in the middle of the generated region: a prefix pass's mean length over a decode).

    python benchmarks/decode_speed.py                          # embedded backbone, CPU
    python benchmarks/decode_speed.py --sampler-layers 2 --costs-only   # c of a two-layer sampler
    python benchmarks/decode_speed.py --random-shapes dream-7b --gen-length 256   # GPU, bf16
    python benchmarks/decode_speed.py --random-shapes dream-7b --kv-cache --prompt-length 256 \
        --gen-length 256 --block-length 32 --ks 4                 # GPU: none / prefix / dual
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from sampler import JointSampler, encode_prompts, generate, load_backbone
from sampler.backbone import Backbone, Layout, parse_dtype
from sampler.decode import compile_read_out, read_out
from sampler.kvcache import BlockKVCache
from sampler.model import ModelArgs, Transformer

# Dream-v0-Base-7B (Qwen2.5-7B shapes): no weights needed to measure speed
SHAPES = {
    "dream-7b": ModelArgs(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                          intermediate_size=18944, rope_theta=1e6, max_seq_len=4096),
}


def random_backbone(shape: str, device: str, dtype: torch.dtype, layers: int | None = None) -> Backbone:
    args = SHAPES[shape] if layers is None else replace(SHAPES[shape], n_layers=layers)
    with torch.device(device):
        model = Transformer(args)
    model = model.to(dtype).eval().requires_grad_(False)
    v = args.vocab_size
    layout = Layout(f"random-{shape}", 1, args, mask_id=v - 1, eos_id=v - 2, bos_id=v - 3, pad_id=v - 2)
    return Backbone(model, layout, name=f"random-{shape}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


@torch.inference_mode()
def step_costs(bb: Backbone, s: JointSampler, batch: int, prompt_len: int, gen_length: int,
               repeats: int, block_length: int | None = None, kv_cache: str = "none") -> dict:
    """Forward and per-iteration costs on one random input, candidates = half a block (the mean over a
    decode). With a KV cache: the cached passes (after the refresh and the sampler's storing pass),
    the current block in the middle of the generated region."""
    dev = bb.device
    L, block = prompt_len + gen_length, block_length or gen_length
    x = torch.randint(0, bb.args.vocab_size - 3, (batch, L), device=dev)
    cand = torch.arange(prompt_len, prompt_len + max(1, block // 2), device=dev).expand(batch, -1)
    rng = torch.Generator(device=dev).manual_seed(0)
    ctx = bb.context(x)
    cache = None
    if kv_cache != "none":
        cache = BlockKVCache.for_backbone(bb, batch, L, kv_cache, s)
        block_id = torch.cat([torch.full((prompt_len,), gen_length, device=dev),
                              torch.arange(gen_length, device=dev) // block]).expand(batch, -1)
        middle = -(-gen_length // block) // 2  # masked from the middle block on
        cache.plan((block_id >= middle) & (block_id < gen_length), block_id)
        s(bb.embed(x), bb.hidden(x, None, ctx, cache), ctx, cache)  # the refresh and the storing pass
    h = bb.hidden(x, None, ctx, cache)

    def readout(h):
        return read_out(bb, h, cand, 1.0, 1.0, "entropy", rng)

    t_full = time_it(lambda: bb.hidden(x, None, ctx, cache), repeats, dev)
    t_samp = time_it(lambda: s(bb.embed(x), h, ctx, cache), repeats, dev)
    t_read = time_it(lambda: readout(h), repeats, dev)
    return {"full_ms": t_full * 1e3, "sampler_ms": t_samp * 1e3, "readout_ms": t_read * 1e3,
            "c": t_samp / t_full, "c_step": (t_samp + t_read) / (t_full + t_read)}


def make_prompts(bb: Backbone, batch: int, prompt_length: int) -> list[list[int]]:
    """`batch` prompts: [BOS] (prompt_length 0) or BOS + random ids (never the mask token)."""
    if prompt_length == 0:
        return encode_prompts(bb, n=batch) if bb.tokenizer is not None else [[bb.bos_id]] * batch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, bb.args.vocab_size, (batch, prompt_length - 1), generator=g)
    ids[ids == bb.mask_id] = bb.bos_id
    return [[bb.bos_id] + row for row in ids.tolist()]


def kv_cache_table(bb: Backbone, s: JointSampler, batch: int, prompts: list[list[int]], args) -> None:
    """Each mode without a cache, with the prefix cache and with the dual cache, measured in one run."""
    caches = ("none", "prefix", "dual")
    rows = [(m, k, kv) for m, k in [("exact", 1)] + [(m, k) for k in map(int, args.ks.split(","))
                                                     for m in ("marginal", "joint")] for kv in caches]
    costs, times, results = {kv: [] for kv in caches}, {row: [] for row in rows}, {}
    for _ in range(args.trials):  # interleaved: a slow spell of the machine hits every row alike
        for kv in caches:
            costs[kv].append(step_costs(bb, s, batch, len(prompts[0]), args.gen_length, max(5, args.repeats),
                                        args.block_length, kv))
        for mode, k, kv in rows:
            def run(mode=mode, k=k, kv=kv):
                results[(mode, k, kv)] = generate(
                    bb, prompts, sampler=s if mode == "joint" else None, mode=mode, k=k, seed=0,
                    gen_length=args.gen_length, block_length=args.block_length, kv_cache=kv)

            times[(mode, k, kv)].append(time_it(run, args.repeats, bb.device))
    cost = {kv: {key: statistics.median(c[key] for c in costs[kv]) for key in costs[kv][0]} for kv in caches}
    print(f"\nbatch {batch}, prompt {len(prompts[0])}, block {args.block_length or args.gen_length} "
          f"(median of {args.trials} trial(s)): "
          + "; ".join(f"{kv}: full pass {c['full_ms']:.2f} ms, sampler step {c['sampler_ms']:.2f} ms, "
                      f"c = {c['c']:.3f}" for kv, c in cost.items()))
    print(f"{'mode':<9}{'k':>3}{'cache':>8}{'tok/s':>10}{'full':>6}{'samp':>6}{'speed-up':>10}{'vs none':>9}")
    base = {}
    for mode, k, kv in rows:
        r = results[(mode, k, kv)]
        tps = r.decoded_tokens / statistics.median(times[(mode, k, kv)])
        base.setdefault("exact", tps)
        base.setdefault((mode, k), tps)
        print(f"{mode:<9}{k:>3}{kv:>8}{tps:>10.0f}{r.full_passes:>6}{r.sampler_passes:>6}"
              f"{tps / base['exact']:>9.2f}x{tps / base[(mode, k)]:>8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="checkpoint dir (default: the embedded backbone)")
    ap.add_argument("--random-shapes", choices=sorted(SHAPES), default=None,
                    help="a randomly initialised backbone of these shapes instead of a checkpoint")
    ap.add_argument("--sampler", default=None, help="sampler dir (default: an untrained sampler; same cost)")
    ap.add_argument("--sampler-layers", type=int, default=1,
                    help="decoder layers of the untrained sampler (c grows with them); not with --sampler")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: the checkpoint's dtype (bfloat16 for --random-shapes)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the read-out (compile_read_out)")
    ap.add_argument("--trials", type=int, default=1,
                    help="interleaved trials of every row; the table shows medians (noisy machines)")
    ap.add_argument("--prompt-length", type=int, default=0,
                    help="prompts of this many tokens (BOS + random ids); 0: [BOS] alone")
    ap.add_argument("--block-length", type=int, default=None, help="semi-autoregressive blocks")
    ap.add_argument("--kv-cache", action="store_true",
                    help="compare no cache / prefix / dual KV cache (sampler.kvcache) instead")
    ap.add_argument("--layers", type=int, default=None,
                    help="with --random-shapes: this many layers (a CPU cannot run 28 of Dream-7B's)")
    ap.add_argument("--costs-only", action="store_true",
                    help="only the per-pass costs (full pass, sampler step, c) for each cache, no decoding")
    ap.add_argument("--planned", action="store_true",
                    help="also joint rows with order='planned' (one read-out per sampler step)")
    ap.add_argument("--thresholds", default="",
                    help="threshold rows, e.g. 0.9: marginal with k = block (Fast-dLLM's rule) and joint "
                         "at each k with that threshold")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        compile_read_out()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = parse_dtype(args.dtype)
    if args.random_shapes:
        bb = random_backbone(args.random_shapes, device, dtype or torch.bfloat16, args.layers)
    else:
        bb = load_backbone(args.backbone, device=device, dtype=dtype)
    if args.sampler and args.sampler_layers != 1:
        ap.error("--sampler-layers is for the untrained sampler; a saved one has its own (--sampler)")
    if args.sampler:
        s = JointSampler.load(args.sampler, bb)
    else:  # an untrained sampler costs exactly what a trained one does
        s = JointSampler.for_backbone(bb, seed=0, n_layers=args.sampler_layers)
        s = s.to(bb.dtype).eval().requires_grad_(False)
    where = (torch.cuda.get_device_name() if bb.device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"backbone {bb.name} ({sum(p.numel() for p in bb.parameters()) / 1e6:.1f}M params, {bb.dtype}), "
          f"sampler {s.args.n_layers} layer(s), {sum(p.numel() for p in s.parameters()) / 1e6:.1f}M params, "
          f"{where}, gen_length {args.gen_length}, read-out {'compiled' if args.compile else 'eager'}")

    for batch in map(int, args.batches.split(",")):
        prompts = make_prompts(bb, batch, args.prompt_length)
        if args.costs_only:
            for kv in ("none", "prefix", "dual"):
                c = step_costs(bb, s, batch, len(prompts[0]), args.gen_length, max(3, args.repeats),
                               args.block_length, kv)
                print(f"batch {batch}, prompt {len(prompts[0])}, gen {args.gen_length}, block "
                      f"{args.block_length or args.gen_length}, cache {kv}: full pass {c['full_ms']:.1f} ms, "
                      f"sampler step {c['sampler_ms']:.1f} ms, c = {c['c']:.3f}", flush=True)
            continue
        if args.kv_cache:
            kv_cache_table(bb, s, batch, prompts, args)
            continue
        ks = list(map(int, args.ks.split(",")))
        rows = [("exact", 1, None, "rescore")] + [(m, k, None, "rescore") for k in ks
                                                  for m in ("marginal", "joint")]
        if args.planned:
            rows += [("joint", k, None, "planned") for k in ks]
        for tau in (float(t) for t in args.thresholds.split(",") if t):
            rows += [("marginal", args.block_length or args.gen_length, tau, "rescore")]
            rows += [("joint", k, tau, "rescore") for k in ks]
        costs, times, results = [], {row: [] for row in rows}, {}
        for _ in range(args.trials):  # interleaved: a slow spell of the machine hits every row alike
            costs.append(step_costs(bb, s, batch, len(prompts[0]), args.gen_length, max(5, args.repeats),
                                    args.block_length))
            for row in rows:
                def run(row=row, prompts=prompts, results=results):
                    mode, k, tau, order = row
                    results[row] = generate(bb, prompts, sampler=s if mode == "joint" else None,
                                            mode=mode, k=k, threshold=tau, gen_length=args.gen_length,
                                            seed=0, block_length=args.block_length, order=order)

                times[row].append(time_it(run, args.repeats, bb.device))
        cost = {key: statistics.median(c[key] for c in costs) for key in costs[0]}
        print(f"\nbatch {batch} (median of {args.trials} trial(s)): full pass {cost['full_ms']:.2f} ms, "
              f"sampler step {cost['sampler_ms']:.2f} ms, "
              f"read-out at {(args.block_length or args.gen_length) // 2} candidates "
              f"{cost['readout_ms']:.2f} ms: "
              f"c = {cost['c']:.3f}, c_step = {cost['c_step']:.3f}")
        print(f"{'mode':<9}{'order':>8}{'k':>3}{'tau':>5}{'tok/pass':>9}{'tok/s':>10}{'full':>6}{'samp':>6}{'speed-up':>10}"
              f"{'ideal':>8}{'of ideal':>10}{'of ideal(step)':>16}")
        base = None
        for mode, k, tau, order in rows:
            r = results[(mode, k, tau, order)]
            tps = r.decoded_tokens / statistics.median(times[(mode, k, tau, order)])
            base = base or tps
            if tau is not None:  # a threshold row's ideal: its own tokens and sampler passes per full pass
                per_pass = r.sampler_passes / max(r.full_passes, 1)
                ideal, ideal_step = (r.tokens_per_pass / (1 + per_pass * cost[c]) for c in ("c", "c_step"))
            elif mode == "joint":
                ideal, ideal_step = (k / (1 + (k - 1) * cost[c]) for c in ("c", "c_step"))
            else:
                ideal = ideal_step = float(k)
            up = tps / base
            shown = order if mode == "joint" else "-"
            print(f"{mode:<9}{shown:>8}{k:>3}{'-' if tau is None else tau:>5}"
                  f"{r.tokens_per_pass:>9.2f}{tps:>10.0f}"
                  f"{r.full_passes:>6}{r.sampler_passes:>6}{up:>9.2f}x{ideal:>7.2f}x"
                  f"{up / ideal:>9.0%}{up / ideal_step:>15.0%}")


if __name__ == "__main__":
    main()
