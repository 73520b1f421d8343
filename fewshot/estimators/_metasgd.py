"""Meta-SGD: MAML with per-parameter inner learning rates learned with the initialisation."""

from __future__ import annotations

from ..core.rules import Unrolled
from .._validation import check_choice
from ._base import MetaLearner
from ._params import COMMON_PARAMS, estimator_init
from ._solvers import _doc

__all__ = ["MetaSGD"]


@_doc
class MetaSGD(MetaLearner):
    """Meta-SGD: the initialisation and an elementwise inner step size, both meta-learned.

    The meta-parameters are theta and ``alpha``, a tensor shaped like each adapted parameter
    (``params_["inner_lr.<name>"]``, initialised to ``inner_lr``). Per task,
    ``phi_0 = theta``, ``phi_{j+1} = phi_j - alpha * grad Ls(phi_j)`` elementwise, and the
    meta-gradient is the exact total derivative of ``Lq(phi_k)`` with respect to theta and alpha
    through all k steps. For one step, ``dLq/dtheta = (I - H diag(alpha)) grad Lq(phi_1)`` and
    ``dLq/dalpha = -grad Ls(theta) * grad Lq(phi_1)`` (tested against these and against finite
    differences). ``first_order=True`` treats the support gradients as constants: theta gets
    ``grad Lq(phi_k)`` (FOMAML's) and alpha still its exact gradient through the updates,
    ``-sum_j grad Ls(phi_j) * grad Lq(phi_k)``. ``alpha`` is not constrained to be positive (as
    in the paper); ``adapt`` uses the learned ``alpha``.

    Parameters
    ----------
    {common}
    first_order : bool, default=False
        Drop the Hessian terms (see above).
    {attributes}
    Notes
    -----
    ``inner_steps`` defaults to 1, the paper's inner loop.

    References
    ----------
    Li, Zhou, Chen, Li. Meta-SGD: learning to learn quickly for few-shot learning.
    arXiv:1707.09835, 2017.

    Examples
    --------
    >>> import fewshot
    >>> sampler = fewshot.tasks.SinusoidTasks(k_shot=10, n_query=10)
    >>> learner = fewshot.MetaSGD(meta_steps=5, random_state=0).meta_fit(sampler)
    >>> learner.params_["inner_lr.head.weight"].shape == learner.params_["head.weight"].shape
    True
    """

    __init__ = estimator_init(**{**COMMON_PARAMS, "inner_steps": 1}, first_order=False)
    _extra_checks = {"first_order": lambda n, v: check_choice(n, str(v), {"True", "False"})}
    _learn_lr = "per_parameter"

    def _make_rule(self):
        return Unrolled(self.inner_, first_order=bool(self.first_order), full_stats=self.full_history)
