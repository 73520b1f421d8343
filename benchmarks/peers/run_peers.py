"""Time learn2learn, higher and TorchOpt meta-steps, each configuration in its own process.

Every configuration (library x solver x inner steps x workload) runs ``peer_step.py`` in a fresh
subprocess of the peer environment's Python (``benchmarks/.venv-peers``, made by ``setup_env.sh``,
which this script runs first when the environment or a peer is missing). The JSON lines are
collected into one results file with a description of the machine, and a table is printed.

Examples::

    python benchmarks/peers/run_peers.py --quick --workloads omniglot --inner-steps 1
    python benchmarks/peers/run_peers.py --libraries higher torchopt --solvers maml fomaml
    python benchmarks/peers/run_peers.py            # everything, 3 warm-up + 10 timed steps each

Any Python 3.9+ can run this file (it does not import torch); the timing runs in the peer venv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import configs  # noqa: E402  (this folder is not a package)

DEFAULT_VENV = REPO / "benchmarks" / ".venv-peers"
PEER_MODULES = ("torch", "higher", "torchopt", "learn2learn")


def venv_python(venv: Path = DEFAULT_VENV) -> Path:
    return Path(os.environ.get("PEERS_VENV", venv)) / "bin" / "python"


def peers_installed(python: Path) -> bool:
    """True if ``python`` exists and has torch and every peer library installed."""
    if not python.exists():
        return False
    probe = "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))"
    return subprocess.run([str(python), "-I", "-c", probe, *PEER_MODULES], capture_output=True).returncode == 0


def ensure_environment(python: Path, force: bool = False) -> None:
    """Run ``setup_env.sh`` when the peer environment is absent or incomplete (or ``force``)."""
    if not force and peers_installed(python):
        return
    print(f"[run_peers] setting up the peer environment ({python.parent.parent})", flush=True)
    env = dict(os.environ, PEERS_VENV=str(python.parent.parent))
    subprocess.run(["bash", str(HERE / "setup_env.sh")], check=True, env=env)


def machine_description() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }


def run_one(python: Path, library, solver, inner_steps, workload, args) -> dict:
    command = [
        str(python), str(HERE / "peer_step.py"),
        "--library", library, "--solver", solver, "--inner-steps", str(inner_steps),
        "--workload", workload, "--threads", str(args.threads), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--dtype", args.dtype,
    ]
    config = {"library": library, "solver": solver, "inner_steps": inner_steps, "workload": workload}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**config, "status": "timeout", "wall_seconds": time.perf_counter() - start}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**config, "status": "error", "returncode": proc.returncode, "wall_seconds": wall,
                "stderr_tail": proc.stderr[-2000:]}
    return {**json.loads(lines[-1]), "status": "ok", "wall_seconds": wall}


def format_table(results) -> str:
    header = ("workload", "library", "solver", "inner", "s/step (median)", "min", "max", "peak RSS MB (+incr)", "status")
    rows = [header]
    for r in results:
        times = r.get("all_times") or []
        if r["status"] == "ok" and times:
            cells = (f"{r['seconds_per_step']:.3f}", f"{min(times):.3f}", f"{max(times):.3f}",
                     f"{r['peak_rss_abs_mb']:.0f} (+{r['peak_rss_mb']:.0f})")
        else:
            cells = ("-", "-", "-", "-")
        rows.append((r["workload"], r["library"], r["solver"], str(r["inner_steps"]), *cells, r["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libraries", nargs="+", default=list(configs.LIBRARIES), choices=configs.LIBRARIES)
    parser.add_argument("--solvers", nargs="+", default=list(configs.ALL_SOLVERS), choices=configs.ALL_SOLVERS)
    parser.add_argument("--inner-steps", nargs="+", type=int, default=list(configs.INNER_STEPS))
    parser.add_argument("--workloads", nargs="+", default=list(configs.WORKLOADS), choices=sorted(configs.WORKLOADS))
    parser.add_argument("--threads", type=int, default=configs.DEFAULT_THREADS)
    parser.add_argument("--steps", type=int, default=configs.DEFAULT_STEPS, help="timed meta-steps per configuration")
    parser.add_argument("--warmup", type=int, default=configs.DEFAULT_WARMUP, help="untimed meta-steps first")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: --steps {configs.QUICK_STEPS} --warmup {configs.QUICK_WARMUP}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--output", type=Path, default=None,
                        help="results JSON (default: benchmarks/peers/results/peers-<time>.json)")
    parser.add_argument("--python", type=Path, default=None,
                        help="interpreter of the peer environment (default: benchmarks/.venv-peers/bin/python)")
    parser.add_argument("--setup", action="store_true", help="run setup_env.sh even if the environment looks complete")
    parser.add_argument("--no-setup", action="store_true", help="never run setup_env.sh")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = configs.QUICK_STEPS, configs.QUICK_WARMUP
    if any(n < 1 for n in args.inner_steps):
        parser.error(f"--inner-steps must all be >= 1, got {args.inner_steps}")

    python = args.python or venv_python()
    if not args.no_setup:
        ensure_environment(python, force=args.setup)
    if not peers_installed(python):
        parser.error(f"the peer environment at {python} lacks one of {PEER_MODULES}; run setup_env.sh")

    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        message = (f"the 1-minute load average is {load:.1f} on {cpus} CPUs: other work is running and "
                   f"the timings will be inflated")
        if args.threads > 1:
            message += (f"; with --threads {args.threads} torch's worker threads also wait on each other, "
                        f"which made meta-steps 10-100x slower on this machine (compare at --threads 1)")
        warnings.warn(message + ". Trust only runs on an idle machine.", RuntimeWarning, stacklevel=1)
    todo = configs.configurations(args.libraries, args.solvers, args.inner_steps, args.workloads)
    if not todo:
        parser.error("no configuration matches the chosen libraries and solvers")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = args.output or HERE / "results" / f"peers-{stamp}.json"
    report = {
        "started": stamp,
        "command": sys.argv,
        "python": str(python),
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype,
        "machine": machine_description(),
        "workloads": {name: configs.WORKLOADS[name] for name in args.workloads},
        "meta_lr": configs.META_LR,
        "imaml": configs.IMAML,
        "results": [],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    for i, (library, solver, inner_steps, workload) in enumerate(todo, 1):
        result = run_one(python, library, solver, inner_steps, workload, args)
        report["results"].append(result)
        report["machine"]["loadavg_end"] = os.getloadavg()
        output.write_text(json.dumps(report, indent=1))  # after each run: a crash keeps what ran
        median = result.get("seconds_per_step")
        shown = f"{median:.3f} s/step" if median is not None else result["status"]
        print(f"[run_peers] {i}/{len(todo)} {workload} {library} {solver} inner_steps={inner_steps}: {shown}"
              f" ({result['wall_seconds']:.1f} s wall)", flush=True)
        if result["status"] != "ok" and "stderr_tail" in result:
            print(result["stderr_tail"], file=sys.stderr)

    print()
    print(format_table(report["results"]))
    print(f"\n[run_peers] results: {output}")
    print(f"[run_peers] load average start {report['machine']['loadavg_start']}, end {report['machine']['loadavg_end']}")
    return 0 if all(r["status"] == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
