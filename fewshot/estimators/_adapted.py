"""What adaptation returns: a model adapted to one support set, and scores over many tasks."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from ..core.functional import FunctionalModel
from ..core.tree import Params
from .._validation import check_inputs, check_labeled_set, check_number, check_targets
from ..exceptions import NotFittedError
from ..tasks import TaskSampler, as_task_batch

__all__ = ["AdaptedModel", "Evaluation", "Adaptation", "confidence_interval"]


class Evaluation(NamedTuple):
    """Scores of an adapted model over held-out tasks.

    ``mean`` is the mean per-task score (query accuracy for classification, negative query MSE for
    regression), ``ci95`` the half-width of its 95% normal confidence interval
    (``1.96 * std / sqrt(n_tasks)``, the convention of the few-shot literature) and ``scores`` the
    per-task scores.
    """

    mean: float
    ci95: float
    scores: np.ndarray

    def __str__(self):
        return f"{self.mean:.4f} +- {self.ci95:.4f} (95% CI, {len(self.scores)} tasks)"


def confidence_interval(scores) -> tuple[float, float]:
    scores = np.asarray(scores, dtype=float)
    if scores.size < 2:
        return float(scores.mean()), float("nan")
    return float(scores.mean()), float(1.96 * scores.std(ddof=1) / math.sqrt(scores.size))


class AdaptedModel:
    """A model adapted to one task's support set: ``predict``, ``predict_proba``, ``score``.

    Created by ``estimator.adapt(support)``; holds its own parameters and never changes the
    estimator. With ``transductive=True`` a batch of inputs is normalised with its own batch
    statistics (BatchNorm in training mode, as MAML evaluates); with ``transductive=False`` each
    input is predicted in a batch made of the support set plus that input alone, so predictions do
    not depend on the other query examples.

    Inputs ``x`` (and ``score``'s targets ``y``) may be tensors or anything :func:`torch.as_tensor`
    accepts (NumPy arrays, nested lists); they are checked as ``adapt`` checks the support set:
    floating-point ``x`` of shape ``[n, *input_shape]`` without NaN or infinities (cast to the
    estimator's dtype and device), integer class labels in ``0 .. n_way - 1``, regression targets of
    shape ``[n, n_outputs]`` (or ``[n]`` for one output). Bad inputs raise ``TypeError`` or
    ``ValueError`` naming the argument.
    """

    def __init__(self, fmodel: FunctionalModel, params: Params, *, task_type, n_outputs, input_shape,
                 support, transductive, dtype, device):
        self.fmodel, self.params = fmodel, params
        self.task_type, self.n_outputs, self.input_shape = task_type, n_outputs, tuple(input_shape)
        self.support, self.transductive = support, transductive
        self.dtype, self.device = dtype, device

    def __repr__(self) -> str:
        outputs = "n_way" if self.task_type == "classification" else "n_outputs"
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"AdaptedModel(task_type={self.task_type!r}, {outputs}={self.n_outputs}, "
                f"input_shape={self.input_shape}, support={len(self.support)} examples, "
                f"transductive={self.transductive}, device={self.device}, dtype={dtype})")

    def _check_x(self, x) -> Tensor:
        x = check_inputs(x, self.input_shape, "x")
        return x.to(device=self.device, dtype=self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Raw outputs (logits for classification), ``[n, n_outputs]``."""
        return self._outputs(self._check_x(x))

    __call__ = forward

    def _outputs(self, x: Tensor) -> Tensor:
        """Outputs for inputs already checked and on the model's device and dtype."""
        with torch.no_grad():
            if self.transductive:
                return self.fmodel(self.params, x)
            xs = self.support.x

            def one(xi):
                return self.fmodel(self.params, torch.cat([xs, xi[None]]))[-1]

            return vmap(one)(x)

    def predict(self, x: Tensor) -> Tensor:
        """Class labels (classification) or predicted targets (regression)."""
        out = self.forward(x)
        return out.argmax(-1) if self.task_type == "classification" else out

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (softmax of the logits); classification only."""
        if self.task_type != "classification":
            raise AttributeError("predict_proba is only available for classification tasks")
        return torch.softmax(self.forward(x), dim=-1)

    def score(self, x: Tensor, y: Tensor) -> float:
        """Accuracy (classification) or negative mean squared error (regression) on ``(x, y)``."""
        x = self._check_x(x)
        y = check_targets(y, x, "y", task_type=self.task_type, n_outputs=self.n_outputs)
        return self._score(x, y)

    def _score(self, x: Tensor, y: Tensor) -> float:
        """``score`` of inputs and targets already checked; ``x`` on the model's device and dtype."""
        out = self._outputs(x)
        y = y.to(out.device)
        if self.task_type == "classification":
            return float((out.argmax(-1) == y).double().mean())
        return -float(((out - y.reshape(out.shape).to(out.dtype)) ** 2).mean())


class Adaptation:
    """``adapt``, ``evaluate`` and ``score`` of a fitted estimator, on its inner problem ``inner_``
    (a mixin of :class:`~fewshot.estimators._base.MetaLearner`)."""

    def _device_dtype(self):
        p = next(iter(self.params_.values()))
        return p.device, p.dtype

    def _adapt_steps(self):
        return self.inner_steps if self.adapt_steps is None else self.adapt_steps

    def _adapt_params(self, support) -> Params:
        """The inner problem's answer on ``support`` (``adapt_steps`` steps, dropout off)."""
        return self.inner_.run(self._task_loss, self.params_, support.x, support.y, steps=self._adapt_steps()).phi

    def adapt(self, support) -> AdaptedModel:
        """Adapt the meta-parameters to one task's ``support`` set (a ``LabeledSet`` or ``(x, y)``).

        Runs the estimator's inner problem ``inner_`` (``adapt_steps``, default ``inner_steps``;
        dropout layers off, so the result is a function of the support set) and returns a new
        :class:`AdaptedModel`; the estimator is not changed.
        """
        self._check_fitted()
        device, dtype = self._device_dtype()
        support = check_labeled_set(support, input_shape=self.input_shape_, task_type=self.task_type_,
                                    n_outputs=self.n_outputs_, name="support", require_all_classes=True)
        return self._adapted(support.to(device, dtype), device, dtype)

    def _adapted(self, support, device, dtype) -> AdaptedModel:
        """Adapt to a support set already validated and on the estimator's device and dtype."""
        return AdaptedModel(self.fmodel_, self._adapt_params(support), task_type=self.task_type_,
                            n_outputs=self.n_outputs_, input_shape=self.input_shape_, support=support,
                            transductive=self.transductive, dtype=dtype, device=device)

    def evaluate(self, tasks, *, n_tasks=600, random_state=0) -> Evaluation:
        """Adapt to each task's support set and score its query set.

        ``tasks`` is a :class:`~fewshot.tasks.TaskSampler` (``n_tasks`` tasks are drawn with
        ``random_state``, so the same seed gives the same pool for every estimator), a
        :class:`~fewshot.tasks.TaskBatch`, a :class:`~fewshot.tasks.Task` or a list of tasks.
        """
        self._check_fitted()
        if isinstance(tasks, TaskSampler):
            check_number("n_tasks", n_tasks, low=1, integer=True)
            tasks = tasks.sample(n_tasks, random_state=random_state)
        device, dtype = self._device_dtype()
        batch = self._check_batch(as_task_batch(tasks).to(device, dtype), name="tasks")  # checked once
        scores = [self._adapted(task.support, device, dtype)._score(task.query.x, task.query.y)
                  for task in batch]
        mean, ci = confidence_interval(scores)
        return Evaluation(mean, ci, np.asarray(scores))

    def score(self, tasks, n_tasks=600, random_state=0) -> float:
        """Mean query accuracy (classification) or negative MSE (regression) after adaptation over
        held-out tasks; :meth:`evaluate` also gives the 95% confidence interval."""
        return self.evaluate(tasks, n_tasks=n_tasks, random_state=random_state).mean

    def _check_fitted(self):
        # sklearn's check_is_fitted insists on a `fit` method; meta-learners have `meta_fit`.
        if not hasattr(self, "params_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call "
                                 "'meta_fit' with a task sampler before using this estimator.")

    def __sklearn_is_fitted__(self):
        return hasattr(self, "params_")
