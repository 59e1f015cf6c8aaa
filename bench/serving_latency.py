"""Latency and throughput of one X-ray per request through ``mlflow models serve`` on 127.0.0.1.

    .venv/bin/python -m bench.serving_latency --data ../shared/fracatlas [--requests 40] [--clients 4]
    .venv/bin/python -m bench.serving_latency --data ../shared/fracatlas --servers 1:all 2:1 2:all [--repeats 2]
    .venv/bin/python -m bench.serving_latency --data ../shared/fracatlas --servers 1:all 1:all:tunables --repeats 2

Serves the CPU profile's model (its network, as many members as it trains) as the registry's
pyfunc (:func:`bench.common.save_cpu_model`) with ``mlflow models serve --env-manager local`` on a
free loopback port, then:

- one client, one request at a time: p50 and p95 latency for a 373 x 454 and a large X-ray
  (:func:`bench.common.pick_large`) (``--requests`` each, at most ``--seconds`` each, after 3 warm-up requests);
- ``--clients`` clients at once, each sending the 373 x 454 X-ray ``--requests`` times, within
  ``--seconds``: requests per second over all, and p50 / p95 under that load.

``--servers`` names the servers to compare, each as ``WORKERS:THREADS[:tunables]``: ``-w WORKERS``,
PyTorch's threads in each worker (``OMP_NUM_THREADS``; ``all``: not set, so each worker takes one
thread per core, PyTorch's default), and with ``tunables`` the server started with glibc's tunables
that keep freed memory for the next request (``GLIBC_TUNABLES``, :data:`bench.common.TUNABLES`,
as docs/consumers.md tells a process that only scores). They are measured one after the other, in turn, ``--repeats``
times, so that each meets the machine's changing speed alike; the throughput's ratio to the first
server's is printed for each round. Default: one server of 1 worker and PyTorch's default threads.

Each server is stopped when it has been measured, whatever happened (:func:`tests.servers.running`).
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.args import fracatlas_folder
from bench.common import pick, pick_large, save_cpu_model, with_tunables
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


def server(spec: str) -> tuple[int, int | None, bool]:
    """``WORKERS:THREADS[:tunables]`` as (workers, threads per worker or ``None`` for PyTorch's
    default, whether the server starts with glibc's tunables that keep freed memory)."""
    workers, _, rest = spec.partition(":")
    threads, _, tunables = rest.partition(":")
    try:
        if tunables not in ("", "tunables"):
            raise ValueError(tunables)
        return int(workers), None if threads in ("", "all") else int(threads), tunables == "tunables"
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: give WORKERS:THREADS[:tunables], e.g. 2:1, 1:all or 1:all:tunables"
        ) from None


def described(workers: int, threads: int | None, tunables: bool = False) -> str:
    each = "PyTorch's default threads" if threads is None else f"{threads} thread{'s' if threads > 1 else ''}"
    kept = ", glibc's tunables keeping freed memory" if tunables else ""
    return f"{workers} worker{'s' if workers > 1 else ''}, {each} each{kept}"


def measure(model: Path, workers: int, threads: int | None, tunables: bool, small: Path, large: Path, body: dict,
            args: argparse.Namespace, log: Path) -> float:
    """Serves ``model`` as given, prints its latencies and throughput, and returns the requests/s of
    ``args.clients`` clients at once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(model),
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    env = child_env()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(name, None)
        if threads is not None:
            env[name] = str(threads)
    with running(cmd, with_tunables(env, tunables), f"{url}/ping", log):
        print(f"mlflow models serve on {url}, {described(workers, threads, tunables)}")
        invocations = f"{url}/invocations"
        # Warm-up: every worker loads the model and runs it once; clients at once reach them all.
        with ThreadPoolExecutor(max(args.clients, 2 * workers)) as pool:
            list(pool.map(lambda _: timed_requests(invocations, body[small], 3, args.seconds),
                          range(max(args.clients, 2 * workers))))
        for path in (small, large):
            timed_requests(invocations, body[path], 3, args.seconds)  # warm-up
            lat = timed_requests(invocations, body[path], args.requests, args.seconds)
            kind = "small" if path == small else "large"
            print(f"  one client, {path.name} ({kind}, {path.stat().st_size // 1024} KiB): "
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
        rate = len(lat) / elapsed
        print(f"  {args.clients} clients at once, {small.name}: {len(lat)} requests in {elapsed:.1f} s = "
              f"{rate:.1f} requests/s; p50 {1000 * percentile(lat, 50):.0f} ms, "
              f"p95 {1000 * percentile(lat, 95):.0f} ms")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=fracatlas_folder, required=True, help="a FracAtlas-layout folder")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--servers", type=server, nargs="+", default=[(1, None, False)],
                        help="servers to compare, each WORKERS:THREADS[:tunables] (threads per worker; all: PyTorch's "
                             "default; tunables: glibc's that keep freed memory, bench.common.TUNABLES)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the servers, in turn")
    args = parser.parse_args()

    params = load_params()
    small, large = pick(args.data, (373, 454), 1)[0], pick_large(args.data, 1)[0]
    body = {p: {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()]]}}
            for p in (small, large)}
    profile = params.profiles["cpu"]
    print(f"{profile.model} at {profile.image_size} px, {profile.members} member(s), tta {profile.tta}, "
          f"on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        model = save_cpu_model(params, Path(tmp), members=profile.members)
        rates: dict[tuple[int, int | None, bool], list[float]] = {s: [] for s in args.servers}
        for round_ in range(1, args.repeats + 1):
            for workers, threads, tunables in args.servers:
                rates[workers, threads, tunables].append(
                    measure(model, workers, threads, tunables, small, large, body, args, Path(tmp) / "serve.log"))
            if len(args.servers) > 1:
                first = rates[args.servers[0]][-1]
                print(f"round {round_}: requests/s against {described(*args.servers[0])}: " + "; ".join(
                    f"{described(*s)} {rates[s][-1] / first:.2f}x" for s in args.servers[1:]))
        if len(args.servers) > 1 and args.repeats > 1:
            first = statistics.median(rates[args.servers[0]])
            print("medians: " + "; ".join(
                f"{described(*s)} {statistics.median(rates[s]):.1f} requests/s ({statistics.median(rates[s]) / first:.2f}x)"
                for s in args.servers))


if __name__ == "__main__":
    main()
