"""The functional backend: a model as a pure function ``f(params, x)`` (``torch.func.functional_call``),
task losses, gradients and the inner loop (reverse-mode ``torch.autograd`` on those functions, see
:func:`value_and_grad`) and Hessian-vector products (``torch.func.jvp`` of the gradient, or
reverse-over-reverse autograd).

Every solver, at training time and in ``adapt``, goes through these few functions.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from .tree import Params

__all__ = ["FunctionalModel", "TaskLoss", "BatchedTaskLoss", "LOSSES", "value_and_grad", "make_hvp"]


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
    from ..models import MLP, Conv4, MaxPool2x2

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


_RANDOMNESS = threading.local()  # .generator: where the dropout layers of this thread draw masks


class _SeededDropout(nn.Module):
    """``nn.Dropout`` (``channels=False``) or ``nn.Dropout1d/2d/3d`` (``channels=True``: one mask
    entry per example and channel) drawing its masks from the generator of
    :meth:`FunctionalModel.seeded`, and the identity outside it (inference)."""

    def __init__(self, p: float, channels: bool):
        super().__init__()
        self.p, self.channels = float(p), channels

    def forward(self, x: Tensor) -> Tensor:
        gen = getattr(_RANDOMNESS, "generator", None)
        if gen is None or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        shape = (*x.shape[:2], *([1] * (x.dim() - 2))) if self.channels else x.shape
        keep = torch.rand(shape, generator=gen, device=x.device, dtype=x.dtype) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


_DROPOUT = {nn.Dropout: False, nn.Dropout1d: True, nn.Dropout2d: True, nn.Dropout3d: True}


def _seed_dropout(module: nn.Module) -> bool:
    """Replace, in place, every dropout layer of ``module`` by a :class:`_SeededDropout`; return
    whether any has ``p > 0``. Alpha dropout (which draws from the global generator and keeps
    SELU's statistics) is refused."""
    random = False
    for name, child in list(module.named_children()):
        if type(child) in _DROPOUT:
            setattr(module, name, _SeededDropout(child.p, _DROPOUT[type(child)]))
            random |= child.p > 0
        elif isinstance(child, (nn.AlphaDropout, nn.FeatureAlphaDropout)):
            raise ValueError(f"{type(child).__name__} layers are not supported: fewshot draws dropout masks "
                             "from the estimator's own generator, which it does for nn.Dropout and "
                             "nn.Dropout1d/2d/3d only")
        else:
            random |= _seed_dropout(child)
    return random


class FunctionalModel:
    """A pure-function view ``f(params, x)`` of an :class:`nn.Module`.

    Holds a private copy of the module (the user's template is never touched) and its buffers;
    parameters are always passed in, so one instance serves every task of a meta-batch. The
    reference networks of :mod:`fewshot.models` are evaluated layer by layer with
    ``torch.nn.functional`` (see :func:`_direct_plan`); any other module through
    ``torch.func.functional_call``.

    The model boundary, for any module:

    - The copy runs in training mode: BatchNorm normalises every batch with its own statistics,
      in meta-training and adaptation alike (as MAML does).
    - Buffers are constants: read, never written. Each call gets fresh copies, so BatchNorm's
      running statistics are neither updated nor used, and calls from many threads do not race.
    - ``nn.Dropout`` and ``nn.Dropout1d/2d/3d`` layers draw their masks from the generator set by
      :meth:`seeded` (the estimator's own, seeded from ``random_state``; never torch's global
      generator) and are the identity outside it: predictions are repeatable. Alpha dropout is
      refused; randomness drawn inside ``forward`` from the global generator (``F.dropout``,
      ``torch.rand``) is detected by :meth:`draws_global_randomness`.
    """

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).train()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.random = _seed_dropout(self.module)
        self.buffers = {k: v for k, v in self.module.named_buffers()}
        self._plan = _direct_plan(self.module)
        self._batch_plan = _batched_plan(self._plan)

    @staticmethod
    @contextlib.contextmanager
    def seeded(generator: torch.Generator | None):
        """Dropout masks of this thread's forward passes come from ``generator`` inside the block
        (``None``: dropout off)."""
        previous = getattr(_RANDOMNESS, "generator", None)
        _RANDOMNESS.generator = generator
        try:
            yield
        finally:
            _RANDOMNESS.generator = previous

    def draws_global_randomness(self, params: Params, x: Tensor) -> bool:
        """Whether a forward pass on ``x`` changes torch's global random state (the CPU generator
        and, for CUDA inputs, the device's): the module draws random numbers fewshot cannot seed."""
        cuda = x.device.type == "cuda"
        before = torch.random.get_rng_state(), (torch.cuda.get_rng_state(x.device) if cuda else None)
        with torch.no_grad(), self.seeded(torch.Generator(x.device).manual_seed(0)):
            self(params, x)
        after = torch.random.get_rng_state(), (torch.cuda.get_rng_state(x.device) if cuda else None)
        changed = not torch.equal(before[0], after[0]) or (cuda and not torch.equal(before[1], after[1]))
        if changed:  # put the user's global state back as it was
            torch.random.set_rng_state(before[0])
            if cuda:
                torch.cuda.set_rng_state(before[1], x.device)
        return changed

    def split_index(self, names) -> int | None:
        """The first layer that holds one of the parameters ``names``, when the network runs layer
        by layer and that layer is not the first (so the layers before it, none of them holding
        one of ``names``, can run once on their own); ``None`` otherwise."""
        if self._plan is None:
            return None
        owners = [i for i, (_, prefix) in enumerate(self._plan) if any(n.startswith(prefix) for n in names)]
        return min(owners) if owners and min(owners) > 0 else None

    def layers(self, start: int, stop: int | None = None) -> "_Layers":
        """Layers ``start .. stop - 1`` of the network as a function ``f(params, x)``."""
        return _Layers(self, start, stop)

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
            buffers = {k: v.clone() for k, v in self.buffers.items()}  # constants: writes are dropped
            return functional_call(self.module, (params, buffers), (x,))
        return functional_call(self.module, params, (x,))


class _Layers:
    """A contiguous run of a :class:`FunctionalModel`'s layers, called like the model."""

    def __init__(self, fmodel: FunctionalModel, start: int, stop: int | None):
        self.fmodel, self.start, self.stop = fmodel, start, stop

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        return _direct_forward(self.fmodel._plan[self.start:self.stop], params, x)

    def batched(self, params: Params, x: Tensor) -> Tensor:
        return _batched_forward(self.fmodel._batch_plan[self.start:self.stop], params, x)


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
    accuracy for classification and the loss itself otherwise. ``hvp_mode`` is the kind of
    Hessian-vector product (:func:`make_hvp`) the rules use with it, chosen once by whoever runs
    the meta-step.
    """

    def __init__(self, fmodel: FunctionalModel, loss: Callable, metric: Callable | None,
                 hvp_mode: str = "fwdrev"):
        self.fmodel, self.loss, self.metric, self.hvp_mode = fmodel, loss, metric, hvp_mode
        self._splits = {}

    def split(self, names):
        """``(features, head_loss)`` when the network splits before every parameter in ``names``
        (:meth:`FunctionalModel.split_index`): ``features(params, x)`` runs the layers before the
        split and ``head_loss`` is this loss of the layers from it on, so that
        ``self(params, x, y) == head_loss(params, features(params, x), y)``; else ``None``."""
        names = tuple(names)
        if names not in self._splits:
            i = self.fmodel.split_index(names) if isinstance(self.fmodel, FunctionalModel) else None
            self._splits[names] = None if i is None else (
                self._run(self.fmodel.layers(0, i)),
                type(self)(self.fmodel.layers(i), self.loss, self.metric, self.hvp_mode))
        return self._splits[names]

    @staticmethod
    def _run(layers):
        return layers

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

    @staticmethod
    def _run(layers):
        return layers.batched

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


def make_hvp(fn: Callable, params: Params, mode: str = "fwdrev"):
    """The Hessian-vector product ``v -> H v`` of the scalar function ``fn`` at ``params``.

    ``mode="fwdrev"``: forward-over-reverse, ``jvp(grad(fn), (params,), (v,))``; each product
    re-runs the forward and backward passes but keeps no graph between products.
    ``mode="revrev"``: reverse-over-reverse; the gradient graph is built once and each product is
    one more backward pass through it (cheaper per product, holds the graph while alive).
    """
    if mode == "fwdrev":
        grad_fn = grad(fn)

        def hvp(v: Params) -> Params:
            return jvp(grad_fn, (params,), (v,))[1]

        return hvp
    if mode == "revrev":
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            g = torch.autograd.grad(fn(leaves), list(leaves.values()), create_graph=True)
        names = list(leaves)

        def hvp(v: Params) -> Params:
            hv = torch.autograd.grad(g, list(leaves.values()), [v[k] for k in names], retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
            return dict(zip(names, hv))

        return hvp
    raise ValueError(f"unknown hvp mode {mode!r}; expected 'fwdrev' or 'revrev'")
