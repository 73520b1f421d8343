"""MAML++: learned per-layer per-step inner learning rates, the multi-step loss and
derivative-order annealing."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from torch import nn

from ..core.inner import InnerProblem
from ..core.rules import MetaGradientRule, Unrolled
from .._validation import check_choice, check_number
from ._base import MetaLearner
from ._params import COMMON_PARAMS, estimator_init
from ._solvers import _doc

__all__ = ["MAMLPlusPlus", "MultiStepSchedule", "multi_step_weights"]

#: The floor of the non-final weights of the multi-step loss while it is annealed, times 1/k
#: (the authors' code: ``min_value_for_non_final_losses = 0.03 / k``).
NON_FINAL_FLOOR = 0.03


def multi_step_weights(k: int, progress: float) -> tuple:
    """The multi-step loss weights ``(w_1, ..., w_k)`` at ``progress`` in [0, 1] of its annealing,
    as in the authors' code: all ``1/k`` at 0; each non-final weight falls linearly by ``1/k`` per
    unit of progress to the floor ``0.03/k``, the final one rises by ``(k-1)/k`` to at most
    ``1 - (k-1) 0.03/k``. (After the annealing MAML++ uses the final step's loss alone.)"""
    floor = NON_FINAL_FLOOR / k
    early = [max(1.0 / k - progress / k, floor) for _ in range(k - 1)]
    last = min(1.0 / k + progress * (k - 1) / k, 1.0 - (k - 1) * floor)
    return (*early, last)


@dataclass
class MultiStepSchedule(MetaGradientRule):
    """MAML++'s meta-gradient as a schedule of :class:`~fewshot.core.rules.Unrolled` rules.

    Meta-step ``n`` (0-based) uses the multi-step loss ``sum_j w_j Lq(phi_j)`` with the weights
    :func:`multi_step_weights` at progress ``n / msl_steps`` while ``n < msl_steps``, and
    ``Lq(phi_k)`` from then on; and it is first order (support gradients constant: FOMAML's
    gradient for the weights, the exact one through the updates for the learned steps) while
    ``n < first_order_steps``, second order from then on.
    """

    inner: InnerProblem
    msl_steps: int = 0
    first_order_steps: int = 0
    full_stats: bool = field(default=True, kw_only=True)
    batchable = True

    def for_step(self, step: int) -> Unrolled:
        k = self.inner.steps
        weights = multi_step_weights(k, step / self.msl_steps) if step < self.msl_steps and k > 1 else None
        return _unrolled(self.inner, weights, step < self.first_order_steps, self.full_stats)

    def __call__(self, task_loss, theta, task):
        return self.for_step(self.msl_steps + self.first_order_steps)(task_loss, theta, task)


@functools.lru_cache(maxsize=64)
def _unrolled(inner, weights, first_order, full_stats):
    return Unrolled(inner, step_weights=weights, first_order=first_order, full_stats=full_stats)


@_doc
class MAMLPlusPlus(MetaLearner):
    """MAML++ ("How to train your MAML"): MAML with learned per-layer per-step learning rates, the
    multi-step loss and derivative-order annealing.

    Inner loop: ``phi_{j+1} = phi_j - alpha_{j,l} * grad Ls(phi_j)`` where ``alpha_{j,l}`` is a
    scalar per adapted parameter tensor ``l`` (each layer's weight and bias, as the authors' code)
    and step ``j``, the meta-parameter ``params_["inner_lr.<name>"]`` (a vector of length
    ``inner_steps``, initialised to ``inner_lr``; LSLR). ``adapt`` uses the learned rates (the last
    step's beyond ``inner_steps``). The meta-objective of meta-step ``n`` is the multi-step loss
    ``sum_j w_j(n) Lq(phi_j)`` (MSL) over ``multi_step_loss_steps`` meta-steps, its weights
    annealed towards the last step (:func:`multi_step_weights`), then ``Lq(phi_k)``; its gradient,
    with respect to theta and the learning rates, is first order during the first
    ``first_order_steps`` meta-steps (derivative-order annealing, DA) and exact second order after.
    The meta learning rate follows a cosine schedule by default (the paper's CA). During the
    multi-step loss a meta-step evaluates the query loss after every inner step (2.6x MAML's
    meta-step on Omniglot with 5 steps); after it, a meta-step costs about MAML's. With
    ``multi_step_loss_steps=0``, ``first_order_steps=0`` and rates that stay equal this is MAML
    (tested; the rates still learn unless ``meta_lr`` leaves them, so MAML++ differs from MAML
    after the first step).

    ``per_step_bn=True`` gives every batch-normalisation layer's weight and bias a meta-learned copy
    per inner step (BNWB; ``params_["inner_step.<j>.<name>"]`` for steps 1..k, the parameter
    itself for step 0, copy k for the adapted network), which the inner loop does not adapt. Not
    included: per-step running statistics (BNRS): fewshot normalises every batch with its own
    statistics, as MAML does.

    Parameters
    ----------
    {common}
    multi_step_loss_steps : int, default=200
        Meta-steps over which the multi-step loss is annealed (0: the final step's loss only).
    first_order_steps : int, default=0
        Meta-steps computed to first order at the start (derivative-order annealing).
    per_step_bn : bool, default=False
        Per-step batch-normalisation weights and biases (BNWB, above).
    {attributes}
    References
    ----------
    Antoniou, Edwards, Storkey. How to train your MAML. ICLR 2019.

    Examples
    --------
    >>> import fewshot
    >>> sampler = fewshot.tasks.SinusoidTasks(k_shot=10, n_query=10)
    >>> learner = fewshot.MAMLPlusPlus(meta_steps=5, random_state=0).meta_fit(sampler)
    >>> learner.params_["inner_lr.head.weight"].shape
    torch.Size([5])
    """

    __init__ = estimator_init(**{**COMMON_PARAMS, "meta_lr_schedule": "cosine"}, multi_step_loss_steps=200,
                              first_order_steps=0, per_step_bn=False)
    _extra_checks = {"multi_step_loss_steps": functools.partial(check_number, low=0, integer=True),
                     "first_order_steps": functools.partial(check_number, low=0, integer=True),
                     "per_step_bn": lambda n, v: check_choice(n, str(v), {"True", "False"})}
    _learn_lr = "per_layer_per_step"

    def _per_step(self):
        if not self.per_step_bn:
            return None
        names = tuple(f"{module}.{p}" if module else p for module, m in self.fmodel_.module.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      for p in ("weight", "bias") if getattr(m, p, None) is not None)
        if not names:
            raise ValueError("per_step_bn=True needs batch-normalisation layers with affine weights; the model "
                             "has none")
        return names

    def _make_rule(self):
        return MultiStepSchedule(self.inner_, int(self.multi_step_loss_steps), int(self.first_order_steps),
                                 full_stats=self.full_history)
