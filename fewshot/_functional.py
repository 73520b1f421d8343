"""The functional backend: a model as a pure function ``f(params, x)``, task losses, the inner loop
and Hessian-vector products, all on :mod:`torch.func`.

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

__all__ = ["FunctionalModel", "TaskLoss", "LOSSES", "inner_loop", "make_hvp"]


class FunctionalModel:
    """A pure-function view ``f(params, x)`` of an :class:`nn.Module`.

    Holds a private copy of the module (the user's template is never touched) and its buffers;
    parameters are always passed in, so one instance serves every task of a meta-batch.
    """

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).train()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.buffers = {k: v for k, v in self.module.named_buffers()}

    def init_params(self, device=None, dtype=None) -> Params:
        return {k: v.detach().clone().to(device=device, dtype=dtype)
                for k, v in self.module.named_parameters()}

    def to(self, device=None, dtype=None) -> "FunctionalModel":
        self.module.to(device=device, dtype=dtype)
        self.buffers = {k: v for k, v in self.module.named_buffers()}
        return self

    def __call__(self, params: Params, x: Tensor) -> Tensor:
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


def inner_loop(task_loss: TaskLoss, theta: Params, x: Tensor, y: Tensor, *, lr: float, steps: int,
               lam: float | None = None, keep_path: bool = False):
    """``steps`` of gradient descent on the support loss from ``theta``.

    ``phi_0 = theta``, ``phi_{j+1} = phi_j - lr * grad L(phi_j)``, where ``L`` is the support loss,
    plus ``lam/2 ||phi - theta||^2`` when ``lam`` is given (iMAML's regularised inner problem; the
    proximal centre ``theta`` is a constant of the inner problem).

    Differentiable in ``theta`` when called under an outer :func:`torch.func.grad` (explicit MAML);
    otherwise no graph is kept. Returns ``(phi_k, (loss_0, metric_0), path)``: the support loss and
    metric at ``theta`` (before adaptation; ``None`` if ``steps == 0``) and, with ``keep_path``, the
    list ``[phi_0, ..., phi_{k-1}]`` of iterates (for the reverse recursion of
    memory-efficient MAML).
    """
    grad_fn = grad(task_loss.with_aux, has_aux=True)
    phi, first, path = theta, None, []
    for step in range(steps):
        if keep_path:
            path.append(phi)
        g, aux = grad_fn(phi, x, y)
        if step == 0:
            first = aux
        if lam is None:
            phi = {k: phi[k] - lr * g[k] for k in phi}
        else:
            phi = {k: phi[k] - lr * (g[k] + lam * (phi[k] - theta[k])) for k in phi}
    return phi, first, path


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
