"""Time fewshot's solvers against learn2learn, higher and TorchOpt: speed ratios, memory, FLOP rate.

Every configuration (library x solver x inner steps x workload) runs in its own process: fewshot's
through ``benchmarks/_fewshot_step.py``, the peers' through the peer harness
(``benchmarks/peers/run_peers.py`` and ``peer_step.py``), on the same workloads and random data
(``benchmarks/peers/configs.py``) and, by default, the same interpreter and torch build (the peer
environment ``benchmarks/.venv-peers``, where fewshot is installed too). Configurations are
interleaved (a fewshot solver, then the peers it is compared with, then the next fewshot solver,
...) and the whole sequence is run ``--rounds`` times, the second time in reverse order, so that
changes of machine load fall on both sides of each comparison. Timings of all rounds are pooled.

Reported per fewshot solver: seconds per meta-step (median), meta-steps per second relative to each
peer (peer seconds / fewshot seconds: above 1 means fewshot is faster), peak memory (``ru_maxrss``
of its process: absolute and increase over the meta-steps), achieved GFLOP/s of a meta-step
(``FlopCounterMode`` count / median time) against the machine's float32 matmul rate, and the
issue's targets. ``--memory-sweep`` adds MAML, memory-efficient MAML and IMAML at 5, 20 and 50
inner steps, each ``--sweep-rounds`` times (medians reported). ``--profile SOLVER`` prints a ``torch.profiler`` summary of one meta-step instead.

Examples::

    python benchmarks/bench_solvers.py --quick --workloads omniglot --inner-steps 1 --solvers FOMAML
    python benchmarks/bench_solvers.py --memory-sweep --write-docs  # the full run (about an hour idle)
    python benchmarks/bench_solvers.py --memory-sweep --no-peers --solvers MAML
    python benchmarks/bench_solvers.py --profile MAML --workloads omniglot --inner-steps 5

Any Python 3.10+ runs this file (it does not import torch); measurements run in subprocesses.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
import configs  # benchmarks/peers is not a package
import run_peers

STEP_SCRIPT = HERE / "_fewshot_step.py"
DOCS = REPO / "docs" / "benchmarks.md"
RESULTS = HERE / "peers" / "results"  # ignored by git

#: fewshot solver -> (estimator class, its parameters, the peer solver it is compared with).
#: IMAML uses TorchOpt's iMAML settings (configs.IMAML: lam, a fixed number of CG iterations with
#: no tolerance); NeumannMAML gets the same lam and as many Hessian-vector products as IMAML
#: (one for CG's initial residual plus one per iteration). PenaltyMAML does MAML's work plus the
#: penalty's, and is compared with the peers' MAML.
SOLVERS = {
    "MAML": ("MAML", {}, "maml"),
    "FOMAML": ("FOMAML", {}, "fomaml"),
    "Reptile": ("Reptile", {}, "reptile"),
    "IMAML": ("IMAML", {"lam": configs.IMAML["lam"], "cg_steps": configs.IMAML["cg_iters"], "cg_tol": 0.0},
              "imaml"),
    "NeumannMAML": ("NeumannMAML", {"lam": configs.IMAML["lam"], "neumann_terms": configs.IMAML["cg_iters"] + 1},
                    "imaml"),
    "PenaltyMAML": ("PenaltyMAML", {}, "maml"),
    "MAML-me": ("MAML", {"memory_efficient": True}, "maml"),
    # Tasks one after another with torch's intra-op threads, as the peers run them: one task's
    # graph in memory at a time instead of task_threads of them.
    "MAML-seq": ("MAML", {"task_threads": 1}, "maml"),
    # The variants, compared with the peers' MAML: ANIL adapts the head alone (its body runs once
    # per task), Meta-SGD and MAML++ do MAML's work plus their learned steps (MAML++ with its
    # multi-step loss off: the annealed phase costs about k query passes more).
    "ANIL": ("ANIL", {}, "maml"),
    "MetaSGD": ("MetaSGD", {}, "maml"),
    "MAMLPlusPlus": ("MAMLPlusPlus", {"multi_step_loss_steps": 0}, "maml"),
}
DEFAULT_SOLVERS = ("MAML", "MAML-seq", "FOMAML", "Reptile", "IMAML", "NeumannMAML", "PenaltyMAML", "ANIL",
                   "MetaSGD", "MAMLPlusPlus")
SWEEP_SOLVERS = ("MAML", "MAML-me", "IMAML")
SWEEP_INNER_STEPS = (5, 20, 50)
PEER_NAMES = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "TorchOpt"}
LOAD_WARNING = 1.5


@dataclass(frozen=True)
class Target:
    kind: str  # "speed": meta-steps/s ratio >= factor; "memory": peak-memory increase <= the peer's
    reference: str  # "fastest" (the fastest peer on this configuration) or a library name
    factor: float = 1.0

    def label(self) -> str:
        who = "fastest peer" if self.reference == "fastest" else PEER_NAMES[self.reference]
        if self.kind == "speed":
            return f">={self.factor:g}x {who}"
        return f"memory <= {who}"


#: The issue's targets.
TARGETS = {
    "MAML": (Target("speed", "fastest", 2.0), Target("memory", "fastest")),
    "MAML-seq": (Target("speed", "fastest", 2.0), Target("memory", "fastest")),
    "FOMAML": (Target("speed", "fastest", 2.0),),
    "Reptile": (Target("speed", "fastest", 2.0),),
    "IMAML": (Target("speed", "torchopt", 1.5),),
}


# --------------------------------------------------------------------------------------------
# Running measurements


def _subprocess_json(command, config, threads, timeout) -> dict:
    """Run ``command`` and return its last JSON line merged with ``config`` and a status."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([str(c) for c in command], check=False, capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**config, "status": "timeout"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**config, "status": "error", "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    return {**json.loads(lines[-1]), **config, "status": "ok"}


def run_fewshot(python, solver, inner_steps, workload, args, *, steps, warmup, flops=False) -> dict:
    estimator, options, _ = SOLVERS[solver]
    command = [python, STEP_SCRIPT, "time", "--solver", estimator, "--options", json.dumps(options),
               "--workload", workload, "--inner-steps", inner_steps, "--threads", args.threads,
               "--steps", steps, "--warmup", warmup, "--task-threads", args.task_threads,
               "--device", args.device]
    if flops:
        command.append("--flops")
    config = {"library": "fewshot", "solver": solver, "estimator": estimator, "inner_steps": inner_steps,
              "workload": workload}
    return _subprocess_json(command, config, args.threads, args.timeout)


def run_peer(python, library, solver, inner_steps, workload, args) -> dict:
    peer_args = argparse.Namespace(threads=args.threads, steps=args.steps, warmup=args.warmup,
                                   dtype="float32", timeout=args.timeout)
    return run_peers.run_one(python, library, solver, inner_steps, workload, peer_args)


def _has_fewshot(python: Path) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('fewshot') is None)"
    return python.exists() and subprocess.run([str(python), "-c", probe], check=False, capture_output=True).returncode == 0


def plan(workloads, inner_steps, solvers, libraries, rounds):
    """The order of the timing runs: ``(round, workload, inner_steps, library, solver)``.

    Within a workload and inner-step count, each family of compared solvers (a peer solver and the
    fewshot solvers compared with it) runs together, fewshot and peers alternating; odd rounds run
    in reverse order.
    """
    order = []
    for round_ in range(rounds):
        for workload in workloads:
            for k in inner_steps:
                group = []
                families = dict.fromkeys(SOLVERS[s][2] for s in solvers)
                for family in families:
                    ours = [("fewshot", s) for s in solvers if SOLVERS[s][2] == family]
                    peers = [(lib, family) for lib in libraries if family in configs.SOLVERS[lib]]
                    for i in range(max(len(ours), len(peers))):
                        group += ours[i:i + 1] + peers[i:i + 1]
                if round_ % 2:
                    group.reverse()
                order += [(round_, workload, k, lib, solver) for lib, solver in group]
    return order


# --------------------------------------------------------------------------------------------
# Summaries


@dataclass
class Summary:
    median: float
    round_medians: dict
    rss_abs: float
    rss_incr: float
    flops: int | None
    solve_iters: float | None
    n_times: int
    device_mb: float | None = None  # peak memory allocated on a CUDA device


def summarize(results) -> dict:
    """``(workload, inner_steps, library, solver) -> Summary`` over the rounds' successful runs."""
    groups = {}
    for r in results:
        if r.get("status") == "ok" and r.get("kind") == "timing":
            groups.setdefault((r["workload"], r["inner_steps"], r["library"], r["solver"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        times = [t for r in runs for t in r["all_times"]]
        flops = next((r["flops"] for r in runs if "flops" in r), None)
        iters = [r["mean_solve_iters"] for r in runs if "mean_solve_iters" in r]
        device_mb = [r["peak_device_mb"] for r in runs if "peak_device_mb" in r]
        out[key] = Summary(
            median=statistics.median(times),
            round_medians={r["round"]: r["seconds_per_step"] for r in runs},
            rss_abs=max(r["peak_rss_abs_mb"] for r in runs),
            rss_incr=max(r["peak_rss_mb"] for r in runs),
            flops=flops,
            solve_iters=statistics.mean(iters) if iters else None,
            n_times=len(times),
            device_mb=max(device_mb) if device_mb else None,
        )
    return out


def _ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def _mb(abs_mb, incr_mb):
    return f"{abs_mb:.0f} (+{incr_mb:.0f})"


def evaluate_target(target: Target, ours: Summary, peers: dict) -> str:
    """``"<label>: met"`` or ``"<label>: missed by x%"`` (speed: the ratio is x% below the target;
    memory: fewshot's increase is x% above the peer's)."""
    if not peers:
        return f"{target.label()}: no peer result"
    if target.reference == "fastest":
        library = min(peers, key=lambda lib: peers[lib].median)
    elif target.reference in peers:
        library = target.reference
    else:
        return f"{target.label()}: no {PEER_NAMES[target.reference]} result"
    peer = peers[library]
    if target.kind == "speed":
        ratio = peer.median / ours.median
        if ratio >= target.factor:
            return f"{target.label()}: met ({ratio:.2f}x)"
        return f"{target.label()}: missed by {100 * (1 - ratio / target.factor):.0f}% ({ratio:.2f}x)"
    if ours.rss_incr <= peer.rss_incr:
        return f"{target.label()}: met (+{ours.rss_incr:.0f} vs +{peer.rss_incr:.0f} MB)"
    excess = 100 * (ours.rss_incr / peer.rss_incr - 1) if peer.rss_incr > 0 else float("inf")
    return f"{target.label()}: missed by {excess:.0f}% (+{ours.rss_incr:.0f} vs +{peer.rss_incr:.0f} MB)"


MAIN_HEADER = ("workload", "solver", "k", "s/step", "steps/s", "vs learn2learn", "vs higher", "vs TorchOpt",
               "vs fastest peer", "per round", "peak RSS MB (+incr)", "fastest peer RSS", "GFLOP/s (% matmul)",
               "target", "notes")


def main_rows(summary, workloads, inner_steps, solvers, libraries, matmul_gflops):
    rows = []
    for workload in workloads:
        for k in inner_steps:
            for solver in solvers:
                ours = summary.get((workload, k, "fewshot", solver))
                if ours is None:
                    rows.append((workload, solver, str(k), "failed", *["-"] * (len(MAIN_HEADER) - 4)))
                    continue
                family = SOLVERS[solver][2]
                peers = {lib: summary[(workload, k, lib, family)] for lib in libraries
                         if (workload, k, lib, family) in summary}
                ratios = {lib: peers[lib].median / ours.median for lib in peers}
                fastest = min(peers, key=lambda lib: peers[lib].median) if peers else None
                per_round = []
                for round_, seconds in sorted(ours.round_medians.items()):
                    times = [p.round_medians[round_] for p in peers.values() if round_ in p.round_medians]
                    if times:
                        per_round.append(f"{min(times) / seconds:.2f}")
                gflops = "-"
                if ours.flops is not None:
                    rate = ours.flops / ours.median / 1e9
                    gflops = f"{rate:.1f}" + (f" ({100 * rate / matmul_gflops:.0f}%)" if matmul_gflops else "")
                notes = []
                if family != solver.lower():
                    notes.append(f"vs peers' {family}")
                if ours.device_mb is not None:
                    notes.append(f"peak device memory {ours.device_mb:.0f} MB")
                if ours.solve_iters is not None and SOLVERS[solver][0] == "IMAML":
                    notes.append(f"CG iterations {ours.solve_iters:.1f} of {SOLVERS[solver][1]['cg_steps']} "
                                 f"(TorchOpt: {configs.IMAML['cg_iters']})")
                targets = "; ".join(evaluate_target(t, ours, peers) for t in TARGETS.get(solver, ())) or "-"
                rows.append((
                    workload, solver, str(k), f"{ours.median:.4f}", f"{1 / ours.median:.2f}",
                    *(_ratio(ratios.get(lib)) for lib in ("learn2learn", "higher", "torchopt")),
                    f"{_ratio(ratios.get(fastest))} ({PEER_NAMES[fastest]})" if fastest else "-",
                    " / ".join(per_round) or "-",
                    _mb(ours.rss_abs, ours.rss_incr),
                    _mb(peers[fastest].rss_abs, peers[fastest].rss_incr) if fastest else "-",
                    gflops, targets, "; ".join(notes) or "-",
                ))
    return rows


PEER_HEADER = ("workload", "library", "solver", "k", "s/step", "steps/s", "per round s/step", "peak RSS MB (+incr)")


def peer_rows(summary, workloads, inner_steps, libraries):
    rows = []
    for (workload, k, library, solver), s in summary.items():
        if library == "fewshot" or workload not in workloads or k not in inner_steps or library not in libraries:
            continue
        per_round = " / ".join(f"{t:.4f}" for _, t in sorted(s.round_medians.items()))
        rows.append((workload, PEER_NAMES[library], solver, str(k), f"{s.median:.4f}", f"{1 / s.median:.2f}",
                     per_round, _mb(s.rss_abs, s.rss_incr)))
    order = {w: i for i, w in enumerate(workloads)}
    rows.sort(key=lambda r: (order[r[0]], int(r[3]), configs.ALL_SOLVERS.index(r[2]), r[1]))
    return rows


SWEEP_HEADER = ("solver", "inner steps", "peak RSS MB", "increase MB", "increase per round MB", "s/step")


def sweep_rows_and_verdicts(sweep):
    """One row per solver and inner-step count: the median over the sweep's rounds of the peak RSS
    (absolute and increase) and of the seconds per step, with every round's increase; the verdicts
    compare the medians (the same configuration repeated varies by 10-15%: allocator high-water)."""
    rows, verdicts = [], []
    rounds = len({r.get("round", 0) for r in sweep})
    verdicts.append(f"Each configuration ran {rounds} time(s) in its own process (2 timed meta-steps after 1 "
                    "warm-up, the rounds in alternating order); the table gives the medians over the runs and "
                    "every run's increase.")
    for solver in SWEEP_SOLVERS:
        by_k = {}
        for r in sweep:
            if r["solver"] == solver:
                by_k.setdefault(r["inner_steps"], []).append(r)
        medians, complete = [], True
        for k in sorted(by_k):
            ok = [r for r in by_k[k] if r["status"] == "ok"]
            if not ok:
                rows.append((solver, str(k), by_k[k][0]["status"], "-", "-", "-"))
                complete = False
                continue
            complete = complete and len(ok) == len(by_k[k])
            incr = statistics.median(r["peak_rss_mb"] for r in ok)
            absolute = statistics.median(r["peak_rss_abs_mb"] for r in ok)
            rows.append((solver, str(k), f"{absolute:.0f}", f"{incr:.0f}",
                         " / ".join(f"+{r['peak_rss_mb']:.0f}" for r in ok),
                         f"{statistics.median(r['seconds_per_step'] for r in ok):.3f}"))
            medians.append((k, incr, absolute))
        if len(medians) < 2 or not complete:
            continue
        incr = [m[1] for m in medians]
        absolute = [m[2] for m in medians]
        spread = (max(incr) - min(incr)) / min(incr) if min(incr) > 0 else float("inf")
        spread_abs = (max(absolute) - min(absolute)) / min(absolute)
        growing = all(b > a for a, b in itertools.pairwise(incr))
        name = "MAML (memory_efficient=True)" if solver == "MAML-me" else solver
        line = (f"{name}: median increase {' -> '.join(f'+{x:.0f}' for x in incr)} MB over "
                f"{'/'.join(str(m[0]) for m in medians)} inner steps ({'rising' if growing else 'not rising'} at "
                f"every step; spread {100 * spread:.0f}% of the smallest increase, {100 * spread_abs:.0f}% of the "
                f"smallest absolute peak)")
        if solver == "IMAML":
            line += f": {'met' if spread <= 0.10 else 'missed'} (target: increase flat within 10%)"
        elif solver == "MAML":
            line += f": {'growing as expected' if growing else 'NOT growing'}"
        verdicts.append(line)
    return rows, verdicts


def flop_check_lines(check) -> list[str]:
    if check is None or check.get("status") != "ok":
        return ["FLOP-count check: not run" + (f" ({check['status']})" if check else "")]
    hand = check["forward_flops_per_example_by_hand"]
    fomaml_conv = check["FOMAML"]["torch_func_by_op"].get("aten.convolution", 0)
    lines = [
        (f"Forward pass of one 28x28 example, counted by hand from the layer shapes: "
         f"{hand['conv'] / 1e6:.2f} MFLOP in the convolutions, {hand['linear']} FLOP in the head."),
        (f"FOMAML, one task, {check['inner_steps']} inner step(s): FlopCounterMode under torch.func counts "
         f"{fomaml_conv / 1e9:.4f} GFLOP of forward convolutions; by hand "
         f"({check['inner_steps']} x {check['n_support']} support + {check['n_query']} query examples): "
         f"{check['fomaml_forward_conv_flops_by_hand'] / 1e9:.4f} GFLOP "
         f"(ratio {fomaml_conv / check['fomaml_forward_conv_flops_by_hand']:.4f})."),
    ]
    agree = True
    for solver in ("FOMAML", "MAML"):
        func, plain = check[solver]["torch_func"], check[solver]["plain_autograd"]
        agree &= abs(func - plain) <= 0.01 * plain
        lines.append(f"{solver}, one task: torch.func {func / 1e9:.4f} GFLOP, the same computation in plain "
                     f"autograd {plain / 1e9:.4f} GFLOP (ratio {func / plain:.4f}).")
    if agree:
        lines.append("FlopCounterMode counts fewshot's torch.func computations (grad, grad of grad) like plain "
                     "autograd, so the GFLOP/s column uses its counts directly. It counts matrix products and "
                     "convolutions only (batch norm, pooling, ReLU and optimizer arithmetic are left out).")
    else:
        lines.append("WARNING: FlopCounterMode's count under torch.func differs from plain autograd's: the "
                     "GFLOP/s column is not reliable.")
    return lines


# --------------------------------------------------------------------------------------------
# Reports


def text_table(header, rows) -> str:
    rows = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header, rows) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def machine_description() -> dict:
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "model": info.get("Model name") or run_peers.machine_description()["cpu"],
        "cpus": info.get("CPU(s)", str(os.cpu_count())),
        "cores_per_socket": info.get("Core(s) per socket", "?"),
        "sockets": info.get("Socket(s)", "?"),
        "threads_per_core": info.get("Thread(s) per core", "?"),
        "hypervisor": info.get("Hypervisor vendor", ""),
        "platform": platform.platform(),
        "vector": _vector_extension(info.get("Flags", "")),
    }


def _vector_extension(flags: str) -> str:
    """The widest x86 vector extension in ``lscpu``'s flags (torch's kernels pick theirs by it)."""
    flags = set(flags.split())
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither AVX2 nor AVX-512"


def versions(results) -> dict:
    """Versions seen in the runs: python, torch (per side if fewshot's and the peers' differ),
    fewshot and each peer."""
    seen = {"python": {}, "torch": {}}
    libraries = {}
    for r in results:
        if r.get("status") != "ok" or r.get("kind") not in ("timing", "memory_sweep"):
            continue
        side = "fewshot" if r["library"] == "fewshot" else "peers"
        seen["python"].setdefault(side, r["python"])
        seen["torch"].setdefault(side, r["torch_version"])
        name = "fewshot" if side == "fewshot" else PEER_NAMES[r["library"]]
        libraries.setdefault(name, r["fewshot_version"] if side == "fewshot" else r["library_version"])
    out = {}
    for key, sides in seen.items():
        if len(set(sides.values())) == 1:
            out[key] = next(iter(sides.values()))
        else:
            out.update({f"{key} ({side})": value for side, value in sides.items()})
    for name in ("fewshot", *PEER_NAMES.values()):
        if name in libraries:
            out[name] = libraries[name]
    return out


def render(report, markdown: bool) -> str:
    table = markdown_table if markdown else text_table
    out = []
    if markdown:
        out += ["# Solver benchmark: fewshot against learn2learn, higher and TorchOpt", ""]
        out += ["Generated by `benchmarks/bench_solvers.py --write-docs`; do not edit by hand.", ""]
        if report["quick"]:
            out += [("> **SMOKE TEST, NOT A MEASUREMENT.** This file was written by a `--quick` run (2 timed "
                     "meta-steps after 1 warm-up per configuration) to check that the benchmark works. Its "
                     "numbers say nothing about fewshot's speed; the full run replaces them."), ""]
    for message in report["warnings"]:
        out += [("> **Warning:** " if markdown else "WARNING: ") + message, ""]
    s = report["settings"]
    m = report["machine"]
    v = report["versions"]
    setup = [
        f"date: {report['date']}",
        f"command: `{report['command']}`" if markdown else f"command: {report['command']}",
        (f"machine: {m['model']}, {m['cpus']} CPUs ({m['sockets']} socket(s) x {m['cores_per_socket']} cores x "
         f"{m['threads_per_core']} thread(s) per core){', ' + m['hypervisor'] + ' guest' if m['hypervisor'] else ''}; "
         f"{m['platform']}; vector extension: {m.get('vector', 'not recorded by this run')}"),
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"interpreter: {_interpreter(report['python'])}",
        f"load average (1, 5, 15 min): start {_load(report['load_start'])}, end {_load(report['load_end'])}",
        (f"settings: --threads {s['threads']} (fewshot: task_threads={s['task_threads']}), {s['warmup']} warm-up + "
         f"{s['steps']} timed meta-steps per run, {s['rounds']} round(s), float32, "
         f"{_device_label(report)}"),
    ]
    if report.get("matmul", {}).get("status") == "ok":
        mm = report["matmul"]
        setup.append(f"machine float32 matmul rate: {mm['gflops']:.1f} GFLOP/s ({mm['size']}x{mm['size']}, "
                     f"median of {mm['repeats']}, {mm['threads']} threads, {_device_label(report)})")
    out += [("- " if markdown else "") + line for line in setup] + [""]

    if report["main_rows"]:
        out += ["## Meta-step time against the peers" if markdown else "fewshot solvers vs peers", ""]
        out += [table(MAIN_HEADER, report["main_rows"]), ""]
        out += [
            ("k: inner steps. s/step: median over all rounds' timed meta-steps. vs X: X's seconds per meta-step "
             "divided by fewshot's, i.e. how many times more meta-steps per second fewshot runs (above 1: fewshot "
             "is faster). per round: the ratio to the fastest peer in each round, to show the noise. Peak RSS: "
             "ru_maxrss of the run's process (absolute, and its increase over the meta-steps; the larger over "
             "the rounds). GFLOP/s: FlopCounterMode's count for one meta-step divided by the median time, and "
             "its share of the machine's matmul rate. Target: the issue's targets; 'missed by x%' means the "
             "ratio is x% below the target (memory: the increase is x% above the peer's)."),
            ""]
    if report["peer_rows"]:
        out += ["## The peers' runs" if markdown else "peer runs", ""]
        out += [table(PEER_HEADER, report["peer_rows"]), ""]
    if report.get("sweep_rows"):
        out += ["## Peak memory against inner steps (omniglot)" if markdown else "memory sweep (omniglot)", ""]
        out += [table(SWEEP_HEADER, report["sweep_rows"]), ""]
        out += [("- " if markdown else "") + line for line in report["sweep_verdicts"]] + [""]
    if report.get("flop_check") is not None:
        out += ["## FLOP counting" if markdown else "FLOP counting", ""]
        out += [("- " if markdown else "") + line for line in flop_check_lines(report["flop_check"])] + [""]
    if markdown:
        out += ["## What is measured", ""] + METHOD + [""]
        out += ["## How the ratios depend on the CPU", ""] + CPU_DEPENDENCE + [""]
        out += ["## What bounds the Omniglot ratios (profiled 2026-11-23)", ""] + BOUNDS + [""]
        out += ["## Implementation choices", ""] + CHOICES + [""]
    failed = [r for r in report["results"] if r.get("status") != "ok"]
    if failed:
        out += [f"{len(failed)} run(s) failed: " + ", ".join(
            f"{r.get('library', '')} {r.get('solver', r.get('kind'))} {r.get('workload', '')} "
            f"k={r.get('inner_steps', '')} ({r['status']})" for r in failed), ""]
    return "\n".join(out).rstrip() + "\n"


def _device_label(report) -> str:
    """Where fewshot's runs ran: ``CPU``, or the device and its name (``cuda (NVIDIA H100 ...)``)."""
    device = report["settings"].get("device", "cpu")
    if device == "cpu":
        return "CPU"
    name = next((r["device_name"] for r in report["results"] if "device_name" in r), "?")
    return f"{device} ({name})"


def _interpreter(path) -> str:
    """The interpreter as the docs show it: relative to the repository, else by name only (no path of
    one particular machine)."""
    path = Path(path)
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return f"{path.name} (outside the repository)"


def _load(load):
    return ", ".join(f"{x:.2f}" for x in load) if load else "?"


METHOD = [
    ("- Workloads (`benchmarks/peers/configs.py`): **omniglot**, Conv4 (4 blocks of 64 3x3 filters, batch norm "
     "with batch statistics, ReLU, 2x2 max-pool; 28x28 inputs), 5-way 1-shot with 15 queries per class, 16 "
     "tasks per meta-batch, inner lr 0.4; **sinusoid**, MLP 1-40-40-1, 10 support and 10 query points, 25 "
     "tasks, inner lr 0.01. Both: plain SGD inner steps, Adam at 1e-3 on the meta-parameters, random data "
     "drawn once before timing (the same tensors for fewshot and the peers)."),
    ("- One meta-step of fewshot is one step of `meta_fit` (drawing the meta-batch from a sampler that "
     "returns the fixed tensors, the per-task meta-gradients on `task_threads` Python threads, averaging, "
     "Adam), timed by `history_[\"time\"]`, with `full_history=False` because the peers compute no "
     "logging passes. On the sinusoid workload (a network of linear layers and ReLUs under 1 MFLOP per "
     "example) fewshot's MAML, MAML-seq, FOMAML, PenaltyMAML and Reptile compute all 25 tasks as one "
     "batched computation (a task axis on the parameters, batched matrix products; `task_threads` is then "
     "not used); IMAML and NeumannMAML run task by task. The peers' meta-step is described in "
     "`benchmarks/peers/README.md`; they run the tasks one after the other with torch's intra-op threads, "
     "as their MAML examples do (learn2learn and higher have no batched path; TorchOpt also ships a "
     "functorch example that vmaps MAML over tasks, `examples/FuncTorch/maml_omniglot_vmap.py`, a pattern "
     "users write by hand, which this benchmark does not time)."),
    ("- Solver settings: IMAML lam=2.0 with at most 5 CG iterations and no tolerance (`cg_tol=0`, started "
     "from the query gradient), to match TorchOpt's iMAML (lam=2.0, `solve_normal_cg(maxiter=5, atol=0)`), "
     "its comparison. The two do not always do the same work: fewshot's CG stops at a direction of "
     "non-positive curvature of I + H/lam (the notes give the mean number of iterations run), while "
     "TorchOpt's CG on the normal equations (operator M^T M, never indefinite) always runs 5 iterations, "
     "each applying M and its transpose. NeumannMAML, lam=2.0 with 6 series terms, always does 6 "
     "Hessian-vector products (IMAML's count when CG runs all 5 iterations) and is also compared with "
     "TorchOpt's iMAML. PenaltyMAML (penalty 0.1) does MAML's work plus the penalty's and is compared "
     "with the peers' MAML."),
    ("- Reptile: with `full_history=False` fewshot's Reptile, like the peers', adapts on the support set and "
     "never evaluates the query set."),
    ("- MAML-seq is fewshot's MAML with `task_threads=1`: the tasks one after another with torch's 2 "
     "intra-op threads, as the peers run them, so one task's graph is in memory at a time (the default, "
     "`task_threads=\"auto\"`, keeps two in flight). It is the configuration to compare memory with."),
    ("- Peak memory is `ru_maxrss`, the most resident memory the process ever had: what the allocator "
     "holds, not only live tensors. fewshot's increase is measured after a `meta_fit` with no steps has done "
     "the estimator's one-off setup (about 70 MB, mostly modules imported on first use), as the peers' "
     "harness builds its model and imports its library before its reading. With `task_threads=2` two tasks "
     "are in flight at once and glibc gives each thread its own malloc arena, which raises the peak "
     "(`MALLOC_ARENA_MAX=1` lowers it)."),
    ("- Peak memory and the allocator. A meta-step sums its tasks' gradients as the tasks finish. Until "
     "2026-11-22 it kept all 16 to the end of the meta-step; each pinned the top of glibc's heap, the "
     "activations freed below it stayed resident, and MAML one task at a time peaked at +374 MB against "
     "learn2learn's +206 (the live tensors were no larger: +109 vs +116 MB with the heap bypassed). "
     "`benchmarks/bench_allocator.py` after the change (MAML, omniglot workload, 5 inner steps, 2 threads, "
     "5 timed steps, one round, 2026-11-22), s/step and peak RSS increase under the default allocator: "
     "fewshot `task_threads=1` 1.52 s, +160 MB; fewshot default (`task_threads=2`) 0.88 s, +347 MB; "
     "learn2learn 1.62 s, +223 MB. With `MALLOC_MMAP_THRESHOLD_` at 1 MB: 2.22 s +117, 1.38 s +216, "
     "2.35 s +133; at 128 kB: 3.37 s +101, 2.01 s +191, 3.74 s +116. One task at a time fewshot peaks "
     "below learn2learn under every setting; the default keeps two tasks, each with its own graph, in "
     "flight, about twice one task's memory for 1.7x the speed. Set `task_threads=1` when memory binds."),
    ("- Each configuration runs in its own process, fewshot and the peers alternating; every second round "
     "runs in reverse order. The machine has 2 cores shared with other work: compare the ratios, which are measured "
     "close together in time, rather than the absolute times, and distrust runs with a high load average."),
]


# Measured by hand (ad hoc scripts, not this benchmark); see the notes of issue 4.
CPU_DEPENDENCE = [
    ("The ratios are not a property of fewshot alone: they depend on the CPU. On the AVX-512 machine of "
     "the 2026-11-23 run above, Omniglot MAML (k=5) ran 1.69x and FOMAML 1.58x the fastest peer; on "
     "2026-12-01, on a 2-core AMD EPYC with AVX2 only, the same workloads measured 1.34x and 1.28x. What "
     "fewshot saves is per-operation overhead and idle cores (the functional forward pass, task threads, "
     "the summed gradients); the convolutions both sides run are the same oneDNN kernels, which are "
     "faster with AVX-512, so there the saved overhead is a larger share of a meta-step and the ratio "
     "rises. Record the CPU and its vector extension with every figure (the machine line above does), "
     "and compare ratios only within one run."),
]

BOUNDS = [
    ("- Where the speed comes from. One task at a time (MAML-seq) fewshot runs at 0.93-1.05x the fastest "
     "peer on 2026-11-23 (1.01-1.19x on 2026-11-22): per task it runs the same convolution and batch-norm "
     "kernels as the peers. The default's 1.4-1.7x comes mostly from running two tasks at once, each on "
     "one intra-op thread (`task_threads`). On the sinusoid MLP, batching the tasks removes the "
     "per-operation overhead that dominates there, hence 8-14x for MAML, FOMAML and Reptile."),
    ("- Profile (torch.profiler, one task's MAML meta-gradient on this workload, 5 inner steps, 1 thread, "
     "self CPU): convolution_backward 26%, mkldnn_convolution 21% (+ 4% dispatch), native_batch_norm 8% and "
     "its backward 7%, the element-wise ops of batch norm's double backward (mul 5.5%, copy 4%, sum 3%, "
     "fill 2%), pooling (scatter_add 4%, gather 3%, max_pool2d 2%). By shape, the first block on the "
     "75-image query batch ([75, 64, 28, 28], 15 MB per tensor) takes about a quarter of the task's "
     "124 ms with 5% of its FLOPs: batch norm 7.0 ms forward and 5.2 ms backward, the channels-last copy "
     "for the window maxima 4.6 ms, the first convolution 4.9 ms forward and 2.0 ms backward, zero-fill "
     "2.5 ms, gather and scatter 2 ms each, max-pool 1.4 ms."),
    ("- Tried, measured and dropped on 2026-11-23 (1 thread, one task's MAML / FOMAML meta-gradient, "
     "interleaved medians; each variant agrees with the default to 1e-12 in float64): the whole network "
     "in channels-last memory format, 0.96x / 1.05x (batch norm's forward on that tensor takes 1.4 ms "
     "instead of 6.1, but its backward 7.2 ms and the first convolution's backward 9.7 ms instead of "
     "2.0); the first convolution as unfold and matrix product (channels-last output at no copy), "
     "0.94x / 0.98x; pooling before batch norm (exact with batch statistics: after flipping the sign of "
     "channels with negative scale, max-pooling commutes with batch norm's per-channel affine map, so "
     "only the statistics see the full-size tensor), 0.82x / 0.67x, because `var_mean` over N, H and W "
     "takes 17 ms against batch norm's 6; glibc malloc thresholds or transparent huge pages against page "
     "faults (1.03 million minor faults down to 0.11 million in the same script), no gain beyond noise in "
     "a meta-step. Earlier: tasks batched as grouped convolutions (0.62x at 75 images), torch.compile "
     "(slower, and no double backward)."),
    ("- What would move it: batch norm, ReLU and pooling fused into one kernel with hand-written first "
     "and second derivatives (C++ or a compiler that handles double backward), in place of the pure "
     "PyTorch operators this backend uses."),
]


# The measurements behind choices the code's docstrings state without numbers; measured by hand when
# each choice was made (A/B timings in one process, not this benchmark), with the commit that made it.
CHOICES = [
    ("- Reference networks evaluated directly (`fewshot/core/functional.py`, `_direct_plan`): `Conv4` and "
     "`MLP` run layer by layer through `torch.nn.functional` on the parameter dict instead of through "
     "`functional_call`, which swaps every parameter into the module and back on each call. On the "
     "sinusoid MLP that swapping took about a quarter of a meta-step: the direct path runs about 1.33x "
     "the meta-steps per second (2026-11-22, commit 1c61f29)."),
    ("- Plain `torch.autograd` for gradients (`fewshot/core/functional.py`, `value_and_grad`) instead of nested "
     "`torch.func.grad`: explicit MAML on one Omniglot task (5 inner steps, 75 query images) peaked at "
     "+170 MB instead of +315 MB of resident memory, first-order steps at +110 MB instead of +200 MB, at "
     "the same speed (2026-11-22, commit 25d400e)."),
    ("- `fewshot.models.MaxPool2x2` in place of `nn.MaxPool2d(2)`: PyTorch's CPU `max_pool2d` kernel on "
     "contiguous (NCHW) tensors took about a third of a Conv4 meta-step; finding the window maxima with "
     "the channels-last kernel and gathering them is about 3x faster, forward and backward together, "
     "for a 75-image query batch (2026-11-22, commit 70e3de3)."),
    ("- `full_history=True` (the estimators' default) costs two more forward passes per task, the query "
     "loss before and the support loss after adaptation: about 15-25% of a first-order Omniglot "
     "meta-step with 15 query examples per class (2026-11-22, commit 70e3de3). This benchmark runs "
     "with `full_history=False`."),
]


def finish(report) -> None:
    """Add the tables, versions and consistency warnings to ``report`` from its ``results``."""
    s = report["settings"]
    summary = summarize(report["results"])
    matmul_gflops = report.get("matmul", {}).get("gflops")
    report["main_rows"] = main_rows(summary, s["workloads"], s["inner_steps"], s["solvers"], s["libraries"],
                                    matmul_gflops)
    report["peer_rows"] = peer_rows(summary, s["workloads"], s["inner_steps"], s["libraries"])
    sweep = [r for r in report["results"] if r.get("kind") == "memory_sweep"]
    if sweep:
        report["sweep_rows"], report["sweep_verdicts"] = sweep_rows_and_verdicts(sweep)
    report["versions"] = versions(report["results"])
    torches = {v for k, v in report["versions"].items() if k.startswith("torch")}
    message = f"fewshot and the peers ran on different torch builds: {sorted(torches)}."
    if len(torches) > 1 and message not in report["warnings"]:
        report["warnings"].append(message)


# --------------------------------------------------------------------------------------------


def _list(kind, choices=None):
    """argparse type for comma-separated lists (``1,5`` or ``omniglot,sinusoid``)."""

    def parse(text):
        items = [item for item in text.split(",") if item]
        values = [kind(item) for item in items]
        if choices is not None:
            bad = [x for x in values if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"invalid choice(s) {bad}; choose from {list(choices)}")
        return values

    return parse


def _flatten(values):
    return [x for group in values for x in group]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: --steps {configs.QUICK_STEPS} --warmup {configs.QUICK_WARMUP}")
    parser.add_argument("--solvers", nargs="+", type=_list(str, tuple(SOLVERS)), default=None,
                        help=f"fewshot solvers (default: {','.join(DEFAULT_SOLVERS)}; MAML-me is MAML with "
                             "memory_efficient=True, MAML-seq MAML with task_threads=1)")
    parser.add_argument("--workloads", nargs="+", type=_list(str, tuple(configs.WORKLOADS)), default=None,
                        help="default: omniglot,sinusoid")
    parser.add_argument("--inner-steps", nargs="+", type=_list(int), default=None, help="default: 1,5")
    parser.add_argument("--libraries", nargs="+", type=_list(str, configs.LIBRARIES), default=None,
                        help="peer libraries (default: all three)")
    parser.add_argument("--threads", type=int, default=configs.DEFAULT_THREADS)
    parser.add_argument("--task-threads", default="auto", help="fewshot's task_threads (default auto)")
    parser.add_argument("--steps", type=int, default=configs.DEFAULT_STEPS, help="timed meta-steps per run")
    parser.add_argument("--warmup", type=int, default=configs.DEFAULT_WARMUP, help="untimed meta-steps first")
    parser.add_argument("--rounds", type=int, default=2, help="times the whole interleaved sequence runs")
    parser.add_argument("--no-peers", action="store_true", help="time fewshot only")
    parser.add_argument("--device", default="cpu",
                        help="torch device of fewshot's runs, e.g. cuda (default cpu; the peers run on "
                             "the CPU only, so another device needs --no-peers)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting and the matmul rate")
    parser.add_argument("--memory-sweep", action="store_true",
                        help="also peak memory of MAML, MAML-me and IMAML at --sweep-inner-steps (omniglot)")
    parser.add_argument("--sweep-inner-steps", type=_list(int), default=list(SWEEP_INNER_STEPS))
    parser.add_argument("--sweep-rounds", type=int, default=3,
                        help="runs of each memory-sweep configuration (medians are reported)")
    parser.add_argument("--profile", metavar="SOLVER", choices=tuple(SOLVERS), default=None,
                        help="print torch.profiler's top ops of one fewshot meta-step (first workload and "
                             "inner-step count) and exit")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--write-docs", action="store_true", help=f"write {DOCS.relative_to(REPO)}")
    parser.add_argument("--output", type=Path, default=None,
                        help="results JSON (default: benchmarks/peers/results/solvers-<time>.json, not in git)")
    parser.add_argument("--python", type=Path, default=None,
                        help="interpreter for every run (default: the peer environment's, if fewshot is "
                             "installed there, else this one)")
    parser.add_argument("--no-setup", action="store_true", help="never run the peers' setup_env.sh")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--from-results", type=Path, default=None, metavar="JSON",
                        help="run nothing: rebuild the tables (and with --write-docs the docs page) from a "
                             "results file of an earlier run")
    args = parser.parse_args(argv)
    if args.from_results:
        report = json.loads(args.from_results.read_text())
        finish(report)
        return publish(report, args.write_docs)
    solvers = list(dict.fromkeys(_flatten(args.solvers))) if args.solvers else list(DEFAULT_SOLVERS)
    workloads = list(dict.fromkeys(_flatten(args.workloads))) if args.workloads else list(configs.WORKLOADS)
    inner_steps = list(dict.fromkeys(_flatten(args.inner_steps))) if args.inner_steps else list(configs.INNER_STEPS)
    libraries = [] if args.no_peers else (
        list(dict.fromkeys(_flatten(args.libraries))) if args.libraries else list(configs.LIBRARIES))
    if args.quick:
        args.steps, args.warmup = configs.QUICK_STEPS, configs.QUICK_WARMUP
    for name in ("threads", "steps", "rounds", "sweep_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if any(k < 1 for k in inner_steps + args.sweep_inner_steps):
        parser.error(f"inner steps must all be >= 1, got {inner_steps} and {args.sweep_inner_steps}")
    if args.device != "cpu" and (libraries or args.write_docs):
        parser.error(f"--device {args.device}: the peers' harness runs on the CPU only, and "
                     f"{DOCS.relative_to(REPO)} holds the CPU comparison; pass --no-peers and no "
                     "--write-docs")

    peer_python = run_peers.venv_python()
    if libraries:
        if not args.no_setup and not args.python:
            run_peers.ensure_environment(peer_python)
        if not run_peers.peers_installed(args.python or peer_python):
            parser.error(f"the peer environment at {args.python or peer_python} lacks one of "
                         f"{run_peers.PEER_MODULES}; run benchmarks/peers/setup_env.sh or pass --no-peers")
    if args.python:
        python = args.python
    elif _has_fewshot(peer_python):
        python = peer_python
    else:
        python = Path(sys.executable)
        if libraries:
            warnings.warn(f"fewshot is not installed in the peer environment; fewshot runs use {python}, "
                          "whose torch build may differ from the peers'", RuntimeWarning, stacklevel=1)
    peers_python = args.python or peer_python

    if args.profile:
        estimator, options, _ = SOLVERS[args.profile]
        command = [python, STEP_SCRIPT, "profile", "--solver", estimator, "--options", json.dumps(options),
                   "--workload", workloads[0], "--inner-steps", inner_steps[0], "--threads", args.threads,
                   "--warmup", max(args.warmup, 1), "--task-threads", args.task_threads,
                   "--device", args.device]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        return subprocess.run([str(c) for c in command], check=False, env=env).returncode

    load_start = os.getloadavg()
    messages = []
    if load_start[0] > LOAD_WARNING:
        messages.append(f"the 1-minute load average was {load_start[0]:.2f} at the start (above "
                        f"{LOAD_WARNING}): other work was running and these results are unreliable.")
        warnings.warn(messages[-1], RuntimeWarning, stacklevel=1)
    stamp = datetime.datetime.now().astimezone()
    output = args.output or RESULTS / f"solvers-{stamp:%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/bench_solvers.py", *(sys.argv[1:] if argv is None else argv)]),
        "python": str(python), "quick": args.quick, "machine": machine_description(),
        "settings": {"device": args.device,
                     "threads": args.threads, "task_threads": args.task_threads, "steps": args.steps,
                     "warmup": args.warmup, "rounds": args.rounds, "solvers": solvers, "workloads": workloads,
                     "inner_steps": inner_steps, "libraries": libraries,
                     "solver_options": {s: SOLVERS[s][1] for s in solvers}, "peer_imaml": configs.IMAML},
        "load_start": load_start, "load_end": None, "warnings": messages, "results": [],
    }

    def record(result, label):
        report["results"].append(result)
        report["load_end"] = os.getloadavg()
        output.write_text(json.dumps(report, indent=1))  # after each run: a crash keeps what ran
        shown = f"{result['seconds_per_step']:.4f} s/step" if "seconds_per_step" in result else result["status"]
        if "gflops" in result:
            shown = f"{result['gflops']:.1f} GFLOP/s"
        print(f"[bench_solvers] {label}: {shown}", flush=True)
        if result["status"] != "ok" and "stderr_tail" in result:
            print(result["stderr_tail"], file=sys.stderr)

    threads_args = ["--threads", args.threads]
    if not args.no_flops:
        matmul = _subprocess_json([python, STEP_SCRIPT, "matmul", "--size", args.matmul_size, *threads_args,
                                   "--device", args.device],
                                  {"kind": "matmul"}, args.threads, args.timeout)
        report["matmul"] = matmul
        record(matmul, f"matmul {args.matmul_size}x{args.matmul_size}")
        if "omniglot" in workloads:
            check = _subprocess_json([python, STEP_SCRIPT, "check-flops", "--inner-steps", 1, *threads_args],
                                     {"kind": "flop_check"}, args.threads, args.timeout)
            report["flop_check"] = check
            record(check, "FLOP-count check")

    order = plan(workloads, inner_steps, solvers, libraries, args.rounds)
    for i, (round_, workload, k, library, solver) in enumerate(order, 1):
        if library == "fewshot":
            result = run_fewshot(python, solver, k, workload, args, steps=args.steps, warmup=args.warmup,
                                 flops=round_ == 0 and not args.no_flops)
        else:
            result = run_peer(peers_python, library, solver, k, workload, args)
        result.update(kind="timing", round=round_)
        record(result, f"{i}/{len(order)} round {round_ + 1} {workload} {library} {solver} k={k}")

    if args.memory_sweep:
        sweep_plan = [(k, solver) for k in args.sweep_inner_steps for solver in SWEEP_SOLVERS]
        for round_ in range(args.sweep_rounds):
            for k, solver in (sweep_plan if round_ % 2 == 0 else sweep_plan[::-1]):
                result = run_fewshot(python, solver, k, "omniglot", args, steps=min(args.steps, 2),
                                     warmup=min(args.warmup, 1))
                result.update(kind="memory_sweep", round=round_)
                record(result, f"memory sweep round {round_ + 1} {solver} k={k}")

    report["load_end"] = os.getloadavg()
    if report["load_end"][0] > LOAD_WARNING:
        report["warnings"].append(f"the 1-minute load average was {report['load_end'][0]:.2f} at the end.")
    finish(report)
    output.write_text(json.dumps(report, indent=1))
    print(f"[bench_solvers] results: {output}")
    return publish(report, args.write_docs)


def publish(report, write_docs: bool) -> int:
    """Print the report, write the docs page if asked; exit status 1 if a run failed."""
    print()
    print(render(report, markdown=False))
    if write_docs:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(render(report, markdown=True))
        print(f"[bench_solvers] wrote {DOCS}")
    return 0 if all(r.get("status") == "ok" for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
