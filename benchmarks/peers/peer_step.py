"""Time one meta-learning configuration of a peer library and print one JSON line.

Run with the peer environment's interpreter (``benchmarks/peers/setup_env.sh`` makes it)::

    benchmarks/.venv-peers/bin/python benchmarks/peers/peer_step.py \\
        --library higher --solver maml --inner-steps 5 --workload omniglot

One meta-step = for each of the workload's tasks, ``inner_steps`` SGD steps on the support loss,
then the query loss's meta-gradient (averaged over tasks) accumulated into the parameters'
``.grad``, then one Adam step (lr ``configs.META_LR``). Reptile's "meta-gradient" is
``mean(theta - phi_task)``; iMAML's is TorchOpt's implicit gradient. The JSON line has
``seconds_per_step`` (median of ``--steps`` timed steps after ``--warmup`` untimed ones),
``all_times``, and memory from ``resource.getrusage`` (``ru_maxrss``): ``peak_rss_mb`` is the
increase of the process's peak resident set over the timed and warm-up steps, ``peak_rss_abs_mb``
its absolute value at the end.

The meta-gradient code (``make_meta_gradient``) is also what ``check_agreement.py`` compares.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import configs  # noqa: E402  (this folder is not a package)

# learn2learn's package __init__ imports these subpackages, whose dependencies (torchvision, gym)
# cannot load next to this CPU torch and NumPy 2. MAML needs neither.
_LEARN2LEARN_STUBS = ("learn2learn.vision", "learn2learn.gym")


def import_learn2learn():
    for name in _LEARN2LEARN_STUBS:
        sys.modules.setdefault(name, types.ModuleType(name))
    import learn2learn

    return learn2learn


def library_version(library: str) -> str:
    return importlib.metadata.version(library)


# --------------------------------------------------------------------------------------------
# Models, data, losses. Module and parameter names mirror fewshot.models (features.*, head.*), so
# a state_dict moves between a peer run and fewshot unchanged.


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    def __init__(self, in_channels: int = 1, n_outputs: int = 5, hidden: int = 64, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, hidden),
            _conv_block(hidden, hidden),
            _conv_block(hidden, hidden),
            _conv_block(hidden, hidden),
            nn.Flatten(),
        )
        side = image_size // 16
        self.head = nn.Linear(hidden * side * side, n_outputs)

    def forward(self, x):
        return self.head(self.features(x))


class MLP(nn.Module):
    def __init__(self, in_features: int = 1, n_outputs: int = 1, hidden=(40, 40)):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x):
        return self.head(self.features(x))


def build_model(workload: dict, dtype: torch.dtype) -> nn.Module:
    if workload["model"] == "conv4":
        channels, size, _ = workload["image_shape"]
        model = Conv4(channels, workload["n_way"], workload["hidden"], size)
    elif workload["model"] == "mlp":
        model = MLP(1, 1, workload["hidden"])
    else:
        raise ValueError(f"workload model must be 'conv4' or 'mlp', got {workload['model']!r}")
    return model.to(dtype)


def make_tasks(workload: dict, dtype: torch.dtype, generator: torch.Generator):
    """A list of ``(x_support, y_support, x_query, y_query)``, one per task. Random content: the
    cost of a meta-step does not depend on it."""
    n_tasks = workload["n_tasks"]
    if workload["model"] == "conv4":
        n_way, shape = workload["n_way"], tuple(workload["image_shape"])
        n_s, n_q = n_way * workload["n_shot"], n_way * workload["n_query"]
        xs = torch.randn((n_tasks, n_s, *shape), generator=generator, dtype=dtype)
        xq = torch.randn((n_tasks, n_q, *shape), generator=generator, dtype=dtype)
        ys = torch.arange(n_way).repeat_interleave(workload["n_shot"]).expand(n_tasks, -1)
        yq = torch.arange(n_way).repeat_interleave(workload["n_query"]).expand(n_tasks, -1)
    else:  # sinusoid regression: y = A sin(x - phase), A in [0.1, 5], phase in [0, pi], x in [-5, 5]
        amplitude = 0.1 + 4.9 * torch.rand((n_tasks, 1, 1), generator=generator, dtype=dtype)
        phase = torch.pi * torch.rand((n_tasks, 1, 1), generator=generator, dtype=dtype)
        xs = 10 * torch.rand((n_tasks, workload["n_support"], 1), generator=generator, dtype=dtype) - 5
        xq = 10 * torch.rand((n_tasks, workload["n_query"], 1), generator=generator, dtype=dtype) - 5
        ys, yq = amplitude * torch.sin(xs - phase), amplitude * torch.sin(xq - phase)
    return [(xs[i], ys[i].contiguous(), xq[i], yq[i].contiguous()) for i in range(n_tasks)]


LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


# --------------------------------------------------------------------------------------------
# Meta-gradients, one builder per library. Each returns ``accumulate(tasks)``, which adds the
# task-averaged meta-gradient to ``p.grad`` of ``model.parameters()``; the caller zeroes the
# gradients before and takes the optimizer step after.


def _add_to_grad(params, values, scale=1.0):
    with torch.no_grad():
        for p, v in zip(params, values):
            v = v * scale
            if p.grad is None:
                p.grad = v.clone()
            else:
                p.grad.add_(v)


def _add_reptile_grad(params, adapted, scale):
    """Reptile's meta-gradient for one task: (theta - phi) / n_tasks."""
    with torch.no_grad():
        _add_to_grad(params, [p - q for p, q in zip(params, adapted)], scale)


def _check_inner_steps(inner_steps):
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")


def _learn2learn(model, solver, loss_fn, inner_steps, inner_lr, imaml):
    l2l = import_learn2learn()
    # learn2learn has no Reptile class: Reptile is its first-order clone/adapt loop plus theta - phi.
    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=solver != "maml")
    params = list(model.parameters())

    def accumulate(tasks):
        scale = 1.0 / len(tasks)
        for xs, ys, xq, yq in tasks:
            learner = maml.clone()
            for _ in range(inner_steps):
                learner.adapt(loss_fn(learner(xs), ys))
            if solver == "reptile":
                _add_reptile_grad(params, list(learner.parameters()), scale)
            else:
                (loss_fn(learner(xq), yq) * scale).backward()

    return accumulate


def _higher(model, solver, loss_fn, inner_steps, inner_lr, imaml):
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    params = list(model.parameters())
    second_order = solver == "maml"

    def accumulate(tasks):
        scale = 1.0 / len(tasks)
        for xs, ys, xq, yq in tasks:
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=second_order
            ) as (fmodel, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(loss_fn(fmodel(xs), ys))
                fast = list(fmodel.parameters())
                if solver == "reptile":
                    _add_reptile_grad(params, fast, scale)
                elif second_order:
                    (loss_fn(fmodel(xq), yq) * scale).backward()
                else:
                    # Without higher-order tracking the fast weights are detached leaves, so the
                    # first-order meta-gradient is the query gradient at them, added by hand.
                    grads = torch.autograd.grad(loss_fn(fmodel(xq), yq) * scale, fast)
                    _add_to_grad(params, grads)

    return accumulate


def _torchopt(model, solver, loss_fn, inner_steps, inner_lr, imaml):
    import torchopt

    params = tuple(model.parameters())
    names = [name for name, _ in model.named_parameters()]

    def fnet(weights, x):
        return torch.func.functional_call(model, dict(zip(names, weights)), (x,))

    if solver == "maml":
        # The meta-optimizer: differentiable SGD steps on the module, state restored per task,
        # as in TorchOpt's examples/few-shot/maml_omniglot.py.
        inner_opt = torchopt.MetaSGD(model, lr=inner_lr)

        def accumulate(tasks):
            scale = 1.0 / len(tasks)
            net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
            opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
            for xs, ys, xq, yq in tasks:
                for _ in range(inner_steps):
                    inner_opt.step(loss_fn(model(xs), ys))
                (loss_fn(model(xq), yq) * scale).backward()
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner_opt, opt_state)

        return accumulate

    sgd = torchopt.sgd(lr=inner_lr)

    if solver == "fomaml":
        # MetaSGD has no first-order mode: the functional API with gradients taken without
        # create_graph, so phi = theta - lr * (constant) and backward gives dL_query/dphi.
        def accumulate(tasks):
            scale = 1.0 / len(tasks)
            for xs, ys, xq, yq in tasks:
                weights, state = params, sgd.init(params)
                for _ in range(inner_steps):
                    grads = torch.autograd.grad(loss_fn(fnet(weights, xs), ys), weights)
                    updates, state = sgd.update(grads, state, inplace=False)
                    weights = torchopt.apply_updates(weights, updates, inplace=False)
                (loss_fn(fnet(weights, xq), yq) * scale).backward()

        return accumulate

    lam = imaml["lam"]

    def support_objective(weights, meta_weights, data):
        x, y = data
        loss = loss_fn(fnet(weights, x), y)
        if meta_weights is None:
            return loss
        proximal = sum(torch.sum(torch.square(w - m)) for w, m in zip(weights, meta_weights))
        return loss + 0.5 * lam * proximal

    def inner_solve(weights, meta_weights, data):
        """``inner_steps`` in-place SGD steps from detached ``weights`` (TorchOpt's iMAML style)."""
        state = sgd.init(weights)
        with torch.enable_grad():
            for _ in range(inner_steps):
                grads = torch.autograd.grad(support_objective(weights, meta_weights, data), weights)
                updates, state = sgd.update(grads, state, inplace=True)
                weights = torchopt.apply_updates(weights, updates, inplace=True)
        return weights

    def detached_copy():
        return tuple(p.detach().clone().requires_grad_() for p in params)

    if solver == "reptile":

        def accumulate(tasks):
            scale = 1.0 / len(tasks)
            for xs, ys, _, _ in tasks:
                _add_reptile_grad(params, inner_solve(detached_copy(), None, (xs, ys)), scale)

        return accumulate

    if solver == "imaml":
        solvers = {"cg": torchopt.linear_solve.solve_cg, "normal_cg": torchopt.linear_solve.solve_normal_cg}
        implicit_solve = torchopt.diff.implicit.custom_root(
            torch.func.grad(support_objective, argnums=0),
            argnums=1,
            has_aux=False,
            solve=solvers[imaml["linear_solve"]](maxiter=imaml["cg_iters"], atol=0),
        )(inner_solve)

        def accumulate(tasks):
            scale = 1.0 / len(tasks)
            for xs, ys, xq, yq in tasks:
                adapted = implicit_solve(detached_copy(), params, (xs, ys))
                (loss_fn(fnet(adapted, xq), yq) * scale).backward()

        return accumulate

    raise AssertionError(solver)


_BUILDERS = {"learn2learn": _learn2learn, "higher": _higher, "torchopt": _torchopt}


def make_meta_gradient(library, solver, model, loss_fn, inner_steps, inner_lr, imaml=None):
    """``accumulate(tasks)`` adding ``library``'s ``solver`` meta-gradient to ``p.grad``."""
    if library not in _BUILDERS:
        raise ValueError(f"library must be one of {sorted(_BUILDERS)}, got {library!r}")
    if solver not in configs.SOLVERS[library]:
        raise ValueError(f"solver for library={library!r} must be one of {configs.SOLVERS[library]}, got {solver!r}")
    _check_inner_steps(inner_steps)
    return _BUILDERS[library](model, solver, loss_fn, inner_steps, inner_lr, imaml or configs.IMAML)


# --------------------------------------------------------------------------------------------


def _max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run(library, solver, inner_steps, workload_name, threads, steps, warmup, dtype_name, seed=0):
    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    workload = configs.WORKLOADS[workload_name]
    torch.manual_seed(seed)
    model = build_model(workload, dtype)
    tasks = make_tasks(workload, dtype, torch.Generator().manual_seed(seed + 1))
    loss_fn = LOSSES[workload["loss"]]
    accumulate = make_meta_gradient(library, solver, model, loss_fn, inner_steps, workload["inner_lr"])
    meta_opt = torch.optim.Adam(model.parameters(), lr=configs.META_LR)

    def meta_step():
        meta_opt.zero_grad(set_to_none=True)
        accumulate(tasks)
        meta_opt.step()

    rss_before = _max_rss_mb()
    for _ in range(warmup):
        meta_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        meta_step()
        times.append(time.perf_counter() - start)
    rss_after = _max_rss_mb()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())

    result = {
        "library": library,
        "library_version": library_version(library),
        "solver": solver,
        "inner_steps": inner_steps,
        "workload": workload_name,
        "seconds_per_step": statistics.median(times) if times else None,
        "all_times": times,
        "steps": steps,
        "warmup": warmup,
        "peak_rss_mb": rss_after - rss_before,
        "peak_rss_abs_mb": rss_after,
        "rss_before_mb": rss_before,
        "torch_version": torch.__version__,
        "threads": threads,
        "dtype": dtype_name,
        "n_tasks": workload["n_tasks"],
        "inner_lr": workload["inner_lr"],
        "meta_lr": configs.META_LR,
        "params_finite": finite,
        "python": platform.python_version(),
    }
    if solver == "imaml":
        result["solver_options"] = dict(configs.IMAML)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", required=True, choices=configs.LIBRARIES)
    parser.add_argument("--solver", required=True, choices=configs.ALL_SOLVERS)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--workload", default="omniglot", choices=sorted(configs.WORKLOADS))
    parser.add_argument("--threads", type=int, default=configs.DEFAULT_THREADS)
    parser.add_argument("--steps", type=int, default=configs.DEFAULT_STEPS, help="timed meta-steps")
    parser.add_argument("--warmup", type=int, default=configs.DEFAULT_WARMUP, help="untimed meta-steps first")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.solver not in configs.SOLVERS[args.library]:
        parser.error(f"--solver {args.solver} is not available for --library {args.library}; "
                     f"choose from {configs.SOLVERS[args.library]}")
    result = run(args.library, args.solver, args.inner_steps, args.workload, args.threads,
                 args.steps, args.warmup, args.dtype, args.seed)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
