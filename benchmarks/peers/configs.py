"""What the peer benchmark measures: libraries, solvers and workloads, in one place.

Plain data with no torch import, so the runner (``run_peers.py``) can read it from any Python.
``peer_step.py`` runs one configuration; ``check_agreement.py`` reuses its meta-gradient code.
"""

from __future__ import annotations

LIBRARIES = ("learn2learn", "higher", "torchopt")

# Which meta-gradient rules each peer offers in a natural way. iMAML is TorchOpt's implicit
# differentiation (``torchopt.diff.implicit.custom_root``); the other two have no such thing.
SOLVERS = {
    "learn2learn": ("maml", "fomaml", "reptile"),
    "higher": ("maml", "fomaml", "reptile"),
    "torchopt": ("maml", "fomaml", "reptile", "imaml"),
}
ALL_SOLVERS = ("maml", "fomaml", "reptile", "imaml")

INNER_STEPS = (1, 5)

# Every meta-step: ``n_tasks`` tasks, each adapted with ``inner_steps`` plain SGD steps at
# ``inner_lr`` on its support set; the query losses' meta-gradients are averaged over the tasks
# and one Adam step at ``META_LR`` is taken.
WORKLOADS = {
    # Conv4 (4 x [conv 3x3 64, batch norm with batch statistics, ReLU, max-pool 2] + linear),
    # 5-way 1-shot with 15 queries per class on 1x28x28 inputs.
    "omniglot": {
        "model": "conv4",
        "n_tasks": 16,
        "inner_lr": 0.4,
        "n_way": 5,
        "n_shot": 1,
        "n_query": 15,
        "image_shape": (1, 28, 28),
        "hidden": 64,
        "loss": "cross_entropy",
    },
    # MLP 1-40-40-1 with ReLU, 10 support and 10 query points, mean squared error.
    "sinusoid": {
        "model": "mlp",
        "n_tasks": 25,
        "inner_lr": 0.01,
        "n_support": 10,
        "n_query": 10,
        "hidden": (40, 40),
        "loss": "mse",
    },
}

META_LR = 1e-3

# iMAML: the inner loop minimises  L_support(phi) + lam/2 ||phi - theta||^2  with ``inner_steps``
# SGD steps at the workload's ``inner_lr``, and the implicit meta-gradient solves
# (I + H/lam)-type systems with a fixed number of conjugate-gradient iterations. These are the
# values of TorchOpt's own iMAML Omniglot example (reg_params=2.0, solve_normal_cg(maxiter=5)).
IMAML = {"lam": 2.0, "cg_iters": 5, "linear_solve": "normal_cg"}

DEFAULT_THREADS = 2
DEFAULT_STEPS = 10
DEFAULT_WARMUP = 3
QUICK_STEPS = 2
QUICK_WARMUP = 1


def configurations(libraries=LIBRARIES, solvers=ALL_SOLVERS, inner_steps=INNER_STEPS, workloads=tuple(WORKLOADS)):
    """Every supported (library, solver, inner_steps, workload), in a stable order.

    The libraries are innermost, so the runs being compared happen close together in time and a
    change of machine load between them does less harm.
    """
    return [
        (library, solver, steps, workload)
        for workload in workloads
        for solver in solvers
        for steps in inner_steps
        for library in libraries
        if solver in SOLVERS[library]
    ]
