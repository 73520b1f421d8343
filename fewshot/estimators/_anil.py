"""ANIL: MAML whose inner loop adapts only the head."""

from __future__ import annotations

from ..core.rules import FirstOrder, Unrolled
from .._validation import check_choice
from ._base import MetaLearner
from ._params import COMMON_PARAMS, estimator_init
from ._solvers import _doc

__all__ = ["ANIL"]


@_doc
class ANIL(MetaLearner):
    """Almost No Inner Loop: MAML with only the head adapted per task.

    Write theta = (b, h_0): the body ``b`` (every parameter outside ``inner_params``, by default
    everything but the last linear layer) and the head's initialisation ``h_0``. Per task the
    inner loop adapts the head alone, ``h_{j+1} = h_j - alpha * grad_h Ls(b, h_j)``, with the body
    fixed at its meta-parameters; the meta-gradient is the exact total derivative
    ``d Lq(b, h_k(b, h_0)) / d(b, h_0)`` through all k steps (second order: the body's gradient
    includes its direct query term and the terms through the head's steps). ``first_order=True``
    takes ``grad Lq(b, h_k)`` with ``h_k`` held constant instead (FOMAML's approximation).

    With the reference networks (:class:`~fewshot.models.Conv4`, :class:`~fewshot.models.MLP`, or a
    plain ``nn.Sequential``), the body runs once per task and meta-step (on the support and on the
    query set) and the k inner steps run the head alone on those features, so what remains of a
    meta-step is the body's forward and backward pass on the support and query sets. Measured on
    Omniglot 5-way 1-shot with 5 inner steps: 0.14x MAML's meta-step with one query example per
    class, 0.37x with 5, 0.48x with 15 (``benchmarks/results/2026-12-01-redesign.md``). It equals
    :class:`MAML` with a zero inner step on the body (tested).

    Parameters
    ----------
    {common}
    first_order : bool, default=False
        Treat the adapted head as a constant in the meta-gradient.
    {attributes}
    References
    ----------
    Raghu, Raghu, Bengio, Vinyals. Rapid learning or feature reuse? Towards understanding the
    effectiveness of MAML. ICLR 2020.

    Examples
    --------
    >>> import fewshot
    >>> sampler = fewshot.tasks.SinusoidTasks(k_shot=10, n_query=10)
    >>> learner = fewshot.ANIL(meta_steps=5, random_state=0).meta_fit(sampler)
    >>> learner.inner_.adapted(learner.params_)
    ('head.weight', 'head.bias')
    """

    __init__ = estimator_init(**{**COMMON_PARAMS, "inner_params": "head"}, first_order=False)
    _extra_checks = {"first_order": lambda n, v: check_choice(n, str(v), {"True", "False"})}

    def _make_rule(self):
        if self.first_order:
            return FirstOrder(self.inner_, full_stats=self.full_history)
        return Unrolled(self.inner_, full_stats=self.full_history)
