"""The functional backend: a model as a pure function ``f(params, x)`` (``torch.func.functional_call``),
task losses, gradients and the inner loop (reverse-mode ``torch.autograd`` on those functions, see
:func:`value_and_grad`) and Hessian-vector products (``torch.func.jvp`` of the gradient, or
reverse-over-reverse autograd).

Every solver, at training time and in ``adapt``, goes through these few functions.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from ._tree import Params

__all__ = ["FunctionalModel", "TaskLoss", "BatchedTaskLoss", "LOSSES", "value_and_grad", "inner_loop",
           "proximal_descent", "make_hvp"]


def _direct_plan(module: nn.Module):
    """The layers of an unmodified :class:`~fewshot.models.Conv4` or :class:`~fewshot.models.MLP`, or
    of a plain ``nn.Sequential``, as ``[(layer, parameter prefix)]`` in call order, or ``None`` for
    any other module.

    Those two networks are ``head(features(x))`` with ``features`` a (nested) ``nn.Sequential``
    (a plain ``nn.Sequential`` is its layers in order), all of ``Conv2d``, ``BatchNorm2d`` (batch
    statistics), ``MaxPool2x2``, ``ReLU``, ``Flatten`` and ``Linear`` layers and no buffers, so
    ``f(params, x)`` can call ``torch.nn.functional`` directly on the parameter dict.
    ``functional_call`` computes the same function but swaps every parameter into the module and
    back on each call, an overhead that matters for small networks (measured on the sinusoid MLP:
    ``docs/benchmarks.md``, "Implementation choices").
    Subclasses (which may override ``forward``), any other layer type and modules with forward
    hooks (which only a call through the module runs) get ``None``.
    """
    from .models import MLP, Conv4, MaxPool2x2

    if type(module) not in (Conv4, MLP, nn.Sequential) or any(True for _ in module.buffers()):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
        return None
    plan = []

    def visit(m, prefix):
        if type(m) is nn.Sequential:
            return all(visit(child, f"{prefix}{name}.") for name, child in m.named_children())
        if type(m) is nn.Conv2d:
            ok = m.padding_mode == "zeros" and isinstance(m.padding, tuple)
        elif type(m) is nn.BatchNorm2d:
            ok = not m.track_running_stats and m.running_mean is None
        else:
            ok = type(m) in (nn.Linear, nn.ReLU, nn.Flatten, MaxPool2x2)
        plan.append((m, prefix))
        return ok

    if type(module) is nn.Sequential:
        ok = visit(module, "")
    else:
        ok = visit(module.features, "features.") and visit(module.head, "head.")
    if not ok:
        return None
    return plan


def _direct_forward(plan, params: Params, x: Tensor) -> Tensor:
    for m, prefix in plan:
        kind = type(m)
        if kind is nn.Conv2d:
            x = F.conv2d(x, params[prefix + "weight"], params.get(prefix + "bias"), m.stride, m.padding,
                         m.dilation, m.groups)
        elif kind is nn.BatchNorm2d:
            x = F.batch_norm(x, None, None, params.get(prefix + "weight"), params.get(prefix + "bias"),
                             True, 0.0, m.eps)
        elif kind is nn.Linear:
            x = F.linear(x, params[prefix + "weight"], params.get(prefix + "bias"))
        elif kind is nn.ReLU:
            x = torch.relu(x)
        elif kind is nn.Flatten:
            x = x.flatten(m.start_dim, m.end_dim)
        else:  # MaxPool2x2: no parameters
            x = m.forward(x)
    return x


def _batched_plan(plan):
    """``plan`` if a forward pass can run many tasks at once with :func:`_batched_forward`: only
    ``Linear``, ``ReLU`` and ``Flatten`` layers (a ``Flatten`` from a positive ``start_dim``, so it
    never merges examples); ``None`` otherwise (convolutions would become grouped convolutions,
    slower on CPU, and batch statistics would need per-task reductions)."""
    if plan is None:
        return None
    for m, _ in plan:
        if type(m) is nn.Flatten:
            if m.start_dim < 1 or m.end_dim == 0:
                return None
        elif type(m) not in (nn.Linear, nn.ReLU):
            return None
    return plan


def _batched_forward(plan, params: Params, x: Tensor) -> Tensor:
    """``f(params[t], x[t])`` for every task ``t`` at once: every parameter and ``x`` have a leading
    task axis. Linear layers are batched matrix products (``baddbmm``)."""
    for m, prefix in plan:
        kind = type(m)
        if kind is nn.Linear:
            weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            if bias is None:
                out = torch.bmm(flat, weight.transpose(1, 2))
            else:
                out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
            x = out.reshape(*x.shape[:-1], out.shape[-1])
        elif kind is nn.ReLU:
            x = torch.relu(x)
        else:  # Flatten, shifted past the task axis
            x = x.flatten(m.start_dim + 1, m.end_dim if m.end_dim < 0 else m.end_dim + 1)
    return x


class FunctionalModel:
    """A pure-function view ``f(params, x)`` of an :class:`nn.Module`.

    Holds a private copy of the module (the user's template is never touched) and its buffers;
    parameters are always passed in, so one instance serves every task of a meta-batch. The
    reference networks of :mod:`fewshot.models` are evaluated layer by layer with
    ``torch.nn.functional`` (see :func:`_direct_plan`); any other module through
    ``torch.func.functional_call``.
    """

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).train()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.buffers = {k: v for k, v in self.module.named_buffers()}
        self._plan = _direct_plan(self.module)
        self._batch_plan = _batched_plan(self._plan)

    def init_params(self, device=None, dtype=None) -> Params:
        return {k: v.detach().clone().to(device=device, dtype=dtype)
                for k, v in self.module.named_parameters()}

    def to(self, device=None, dtype=None) -> "FunctionalModel":
        self.module.to(device=device, dtype=dtype)
        self.buffers = {k: v for k, v in self.module.named_buffers()}
        return self

    _plan = None  # an instance unpickled without a plan uses functional_call
    _batch_plan = None  # ... and without a batched plan runs task by task

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        if self._plan is not None:
            return _direct_forward(self._plan, params, x)
        return self.call_module(params, x)

    @property
    def batchable(self) -> bool:
        """Whether :meth:`batched` can evaluate many tasks' parameters at once (networks of linear
        layers and ReLUs only, such as :class:`~fewshot.models.MLP`)."""
        return self._batch_plan is not None

    def batched(self, params: Params, x: Tensor) -> Tensor:
        """``f(params[t], x[t])`` stacked over a leading task axis of ``params`` and ``x``."""
        if self._batch_plan is None:
            raise ValueError("this network cannot run tasks batched (only Linear, ReLU and Flatten "
                             "layers can)")
        return _batched_forward(self._batch_plan, params, x)

    def call_module(self, params: Params, x: Tensor) -> Tensor:
        """``f(params, x)`` through the module itself (``functional_call``), so that its forward
        hooks run."""
        if self.buffers:
            return functional_call(self.module, (params, self.buffers), (x,))
        return functional_call(self.module, params, (x,))


def _accuracy(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(-1) == y).to(out.dtype).mean()


def _mse(out: Tensor, y: Tensor) -> Tensor:
    # Written out rather than F.mse_loss: in torch 2.13 forward-mode AD through mse_loss's backward
    # (jvp of grad, our Hessian-vector product) fails with "ZeroTensors are immutable".
    return torch.mean((out - y.reshape(out.shape)) ** 2)


# name -> (loss(out, y), metric(out, y) or None, task type)
LOSSES = {
    "cross_entropy": (F.cross_entropy, _accuracy, "classification"),
    "mse": (_mse, None, "regression"),
}


class TaskLoss:
    """``loss(f(params, x), y)`` and its metric, as functions of the parameters.

    ``__call__`` returns the scalar loss (what is differentiated); ``with_aux`` returns
    ``(loss, (loss, metric))`` for ``torch.func.grad(..., has_aux=True)``, where the metric is
    accuracy for classification and the loss itself otherwise.
    """

    def __init__(self, fmodel: FunctionalModel, loss: Callable, metric: Callable | None):
        self.fmodel, self.loss, self.metric = fmodel, loss, metric

    def __call__(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self.fmodel(params, x), y)

    def with_aux(self, params: Params, x: Tensor, y: Tensor):
        out = self.fmodel(params, x)
        value = self.loss(out, y)
        metric = self.metric(out, y) if self.metric is not None else value
        return value, (value.detach(), metric.detach())

    def evaluate(self, params: Params, x: Tensor, y: Tensor):
        """``(loss, metric)`` without building a graph."""
        with torch.no_grad():
            return self.with_aux(params, x, y)[1]


def _batched_loss(loss: Callable, out: Tensor, y: Tensor) -> Tensor:
    """The per-task losses ``[loss(out[t], y[t]) for t]`` as a vector."""
    if loss is F.cross_entropy:
        per_example = F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none")
        return per_example.view(out.shape[0], -1).mean(1)
    if loss is _mse:
        return ((out - y.reshape(out.shape)) ** 2).flatten(1).mean(1)
    return torch.stack([loss(o, t) for o, t in zip(out, y)])


def _batched_metric(metric: Callable, out: Tensor, y: Tensor) -> Tensor:
    if metric is _accuracy:
        return (out.argmax(-1) == y).to(out.dtype).flatten(1).mean(1)
    return torch.stack([metric(o, t) for o, t in zip(out, y)])


class BatchedTaskLoss(TaskLoss):
    """A meta-batch's tasks in one computation: parameters and data carry a leading task axis.

    ``__call__`` is the *sum* of the per-task losses. Task ``t``'s loss depends only on
    ``params[t]``, so its gradient with respect to the stacked parameters is the stack of the
    per-task gradients, and every rule that only adds, scales and differentiates parameter dicts
    (the inner loop, explicit MAML through it, first-order MAML, Reptile) computes all tasks' results
    at once. ``with_aux`` and ``evaluate`` give per-task losses and metrics (vectors). Not for
    rules that take inner products of parameter dicts (the implicit solvers' CG and series, which
    would then couple the tasks).
    """

    def __call__(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return _batched_loss(self.loss, self.fmodel.batched(params, x), y).sum()

    def with_aux(self, params: Params, x: Tensor, y: Tensor):
        out = self.fmodel.batched(params, x)
        per_task = _batched_loss(self.loss, out, y)
        metric = _batched_metric(self.metric, out, y) if self.metric is not None else per_task
        return per_task.sum(), (per_task.detach(), metric.detach())


def value_and_grad(fn: Callable, params: Params, *, create_graph: bool = False):
    """``(grads, aux)`` for ``fn(params) -> (value, aux)``, by reverse-mode autograd.

    ``create_graph=False``: the gradient at ``params`` taken as constants (they are detached first;
    nothing stays attached to a caller's graph). ``create_graph=True``: ``params`` must be part of
    the caller's graph (leaves requiring grad, or tensors computed from them) and the gradient is
    differentiable again, for second-order derivatives.

    Plain ``torch.autograd`` rather than nested ``torch.func.grad`` on the hot path: for explicit
    and first-order MAML on the Omniglot network it holds about half the memory at the same speed
    (``docs/benchmarks.md``, "Implementation choices").
    """
    names = list(params)
    with torch.enable_grad():
        if not create_graph:
            params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        value, aux = fn(params)
        grads = torch.autograd.grad(value, [params[k] for k in names], create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True)
    return dict(zip(names, grads)), aux


def inner_loop(task_loss: TaskLoss, theta: Params, x: Tensor, y: Tensor, *, lr: float, steps: int,
               lam: float | None = None, keep_path: bool = False, create_graph: bool = False):
    """``steps`` of gradient descent on the support loss from ``theta``.

    ``phi_0 = theta``, ``phi_{j+1} = phi_j - lr * grad L(phi_j)``, where ``L`` is the support loss,
    plus ``lam/2 ||phi - theta||^2`` when ``lam`` is given (iMAML's regularised inner problem; the
    proximal centre ``theta`` is a constant of the inner problem).

    ``create_graph=True`` keeps the whole unrolled loop differentiable in ``theta`` (which must then
    require grad; explicit MAML differentiates ``phi_k`` through it, and through the proximal
    centre); otherwise no graph is kept and the iterates are plain tensors. Returns
    ``(phi_k, (loss_0, metric_0), path)``: the support loss and metric at ``theta`` (before
    adaptation; ``None`` if ``steps == 0``) and, with ``keep_path``, the list
    ``[phi_0, ..., phi_{k-1}]`` of iterates (for the reverse recursion of memory-efficient MAML).
    """
    phi, first, path = theta, None, []
    for step in range(steps):
        if keep_path:
            path.append(phi)
        g, aux = value_and_grad(lambda p: task_loss.with_aux(p, x, y), phi, create_graph=create_graph)
        if step == 0:
            first = aux
        with torch.set_grad_enabled(create_graph):
            if lam is None:
                phi = {k: phi[k] - lr * g[k] for k in phi}
            else:
                phi = {k: phi[k] - lr * (g[k] + lam * (phi[k] - theta[k])) for k in phi}
    if not create_graph:
        phi = {k: v.detach() for k, v in phi.items()}
    return phi, first, path


#: Sufficient-decrease constant of :func:`proximal_descent`'s backtracking (Armijo's condition).
ARMIJO_C = 1e-4


def proximal_descent(task_loss: TaskLoss, theta: Params, x: Tensor, y: Tensor, *, lr: float, steps: int,
                     lam: float, max_halvings: int = 30):
    """``steps`` of gradient descent with backtracking on iMAML's proximal inner problem.

    Minimises ``G(phi) = L(phi) + lam/2 ||phi - theta||^2`` (``L`` the support loss) from
    ``phi_0 = theta``. Step ``j`` tries ``phi_j - t grad G(phi_j)`` with ``t = lr`` and halves ``t``
    until Armijo's condition ``G(trial) <= G(phi_j) - ARMIJO_C * t ||grad G(phi_j)||^2`` holds; if it
    fails ``max_halvings`` times the loop stops at ``phi_j``. So ``G`` never increases, whatever the
    curvature: plain gradient descent with a fixed step diverges once the curvature of ``G`` exceeds
    ``2 / lr``, which the implicit meta-gradient, blind to the inner loop, does not prevent. Where
    ``lr`` is small enough for the curvature, no step is halved and the iterates are those of
    :func:`inner_loop` with ``lam``; ``lam=0`` is backtracking gradient descent on ``L`` alone.
    ``task_loss`` needs only ``with_aux``. No graph is kept. Returns
    ``(phi, (loss_0, metric_0), [])`` like :func:`inner_loop`.
    """
    theta = {k: v.detach() for k, v in theta.items()}

    def objective(phi):
        g, aux = value_and_grad(lambda p: task_loss.with_aux(p, x, y), phi)
        with torch.no_grad():
            value = aux[0] + lam / 2 * sum(torch.sum((phi[k] - theta[k]) ** 2) for k in phi)
            g = {k: g[k] + lam * (phi[k] - theta[k]) for k in phi}
        return value, g, aux

    if steps == 0:
        return theta, None, []
    phi = theta
    value, g, first = objective(phi)
    for _ in range(steps):
        slope = sum(torch.sum(v * v) for v in g.values())
        t = lr
        for _ in range(max_halvings + 1):
            with torch.no_grad():
                trial = {k: phi[k] - t * g[k] for k in phi}
            trial_value, trial_g, _ = objective(trial)
            if bool(trial_value <= value - ARMIJO_C * t * slope):  # False for NaN: halve
                break
            t /= 2
        else:
            break
        phi, value, g = trial, trial_value, trial_g
    return phi, first, []


def make_hvp(task_loss: TaskLoss, params: Params, x: Tensor, y: Tensor, mode: str = "fwdrev"):
    """The Hessian-vector product ``v -> H v`` of the task loss at ``params``.

    ``mode="fwdrev"``: forward-over-reverse, ``jvp(grad(L), (params,), (v,))``; each product
    re-runs the forward and backward passes but keeps no graph between products.
    ``mode="revrev"``: reverse-over-reverse; the gradient graph is built once and each product is
    one more backward pass through it (cheaper per product, holds the graph while alive).
    """
    if mode == "fwdrev":
        grad_fn = grad(task_loss)

        def hvp(v: Params) -> Params:
            return jvp(lambda p: grad_fn(p, x, y), (params,), (v,))[1]

        return hvp
    if mode == "revrev":
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            g = torch.autograd.grad(task_loss(leaves, x, y), list(leaves.values()), create_graph=True)
        names = list(leaves)

        def hvp(v: Params) -> Params:
            hv = torch.autograd.grad(g, list(leaves.values()), [v[k] for k in names], retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
            return dict(zip(names, hv))

        return hvp
    raise ValueError(f"unknown hvp mode {mode!r}; expected 'fwdrev' or 'revrev'")
