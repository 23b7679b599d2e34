"""Bounded HTTP load on the Serve app: exact vs joint decoding, in one run.

    .venv/bin/python benchmarks/serve_load.py --clients 8 --seconds 20
    .venv/bin/python benchmarks/serve_load.py --clients 8 --seconds 20 --url http://127.0.0.1:8000

Without --url it starts the app itself on 127.0.0.1 (local Ray cluster, serve/config.yaml, one generator
replica unless --autoscale so both modes see the same hardware; the embedded backbone, or a toy one when
that does not exist yet) and shuts it down afterwards. N clients send completions back to back for T
seconds per mode; every completion generates exactly --max-tokens tokens (EOS does not stop decoding), so
the modes do the same work per request. Prints requests/s, tokens/s, p50/p99 latency, errors, the mean
batch size the generator reported, and joint/exact ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["The quick brown fox", "Once upon a time", "Name three fruits:", "To be, or not to be",
           "A journey of a thousand miles", "The city at night"]


async def run_mode(url: str, model: str | None, body: dict, clients: int, seconds: float,
                   headers: dict[str, str]) -> dict:
    lat, toks, errors, batch = [], 0, 0, []
    stop_at = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal toks, errors
        j = 0
        while time.perf_counter() < stop_at:
            req = {**body, "prompt": PROMPTS[(i + j) % len(PROMPTS)], **({"model": model} if model else {})}
            j += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/completions", json=req, headers=headers)
            except httpx.HTTPError:
                errors += 1
                continue
            if r.status_code != 200:
                errors += 1
                continue
            data = r.json()
            lat.append(time.perf_counter() - t0)
            toks += data["usage"]["completion_tokens"]
            batch.append(data["jointgen"]["batch_requests"])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    wall = time.perf_counter() - t0  # includes the requests still running at the deadline
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "errors": errors, "wall_s": wall, "req_s": len(lat) / wall,
            "tok_s": toks / wall, "p50_s": pct(0.50), "p99_s": pct(0.99),
            "mean_batch": statistics.fmean(batch) if batch else float("nan")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(args: argparse.Namespace) -> str:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from sampler import DEFAULT_BACKBONE
    from serve.app import build, load_config

    app_args, deployments, _ = load_config(Path(__file__).resolve().parents[1] / "serve" / "config.yaml")
    backbone = args.backbone
    if backbone is None and not (DEFAULT_BACKBONE / "config.json").exists():
        from sampler.testing import make_toy_backbone

        backbone = str(make_toy_backbone(Path(tempfile.mkdtemp()) / "toy"))
        print(f"(no embedded backbone yet: using a toy backbone at {backbone})", file=sys.stderr)
    app_args.update(backbone=backbone, sampler=args.sampler or app_args.get("sampler", "auto"),
                    max_batch_size=args.max_batch_size)
    app_args.setdefault("limits", {})["max_tokens"] = max(args.max_tokens, 256)
    if not args.autoscale:
        for name in deployments:
            deployments[name].pop("autoscaling_config", None)
            deployments[name]["num_replicas"] = 1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(app_args, deployments), name="jointgen", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, required=True, help="concurrent clients")
    p.add_argument("--seconds", type=float, required=True, help="seconds of load per mode")
    p.add_argument("--url", help="an already running server (else one is started on 127.0.0.1)")
    p.add_argument("--api-key", default=os.environ.get("JOINTGEN_API_KEY"))
    p.add_argument("--backbone", help="backbone dir for the local server (default: embedded, else a toy)")
    p.add_argument("--sampler", help="sampler for the local server (default: the config's, auto)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="tokens per full pass for the joint mode")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--autoscale", action="store_true", help="local server: keep the config's autoscaling")
    ns = p.parse_args(argv)
    if ns.clients < 1 or ns.seconds <= 0:
        p.error("--clients must be >= 1 and --seconds > 0")

    url = ns.url.rstrip("/") if ns.url else start_local(ns)
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    try:
        models = httpx.get(url + "/v1/models", headers=headers, timeout=60).json()
        model = models["data"][0]["id"]
        modes = [("exact", {"mode": "exact"}), (f"joint k={ns.k}", {"mode": "joint", "k": ns.k})]
        common = {"max_tokens": ns.max_tokens, "stop_at_eos": False}
        results = {}
        for name, extra in modes:
            body = {**common, **extra}
            warm = httpx.post(url + "/v1/completions", json={**body, "prompt": "warm up", "model": model},
                              headers=headers, timeout=300)
            if warm.status_code != 200:
                print(f"{name}: warm-up failed: {warm.status_code} {warm.text}", file=sys.stderr)
                return 1
            results[name] = asyncio.run(run_mode(url, model, body, ns.clients, ns.seconds, headers))
        print(f"\nmodel {model} ({models['data'][0].get('sampler')} sampler), {ns.clients} clients x "
              f"{ns.seconds:g} s per mode, {ns.max_tokens} tokens per completion, url {url}")
        print(f"{'mode':<10} {'requests':>8} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} "
              f"{'errors':>6} {'batch':>6}")
        for name, r in results.items():
            print(f"{name:<10} {r['requests']:>8} {r['req_s']:>7.2f} {r['tok_s']:>8.1f} {r['p50_s']:>7.3f} "
                  f"{r['p99_s']:>7.3f} {r['errors']:>6} {r['mean_batch']:>6.2f}")
        ex, jt = results["exact"], results[f"joint k={ns.k}"]
        if ex["tok_s"] > 0 and jt["p50_s"] > 0:
            print(f"joint/exact: tokens/s x{jt['tok_s'] / ex['tok_s']:.2f}, p50 latency "
                  f"x{jt['p50_s'] / ex['p50_s']:.2f}")
        return 0 if all(r["errors"] == 0 for r in results.values()) else 1
    finally:
        if not ns.url:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
