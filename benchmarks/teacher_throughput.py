"""Teacher throughput with 1 and with 2 actors, measured in one run on one local Ray cluster.

Every run decodes the same trajectories (same config and seed: the shards are identical, which is checked):
1 actor with all the cluster's CPUs as torch threads, 1 actor on 1 thread, 2 actors sharing the threads.
Throughput counts the decoding phase only (Ray start-up and model loading excluded); the ratios are
2 actors over each 1-actor setup, best of --repeats interleaved runs. Then batching efficiency: one
actor's decode loop (`generate(mode="exact")`, one thread) at several batch sizes, trajectories per full
pass and traj/s against batch size x the batch-1 rate.

    python benchmarks/teacher_throughput.py [--backbone DIR|toy] [--toy-dim 256] [--num-trajectories 64]
        [--gen-length 32] [--chunk-size 16] [--batch-size 16] [--cpus 2]

Without --backbone it uses the embedded backbone if it exists, else a random toy (--toy-dim, --toy-layers).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from ray_jobs.common import read_manifest  # noqa: E402
from ray_jobs.teacher import run_teacher  # noqa: E402
from sampler.backbone import DEFAULT_BACKBONE  # noqa: E402
from sampler.testing import make_toy_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None, help="checkpoint dir, or 'toy' (default: embedded, else toy)")
    ap.add_argument("--toy-dim", type=int, default=256)
    ap.add_argument("--toy-layers", type=int, default=4)
    ap.add_argument("--num-trajectories", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster = total torch threads")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-sweep", default="1,4,16,64",
                    help="batch sizes for batching efficiency ('' = skip)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.backbone and args.backbone != "toy":
            backbone = Path(args.backbone)
        elif args.backbone is None and (DEFAULT_BACKBONE / "config.json").exists():
            backbone = DEFAULT_BACKBONE
        else:
            d = args.toy_dim
            backbone = make_toy_backbone(Path(tmp) / "toy", dim=d, n_layers=args.toy_layers,
                                         n_heads=max(1, d // 64), n_kv_heads=max(1, d // 128))
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        # (actors, torch threads per actor): the same total threads, plus one actor on one thread
        setups = [(1, args.cpus), (1, 1), (2, max(1, args.cpus // 2))]
        results: dict[tuple[int, int], list[dict]] = {su: [] for su in setups}
        try:
            for rep in range(args.repeats):  # interleaved, so background load hits every setup alike
                for actors, threads in setups:
                    out = Path(tmp) / f"a{actors}-t{threads}-{rep}"
                    s = run_teacher({"backbone": str(backbone), "out": str(out),
                                     "num_trajectories": args.num_trajectories, "gen_length": args.gen_length,
                                     "chunk_size": args.chunk_size, "batch_size": args.batch_size,
                                     "actors": actors, "torch_threads": threads, "progress": False})
                    results[(actors, threads)].append(s)
                    busy = ", ".join(f"{a['traj_per_s']:.2f}" for a in s["per_actor"])
                    print(f"{actors} actor(s) x {threads} thread(s): {s['trajectories_this_run']} traj x "
                          f"{args.gen_length} tokens in {s['decode_s']:.2f} s decoding "
                          f"({s['startup_s']:.1f} s start-up): {s['traj_per_s']:.2f} traj/s, "
                          f"{s['traj_per_s'] * args.gen_length:.1f} tok/s; per actor {busy} traj/s busy",
                          flush=True)
            shas = {tuple(e["sha256"] for e in read_manifest(Path(s["out"]))["shards"])
                    for runs in results.values() for s in runs}
            same = len(shas) == 1
        finally:
            ray.shutdown()
        if args.batch_sweep:
            batching_efficiency(backbone, [int(b) for b in args.batch_sweep.split(",")], args.gen_length)
    name = results[setups[0]][0]["backbone"]["name"]
    best = {su: max(s["traj_per_s"] for s in runs) for su, runs in results.items()}
    print(f"backbone {name}; {args.cpus} CPUs; load average {os.getloadavg()[0]:.1f}; "
          f"identical shards in every run: {same}")
    print(f"best of {args.repeats} (traj/s): " + ", ".join(f"{a} actor(s) x {t} thread(s) {v:.2f}"
                                                          for (a, t), v in best.items()))
    two = best[setups[2]]
    print(f"throughput ratio 2 actors / 1 actor: {two / best[setups[0]]:.2f}x (same total threads), "
          f"{two / best[setups[1]]:.2f}x (vs 1 actor on 1 thread)")


def batching_efficiency(backbone: Path, batches: list[int], gen_length: int) -> None:
    """Exact decoding as an actor does it, one thread, at several batch sizes."""
    import time

    import torch

    from sampler import encode_prompts, generate, load_backbone

    torch.set_num_threads(1)
    bb = load_backbone(backbone)
    print(f"\nbatching efficiency ({bb.name}, 1 thread, {gen_length} tokens per trajectory)")
    print(f"{'batch':>6}{'tokens/full pass':>18}{'traj/s':>9}{'efficiency':>12}")
    base = None
    for b in batches:
        prompts = encode_prompts(bb, n=b)
        generate(bb, prompts[:1], gen_length=4)  # warm-up
        t0 = time.perf_counter()
        r = generate(bb, prompts, mode="exact", gen_length=gen_length, seed=0)
        rate = b / (time.perf_counter() - t0)
        base = base or rate / b
        print(f"{b:>6}{r.decoded_tokens / r.full_passes:>18.1f}{rate:>9.2f}"
              f"{rate / (b * base):>11.0%}")


if __name__ == "__main__":
    main()
