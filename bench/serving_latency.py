"""Latency and throughput of one X-ray per request through ``mlflow models serve`` on 127.0.0.1.

    .venv/bin/python -m bench.serving_latency --data ../shared/fracatlas [--requests 40] [--clients 4]

Serves the CPU profile's network as the registry's pyfunc (:func:`bench.common.save_cpu_model`)
with ``mlflow models serve --env-manager local -w 1`` on a free loopback port, then:

- one client, one request at a time: p50 and p95 latency for a 373 x 454 and a large X-ray
  (:func:`bench.common.pick_large`) (``--requests`` each, at most ``--seconds`` each, after 3 warm-up requests);
- ``--clients`` clients at once, each sending the 373 x 454 X-ray ``--requests`` times, within
  ``--seconds``: requests per second over all, and p50 / p95 under that load.

The server is stopped at the end, whatever happened (:func:`tests.servers.running`).
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.common import pick, pick_large, save_cpu_model
from fracture.config import load_params
from tests.servers import child_env, free_port, running


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def timed_requests(url: str, body: dict, count: int, seconds: float) -> list[float]:
    """Latencies (s) of up to ``count`` requests, one at a time, stopping after ``seconds``."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while len(latencies) < count and time.monotonic() < deadline:
        started = time.perf_counter()
        answer = requests.post(url, json=body, timeout=120)
        answer.raise_for_status()
        latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True, help="a FracAtlas-layout folder")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()

    params = load_params()
    small, large = pick(args.data, (373, 454), 1)[0], pick_large(args.data, 1)[0]
    body = {p: {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()]]}}
            for p in (small, large)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        model = save_cpu_model(params, Path(tmp))
        cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(model),
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
        with running(cmd, child_env(), f"{url}/ping", Path(tmp) / "serve.log"):
            print(f"mlflow models serve on {url}, 1 worker, {params.profiles['cpu'].model} at "
                  f"{params.profiles['cpu'].image_size} px, tta {params.profiles['cpu'].tta}")
            invocations = f"{url}/invocations"
            for path in (small, large):
                timed_requests(invocations, body[path], 3, args.seconds)  # warm-up
                lat = timed_requests(invocations, body[path], args.requests, args.seconds)
                kind = "small" if path == small else "large"
                print(f"one client, {path.name} ({kind}, {path.stat().st_size // 1024} KiB): "
                      f"{len(lat)} requests, p50 {1000 * percentile(lat, 50):.0f} ms, "
                      f"p95 {1000 * percentile(lat, 95):.0f} ms")
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                per_client = list(pool.map(
                    lambda _: timed_requests(invocations, body[small], args.requests, args.seconds),
                    range(args.clients),
                ))
            elapsed = time.perf_counter() - started
            lat = [x for client in per_client for x in client]
            print(f"{args.clients} clients at once, {small.name}: {len(lat)} requests in {elapsed:.1f} s = "
                  f"{len(lat) / elapsed:.1f} requests/s; p50 {1000 * percentile(lat, 50):.0f} ms, "
                  f"p95 {1000 * percentile(lat, 95):.0f} ms")


if __name__ == "__main__":
    main()
