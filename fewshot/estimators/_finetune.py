"""The non-meta baseline: pre-train one network on all meta-training classes, then fit a fresh
head on each new task's support set."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.func import grad

from ..core.functional import FunctionalModel
from ..core.inner import InnerProblem
from ..core.tree import Params
from .._validation import check_number
from ..tasks import LabeledSet
from ._base import MetaLearner
from ._params import COMMON_PARAMS, estimator_init
from ._solvers import _ATTRIBUTES_DOC, _COMMON_DOC

__all__ = ["FineTune"]

_PARAMS = {k: v for k, v in COMMON_PARAMS.items() if k not in ("meta_batch_size", "inner_params")}
_PARAMS.update(inner_lr=0.1, inner_steps=100, batch_size=64, head="auto")


class _HeadLoss:
    """The loss of a linear head on fixed features, ``loss(feats @ W^T + b, y)``, in the task-loss
    protocol of :func:`~fewshot._functional.proximal_descent`."""

    def __init__(self, loss):
        self.loss = loss

    def with_aux(self, head: Params, feats: torch.Tensor, y: torch.Tensor):
        value = self.loss(feats @ head["weight"].T + head["bias"], y)
        return value, (value.detach(), value.detach())


def _check_head(value):
    if not isinstance(value, str):
        raise ValueError(f"head must be 'auto' or the name of an nn.Linear submodule, got {value!r}")


class FineTune(MetaLearner):
    """Transfer-learning baseline (the report's "fine-tuning, head only").

    ``meta_fit`` pre-trains the whole network as an ordinary classifier (or regressor) on pooled
    examples from the sampler's meta-training classes with their *global* labels
    (``sampler.sample_pretraining``): ``meta_steps`` steps of the meta-optimizer at ``meta_lr`` on
    batches of ``batch_size`` examples. For a new task, ``adapt`` freezes the body, replaces the head
    (the last linear layer) by a fresh zero-initialised one with ``n_way`` outputs and fits only it
    by ``inner_steps`` gradient steps on the support loss (a convex problem on fixed features), each
    of size ``inner_lr`` halved until the loss decreases (Armijo backtracking, as
    :func:`~fewshot._functional.proximal_descent` with ``lam=0``), so the fit cannot diverge when
    ``inner_lr`` exceeds ``2 / lambda_max`` of the features' second-moment matrix. No meta-learning
    is involved.

    Parameters
    ----------
    {common}
    batch_size : int, default=64
        Examples per pre-training step (replaces ``meta_batch_size``).
    head : "auto" or str, default="auto"
        Name of the ``nn.Linear`` submodule that is the head; "auto" takes the last one.

    Notes
    -----
    Pre-training learns only what the tasks share in expectation: on families whose pooled targets
    carry no signal, as :class:`~fewshot.tasks.LinearRegressionTasks` with ``w_mean=0``
    (``E[y | x] = 0``), it cannot help and leaves the head worse features than the random ones.

    Here ``inner_lr`` (default 0.1) and ``inner_steps`` (default 100) describe the head fit and
    ``meta_steps``/``meta_lr`` the pre-training. ``history_`` has ``train_loss``, ``train_acc``
    (classification), ``meta_grad_norm`` and ``time`` per pre-training step.
    {attributes}
    """

    __doc__ = __doc__.replace("{common}", _COMMON_DOC[:_COMMON_DOC.index("    inner_params :")]).replace(
        "{attributes}", _ATTRIBUTES_DOC)
    __init__ = estimator_init(**_PARAMS)
    _extra_checks = {"batch_size": functools.partial(check_number, low=1, integer=True),
                     "head": lambda n, v: _check_head(v)}

    def _check_sampler(self, sampler):
        super()._check_sampler(sampler)
        if getattr(sampler, "n_pretrain_outputs", None) is None:
            raise TypeError(f"FineTune needs pooled pre-training data, which {type(sampler).__name__} "
                            "does not provide (it has no sample_pretraining)")

    def _n_model_outputs(self, sampler):
        return int(sampler.n_pretrain_outputs)

    def _setup(self, sampler, device, dtype, seed):
        params = super()._setup(sampler, device, dtype, seed)
        self.n_pretrain_outputs_ = int(sampler.n_pretrain_outputs)
        modules = dict(self.fmodel_.module.named_modules())
        if self.head == "auto":
            linear = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
            if not linear:
                raise ValueError("head='auto' found no nn.Linear layer in the model to use as head")
            self.head_ = linear[-1]
        elif isinstance(modules.get(self.head), nn.Linear):
            self.head_ = self.head
        else:
            raise ValueError(f"head={self.head!r} is not an nn.Linear submodule of the model; "
                             f"its linear layers are {[n for n, m in modules.items() if isinstance(m, nn.Linear)]}")
        return params

    def _make_rule(self):
        return None

    def _inner_problem(self, weights):
        """The head fit of ``adapt``: backtracking gradient descent on the head's support loss."""
        return InnerProblem(int(self.inner_steps), self.inner_lr_, backtracking=True)

    def _draw(self, sampler, gen, device, dtype):
        data = sampler.sample_pretraining(self.batch_size, random_state=gen)
        return data.to(device, dtype)

    def _step(self, executor, rule, params: Params, data: LabeledSet, seeds):
        gen = None if not seeds else torch.Generator(data.x.device).manual_seed(seeds[0])
        with FunctionalModel.seeded(gen):
            g, (loss, metric) = grad(self._task_loss.with_aux, has_aux=True)(params, data.x, data.y)
        stats = {"train_loss": loss}
        if self.task_type_ == "classification":
            stats["train_acc"] = metric
        return g, stats

    def _progress_postfix(self, record):
        return {k: f"{v:.3f}" for k, v in record.items() if k.startswith("train_")}

    def _features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Inputs of the head layer (the body's output)."""
        captured = []
        module = self.fmodel_.module.get_submodule(self.head_)
        handle = module.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
        try:
            with torch.no_grad():
                self.fmodel_.call_module(params, x)  # through the module: the hook must run
        finally:
            handle.remove()
        return captured[0]

    def _adapt_params(self, support) -> Params:
        feats = self._features(self.params_, support.x)
        n_out = self.n_outputs_
        head = {"weight": feats.new_zeros((n_out, feats.shape[1])), "bias": feats.new_zeros((n_out,))}
        head = self.inner_.run(_HeadLoss(self._loss_parts[0]), head, feats, support.y,
                               steps=self._adapt_steps()).phi
        params = dict(self.params_)
        params[f"{self.head_}.weight"], params[f"{self.head_}.bias"] = head["weight"], head["bias"]
        return params
