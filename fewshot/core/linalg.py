"""Linear solvers for the implicit meta-gradient, all with one signature.

``solve(matvec, b, *, maxiter, tol, init) -> SolveResult`` where ``matvec(v)`` applies a linear
operator ``M`` to ``v`` (a tensor or a dict of tensors) and ``SolveResult`` holds the approximate
solution of ``M x = b`` with the number of iterations and the final residual norm
``||b - M x||``. Damping is applied by wrapping ``matvec`` (see :func:`damped`), never inside a
solver, so the solvers are interchangeable values.

The meta-gradient rules take a *configured* solve, ``solve(matvec, b) -> SolveResult``, as
TorchOpt's ``linear_solve`` and jaxopt's ``solve_cg`` do: :func:`solve_cg`, :func:`solve_neumann`,
:func:`solve_minres` and :func:`solve_dense` build one from a solver and its settings.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .tree import Vector, tree_axpy, tree_dot, tree_map, tree_norm, tree_zeros_like

__all__ = ["SolveResult", "cg", "cg_normal", "minres", "neumann", "spectral_radius", "dense", "damped",
           "SOLVERS", "solve_cg", "solve_neumann", "solve_minres", "solve_dense"]


class SolveResult(NamedTuple):
    """Approximate solution of ``M x = b``.

    Attributes
    ----------
    x : tensor or dict of tensors
    n_iter : int
        Matrix-vector products spent on iterations (CG: iterations run; Neumann: series terms
        beyond the first).
    residual : Tensor
        ``||b - M x||`` (0-dim tensor; no host synchronisation needed to build it).
    negative_curvature : bool
        CG met a direction ``p`` with ``p^T M p <= 0`` and stopped before it (``M`` is not
        positive definite there); always ``False`` for the other solvers.
    diverged : bool
        The Neumann series stopped early because its residual grew (with ``stop_on_growth``).
    """

    x: Vector
    n_iter: int
    residual: Tensor
    negative_curvature: bool = False
    diverged: bool = False


def damped(matvec: Callable, damping: float) -> Callable:
    """The operator ``v -> M v + damping * v``."""
    if damping == 0:
        return matvec
    return lambda v: tree_axpy(damping, v, matvec(v))


def cg(matvec: Callable, b: Vector, *, maxiter: int = 10, tol: float | None = 1e-10,
       init: Vector | None = None) -> SolveResult:
    """Conjugate gradient for symmetric positive definite ``M``.

    Stops after ``maxiter`` iterations or when ``||r|| <= tol * ||b||``. With ``tol=None`` it runs
    exactly ``maxiter`` iterations with no data-dependent Python branching (usable under
    ``torch.func.vmap``; a direction with non-positive curvature then contributes a zero step).

    A direction ``p`` with ``p^T M p <= 0`` means ``M`` is not positive definite along ``p``: CG stops
    there with ``negative_curvature=True`` (with ``tol=None`` the step is zeroed instead). On an
    indefinite or badly conditioned ``M`` an iterate can also be far worse than the start (a step
    along a direction of tiny positive curvature is huge), so with ``tol`` set the iterate with the
    smallest residual is returned, ``init`` (default zero) included. For positive definite ``M``
    solved to tolerance that is the last iterate.
    """
    x = tree_zeros_like(b) if init is None else init
    r = b if init is None else tree_axpy(-1.0, matvec(x), b)
    p = r
    rs = tree_dot(r, r)
    b_norm = tree_norm(b)
    best_x, best_rs = x, rs
    n_iter, negative = 0, False
    for _ in range(maxiter):
        if tol is not None and bool(torch.sqrt(rs) <= tol * b_norm):
            break
        mp = matvec(p)
        curvature = tree_dot(p, mp)
        if tol is not None:
            if bool(curvature <= 0):
                negative = True
                break
            alpha = rs / curvature
        else:
            positive = curvature > 0
            alpha = torch.where(positive, rs / torch.where(positive, curvature, 1.0), 0.0)
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, mp, r)
        rs_new = tree_dot(r, r)
        beta = rs_new / torch.where(rs > 0, rs, 1.0)
        p = tree_axpy(beta, p, r)
        rs = rs_new
        n_iter += 1
        if tol is not None and bool(rs < best_rs):
            best_x, best_rs = x, rs
    if tol is None:
        best_x, best_rs = x, rs
    return SolveResult(best_x, n_iter, torch.sqrt(best_rs), negative)


def cg_normal(matvec: Callable, b: Vector, *, maxiter: int = 100, tol: float | None = 1e-10,
              init: Vector | None = None) -> SolveResult:
    """Conjugate gradient on the normal equations ``M^2 x = M b`` of a symmetric ``M``.

    ``M^2`` is positive definite whenever ``M`` is nonsingular, so this solves indefinite systems
    (where :func:`cg` stops at the first direction of non-positive curvature), at two matrix-vector
    products per iteration and the square of ``M``'s condition number. The returned residual is that
    of the original system, ``||b - M x||``. For indefinite systems :func:`minres` converges with
    the condition number itself, not its square.
    """
    result = cg(lambda v: matvec(matvec(v)), matvec(b), maxiter=maxiter, tol=tol, init=init)
    residual = tree_norm(tree_axpy(-1.0, matvec(result.x), b))
    return SolveResult(result.x, result.n_iter, residual, result.negative_curvature)


def minres(matvec: Callable, b: Vector, *, maxiter: int = 100, tol: float | None = 1e-10,
           init: Vector | None = None) -> SolveResult:
    """MINRES (Paige and Saunders, 1975) for symmetric, possibly indefinite ``M``.

    Minimises ``||b - M x||`` over the Krylov space of ``M`` and the initial residual, so the
    residual never grows; one matrix-vector product per iteration and, unlike :func:`cg_normal`,
    convergence governed by ``M``'s condition number, not its square. Stops after ``maxiter``
    iterations or when the residual estimate falls below ``tol * ||b||``. The returned residual is
    computed from the returned ``x`` (one more product). The exact reference of the implicit
    gradient in :mod:`fewshot.diagnostics`, where ``I + H/lam`` is often indefinite on real networks.

    The recurrences are those of scipy.sparse.linalg.minres without a preconditioner.
    """
    x = tree_zeros_like(b) if init is None else init
    r1 = b if init is None else tree_axpy(-1.0, matvec(x), b)
    b_norm = tree_norm(b)
    beta1 = tree_norm(r1)
    n_iter = 0
    if bool(beta1 > 0):
        zero = tree_zeros_like(b)
        y, r2, w, w2 = r1, r1, zero, zero
        old_beta, beta, dbar, eps_n, phibar = 0.0, beta1, 0.0, 0.0, beta1
        cs, sn = -1.0, 0.0
        tiny = torch.finfo(beta1.dtype).eps
        for _ in range(maxiter):
            if tol is not None and bool(phibar <= tol * b_norm):
                break
            v = tree_map(lambda t: t / beta, y)
            y = matvec(v)
            if n_iter > 0:
                y = tree_axpy(-beta / old_beta, r1, y)
            alpha = tree_dot(v, y)
            y = tree_axpy(-alpha / beta, r2, y)
            r1, r2 = r2, y
            old_beta, beta = beta, tree_norm(y)
            # the next plane rotation of the tridiagonal Lanczos matrix
            old_eps = eps_n
            delta = cs * dbar + sn * alpha
            gbar = sn * dbar - cs * alpha
            eps_n = sn * beta
            dbar = -cs * beta
            gamma = torch.clamp(torch.sqrt(gbar ** 2 + beta ** 2), min=tiny)
            cs, sn = gbar / gamma, beta / gamma
            phi, phibar = cs * phibar, sn * phibar
            w1, w2 = w2, w
            w = tree_map(lambda vi, a, c: (vi - old_eps * a - delta * c) / gamma, v, w1, w2)
            x = tree_axpy(phi, w, x)
            n_iter += 1
            if not bool(beta > tiny * beta1):  # the Krylov space is exhausted: x is exact
                break
    residual = tree_norm(tree_axpy(-1.0, matvec(x), b))
    return SolveResult(x, n_iter, residual)


def spectral_radius(matvec: Callable, v: Vector, *, iters: int = 4) -> Tensor:
    """An estimate of the largest eigenvalue magnitude of symmetric ``M``: ``||M u_j||`` after
    ``iters`` power iterations ``u_{j+1} = M u_j / ||M u_j||`` from ``u_0 = v / ||v||`` (``iters``
    matrix-vector products). A lower bound, which rises to ``max |mu|`` as ``iters`` grows when
    ``v`` is not orthogonal to the top eigenvector."""
    norm = tree_norm(v)
    u = tree_map(lambda t: t / torch.clamp(norm, min=torch.finfo(norm.dtype).tiny), v)
    rho = norm * 0
    for _ in range(iters):
        w = matvec(u)
        rho = tree_norm(w)
        u = tree_map(lambda t: t / torch.clamp(rho, min=torch.finfo(rho.dtype).tiny), w)
    return rho


def neumann(matvec: Callable, b: Vector, *, maxiter: int = 4, tol: float | None = None,
            init: Vector | None = None, lr: float | str = 1.0, compute_residual: bool = True,
            stop_on_growth: bool = False, power_iters: int = 4) -> SolveResult:
    """Truncated Neumann series (Richardson iteration) for ``M x = b``.

    Returns ``x_K = lr * sum_{j=0}^{K-1} (I - lr M)^j b`` with ``K = maxiter`` terms, computed with
    ``K - 1`` matrix-vector products (one more gives the residual, since
    ``b - M x_K = (I - lr M)^K b``). The series converges to ``M^{-1} b`` as ``K -> inf`` if and only
    if every eigenvalue ``mu`` of ``M`` satisfies ``0 < lr * mu < 2`` (spectral radius of
    ``I - lr M`` below one); for symmetric positive definite ``M`` any
    ``0 < lr < 2 / lambda_max(M)`` guarantees it. With ``M = I + H / lam`` and ``lr = 1`` the series is
    ``sum_j (-H / lam)^j b``, which converges when every eigenvalue of ``H`` lies in ``(-lam, lam)``.

    ``lr="auto"`` takes ``lr = 1 / rho`` with ``rho`` the :func:`spectral_radius` estimate of
    ``M`` from ``b`` (``power_iters`` more products): the series then converges for positive
    definite ``M`` whenever ``rho`` is above half of ``lambda_max(M)``, whatever its scale.

    ``tol`` stops early when the residual falls below ``tol * ||b||`` (needs ``compute_residual``).
    ``stop_on_growth`` stops when adding a term would make the residual grow (the series is
    diverging) and returns the partial sum with the smallest residual, flagged ``diverged``.
    ``init`` is accepted for interface compatibility and must be ``None``.
    """
    if init is not None:
        raise ValueError("neumann() sums a series from zero; init must be None")
    if maxiter < 1:
        raise ValueError(f"neumann() needs maxiter >= 1 terms, got {maxiter}")
    if isinstance(lr, str):
        if lr != "auto":
            raise ValueError(f"neumann() lr must be a positive number or 'auto', got {lr!r}")
        lr = 1.0 / torch.clamp(spectral_radius(matvec, b, iters=power_iters),
                               min=torch.finfo(tree_norm(b).dtype).tiny)
    term = tree_map(lambda bi: lr * bi, b)
    x = term
    b_norm = tree_norm(b)
    residual = torch.full((), float("nan"), dtype=b_norm.dtype, device=b_norm.device)
    n_iter, diverged = 0, False
    for k in range(1, maxiter + (1 if compute_residual else 0)):
        term = tree_axpy(-lr, matvec(term), term)  # (I - lr M) term
        if compute_residual:
            previous, residual = residual, tree_norm(term) / lr  # residual of x (terms 0..k-1)
            if stop_on_growth and k > 1 and not bool(residual <= previous):
                x, residual, diverged, n_iter = x_previous, previous, True, k - 2
                break
            if k == maxiter or (tol is not None and bool(residual <= tol * b_norm)):
                break
        x_previous = x
        x = tree_axpy(1.0, term, x)
        n_iter = k
    return SolveResult(x, n_iter, residual, False, diverged)


def dense(matvec: Callable, b: Vector, *, maxiter: int | None = None, tol: float | None = None,
          init: Vector | None = None) -> SolveResult:
    """Exact solve by materialising ``M`` column by column (``n`` matvecs): for small problems and
    as the reference in tests. ``maxiter``, ``tol`` and ``init`` are ignored."""
    if isinstance(b, Tensor):
        shapes, flat_b = None, b.reshape(-1)
    else:
        shapes = {k: v.shape for k, v in b.items()}
        flat_b = torch.cat([v.reshape(-1) for v in b.values()])

    def unflatten(v):
        if shapes is None:
            return v.reshape(b.shape)
        out, i = {}, 0
        for k, s in shapes.items():
            n = s.numel()
            out[k] = v[i:i + n].reshape(s)
            i += n
        return out

    def flatten(v):
        return v.reshape(-1) if shapes is None else torch.cat([v[k].reshape(-1) for k in shapes])

    n = flat_b.numel()
    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
    m = torch.stack([flatten(matvec(unflatten(eye[i]))) for i in range(n)], dim=1)
    x = torch.linalg.solve(m, flat_b)
    return SolveResult(unflatten(x), n, torch.linalg.vector_norm(flat_b - m @ x), False)


SOLVERS = {"cg": cg, "cg_normal": cg_normal, "minres": minres, "neumann": neumann, "dense": dense}


class _Configured:
    """``solve(matvec, b)``: ``solver(matvec, b, **settings)``, with ``init=b`` when ``from_rhs``."""

    def __init__(self, name, solver, from_rhs=False, **settings):
        self.name, self.solver, self.from_rhs, self.settings = name, solver, from_rhs, settings

    def __call__(self, matvec: Callable, b: Vector) -> SolveResult:
        return self.solver(matvec, b, init=b if self.from_rhs else None, **self.settings)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{self.name}({args}{', warm_start=True' if self.from_rhs else ''})"

    def __eq__(self, other):
        return isinstance(other, _Configured) and repr(self) == repr(other)

    def __hash__(self):
        return hash(repr(self))


def solve_cg(*, maxiter: int = 10, tol: float | None = 1e-10, warm_start: bool = True) -> Callable:
    """Conjugate gradient (:func:`cg`) as a configured solve; ``warm_start`` starts it from ``b``
    (for ``M = I + H/lam``, the first-order answer) instead of zero."""
    return _Configured("solve_cg", cg, warm_start, maxiter=maxiter, tol=tol)


def solve_neumann(*, terms: int = 4, lr: float | str = 1.0, stop_on_growth: bool = True,
                  power_iters: int = 4) -> Callable:
    """The truncated Neumann series (:func:`neumann`) with ``terms`` terms as a configured solve."""
    return _Configured("solve_neumann", neumann, maxiter=terms, lr=lr, stop_on_growth=stop_on_growth,
                       power_iters=power_iters)


def solve_minres(*, maxiter: int = 100, tol: float | None = 1e-10) -> Callable:
    """MINRES (:func:`minres`) as a configured solve."""
    return _Configured("solve_minres", minres, maxiter=maxiter, tol=tol)


def solve_dense() -> Callable:
    """The exact dense solve (:func:`dense`), for small problems and tests."""
    return _Configured("solve_dense", dense)
