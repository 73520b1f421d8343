"""Errors and warnings raised by fewshot."""

from sklearn.exceptions import NotFittedError

__all__ = ["NotFittedError", "DivergenceError", "SolverWarning", "ConvergenceWarning"]


class DivergenceError(FloatingPointError, RuntimeError):
    """Meta-training produced a non-finite loss or meta-gradient, or broke down: adaptation raised
    the mean support loss in many consecutive meta-steps (the inner loop diverges there).

    For non-finite values the estimator keeps the last finite meta-parameters in ``params_``;
    after a breakdown ``params_`` are those of the last step taken. ``step``, ``solver`` and
    ``last_finite`` (the last history entries) say where and how it happened.
    """

    def __init__(self, message, *, step=None, solver=None, last_finite=None):
        super().__init__(message)
        self.step, self.solver, self.last_finite = step, solver, last_finite


class SolverWarning(UserWarning):
    """An implicit linear solve met negative curvature or did not reach its tolerance."""


class ConvergenceWarning(UserWarning):
    """An iterative procedure stopped before convergence."""
