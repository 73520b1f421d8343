"""The command line: ``fewshot compare`` (also ``python -m fewshot compare``).

Run ``fewshot compare --help`` for the options; ``docs/compare.md`` describes the protocols and the
outputs.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _solver_list(text: str) -> list[str]:
    from . import SOLVERS

    if text.strip().lower() == "all":
        return list(SOLVERS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    by_lower = {n.lower(): n for n in SOLVERS}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown solver(s) {unknown or [text]}; expected a comma-separated "
                                         f"list of {', '.join(SOLVERS)} (or 'all')")
    return [by_lower[n.lower()] for n in names]


def _assignment(text: str) -> tuple[str, str, object]:
    """``[SOLVER.]param=value`` -> (solver or "*", param, value); value parsed as JSON if it can be."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected [SOLVER.]PARAM=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    target, _, param = key.rpartition(".")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return (target or "*"), param.strip(), value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    from . import SOLVERS
    from .compare import _protocols

    parser = argparse.ArgumentParser(prog="fewshot", description="fewshot command-line tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "compare", help="run meta-learning solvers on one task family and compare them",
        description="Meta-train several solvers on one task family under one protocol, score them on "
                    "the same held-out tasks and write a table (CSV, JSON), learning-curve figures and "
                    "a meta-gradient fidelity table. Interrupted runs resume where they stopped. "
                    "Options left unset take the protocol's values.",
)
    g = p.add_argument_group("what to run")
    g.add_argument("--solvers", type=_solver_list, default=None,
                   help=f"comma-separated names from {', '.join(SOLVERS)}, or 'all' (default: all; "
                        "with --table-only: every solver found in --out)")
    g.add_argument("--dataset", choices=sorted(_protocols.DATASETS), default="sinusoid",
                   help="task family (default: sinusoid)")
    g.add_argument("--protocol", choices=sorted(_protocols.PROTOCOLS), default="tuned",
                   help="'report': the report's Table 1; 'tuned': ours (default: tuned)")
    g.add_argument("--split", choices=["vinyals", "lake"], default=None,
                   help="Omniglot split (default: vinyals)")
    g.add_argument("--out", default=None,
                   help="output folder (default: runs/compare-<dataset>-<protocol>)")
    g = p.add_argument_group("protocol overrides (default: the protocol's value)")
    g.add_argument("--n-way", type=_positive_int, default=None)
    g.add_argument("--k-shot", type=_positive_int, default=None)
    g.add_argument("--n-query", type=_positive_int, default=None,
                   help="meta-training query examples (per class)")
    g.add_argument("--eval-query", type=_positive_int, default=None,
                   help="meta-test query examples (per class; 15)")
    g.add_argument("--meta-steps", type=int, default=None)
    g.add_argument("--meta-batch-size", type=_positive_int, default=None)
    g.add_argument("--inner-steps", type=_positive_int, default=None)
    g.add_argument("--inner-lr", type=float, default=None)
    g.add_argument("--meta-lr", type=float, default=None,
                   help="meta-optimizer learning rate (Reptile's outer_stepsize too)")
    g.add_argument("--eval-tasks", type=_positive_int, default=None,
                   help="size of the fixed pool of held-out tasks")
    g.add_argument("--device", default=None, help="torch device, or 'auto'")
    g.add_argument("--seed", type=int, default=None, help="random_state of every estimator (0)")
    g.add_argument("--set", dest="assignments", action="append", type=_assignment, default=[],
                   metavar="[SOLVER.]PARAM=VALUE",
                   help="any estimator parameter, e.g. --set IMAML.lam=2 --set adapt_steps=20 "
                        "(repeatable; without SOLVER it applies to every solver that has PARAM)")
    g = p.add_argument_group("your own images (--dataset folder)")
    g.add_argument("--data-dir", default=None,
                   help="folder with one subfolder of images per class (nested groups allowed)")
    g.add_argument("--image-size", type=_positive_int, default=None, help="resize to N x N (default: 28)")
    g.add_argument("--mode", choices=["L", "RGB"], default=None,
                   help="grayscale (L) or colour (RGB) (default: RGB)")
    g.add_argument("--invert", action="store_true", default=None,
                   help="use 255 - value (dark strokes on light paper become 1 on 0, as Omniglot)")
    g.add_argument("--val-size", type=float, default=None,
                   help="fraction of the class groups for validation (default: 0.2)")
    g.add_argument("--test-size", type=float, default=None,
                   help="fraction of the class groups for meta-testing (default: 0.2)")
    g.add_argument("--split-seed", type=int, default=None, help="seed of the class split (default: 0)")
    g = p.add_argument_group("running")
    g.add_argument("--threads", type=_positive_int, default=2,
                   help="torch.set_num_threads in each solver process (default: 2)")
    g.add_argument("--chunk-size", type=_positive_int, default=50,
                   help="meta-steps between checkpoints (default: 50)")
    g.add_argument("--val-every", type=int, default=0,
                   help="score validation tasks every N meta-steps into <solver>/val_curve.json and "
                        "curves_validation.png (a multiple of --chunk-size; omniglot and folder; "
                        "default: 0, only at the end)")
    g.add_argument("--val-tasks", type=_positive_int, default=100,
                   help="validation tasks per point of that curve (default: 100)")
    g.add_argument("--fidelity-tasks", type=int, default=8,
                   help="tasks for the meta-gradient fidelity table (default: 8; 0 skips it)")
    g.add_argument("--force", action="store_true", help="discard earlier runs in --out and start over")
    g.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    g.add_argument("--in-process", action="store_true",
                   help="run the solvers in this process instead of one subprocess each (peak "
                        "memory is then the whole process's, and an error stops the comparison)")
    g.add_argument("--table-only", action="store_true",
                   help="run nothing: re-assemble the tables and figures from --out")
    g.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one solver's process
    p.set_defaults(func=_compare)
    return parser


def _compare(args) -> int:
    from .compare import _run as runner

    if args.worker is not None:
        return runner._worker(args.worker, chunk_size=args.chunk_size, quiet=args.quiet,
                              threads=args.threads, val_every=args.val_every, val_tasks=args.val_tasks)
    set_params: dict = {}
    for target, param, value in args.assignments:
        set_params.setdefault(target, {})[param] = value
    result = runner.run_comparison(
        args.solvers,
        dataset=args.dataset, protocol=args.protocol, out=args.out, split=args.split,
        n_way=args.n_way, k_shot=args.k_shot, n_query=args.n_query, eval_query=args.eval_query,
        meta_steps=args.meta_steps, meta_batch_size=args.meta_batch_size,
        inner_steps=args.inner_steps, inner_lr=args.inner_lr, meta_lr=args.meta_lr,
        eval_tasks=args.eval_tasks, device=args.device, seed=args.seed, set_params=set_params,
        data_dir=args.data_dir, image_size=args.image_size, mode=args.mode, invert=args.invert,
        val_size=args.val_size, test_size=args.test_size, split_seed=args.split_seed,
        threads=args.threads, chunk_size=args.chunk_size, val_every=args.val_every,
        val_tasks=args.val_tasks, fidelity_tasks=args.fidelity_tasks,
        force=args.force, quiet=args.quiet, isolate=not args.in_process, table_only=args.table_only)
    print(runner.format_table(result.results))
    if result.fidelity:
        print()
        print("Meta-gradient fidelity (each solver's per-task meta-gradient against the exact one, "
              "same meta-parameters and tasks):")
        print(runner.format_fidelity(result.fidelity))
    fidelity = "fidelity.csv/.json, " if result.fidelity else ""
    print(f"\nFiles in {result.out}/: results.csv/.json, {fidelity}figures (*.png) and one folder per solver "
          "(see docs/compare.md)")
    failed = [r["method"] for r in result.results if r.get("status") != "ok" and r.get("score_mean") is None
              and not str(r.get("status", "")).startswith("diverged")]
    return 1 if failed else 0


def main(argv=None) -> int:
    """Entry point of the ``fewshot`` console script; returns the exit status."""
    from .compare._run import UsageError

    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except UsageError as err:
        parser.exit(2, f"fewshot {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
