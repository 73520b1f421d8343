"""Meta-train iMAML on sinusoid regression (no download) and adapt to a new task.

    python examples/sinusoid.py
"""

import torch

import fewshot


def main():
    torch.set_num_threads(2)
    sampler = fewshot.tasks.SinusoidTasks(k_shot=10, n_query=10)
    learner = fewshot.IMAML(lam=1.0, inner_steps=10, meta_steps=300, random_state=0, verbose=1)
    learner.meta_fit(sampler)

    task = sampler.sample(random_state=1)
    adapted = learner.adapt(task.support)
    mse = torch.mean((adapted.predict(task.query.x) - task.query.y) ** 2)
    print(f"query MSE on a new task after adaptation: {mse:.3f}")
    print("held-out score (negative MSE):", learner.evaluate(sampler, n_tasks=200, random_state=123))


if __name__ == "__main__":
    main()
