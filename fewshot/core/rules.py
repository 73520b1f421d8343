"""Meta-gradient rules: how one task's contribution to the meta-update is computed.

A rule is a :class:`MetaGradientRule`: ``rule(task_loss, theta, task) -> (g, stats)`` with ``g`` a
dict shaped like ``theta`` (every meta-parameter, learned inner steps included) and ``stats`` a
dict of 0-dim tensors (losses and metrics before and after adaptation, plus rule-specific
diagnostics). The inner loop is the rule's :class:`~fewshot.core.inner.InnerProblem`; linear solves
are configured callables ``solve(matvec, b) -> SolveResult`` (:mod:`fewshot.core.linalg`); the
kind of Hessian-vector product comes with the task loss (``task_loss.hvp_mode``), chosen by
whoever runs the meta-step. None of these is changed after the rule is built.

Notation (the seeds'): support loss ``Ls``, query loss ``Lq``, step size ``alpha``, ``k`` inner steps
``phi_{j+1} = phi_j - alpha grad Ls(phi_j)`` from ``phi_0 = theta``, Hessian ``H = grad^2 Ls``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..exceptions import SolverWarning
from .functional import TaskLoss, make_hvp, value_and_grad
from .inner import InnerProblem, network_params
from .linalg import SolveResult
from .tree import Params, tree_norm

__all__ = ["MetaGradientRule", "Unrolled", "FirstOrder", "ReptileRule", "Implicit", "query_objective",
           "penalty_objective", "task_stats"]


def _hvp_mode(task_loss) -> str:
    return getattr(task_loss, "hvp_mode", "fwdrev")


def query_objective(task_loss: TaskLoss, task):
    """``phi -> Lq(phi)`` with aux ``(Lq, metric)``."""
    xq, yq = task.query
    return lambda phi: task_loss.with_aux(phi, xq, yq)


def penalty_objective(task_loss: TaskLoss, task, penalty: float, names: Sequence[str] | None = None):
    """``phi -> Lq(phi) + penalty * ||grad Ls(phi)||^2`` with aux ``(Lq, metric)``; the gradient is
    over the parameters ``names`` (default all: the adapted ones, whose stationarity it measures).

    ``phi`` must require grad (or be computed from tensors that do): the penalty's gradient is
    taken with ``create_graph=True`` so that the objective can be differentiated again.
    """
    xs, ys = task.support
    xq, yq = task.query

    def objective(phi):
        value, aux = task_loss.with_aux(phi, xq, yq)
        own = {n: phi[n] for n in (phi if names is None else names)}
        gs, _ = value_and_grad(lambda p: (task_loss({**phi, **p}, xs, ys), None), own, create_graph=True)
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
    weights = network_params(theta)
    if support_pre is None:
        support_pre = task_loss.evaluate(weights, xs, ys)
    parts = [("support_pre", support_pre), ("query_post", query_post)]
    if full:
        parts += [("query_pre", task_loss.evaluate(weights, xq, yq)),
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


def _zeros_for_rest(g: Params, theta: Params) -> Params:
    """``g`` completed with zeros for the meta-parameters it does not cover, in ``theta``'s order."""
    return {k: g[k] if k in g else torch.zeros_like(v) for k, v in theta.items()}


class MetaGradientRule:
    """The protocol of a meta-gradient rule (subclass it, or provide the same members).

    ``inner`` is the rule's inner problem. ``__call__(task_loss, theta, task)`` returns the task's
    meta-gradient, a dict with every key of ``theta``, and its statistics (0-dim tensors; every
    rule reports ``support_loss_pre`` and ``query_loss_post``, and with ``full_stats`` also
    ``query_loss_pre`` and ``support_loss_post``). ``batchable``: the rule only adds, scales and
    differentiates parameter dicts, so a meta-batch may run as one computation with a leading task
    axis (:class:`~fewshot.core.functional.BatchedTaskLoss`). ``fits_support``: its inner loop is
    descent on the support loss (so a rising support loss means the loop diverges).
    ``deterministic``: it needs a task loss that is a deterministic function (no dropout).
    ``for_step(n)`` is the rule of (0-based) meta-step ``n``, for rules whose definition follows a
    schedule (MAML++); ``check_fit(history, start, solver)`` warns about the statistics of a fit
    from step ``start`` on.
    """

    inner: InnerProblem
    batchable: bool = False
    fits_support: bool = True
    deterministic: bool = False
    full_stats: bool = True

    def __call__(self, task_loss, theta: Params, task):  # pragma: no cover - protocol
        raise NotImplementedError

    def for_step(self, step: int) -> "MetaGradientRule":
        return self

    def check_fit(self, history: dict, start: int, solver: str) -> None:
        return None


@dataclass
class Unrolled(MetaGradientRule):
    """Exact gradient of the meta-objective through all ``k`` inner steps (second order).

    The meta-objective is ``objective(phi_k)`` or, with ``step_weights = (w_1, ..., w_k)``,
    ``sum_j w_j objective(phi_j)`` (MAML++'s multi-step loss); its total derivative with respect
    to every meta-parameter (weights and learned inner steps) is taken through the loop.
    ``first_order=True`` treats the support gradients inside the loop as constants: the weights'
    gradient is then FOMAML's ``grad objective(phi_k)`` (``d phi_k / d theta = I``), and learned steps
    still get their exact gradient through the updates.

    ``memory_efficient=False`` differentiates the unrolled graph (memory grows with ``k``).
    ``memory_efficient=True`` runs the inner loop without a graph, keeps the iterates
    ``phi_0..phi_{k-1}`` and applies the chain rule backwards,
    ``v <- v - alpha * H(phi_j) v`` for ``j = k-1, ..., 0`` starting from ``v = grad objective(phi_k)``
    (since ``d phi_{j+1} / d phi_j = I - alpha H(phi_j)`` is symmetric). It gives the same gradient
    with activation memory independent of ``k``, for about one extra forward/backward per step; it
    needs the plain inner problem (every parameter adapted, a fixed scalar step, no proximal term)
    and a single objective.

    With a proximal term in the inner problem the derivative is taken through both the
    initialisation and the proximal centre: the explicit counterpart of :class:`Implicit`.
    """

    inner: InnerProblem
    objective: Callable = query_objective  # (task_loss, task) -> phi -> (value, aux)
    memory_efficient: bool = False
    first_order: bool = False
    step_weights: Sequence[float] | None = None
    full_stats: bool = field(default=True, kw_only=True)
    batchable = True

    def __post_init__(self):
        if self.inner.backtracking:
            raise ValueError("Unrolled differentiates the inner loop, which backtracking makes "
                             "non-differentiable: use an InnerProblem with backtracking=False")
        plain = (self.inner.adapt is None and self.inner.learn_lr is None and self.inner.lam is None
                 and self.inner.per_step is None and self.step_weights is None and not self.first_order)
        if self.memory_efficient and not plain:
            raise ValueError("memory_efficient unrolling supports the plain inner loop only (every "
                             "parameter adapted, a fixed scalar step, no proximal term, no step weights, "
                             "second order)")
        if self.step_weights is not None and len(self.step_weights) != self.inner.steps:
            raise ValueError(f"step_weights has {len(self.step_weights)} entries for {self.inner.steps} "
                             "inner steps")

    @property
    def deterministic(self) -> bool:
        return self.memory_efficient  # the reverse recursion re-runs the forward passes

    def __call__(self, task_loss: TaskLoss, theta: Params, task):
        xs, ys = task.support
        objective = self.objective(task_loss, task)
        if self.memory_efficient:
            return self._reverse(task_loss, theta, task, objective)
        weights_of_steps = self.step_weights

        def outer(th):
            phi, support_pre, path = self.inner.run(task_loss, th, xs, ys, create_graph=True,
                                                    first_order=self.first_order,
                                                    keep_path=weights_of_steps is not None)
            value, query_post = objective(phi)
            if weights_of_steps is not None:
                iterates = path[1:] + [phi]
                value = sum(w * (objective(p)[0] if p is not phi else value)
                            for w, p in zip(weights_of_steps, iterates) if w != 0)
                if not torch.is_tensor(value):  # every weight zero
                    value = phi[next(iter(phi))].sum() * 0
            return value, (support_pre, query_post, {k: v.detach() for k, v in phi.items()})

        g, (support_pre, query_post, phi) = value_and_grad(outer, theta)
        return g, task_stats(task_loss, theta, phi, task, support_pre, query_post, self.full_stats)

    def _reverse(self, task_loss, theta, task, objective):
        xs, ys = task.support
        phi, support_pre, path = self.inner.run(task_loss, theta, xs, ys, keep_path=True)
        g, query_post = value_and_grad(objective, phi)
        for point in reversed(path):
            hv = make_hvp(lambda p: task_loss(p, xs, ys), point, _hvp_mode(task_loss))(g)
            g = {k: g[k] - self.inner.lr * hv[k] for k in g}
        return g, task_stats(task_loss, theta, phi, task, support_pre, query_post, self.full_stats)


@dataclass
class FirstOrder(MetaGradientRule):
    """``grad Lq(phi_k)`` with ``phi_k`` treated as a constant (no second-order terms): over every
    network parameter, adapted or not (with a subset adapted, the others' gradient is their direct
    query gradient at ``phi_k``). Learned inner steps have no such gradient: use
    ``Unrolled(first_order=True)`` for them."""

    inner: InnerProblem
    full_stats: bool = field(default=True, kw_only=True)
    batchable = True

    def __post_init__(self):
        if self.inner.has_meta_parameters:
            raise ValueError("FirstOrder gives no gradient for learned inner steps or per-step parameters; "
                             "use Unrolled(inner, first_order=True)")

    def __call__(self, task_loss: TaskLoss, theta: Params, task):
        xs, ys = task.support
        phi, support_pre, _ = self.inner.run(task_loss, theta, xs, ys)
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
class ReptileRule(MetaGradientRule):
    """The pseudo-gradient ``theta - phi_k`` of an inner loop on the support set, or with
    ``inner_data="task"`` on the support and query sets together (otherwise the query set is only
    used for reporting). Every parameter must be adapted (the others' pseudo-gradient would be
    zero) with a fixed step."""

    inner: InnerProblem
    inner_data: str = "support"
    shots: int | None = None  # examples per class in each inner step; None: all of them
    full_stats: bool = field(default=True, kw_only=True)

    def __post_init__(self):
        if self.inner.adapt is not None or self.inner.has_meta_parameters:
            raise ValueError("Reptile moves theta towards the adapted parameters: it needs every parameter "
                             "adapted with a fixed step (inner_params=None, no learned steps)")

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
            phi, support_pre, _ = self.inner.run(task_loss, theta, x, y)
        else:
            phi, support_pre = theta, None
            for batch in _class_batches(y, self.shots, self.inner.steps):
                phi, _, _ = self.inner.run(task_loss, phi, x[batch], y[batch], steps=1)
        g = {k: theta[k] - phi[k] for k in theta}
        # With inner_data="support" the update never looks at the query set; with full_stats=False
        # it is not evaluated at all.
        query_post = task_loss.evaluate(phi, xq, yq) if self.full_stats else None
        if self.inner_data != "support" or self.shots is not None:
            support_pre = None  # the inner loop's first loss was not on the support set
        return g, task_stats(task_loss, theta, phi, task, support_pre, query_post, self.full_stats)


#: A fit warns when more than this fraction of the linear solves (tasks times meta-steps) of its
#: second half failed: then most of its meta-gradients are not the approximation of the implicit
#: gradient. The first half is left out because at a random initialisation the support loss is
#: often far from convex at the adapted parameters, and meta-training removes that.
SOLVE_FAILURE_WARN = 0.5


@dataclass
class Implicit(MetaGradientRule):
    """Implicit meta-gradient of the proximal inner problem.

    ``phi*`` minimises ``G(phi) = Ls(phi) + lam/2 ||phi - theta||^2`` over the adapted parameters
    ``h`` (the others, ``b``, held at theta), approximated by the inner problem's steps. With
    ``H = d^2 Ls / dh^2`` at ``phi*``, ``lam' = lam + damping`` and ``x`` the solution of
    ``(I + H/lam') x = grad_h Lq(phi*)`` (by ``solve``, Hessian-vector products at ``phi*`` only,
    so memory does not depend on the number of steps), the meta-gradient is:

    - for the adapted parameters' initialisation: ``x``;
    - for the others (when only a subset is adapted): their total derivative
      ``d/db Lq(b, phi*(b)) = grad_b Lq - (1/lam') (d^2 Ls / db dh) x``, the direct term plus the
      mixed second derivative through the minimiser (``d phi*/db = -(H + lam I)^{-1} d^2 Ls/dh db``
      by the implicit function theorem), one more double-backward pass.

    ``damping=0`` is the implicit gradient of ``phi*``. ``solve(matvec, b) -> SolveResult`` is a
    configured solver (:func:`~fewshot.core.linalg.solve_cg`, :func:`~fewshot.core.linalg.solve_neumann`).
    ``history_`` gets ``solve_iters``, ``solve_residual`` (``||b - M x|| / ||b||``),
    ``negative_curvature`` and ``solve_diverged`` (fractions of the meta-batch);
    :meth:`check_fit` warns when most solves of a fit's second half failed.
    """

    inner: InnerProblem
    solve: Callable
    damping: float = 0.0     # added to lam in the linear system only (not in the inner loop)
    full_stats: bool = field(default=True, kw_only=True)
    batchable = False  # the solver's inner products would couple batched tasks
    deterministic = True  # Hessian-vector products re-run the forward pass

    def __post_init__(self):
        if self.inner.lam is None:
            raise ValueError("Implicit needs a proximal inner problem (InnerProblem(lam=...))")
        if self.inner.has_meta_parameters:
            raise ValueError("the implicit gradient does not depend on the inner steps, so learned steps or "
                             "per-step parameters would get no gradient: use a fixed step with Implicit")

    def __call__(self, task_loss: TaskLoss, theta: Params, task):
        xs, ys = task.support
        phi, support_pre, _ = self.inner.run(task_loss, theta, xs, ys)
        gq, query_post = value_and_grad(query_objective(task_loss, task), phi)
        support, h = self.inner.support_loss(task_loss, phi, xs, ys)
        b = {n: gq[n] for n in h}
        hvp = make_hvp(support, h, _hvp_mode(task_loss))
        lam = float(self.inner.lam) + float(self.damping)

        def matvec(v):
            hv = hvp(v)
            return {k: v[k] + hv[k] / lam for k in v}

        result: SolveResult = self.solve(matvec, b)
        g = dict(result.x)
        if len(h) < len(phi):
            g.update(self._body_gradient(task_loss, phi, h, result.x, gq, xs, ys, lam))
        rel = result.residual / torch.clamp(tree_norm(b), min=torch.finfo(result.residual.dtype).tiny)
        extra = {
            "solve_iters": torch.tensor(float(result.n_iter), dtype=rel.dtype, device=rel.device),
            "solve_residual": rel,
            "negative_curvature": torch.tensor(float(result.negative_curvature), dtype=rel.dtype,
                                               device=rel.device),
            "solve_diverged": torch.tensor(float(result.diverged), dtype=rel.dtype, device=rel.device),
        }
        return (_zeros_for_rest(g, theta),
                task_stats(task_loss, theta, phi, task, support_pre, query_post, self.full_stats, **extra))

    @staticmethod
    def _body_gradient(task_loss, phi, h, x, gq, xs, ys, lam):
        """``grad_b Lq - (1/lam) d/db <grad_h Ls(b, h), x>`` for the parameters ``b`` not in ``h``."""
        body = {n: v.detach().requires_grad_(True) for n, v in phi.items() if n not in h}
        head = {n: v.detach().requires_grad_(True) for n, v in h.items()}
        with torch.enable_grad():
            gh = torch.autograd.grad(task_loss({**body, **head}, xs, ys), list(head.values()), create_graph=True)
            inner = sum(torch.sum(g * x[n].detach()) for g, n in zip(gh, head))
            mixed = torch.autograd.grad(inner, list(body.values()), allow_unused=True, materialize_grads=True)
        return {n: gq[n] - m / lam for n, m in zip(body, mixed)}

    def check_fit(self, history: dict, start: int, solver: str) -> None:
        """One :class:`~fewshot.exceptions.SolverWarning` per fit when most solves of its second
        half failed: CG stopped at a direction of non-positive curvature (and returned its
        smallest-residual iterate), or the Neumann series diverged (and was cut at its best partial
        sum), in more than :data:`SOLVE_FAILURE_WARN` of them. Rarer or passing failures are normal,
        leave every step finite, and are recorded per meta-step in ``history_``."""
        unsolved = "solve the inner problem more accurately (more inner_steps, a larger inner_lr)"
        for key, message, remedy in (
            ("negative_curvature",
             "conjugate gradient met non-positive curvature of I + H/(lam + damping) (the Hessian of "
             "the support loss at the adapted parameters has eigenvalues below -(lam + damping), so "
             "the inner problem is not near a minimum) and returned its smallest-residual iterate",
             f"{unsolved}, or raise lam or damping"),
            ("solve_diverged",
             "the Neumann series diverged (0 < neumann_lr * (1 + mu/(lam + damping)) < 2 fails for "
             "some Hessian eigenvalue mu) and was cut at its best partial sum",
             f"use neumann_lr='auto' or a smaller neumann_lr, raise lam or damping, or {unsolved}"),
        ):
            fractions = history.get(key, [])[start:]
            fractions = fractions[len(fractions) // 2:]
            failed = sum(fractions) / len(fractions) if fractions else 0.0
            if failed > SOLVE_FAILURE_WARN:
                warnings.warn(
                    f"{solver}: in {100 * failed:.0f}% of the solves of this fit's second half "
                    f"{message}; its meta-gradients are then mostly not the implicit gradient: "
                    f"{remedy} (see the class docstring).", SolverWarning, stacklevel=4)

