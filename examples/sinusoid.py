"""Meta-train a solver (iMAML by default) on sinusoid regression and adapt it to new tasks.

    python examples/sinusoid.py
    python examples/sinusoid.py --solver MAML --meta-steps 2000

No download is needed. The default run (iMAML, 300 meta-steps, one thread) takes about 30 seconds on
a 2-core CPU; the other solvers take less per meta-step (docs/benchmarks.md). The script then prints
the query MSE on one new task after adaptation, and the mean held-out score (negative query MSE) over
--eval-tasks tasks with its 95% confidence interval.
"""

import argparse

import torch

import fewshot


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default, and the description as it is written."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--solver", default="IMAML", choices=sorted(fewshot.SOLVERS), help="estimator")
    parser.add_argument("--meta-steps", type=int, default=300, help="meta-training steps")
    parser.add_argument("--k-shot", type=int, default=10, help="support examples per task")
    parser.add_argument("--n-query", type=int, default=10, help="query examples per task")
    parser.add_argument("--inner-steps", type=int, default=10, help="adaptation steps in meta-training")
    parser.add_argument("--lam", type=float, default=1.0, help="proximal weight (IMAML and NeumannMAML)")
    parser.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks to score")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the estimator")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the network is small: a second thread slows it down)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    sampler = fewshot.tasks.SinusoidTasks(k_shot=args.k_shot, n_query=args.n_query)
    learner = fewshot.SOLVERS[args.solver](inner_steps=args.inner_steps, meta_steps=args.meta_steps,
                                           random_state=args.seed)
    if "lam" in learner.get_params():
        learner.set_params(lam=args.lam)
    learner.meta_fit(sampler)

    task = sampler.sample(random_state=1)
    adapted = learner.adapt(task.support)
    mse = torch.mean((adapted.predict(task.query.x) - task.query.y) ** 2)
    print(f"{args.solver}: query MSE on a new task after adaptation: {mse:.3f}")
    result = learner.evaluate(sampler, n_tasks=args.eval_tasks, random_state=123)
    print(f"{args.solver}: held-out score (negative query MSE): {result}")


if __name__ == "__main__":
    main()
