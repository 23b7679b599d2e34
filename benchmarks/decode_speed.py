"""Decoding speed: exact vs marginal vs joint at several k, measured in one run on one machine.

Prints tokens/s, speed-up over exact, the sampler-step cost c (one sampler pass over one full pass,
timed alone) and the ideal joint speed-up k / (1 + (k-1) c) next to the measured one (DESIGN 2.2).

    python benchmarks/decode_speed.py [--backbone DIR] [--sampler DIR] [--batch 16] [--gen-length 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from sampler import JointSampler, encode_prompts, generate, load_backbone


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="checkpoint dir (default: the embedded backbone)")
    ap.add_argument("--sampler", default=None, help="sampler dir (default: an untrained sampler; same cost)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone(args.backbone)
    s = JointSampler.load(args.sampler, bb) if args.sampler else JointSampler.for_backbone(bb, seed=0).eval()
    prompts = encode_prompts(bb, n=args.batch)
    L = 1 + args.gen_length
    x = torch.randint(0, bb.args.vocab_size, (args.batch, L))
    with torch.inference_mode():
        ctx = bb.context(x)
        h = bb.hidden(x, None, ctx)
        t_full = time_it(lambda: bb.hidden(x, None, ctx), 10)
        t_samp = time_it(lambda: s(bb.embed(x), h, ctx), 10)
    c = t_samp / t_full
    print(f"backbone {bb.name} ({sum(p.numel() for p in bb.parameters()) / 1e6:.1f}M params), batch "
          f"{args.batch}, gen_length {args.gen_length}, threads {torch.get_num_threads()}")
    print(f"full pass {t_full * 1e3:.2f} ms, sampler step {t_samp * 1e3:.2f} ms: c = {c:.3f}\n")
    rows = [("exact", 1)] + [(m, k) for k in map(int, args.ks.split(",")) for m in ("marginal", "joint")]
    base = None
    print(f"{'mode':<9}{'k':>3}{'tok/s':>10}{'speed-up':>10}{'ideal':>8}{'measured/ideal':>16}{'passes':>8}")
    for mode, k in rows:
        res = {}

        def run(mode=mode, k=k, res=res):
            res["r"] = generate(bb, prompts, sampler=s if mode == "joint" else None, mode=mode, k=k,
                                gen_length=args.gen_length, seed=0)

        dt = time_it(run, args.repeats)
        tps = res["r"].decoded_tokens / dt
        base = base or tps
        ideal = k / (1 + (k - 1) * c) if mode == "joint" else float(k)
        print(f"{mode:<9}{k:>3}{tps:>10.0f}{tps / base:>9.2f}x{ideal:>7.2f}x{tps / base / ideal:>15.2f}"
              f"{res['r'].full_passes:>8}")


if __name__ == "__main__":
    main()
