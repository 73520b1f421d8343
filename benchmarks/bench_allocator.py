"""Peak memory and speed of second-order MAML under glibc's malloc settings, fewshot and a peer.

On Linux, PyTorch's CPU tensors come from glibc ``malloc``. Blocks above ``M_MMAP_THRESHOLD`` are
mapped and returned to the system when freed; smaller ones come from the heap, whose free space is
reused but rarely returned. By default the threshold is *dynamic*: each time a mapped block is
freed, the threshold rises to its size (up to 32 MB), so after the first meta-step most of a
meta-step's activations live on the heap, and the heap's high-water mark (fragmentation included)
becomes the process's peak resident set. Setting ``MALLOC_MMAP_THRESHOLD_`` fixes the threshold:
less memory, more page faults.

This script runs the same MAML meta-step (the workload of ``bench_solvers.py``, 5 inner steps) in
fresh processes, fewshot (one task at a time, and two task threads) and learn2learn (the fastest
peer there), each under the default allocator and under fixed thresholds, interleaved ``--rounds``
times, and prints median seconds per meta-step and the median peak-RSS increase over the timed
steps. Both libraries get the same environment, so the comparison stays like for like.

Usage (the peer environment comes from ``benchmarks/peers/setup_env.sh``)::

    python benchmarks/bench_allocator.py [--rounds 2] [--threads 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".venv-peers" / "bin" / "python"
SETTINGS = {"default": {}, "mmap 16 MB": {"MALLOC_MMAP_THRESHOLD_": str(16 << 20)},
            "mmap 1 MB": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
            "mmap 128 kB": {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}}


def commands(args):
    python = PEER_PYTHON if PEER_PYTHON.exists() else Path(sys.executable)
    common = ["--workload", "omniglot", "--inner-steps", "5", "--threads", str(args.threads),
              "--steps", str(args.steps), "--warmup", str(args.warmup)]
    step = [str(python), str(HERE / "_fewshot_step.py"), "time", "--solver", "MAML", *common]
    return {
        "fewshot MAML (task_threads=1)": [*step, "--task-threads", "1"],
        f"fewshot MAML (task_threads={args.threads})": [*step, "--task-threads", str(args.threads)],
        "learn2learn MAML": [str(python), str(HERE / "peers" / "peer_step.py"), "--library", "learn2learn",
                             "--solver", "maml", *common],
    }


def run(command, extra_env, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra_env)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    return out["seconds_per_step"], out["peak_rss_mb"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    configs = commands(args)
    results = {(name, s): [] for name in configs for s in SETTINGS}
    for r in range(args.rounds):
        for setting, extra in SETTINGS.items():
            for name, command in configs.items():
                results[(name, setting)].append(run(command, extra, args.threads))
                print(f"round {r + 1}: {name:<32} {setting:<12} {results[(name, setting)][-1]}", file=sys.stderr)
    print(f"MAML, omniglot workload, 5 inner steps, {args.threads} threads, {args.steps} timed steps, "
          f"medians of {args.rounds} rounds")
    print(f"| {'library / configuration':<32} | {'allocator':<12} | s/step | peak RSS increase (MB) |")
    print(f"| {'-' * 32} | {'-' * 12} | ------ | ---------------------- |")
    for (name, setting), values in results.items():
        seconds = statistics.median(v[0] for v in values)
        rss = statistics.median(v[1] for v in values)
        print(f"| {name:<32} | {setting:<12} | {seconds:6.3f} | {rss:22.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
