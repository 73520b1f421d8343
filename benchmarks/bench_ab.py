"""Meta-step times of two checkouts of fewshot, interleaved: a change's cost, measured before and after.

Each configuration runs in its own process (``benchmarks/_fewshot_step.py time`` of each checkout,
with that checkout first on ``PYTHONPATH``); the two checkouts alternate, and every second round
runs in reverse order, so that changes of machine load fall on both sides. Prints the median
seconds per meta-step of each side and their ratio (above 1: the second checkout is slower).

Example::

    git worktree add ../before <commit before the change>
    python benchmarks/bench_ab.py --before ../before --after . --rounds 2 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SOLVERS = ("MAML", "FOMAML", "Reptile", "IMAML", "NeumannMAML", "PenaltyMAML")
WORKLOADS = ("omniglot", "sinusoid")


def step_time(tree, python, solver, workload, inner_steps, steps, warmup) -> float:
    command = [python, os.path.join(tree, "benchmarks", "_fewshot_step.py"), "time", "--solver", solver,
               "--workload", workload, "--inner-steps", str(inner_steps), "--steps", str(steps),
               "--warmup", str(warmup)]
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="checkout before the change")
    parser.add_argument("--after", required=True, help="checkout after the change")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    cases = [(s, w) for w in args.workloads for s in args.solvers]
    sides = {"before": args.before, "after": args.after}
    times: dict = {}
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                t = step_time(sides[side], args.python, *case, args.inner_steps, args.steps, args.warmup)
                times.setdefault((case, side), []).append(t)
            print(f"round {r + 1}: {case[0]} {case[1]}: before {times[(case, 'before')][-1]:.4f} s, "
                  f"after {times[(case, 'after')][-1]:.4f} s", flush=True)
    print(f"\n| solver | workload | k | before s/step | after s/step | after/before |\n| --- | --- | --- | --- | --- | --- |")
    for case in cases:
        b, a = statistics.median(times[(case, "before")]), statistics.median(times[(case, "after")])
        print(f"| {case[0]} | {case[1]} | {args.inner_steps} | {b:.4f} | {a:.4f} | {a / b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
