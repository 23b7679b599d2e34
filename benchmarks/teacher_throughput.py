"""Teacher throughput with 1 and with 2 actors, measured in one run on one local Ray cluster.

Both runs decode the same trajectories (same config and seed: the shards are identical, which is checked)
with the same total torch threads (the cluster's cores split among the actors). Throughput counts the
decoding phase only (Ray start-up and model loading excluded); the ratio is 2-actor over 1-actor.

    python benchmarks/teacher_throughput.py [--backbone DIR | --toy-dim 256] [--num-trajectories 64]
        [--gen-length 32] [--chunk-size 16] [--batch-size 16] [--cpus 2]

Without --backbone it uses the embedded backbone if it exists, else a random toy of --toy-dim.
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
from sampler.toy import make_toy_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--toy-dim", type=int, default=256)
    ap.add_argument("--toy-layers", type=int, default=4)
    ap.add_argument("--num-trajectories", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster = total torch threads")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.backbone:
            backbone = Path(args.backbone)
        elif (DEFAULT_BACKBONE / "config.json").exists():
            backbone = DEFAULT_BACKBONE
        else:
            d = args.toy_dim
            backbone = make_toy_backbone(Path(tmp) / "toy", dim=d, n_layers=args.toy_layers,
                                         n_heads=max(1, d // 64), n_kv_heads=max(1, d // 128))
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        results: dict[int, list[dict]] = {1: [], 2: []}
        try:
            for rep in range(args.repeats):  # interleaved, so background load hits both alike
                for actors in (1, 2):
                    out = Path(tmp) / f"actors{actors}-{rep}"
                    s = run_teacher({"backbone": str(backbone), "out": str(out),
                                     "num_trajectories": args.num_trajectories, "gen_length": args.gen_length,
                                     "chunk_size": args.chunk_size, "batch_size": args.batch_size,
                                     "actors": actors, "torch_threads": max(1, args.cpus // actors),
                                     "progress": False})
                    results[actors].append(s)
                    busy = ", ".join(f"{a['traj_per_s']:.2f}" for a in s["per_actor"])
                    print(f"{actors} actor(s): {s['trajectories_this_run']} traj x {args.gen_length} tokens "
                          f"in {s['decode_s']:.2f} s decoding ({s['startup_s']:.1f} s start-up): "
                          f"{s['traj_per_s']:.2f} traj/s, {s['traj_per_s'] * args.gen_length:.1f} tok/s; "
                          f"per actor {busy} traj/s busy", flush=True)
            shas = {tuple(e["sha256"] for e in read_manifest(Path(s["out"]))["shards"])
                    for runs in results.values() for s in runs}
            same = len(shas) == 1
        finally:
            ray.shutdown()
    name = results[1][0]["backbone"]["name"]
    best = {a: max(s["traj_per_s"] for s in runs) for a, runs in results.items()}
    print(f"backbone {name}; {args.cpus} CPUs; load average {os.getloadavg()[0]:.1f}; "
          f"identical shards in every run: {same}")
    print(f"best of {args.repeats}: 1 actor {best[1]:.2f} traj/s, 2 actors {best[2]:.2f} traj/s; "
          f"ratio 2 actors / 1 actor: {best[2] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
