"""Diagnostics of the meta-gradient solvers.

:func:`meta_gradient_fidelity` compares each solver's per-task meta-gradient with the exact one at
the same meta-parameters and on the same tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

import dataclasses

from .core import linalg
from .core.rules import Implicit, ReptileRule, Unrolled
from .core.inner import network_params
from .core.tree import Params, tree_dot, tree_norm
from .estimators._base import MetaLearner
from .tasks import as_task_batch

__all__ = ["meta_gradient_fidelity", "REFERENCES"]

#: What each reference gradient is.
REFERENCES = {
    "unrolled": "exact gradient d Lq(phi_k)/d theta through the estimator's own k-step inner loop "
                "(second order, every meta-parameter: for MAML the MAML gradient)",
    "implicit": "exact implicit gradient (I + H/lam)^-1 grad Lq(phi_k) of the same proximal inner "
                "loop, by CG to convergence",
    "unrolled_proximal": "exact gradient d Lq(phi_k)/d theta through the k-step proximal inner loop "
                         "with fixed steps (explicit differentiation of iMAML's inner loop; with "
                         "backtracking the same loop only where no step was halved)",
}


def _exact_solve(maxiter, tol):
    """The reference solve of ``(I + H/lam) x = b``: conjugate gradient from zero, and where it meets a
    direction of non-positive curvature (the system is indefinite, which plain CG cannot solve),
    MINRES instead, whose convergence depends on the condition number of ``I + H/lam`` rather than
    on its square as conjugate gradient on the normal equations does."""

    def solve(matvec, b):
        result = linalg.cg(matvec, b, maxiter=maxiter, tol=tol)
        if result.negative_curvature:
            result = linalg.minres(matvec, b, maxiter=maxiter, tol=tol)
        return result

    return solve


def _references(est: MetaLearner, rule, cg_steps: int, cg_tol: float) -> dict:
    """``{name: (cache key, rule)}`` of the exact gradients ``est`` is compared with, all on the
    estimator's own inner problem ``inner_``."""
    inner = est.inner_
    if isinstance(rule, Implicit):
        fixed = dataclasses.replace(inner, backtracking=False)
        return {
            "implicit": (("implicit", inner, cg_steps, cg_tol),
                         Implicit(inner, _exact_solve(cg_steps, cg_tol))),
            "unrolled_proximal": (("unrolled_proximal", fixed), Unrolled(fixed)),
        }
    return {"unrolled": (("unrolled", inner), Unrolled(inner))}


def _summary(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def meta_gradient_fidelity(estimators, tasks, *, params: Params | None = None, exact_cg_steps: int = 1000,
                           exact_cg_tol: float = 1e-12) -> list[dict]:
    """Compare each solver's meta-gradient with the exact one, task by task.

    Every estimator computes its per-task meta-gradient (:meth:`~fewshot.MetaLearner.meta_gradient`)
    at the same meta-parameters ``params`` on the same ``tasks``; each is compared with the exact
    gradient of the meta-objective it approximates, computed with the estimator's own model, loss,
    inner step size and inner steps:

    * the estimators whose rule differentiates or approximates the inner loop (MAML, FOMAML,
      Reptile, PenaltyMAML, ANIL, MetaSGD, MAMLPlusPlus): reference ``"unrolled"``, the exact
      second-order gradient of the query loss through the estimator's own inner problem (its
      adapted parameters and learned steps; the gradient covers every meta-parameter, learned
      steps included; for PenaltyMAML the difference is the penalty's contribution);
    * :class:`~fewshot.IMAML` and :class:`~fewshot.NeumannMAML`: reference ``"implicit"``, the
      implicit gradient of the same proximal inner loop with the linear system solved by conjugate
      gradient (``exact_cg_steps`` iterations from zero, tolerance ``exact_cg_tol``), or, where
      ``I + H/lam`` turns out indefinite (CG meets non-positive curvature, and so does IMAML's own
      solver), MINRES (:func:`fewshot.core.linalg.minres`; its residual is reported), and
      reference ``"unrolled_proximal"``, explicit MAML through that proximal inner loop (the two
      agree when the inner problem is solved exactly).

    Parameters
    ----------
    estimators : dict of str to MetaLearner, or list of MetaLearner
        Fitted estimators (``meta_fit`` with ``meta_steps=0`` prepares one without training) of the
        same architecture. A list is named by class name. :class:`~fewshot.FineTune` has no
        meta-gradient and is rejected (``TypeError``).
    tasks : TaskBatch, Task or list of Task
        The tasks (support and query sets) the meta-gradients are computed on.
    params : dict of str to Tensor, optional
        The shared meta-parameters; default the first estimator's ``params_``. Cast to each
        estimator's device and dtype (use ``dtype="float64"`` estimators for tight comparisons).
        The network's parameters must match every estimator's; an estimator's own inner-problem
        meta-parameters (Meta-SGD's and MAML++'s learned steps) are taken from ``params`` when it
        holds them and from the estimator's ``params_`` otherwise, and compared like the weights.
    exact_cg_steps, exact_cg_tol : int, float
        Iteration budget and relative tolerance of the ``"implicit"`` reference's solves (CG or
        MINRES; they stop at the tolerance). The residual each reference reached is reported
        (``reference_residual_max``); residuals measured on Omniglot: ``docs/results.md``.

    Returns
    -------
    list of dict
        One row per (estimator, reference): ``method``, ``solver`` (class name), ``reference``,
        ``n_tasks``, ``cosine_mean``/``cosine_std`` (cosine similarity ``<g, g*>/(||g|| ||g*||)``),
        ``rel_error_mean``/``rel_error_std`` (``||g - g*|| / ||g*||``), ``norm_ratio_mean``
        (``||g|| / ||g*||``), with means and sample standard deviations over tasks, and
        ``reference_residual_max``: for the ``"implicit"`` reference, the largest relative residual
        ``||b - (I + H/lam) x|| / ||b||`` of its solves over the tasks (how exact the reference is;
        ``None`` for the unrolled references, which solve nothing).

        Reptile's pseudo-gradient ``theta - phi_k`` is not an estimate of the meta-gradient: its
        scale is ``inner_lr * inner_steps`` times a support-loss gradient, so only its direction is
        comparable. Its cosine is reported (scale-free) and its relative error is ``nan`` (n/a);
        the error after the best rescaling would be ``sqrt(1 - cosine^2)``, which adds nothing to
        the cosine.

    Examples
    --------
    >>> import fewshot
    >>> from fewshot.diagnostics import meta_gradient_fidelity
    >>> sampler = fewshot.tasks.SinusoidTasks(k_shot=5, n_query=5)
    >>> ests = [cls(meta_steps=0, inner_steps=2, dtype="float64", random_state=0).meta_fit(sampler)
    ...         for cls in (fewshot.MAML, fewshot.FOMAML)]
    >>> rows = meta_gradient_fidelity(ests, sampler.sample(4, random_state=0))
    >>> [(r["method"], r["reference"], round(r["cosine_mean"], 6)) for r in rows][0]
    ('MAML', 'unrolled', 1.0)
    """
    if isinstance(estimators, Mapping):
        named = list(estimators.items())
    elif isinstance(estimators, Sequence) and not isinstance(estimators, str):
        named = [(type(e).__name__, e) for e in estimators]
    else:
        raise TypeError(f"estimators must be a dict of name to estimator or a list of estimators, "
                        f"got {type(estimators).__name__}")
    if not named:
        raise ValueError("estimators is empty: pass at least one fitted estimator")
    rules = {}
    for name, est in named:
        if not isinstance(est, MetaLearner):
            raise TypeError(f"{name}: expected a fewshot estimator, got {type(est).__name__}")
        est._check_fitted()
        rules[name] = est._rule()
        if rules[name] is None:
            raise TypeError(f"{name}: {type(est).__name__} has no meta-gradient to compare; leave it out")
    batch = as_task_batch(tasks)
    theta = named[0][1].params_ if params is None else params
    for name, est in named:
        mine = {k: tuple(v.shape) for k, v in network_params(est.params_).items()}
        given = {k: tuple(v.shape) for k, v in network_params(theta).items()}
        if mine != given:
            raise ValueError(f"{name}: params do not match its model: expected {mine}, got {given}")

    cache: dict = {}
    rows = []
    for name, est in named:
        device, dtype = est._device_dtype()
        # the shared network weights; the inner problem's own meta-parameters (learned steps,
        # per-step copies) from params where it has them, else from the estimator
        point = {k: (theta[k] if k in theta else v).detach().to(device, dtype) for k, v in est.params_.items()}
        grads = est.meta_gradient(batch, params=point)
        moved = batch.to(device, dtype)
        own = len(point) > len(network_params(point))
        for ref_name, (key, rule) in _references(est, rules[name], exact_cg_steps, exact_cg_tol).items():
            key = (*key, str(device), dtype, est.loss_ if isinstance(est.loss_, str) else id(est.loss_),
                   id(type(est.fmodel_.module)), id(est) if own else None)
            if key not in cache:
                cache[key] = est._per_task(rule, point, moved)
            exact = [{k: v.detach() for k, v in ge.items()} for ge, _ in cache[key]]
            # how well the reference itself is solved: max over tasks of ||b - M x|| / ||b||
            residuals = [float(st["solve_residual"]) for _, st in cache[key] if "solve_residual" in st]
            ref_residual = max(residuals) if residuals else None
            cos, rel, ratio = [], [], []
            for g, ge in zip(grads, exact):
                gn, en = float(tree_norm(g)), float(tree_norm(ge))
                diff = float(tree_norm({k: g[k] - ge[k] for k in g}))
                cos.append(float(tree_dot(g, ge)) / (gn * en) if gn > 0 and en > 0 else float("nan"))
                rel.append(diff / en if en > 0 else float("nan"))
                ratio.append(gn / en if en > 0 else float("nan"))
            if isinstance(rules[name], ReptileRule):
                rel = [float("nan")] * len(rel)
            cos_mean, cos_std = _summary(cos)
            rel_mean, rel_std = _summary(rel)
            rows.append({"method": name, "solver": type(est).__name__, "reference": ref_name,
                         "n_tasks": len(batch), "cosine_mean": cos_mean, "cosine_std": cos_std,
                         "rel_error_mean": rel_mean, "rel_error_std": rel_std,
                         "norm_ratio_mean": _summary(ratio)[0], "reference_residual_max": ref_residual})
    return rows
