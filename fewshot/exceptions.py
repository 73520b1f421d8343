"""Errors and warnings raised by fewshot."""

from sklearn.exceptions import NotFittedError

__all__ = ["NotFittedError", "DivergenceError", "SolverWarning", "ConvergenceWarning"]


class DivergenceError(FloatingPointError, RuntimeError):
    """Meta-training produced a non-finite loss or meta-gradient.

    The estimator keeps the last finite meta-parameters in ``params_``; ``step``, ``solver`` and
    ``last_finite`` (the last finite history entries) say where and how it happened.
    """

    def __init__(self, message, *, step=None, solver=None, last_finite=None):
        super().__init__(message)
        self.step, self.solver, self.last_finite = step, solver, last_finite


class SolverWarning(UserWarning):
    """An implicit linear solve met negative curvature or did not reach its tolerance."""


class ConvergenceWarning(UserWarning):
    """An iterative procedure stopped before convergence."""
