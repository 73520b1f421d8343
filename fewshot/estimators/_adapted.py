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
from .._validation import check_inputs, check_targets

__all__ = ["AdaptedModel", "Evaluation", "confidence_interval"]


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
