"""The gate's scoring of a version in a consumer's Python: freed memory kept vs glibc's default, side by side.

    .venv/bin/python -m bench.gate_scoring --data ../shared/fracatlas [--small 96 --large 32] [--repeats 2]

The promotion gate scores the new version and the champion on the test split, each in a Python of
its own with its own packaged code (:func:`fracture.consumer.predict_as_consumer`). That Python
keeps the memory it frees for its next batch, as every pipeline command does
(:mod:`fracture.allocator`); ``FRACTURE_KEEP_FREED_MEMORY=0`` leaves glibc's malloc as it comes,
which maps and zeroes each batch's full-size X-rays and activations afresh. A third side leaves
the consumer's own setting off and sets glibc's tunables for the same (:data:`bench.common.TUNABLES`) in its
environment instead, as a process that only scores with the model and runs none of this
project's set-up (``mlflow models serve``, a hospital's batch job) can. Every side scores the same
real X-rays (``--small`` at 373 x 454, ``--large`` of the largest size the copy holds, as the test
split mixes them) through the CPU profile's model as the registry serves it (its network, input
size, ``members`` and test-time augmentation; ImageNet weights and an untrained head, since speed
does not depend on the weights' values), saved as the registry's pyfunc.

The runs alternate (kept, default, tunables, then tunables, default, kept, ...) so drift in the
machine's speed hits every side. Each prints its seconds (the consumer's Python from start to end,
the model's load included, as the gate pays it), images per second, that Python's CPU time in
user space and in the kernel, its minor page faults (pages the kernel mapped in) and its peak
resident memory (each run is a process of its own around its consumer's Python, so that peak is
that Python's); the summary prints each side's median against glibc's default and whether every
run answered the same probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.args import fracatlas_folder

#: Each side: the consumer's own switch (fracture.consumer), and whether ``GLIBC_TUNABLES`` is set
#: to :data:`bench.common.TUNABLES`.
SIDES = {"kept": ("1", False), "default": ("0", False), "tunables": ("0", True)}


def child(model: str, files: list[str]) -> dict:
    """One scoring in a consumer's Python, from this process, which the parent started for it alone:
    so the children's peak resident memory here is that consumer's."""
    from fracture.consumer import predict_as_consumer

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    answer = predict_as_consumer(model, [Path(f) for f in files])
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": took, "user": after.ru_utime - before.ru_utime, "kernel": after.ru_stime - before.ru_stime,
        "faults": after.ru_minflt - before.ru_minflt, "peak_kib": after.ru_maxrss,
        "probabilities": answer.rows["fracture_probability"].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=fracatlas_folder, help="a FracAtlas-layout folder")
    parser.add_argument("--small", type=int, default=96, help="X-rays of 373 x 454")
    parser.add_argument("--large", type=int, default=32, help="X-rays of the largest size the copy holds")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--members", type=int, default=None, help="default: the CPU profile's members")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "FILES_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(Path(args.child[1]).read_text()))))
        return
    if args.data is None:
        parser.error("--data is required")

    from bench.common import pick, pick_large, save_cpu_model, with_tunables
    from fracture.allocator import SWITCH
    from fracture.config import load_params

    params = load_params()
    profile = params.profiles["cpu"]
    members = args.members or profile.members
    files = [str(f.resolve()) for f in pick(args.data, (373, 454), args.small) + pick_large(args.data, args.large)]
    print(f"{len(files)} real X-rays ({args.small} at 373 x 454, {args.large} large), {profile.model} at "
          f"{profile.image_size} px, {members} member(s), tta {profile.tta}; each run a consumer's Python "
          f"scoring them all, as the gate scores a version; {args.repeats} alternating runs of each side")
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_cpu_model(params, Path(tmp) / "model", members=members)
        listed = Path(tmp) / "files.json"
        listed.write_text(json.dumps(files))
        for i in range(args.repeats):
            for side in list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]:
                # The consumer's Python inherits the switch (fracture.consumer) and glibc's tunables.
                switch, tunables = SIDES[side]
                env = with_tunables(dict(os.environ), tunables) | {SWITCH: switch}
                proc = subprocess.run([sys.executable, "-m", "bench.gate_scoring", "--child", str(model), str(listed)],
                                      env=env, capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise SystemExit(f"the {side} run failed:\n{proc.stderr[-3000:]}")
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[side].append(run)
                print(f"run {i + 1} {side:<8} {run['seconds']:6.1f} s, {len(files) / run['seconds']:5.2f} images/s; "
                      f"CPU user {run['user']:5.1f} s, kernel {run['kernel']:5.1f} s; minor page faults "
                      f"{run['faults']:,}; peak resident {run['peak_kib'] / 1024:,.0f} MiB", flush=True)
    medians = {side: statistics.median(r["seconds"] for r in runs[side]) for side in SIDES}
    peaks = {side: max(r["peak_kib"] for r in runs[side]) / 1024 for side in SIDES}
    every = [r["probabilities"] for side in SIDES for r in runs[side]]
    same = all(a == every[0] for a in every)
    default = medians["default"]
    for side in SIDES:
        print(f"median {side:<8} {medians[side]:6.1f} s ({len(files) / medians[side]:.2f} images/s, peak "
              f"{peaks[side]:,.0f} MiB): {default / medians[side]:.2f}x as fast as glibc's default")
    print(f"the same probabilities in every run: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
