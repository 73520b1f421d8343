"""An estimator's setup: the sampler's task shapes, the loss, the network, its inner problem and
its rule, resolved once per fit (a mixin of :class:`~fewshot.estimators._base.MetaLearner`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import models as _models
from ..core.functional import LOSSES, FunctionalModel, TaskLoss
from ..core.inner import LR_PREFIX, STEP_PREFIX, InnerProblem
from ..core.tree import Params
from .._validation import check_choice, check_number
from ..tasks import TaskSampler
from ._params import AUTO_INNER_LR

__all__ = ["Setup"]


class Setup:
    """Hooks a solver overrides: ``_make_rule`` (its rule), ``_learn_lr``, ``_per_step()`` and
    ``_lam()`` (how its inner problem differs from plain gradient descent), ``_n_model_outputs``,
    ``_check_sampler`` and ``_setup`` (what it needs from the sampler and the network)."""

    _learn_lr = None

    def _check_sampler(self, sampler):
        if not isinstance(sampler, TaskSampler):
            raise TypeError("meta_fit expects a fewshot.tasks.TaskSampler (for example "
                            f"fewshot.tasks.SinusoidTasks()), got {type(sampler).__name__}")
        # _setup builds the model from these three attributes, so a bad one fails here, by name.
        name = type(sampler).__name__
        check_choice(f"{name}.task_type", sampler.task_type, {"classification", "regression"})
        shape = sampler.input_shape
        if not (isinstance(shape, (tuple, list)) and all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"{name}.input_shape must be a tuple of positive integers, got {shape!r}")
        check_number(f"{name}.n_outputs", sampler.n_outputs, low=1, integer=True)

    def _n_model_outputs(self, sampler) -> int:
        return sampler.n_outputs

    def _setup(self, sampler, device, dtype, seed):
        """Resolve 'auto' choices against the sampler, build the functional model and the inner
        problem; return the initial meta-parameters."""
        self.task_type_ = sampler.task_type
        self.input_shape_ = tuple(sampler.input_shape)
        self.n_outputs_ = int(sampler.n_outputs)
        if isinstance(self.loss, str):
            name = self.loss if self.loss != "auto" else (
                "cross_entropy" if sampler.task_type == "classification" else "mse")
            loss_fn, metric, loss_type = LOSSES[name]
            if loss_type != sampler.task_type:
                raise ValueError(f"loss={name!r} is for {loss_type} but the sampler gives "
                                 f"{sampler.task_type} tasks")
            self.loss_ = name
        else:
            loss_fn = self.loss
            metric = LOSSES["cross_entropy"][1] if sampler.task_type == "classification" else None
            self.loss_ = loss_fn
        self._loss_parts = (loss_fn, metric)
        self.inner_lr_ = AUTO_INNER_LR[sampler.task_type] if self.inner_lr == "auto" else float(self.inner_lr)
        n_out = self._n_model_outputs(sampler)
        if isinstance(self.model, nn.Module):
            module = self.model
        else:
            name = self.model
            if name == "auto":
                name = "conv4" if len(self.input_shape_) == 3 else "mlp"
            module = _models.build_model(name, self.input_shape_, n_out, torch.Generator().manual_seed(seed))
        self.fmodel_ = FunctionalModel(module).to(device=device, dtype=dtype)
        weights = self.fmodel_.init_params(device, dtype)
        self._check_model(weights, n_out, device, dtype)
        self.inner_ = self._inner_problem(weights)
        return {**weights, **self.inner_.meta_parameters(weights)}

    def _check_model(self, weights, n_out, device, dtype):
        clash = [k for k in weights if k.startswith((LR_PREFIX, STEP_PREFIX))]
        if clash:
            raise ValueError(f"the model's parameters {clash} start with {LR_PREFIX!r} or {STEP_PREFIX!r}, the "
                             "prefixes of the inner problem's meta-parameters; rename that submodule")
        x = torch.zeros((2, *self.input_shape_), device=device, dtype=dtype)
        try:
            # first, and alone: it puts the global random state back; a plain forward pass of such a
            # model would move it
            global_rng = self.fmodel_.draws_global_randomness(weights, x)
            if not global_rng:
                with torch.no_grad():
                    out = self.fmodel_(weights, x)
        except Exception as exc:  # the user's network rejected our input: say which shapes met
            raise ValueError(f"model cannot run on inputs of shape [n, {', '.join(map(str, self.input_shape_))}] "
                             f"from the task sampler: {exc}") from exc
        if global_rng:
            raise ValueError("the model draws random numbers from torch's global generator in its forward "
                             "pass (torch.nn.functional.dropout, torch.rand, ...), which fewshot cannot seed "
                             "from random_state: use nn.Dropout/Dropout1d/2d/3d layers, whose masks fewshot "
                             "draws from the estimator's own generator")
        if out.dim() != 2 or out.shape[1] != n_out:
            raise ValueError(f"model outputs have shape {list(out.shape)} for 2 inputs, but the tasks need "
                             f"[2, {n_out}] (n_outputs={n_out})")

    def _lam(self):
        """Proximal weight of the inner problem (``None``: plain support loss)."""
        return None

    def _per_step(self):
        """Parameters of the inner problem with a meta-learned copy per step (``None``: none)."""
        return None

    def _inner_problem(self, weights: Params) -> InnerProblem:
        """The inner problem of meta-training and ``adapt`` (``inner_params`` resolved: see
        :func:`_select`)."""
        inner = InnerProblem(int(self.inner_steps), self.inner_lr_, _select(self, weights), self._learn_lr,
                             self._per_step(), self._lam(), bool(getattr(self, "backtracking", False)))
        inner.adapted(weights)  # a name that matches nothing fails here
        return inner

    @property
    def _task_loss(self) -> TaskLoss:
        return TaskLoss(self.fmodel_, *self._loss_parts)

    def _make_rule(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _rule(self):
        rule = self._make_rule()
        if rule is not None and rule.deterministic and self.fmodel_.random:
            raise ValueError(f"{type(self).__name__} (as configured) needs a deterministic support loss, but "
                             "the model has dropout layers: remove them or set their p to 0")
        return rule


def _select(est, weights: Params):
    """``inner_params`` for :class:`~fewshot.core.inner.InnerProblem`: ``"head"`` names the module or
    parameter called ``head`` when the network has one, else its last ``nn.Linear`` layer."""
    value = getattr(est, "inner_params", None)
    if value != "head" or any(n == "head" or n.startswith("head.") for n in weights):
        return value
    linear = [name for name, m in est.fmodel_.module.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("inner_params='head' found neither a 'head' module nor an nn.Linear layer in the model")
    return linear[-1]
