"""Meta-train a solver on Omniglot 5-way 1-shot and report meta-test accuracy with its 95% CI.

    FEWSHOT_DATA=/path/to/data python examples/omniglot.py --solver MAML --meta-steps 2000

The data home must hold ``omniglot-py/images_{background,evaluation}.zip`` (or the extracted
folders); see docs/datasets.md. Evaluation uses 600 fixed meta-test tasks with 15 queries per class.
"""

import argparse

import torch

import fewshot
from fewshot.datasets import omniglot_tasks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solver", default="MAML", choices=sorted(fewshot.SOLVERS))
    parser.add_argument("--meta-steps", type=int, default=2000)
    parser.add_argument("--n-query", type=int, default=1, help="query examples per class while meta-training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train = omniglot_tasks(n_way=5, k_shot=1, n_query=args.n_query, split="vinyals", subset="train")
    test = omniglot_tasks(n_way=5, k_shot=1, n_query=15, split="vinyals", subset="test")
    params = dict(meta_steps=args.meta_steps, random_state=args.seed, verbose=1)
    if args.solver != "FineTune":
        params.update(inner_lr=0.4, inner_steps=5, adapt_steps=10, meta_batch_size=16)
    learner = fewshot.SOLVERS[args.solver](**params).meta_fit(train)
    result = learner.evaluate(test, n_tasks=600, random_state=0)
    print(f"{args.solver}: meta-test accuracy {100 * result.mean:.2f}% +- {100 * result.ci95:.2f} "
          f"(95% CI, 600 tasks, transductive batch norm={learner.transductive})")


if __name__ == "__main__":
    main()
