"""Decoding speed: exact vs marginal vs joint at several k and batch sizes, measured in one run.

For each batch size it prints tokens/s, full and sampler passes, the speed-up over exact and how
close joint decoding comes to its ideal speed-up k / (1 + (k-1) c) (DESIGN 2.2), with two costs
measured in the same run on the same input:

- c       = one sampler forward / one backbone forward (the paper's definition: model compute only);
- c_step  = (sampler forward + LM head, softmax and position scores at the candidates)
            / (backbone forward + the same): what one iteration of the decode loop must do.

"ideal" and "of ideal" use c (the strict figure); "of ideal(step)" uses c_step, so the gap between
the two is the cost of reading out distributions, the rest is loop overhead.

    python benchmarks/decode_speed.py                          # embedded backbone, CPU
    python benchmarks/decode_speed.py --random-shapes dream-7b --gen-length 256   # GPU, bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sampler import JointSampler, encode_prompts, generate, load_backbone
from sampler.backbone import Backbone, Layout
from sampler.decode import compile_read_out, read_out
from sampler.model import ModelArgs, Transformer

# Dream-v0-Base-7B (Qwen2.5-7B shapes): no weights needed to measure speed
SHAPES = {
    "dream-7b": ModelArgs(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                          intermediate_size=18944, rope_theta=1e6, max_seq_len=4096),
}


def random_backbone(shape: str, device: str, dtype: torch.dtype) -> Backbone:
    args = SHAPES[shape]
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
               repeats: int) -> dict:
    """Forward and per-iteration costs on one random input, candidates = half the generated region
    (the mean over a decode)."""
    dev = bb.device
    L = prompt_len + gen_length
    x = torch.randint(0, bb.args.vocab_size - 3, (batch, L), device=dev)
    cand = torch.arange(prompt_len, prompt_len + max(1, gen_length // 2), device=dev).expand(batch, -1)
    rng = torch.Generator(device=dev).manual_seed(0)
    ctx = bb.context(x)
    h = bb.hidden(x, None, ctx)

    def readout(h):
        return read_out(bb, h, cand, 1.0, 1.0, "entropy", rng)

    t_full = time_it(lambda: bb.hidden(x, None, ctx), repeats, dev)
    t_samp = time_it(lambda: s(bb.embed(x), h, ctx), repeats, dev)
    t_read = time_it(lambda: readout(h), repeats, dev)
    return {"full_ms": t_full * 1e3, "sampler_ms": t_samp * 1e3, "readout_ms": t_read * 1e3,
            "c": t_samp / t_full, "c_step": (t_samp + t_read) / (t_full + t_read)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="checkpoint dir (default: the embedded backbone)")
    ap.add_argument("--random-shapes", choices=sorted(SHAPES), default=None,
                    help="a randomly initialised backbone of these shapes instead of a checkpoint")
    ap.add_argument("--sampler", default=None, help="sampler dir (default: an untrained sampler; same cost)")
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        compile_read_out()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.random_shapes:
        bb = random_backbone(args.random_shapes, device, dtype or torch.bfloat16)
    else:
        bb = load_backbone(args.backbone, device=device, dtype=dtype)
    if args.sampler:
        s = JointSampler.load(args.sampler, bb)
    else:  # an untrained sampler costs exactly what a trained one does
        s = JointSampler.for_backbone(bb, seed=0).to(bb.dtype).eval().requires_grad_(False)
    where = (torch.cuda.get_device_name() if bb.device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"backbone {bb.name} ({sum(p.numel() for p in bb.parameters()) / 1e6:.1f}M params, {bb.dtype}), "
          f"sampler {sum(p.numel() for p in s.parameters()) / 1e6:.1f}M params, {where}, "
          f"gen_length {args.gen_length}, read-out {'compiled' if args.compile else 'eager'}")

    for batch in map(int, args.batches.split(",")):
        prompts = encode_prompts(bb, n=batch) if bb.tokenizer is not None else [[bb.bos_id]] * batch
        rows = [("exact", 1)] + [(m, k) for k in map(int, args.ks.split(",")) for m in ("marginal", "joint")]
        costs, times, results = [], {row: [] for row in rows}, {}
        for _ in range(args.trials):  # interleaved: a slow spell of the machine hits every row alike
            costs.append(step_costs(bb, s, batch, len(prompts[0]), args.gen_length, max(5, args.repeats)))
            for mode, k in rows:
                def run(mode=mode, k=k, prompts=prompts, results=results):
                    results[(mode, k)] = generate(bb, prompts, sampler=s if mode == "joint" else None,
                                                  mode=mode, k=k, gen_length=args.gen_length, seed=0)

                times[(mode, k)].append(time_it(run, args.repeats, bb.device))
        cost = {key: statistics.median(c[key] for c in costs) for key in costs[0]}
        print(f"\nbatch {batch} (median of {args.trials} trial(s)): full pass {cost['full_ms']:.2f} ms, "
              f"sampler step {cost['sampler_ms']:.2f} ms, "
              f"read-out at {args.gen_length // 2} candidates {cost['readout_ms']:.2f} ms: "
              f"c = {cost['c']:.3f}, c_step = {cost['c_step']:.3f}")
        print(f"{'mode':<9}{'k':>3}{'tok/s':>10}{'full':>6}{'samp':>6}{'speed-up':>10}{'ideal':>8}"
              f"{'of ideal':>10}{'of ideal(step)':>16}")
        base = None
        for mode, k in rows:
            r = results[(mode, k)]
            tps = r.decoded_tokens / statistics.median(times[(mode, k)])
            base = base or tps
            if mode == "joint":
                ideal, ideal_step = (k / (1 + (k - 1) * cost[c]) for c in ("c", "c_step"))
            else:
                ideal = ideal_step = float(k)
            up = tps / base
            print(f"{mode:<9}{k:>3}{tps:>10.0f}{r.full_passes:>6}{r.sampler_passes:>6}{up:>9.2f}x{ideal:>7.2f}x"
                  f"{up / ideal:>9.0%}{up / ideal_step:>15.0%}")


if __name__ == "__main__":
    main()
