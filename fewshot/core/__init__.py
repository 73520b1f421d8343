"""The functional core beneath the estimators: networks as functions, the inner problem, the
meta-gradient rules, Hessian-vector products and linear solves.

A new solver is a :class:`MetaGradientRule` on an :class:`InnerProblem`; a new inner loop variant
(which parameters adapt, how each step updates them) is an :class:`InnerProblem`. The estimators
(:mod:`fewshot.estimators`) wrap these in the scikit-learn contract.
"""

from . import linalg
from .functional import LOSSES, BatchedTaskLoss, FunctionalModel, TaskLoss, make_hvp, value_and_grad
from .inner import LR_PREFIX, STEP_PREFIX, InnerProblem, InnerResult, network_params
from .rules import (FirstOrder, Implicit, MetaGradientRule, ReptileRule, Unrolled, penalty_objective,
                    query_objective, task_stats)

__all__ = ["FunctionalModel", "TaskLoss", "BatchedTaskLoss", "LOSSES", "value_and_grad", "make_hvp",
           "InnerProblem", "InnerResult", "LR_PREFIX", "STEP_PREFIX", "network_params", "MetaGradientRule", "Unrolled",
           "FirstOrder", "ReptileRule", "Implicit", "query_objective", "penalty_objective", "task_stats",
           "linalg"]
