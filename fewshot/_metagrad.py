"""Meta-gradient rules: how one task's contribution to the meta-update is computed.

Each rule is ``rule(task_loss, theta, task) -> (g, stats)`` with ``g`` a dict shaped like
``theta`` and ``stats`` a dict of 0-dim tensors (losses and metrics before and after adaptation,
plus rule-specific diagnostics). *How the inner problem is solved* (:func:`inner_loop`) and *how the
linear system is solved* (:mod:`fewshot.linalg`) are arguments, not special cases.

Notation (the seeds'): support loss ``Ls``, query loss ``Lq``, step size ``alpha``, ``k`` inner steps
``phi_{j+1} = phi_j - alpha grad Ls(phi_j)`` from ``phi_0 = theta``, Hessian ``H = grad^2 Ls``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from ._functional import TaskLoss, inner_loop, make_hvp, proximal_descent, value_and_grad
from ._tree import Params, tree_norm
from .linalg import SolveResult

__all__ = ["Unrolled", "FirstOrder", "ReptileRule", "Implicit", "query_objective",
           "penalty_objective"]


def query_objective(task_loss: TaskLoss, task):
    """``phi -> Lq(phi)`` with aux ``(Lq, metric)``."""
    xq, yq = task.query
    return lambda phi: task_loss.with_aux(phi, xq, yq)


def penalty_objective(task_loss: TaskLoss, task, penalty: float):
    """``phi -> Lq(phi) + penalty * ||grad Ls(phi)||^2`` with aux ``(Lq, metric)``.

    ``phi`` must require grad (or be computed from tensors that do): the penalty's gradient is
    taken with ``create_graph=True`` so that the objective can be differentiated again.
    """
    xs, ys = task.support
    xq, yq = task.query

    def objective(phi):
        value, aux = task_loss.with_aux(phi, xq, yq)
        gs, _ = value_and_grad(lambda p: (task_loss(p, xs, ys), None), phi, create_graph=True)
        return value + penalty * sum(torch.sum(g * g) for g in gs.values()), aux

    return objective


def task_stats(task_loss: TaskLoss, theta: Params, phi: Params, task, support_pre, query_post,
               full: bool = True, **extra) -> dict:
    """Losses (and accuracies for classification) on support and query, before and after
    adaptation. ``support_pre``/``query_post`` come for free from the rules' own passes; with
    ``full`` the other two cost one forward pass each on the query set (at theta) and on the support
    set (at phi)."""
    xs, ys = task.support
    xq, yq = task.query
    if support_pre is None:
        support_pre = task_loss.evaluate(theta, xs, ys)
    parts = [("support_pre", support_pre), ("query_post", query_post)]
    if full:
        parts += [("query_pre", task_loss.evaluate(theta, xq, yq)),
                  ("support_post", task_loss.evaluate(phi, xs, ys))]
    stats = {}
    for name, pair in parts:
        if pair is None:
            continue
        loss, metric = pair
        where, when = name.split("_")
        stats[f"{where}_loss_{when}"] = loss
        if task_loss.metric is not None:
            stats[f"{where}_acc_{when}"] = metric
    stats.update(extra)
    return stats


@dataclass
class Unrolled:
    """Exact gradient of ``objective(phi_k(theta))`` through all ``k`` inner steps (second order).

    ``memory_efficient=False`` differentiates the unrolled graph (memory grows with ``k``).
    ``memory_efficient=True`` runs the inner loop without a graph, keeps the iterates
    ``phi_0..phi_{k-1}`` and applies the chain rule backwards,
    ``v <- v - alpha * H(phi_j) v`` for ``j = k-1, ..., 0`` starting from ``v = grad objective(phi_k)``
    (since ``d phi_{j+1} / d phi_j = I - alpha H(phi_j)`` is symmetric). It gives the same gradient
    with activation memory independent of ``k``, for about one extra forward/backward per step.

    With ``lam`` set, the inner loop is iMAML's proximal one and the derivative is taken through
    both the initialisation and the proximal centre: the explicit counterpart of :class:`Implicit`.
    """

    lr: float
    steps: int
    objective: Callable  # (task_loss, task) -> phi -> (value, aux)
    memory_efficient: bool = False
    hvp_mode: str = "fwdrev"
    lam: float | None = None  # differentiate through iMAML's proximal inner loop instead
    full_stats: bool = field(default=True, kw_only=True)
    batchable = True  # see BatchedTaskLoss

    def __call__(self, task_loss: TaskLoss, theta: Params, task):
        xs, ys = task.support
        objective = self.objective(task_loss, task)
        if self.lam is not None and self.memory_efficient:
            raise ValueError("memory_efficient unrolling supports the plain inner loop only (lam=None)")
        if not self.memory_efficient:
            def outer(th):
                phi, support_pre, _ = inner_loop(task_loss, th, xs, ys, lr=self.lr, steps=self.steps,
                                                 lam=self.lam, create_graph=True)
                value, query_post = objective(phi)
                return value, (support_pre, query_post, {k: v.detach() for k, v in phi.items()})

            g, (support_pre, query_post, phi) = value_and_grad(outer, theta)
        else:
            phi, support_pre, path = inner_loop(task_loss, theta, xs, ys, lr=self.lr,
                                                steps=self.steps, keep_path=True)
            g, query_post = value_and_grad(objective, phi)
            for point in reversed(path):
                hv = make_hvp(task_loss, point, xs, ys, self.hvp_mode)(g)
                g = {k: g[k] - self.lr * hv[k] for k in g}
        return g, task_stats(task_loss, theta, phi, task, support_pre, query_post, self.full_stats)


@dataclass
class FirstOrder:
    """``grad Lq(phi_k)`` with ``phi_k`` treated as a constant (no second-order terms)."""

    lr: float
    steps: int
    full_stats: bool = field(default=True, kw_only=True)
    batchable = True

    def __call__(self, task_loss: TaskLoss, theta: Params, task):
        xs, ys = task.support
        phi, support_pre, _ = inner_loop(task_loss, theta, xs, ys, lr=self.lr, steps=self.steps)
        g, query_post = value_and_grad(query_objective(task_loss, task), phi)
        return g, task_stats(task_loss, theta, phi, task, support_pre, query_post, self.full_stats)


def _class_batches(y: Tensor, shots: int, steps: int) -> list[Tensor]:
    """Indices of ``steps`` class-balanced batches of ``y`` (class labels, the same number of
    examples per class): batch ``j`` holds examples ``j*shots, ..., (j+1)*shots - 1`` of every class
    in order of appearance, cyclically. So with support first and ``shots = k_shot``, the first
    batch is the support set."""
    order = torch.argsort(y, stable=True)
    n_classes = int(y.max()) + 1
    per_class = y.numel() // n_classes
    if per_class * n_classes != y.numel() or not bool(torch.all(torch.bincount(y, minlength=n_classes) == per_class)):
        raise ValueError(f"inner_shots needs the same number of examples of every class; got class counts "
                         f"{torch.bincount(y).tolist()}")
    by_class = order.view(n_classes, per_class)
    columns = torch.arange(steps * shots, device=y.device) % per_class
    return [by_class[:, columns[j * shots:(j + 1) * shots]].reshape(-1) for j in range(steps)]


@dataclass
class ReptileRule:
    """The pseudo-gradient ``theta - phi_k`` of an inner loop on the support set, or with
    ``inner_data="task"`` on the support and query sets together (otherwise the query set is only
    used for reporting)."""

    lr: float
    steps: int
    inner_data: str = "support"
    shots: int | None = None  # examples per class in each inner step; None: all of them
    full_stats: bool = field(default=True, kw_only=True)

    @property
    def fits_support(self) -> bool:
        """Whether the inner loop is gradient descent on the support set alone (then it must lower
        the support loss; class batches and support+query data need not)."""
        return self.shots is None and self.inner_data == "support"

    @property
    def batchable(self) -> bool:
        # Class batches and support+query concatenation index the example axis of one task.
        return self.fits_support

    def __call__(self, task_loss: TaskLoss, theta: Params, task):
        xs, ys = task.support
        xq, yq = task.query
        x, y = (xs, ys) if self.inner_data == "support" else (torch.cat([xs, xq]), torch.cat([ys, yq]))
        if self.shots is None:
            phi, support_pre, _ = inner_loop(task_loss, theta, x, y, lr=self.lr, steps=self.steps)
        else:
            phi, support_pre = theta, None
            for batch in _class_batches(y, self.shots, self.steps):
                phi, _, _ = inner_loop(task_loss, phi, x[batch], y[batch], lr=self.lr, steps=1)
        g = {k: theta[k] - phi[k] for k in theta}
        # With inner_data="support" the update never looks at the query set; with full_stats=False
        # it is not evaluated at all.
        query_post = task_loss.evaluate(phi, xq, yq) if self.full_stats else None
        if self.inner_data != "support" or self.shots is not None:
            support_pre = None  # the inner loop's first loss was not on the support set
        return g, task_stats(task_loss, theta, phi, task, support_pre, query_post, self.full_stats)


@dataclass
class Implicit:
    """Implicit meta-gradient of the proximal inner problem.

    ``phi*`` is approximated by ``steps`` gradient steps on ``Ls(phi) + lam/2 ||phi - theta||^2``
    (with ``backtracking``, :func:`~fewshot._functional.proximal_descent`: steps halved until the
    objective decreases);
    the meta-gradient is ``x = (I + H/(lam + damping))^{-1} grad Lq(phi*)`` with
    ``H = grad^2 Ls(phi*)`` (``damping=0``: the implicit gradient), found by
    ``solve(matvec, b, maxiter=solve_iters, tol=solve_tol, **solve_kwargs)`` using Hessian-vector
    products at ``phi*`` only, so memory does not depend on ``steps``.
    """

    lr: float
    steps: int
    lam: float
    solve: Callable
    solve_iters: int
    solve_tol: float | None
    solve_kwargs: dict
    warm_start: bool = True  # start CG from grad Lq (the first-order answer) instead of zero
    damping: float = 0.0     # added to lam in the linear system only (not in the inner loop)
    hvp_mode: str = "fwdrev"
    backtracking: bool = False
    full_stats: bool = field(default=True, kw_only=True)
    batchable = False  # the solver's inner products would couple batched tasks

    def __call__(self, task_loss: TaskLoss, theta: Params, task):
        xs, ys = task.support
        solve_inner = proximal_descent if self.backtracking else inner_loop
        phi, support_pre, _ = solve_inner(task_loss, theta, xs, ys, lr=self.lr, steps=self.steps,
                                          lam=self.lam)
        gq, query_post = value_and_grad(query_objective(task_loss, task), phi)
        hvp = make_hvp(task_loss, phi, xs, ys, self.hvp_mode)
        lam = self.lam + self.damping

        def matvec(v):
            hv = hvp(v)
            return {k: v[k] + hv[k] / lam for k in v}

        kwargs = dict(self.solve_kwargs)
        if self.warm_start and self.solve.__name__ == "cg":
            kwargs["init"] = gq
        result: SolveResult = self.solve(matvec, gq, maxiter=self.solve_iters, tol=self.solve_tol,
                                         **kwargs)
        rel = result.residual / torch.clamp(tree_norm(gq), min=torch.finfo(result.residual.dtype).tiny)
        extra = {
            "solve_iters": torch.tensor(float(result.n_iter), dtype=rel.dtype, device=rel.device),
            "solve_residual": rel,
            "negative_curvature": torch.tensor(float(result.negative_curvature), dtype=rel.dtype,
                                               device=rel.device),
            "solve_diverged": torch.tensor(float(result.diverged), dtype=rel.dtype, device=rel.device),
        }
        return result.x, task_stats(task_loss, theta, phi, task, support_pre, query_post, self.full_stats, **extra)
