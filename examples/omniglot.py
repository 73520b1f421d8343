"""Meta-train a solver on Omniglot 5-way 1-shot and report meta-test accuracy with its 95% CI.

    FEWSHOT_DATA=/path/to/data python examples/omniglot.py --solver MAML --meta-steps 2000

The data home must hold Omniglot's images_background and images_evaluation zips (or the extracted
folders); see docs/datasets.md. The default run (MAML, 2,000 meta-steps) takes about 50 minutes on a
2-core CPU, and scoring the 600 meta-test tasks (split "vinyals", 15 queries per class) about a
minute more. Batch norm uses the statistics of each batch and evaluation is transductive, as in the
published Omniglot numbers.
"""

import argparse

import torch

import fewshot
from fewshot.datasets import omniglot_tasks


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default, and the description as it is written."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--solver", default="MAML", choices=sorted(fewshot.SOLVERS), help="estimator")
    parser.add_argument("--meta-steps", type=int, default=2000, help="meta-training steps")
    parser.add_argument("--n-query", type=int, default=1, help="query examples per class while meta-training")
    parser.add_argument("--eval-tasks", type=int, default=600, help="meta-test tasks to score")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the estimator")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train = omniglot_tasks(n_way=5, k_shot=1, n_query=args.n_query, split="vinyals", subset="train")
    test = omniglot_tasks(n_way=5, k_shot=1, n_query=15, split="vinyals", subset="test")
    params = dict(meta_steps=args.meta_steps, random_state=args.seed)
    if args.solver != "FineTune":
        params.update(inner_lr=0.4, inner_steps=5, adapt_steps=10, meta_batch_size=16)
    learner = fewshot.SOLVERS[args.solver](**params).meta_fit(train)
    result = learner.evaluate(test, n_tasks=args.eval_tasks, random_state=0)
    print(f"{args.solver}: meta-test accuracy {100 * result.mean:.2f}% +- {100 * result.ci95:.2f} "
          f"(95% CI, {args.eval_tasks} tasks, transductive batch norm={learner.transductive})")


if __name__ == "__main__":
    main()
