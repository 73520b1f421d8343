"""Every meta-gradient rule against its closed form on random quadratics (float64).

Support loss Ls(phi) = 1/2 (phi - a)^T A (phi - a), query loss Lq(phi) = 1/2 (phi - b)^T B (phi - b),
A and B symmetric positive definite with bounded condition number, dimension 1 to 8.
"""

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fewshot
from fewshot import linalg
from fewshot.core.inner import InnerProblem
from fewshot.core.rules import FirstOrder, Implicit, ReptileRule, Unrolled, penalty_objective, query_objective
from fewshot.tasks import LabeledSet, Task

from _util import QuadraticLoss, spd

DT = torch.float64


@st.composite
def problems(draw):
    n = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    A, B = spd(rng, n, draw(st.floats(1.0, 20.0))), spd(rng, n, draw(st.floats(1.0, 20.0)))
    a, b, theta = (torch.tensor(rng.standard_normal(n)) for _ in range(3))
    task = Task(LabeledSet(A, a), LabeledSet(B, b))
    return dict(n=n, A=A, B=B, a=a, b=b, theta={"phi": theta}, task=task, I=torch.eye(n, dtype=DT))


lrs = st.floats(0.05, 0.9)
steps = st.integers(1, 6)
lams = st.floats(0.1, 10.0)
close = functools.partial(torch.testing.assert_close, rtol=1e-9, atol=1e-10)


def gd_iterate(p, lr, k, lam=None):
    """phi_k of (proximal) gradient descent on Ls, in closed form by iteration of the affine map."""
    A, a, th = p["A"], p["a"], p["theta"]["phi"]
    phi = th.clone()
    for _ in range(k):
        g = A @ (phi - a) + (0 if lam is None else lam * (phi - th))
        phi = phi - lr * g
    return phi


@settings(max_examples=40, deadline=None)
@given(problems(), lrs, steps)
def test_maml_equals_closed_form(p, lr, k):
    phi_k = p["a"] + torch.linalg.matrix_power(p["I"] - lr * p["A"], k) @ (p["theta"]["phi"] - p["a"])
    expected = torch.linalg.matrix_power(p["I"] - lr * p["A"], k) @ p["B"] @ (phi_k - p["b"])
    for memory_efficient in (False, True):
        rule = Unrolled(InnerProblem(k, lr), query_objective, memory_efficient=memory_efficient)
        g, _ = rule(QuadraticLoss(), p["theta"], p["task"])
        close(g["phi"], expected)


@settings(max_examples=40, deadline=None)
@given(problems(), lrs, steps)
def test_fomaml_and_reptile_closed_form(p, lr, k):
    phi_k = gd_iterate(p, lr, k)
    g, _ = FirstOrder(InnerProblem(k, lr))(QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], p["B"] @ (phi_k - p["b"]))
    g, _ = ReptileRule(InnerProblem(k, lr))(QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], p["theta"]["phi"] - phi_k)


def implicit(lr, k, lam, solve, iters, tol=None, eta=None):
    """The implicit rule on the proximal problem (k steps of lr, weight lam) with ``solve`` one of
    ``linalg.cg`` (warm-started from grad Lq, ``iters`` iterations, tolerance ``tol``),
    ``linalg.neumann`` (``iters`` terms with step ``eta``, no cut) or ``linalg.dense``."""
    if solve is linalg.cg:
        configured = linalg.solve_cg(maxiter=iters, tol=tol, warm_start=True)
    elif solve is linalg.neumann:
        configured = linalg.solve_neumann(terms=iters, lr=1.0 if eta is None else eta, stop_on_growth=False)
    else:
        assert solve is linalg.dense
        configured = linalg.solve_dense()
    return Implicit(InnerProblem(k, lr, lam=lam), configured)


@settings(max_examples=40, deadline=None)
@given(problems(), lams)
def test_imaml_cg_equals_closed_form_at_exact_minimiser(p, lam):
    A, B, a, b, I, th = p["A"], p["B"], p["a"], p["b"], p["I"], p["theta"]["phi"]
    phi_star = torch.linalg.solve(A + lam * I, A @ a + lam * th)
    expected = lam * torch.linalg.solve(A + lam * I, B @ (phi_star - b))
    # Proximal GD contracts with factor max|1 - lr (mu + lam)| < 1; enough steps reach phi* to 1e-13.
    lr = 1.0 / (1.0 + lam)
    k = int(np.ceil(np.log(1e-15) / np.log(1 - lr * lam))) + 1
    g, stats = implicit(lr, k, lam, linalg.cg, p["n"] + 2, 1e-14)(QuadraticLoss(), p["theta"], p["task"])
    torch.testing.assert_close(g["phi"], expected, rtol=1e-8, atol=1e-9)
    assert stats["solve_residual"] < 1e-10


@settings(max_examples=40, deadline=None)
@given(problems(), lams, lrs, steps)
def test_imaml_cg_solves_the_system_at_its_own_iterate(p, lam, lr, k):
    """With few inner steps CG still returns (I + A/lam)^{-1} grad Lq(phi_k) exactly."""
    phi_k = gd_iterate(p, lr, k, lam)
    M = p["I"] + p["A"] / lam
    expected = torch.linalg.solve(M, p["B"] @ (phi_k - p["b"]))
    g, _ = implicit(lr, k, lam, linalg.cg, p["n"] + 2, 1e-14)(QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], expected)
    g, _ = implicit(lr, k, lam, linalg.dense, 0)(QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], expected)


@settings(max_examples=40, deadline=None)
@given(problems(), lams, lrs, steps, st.floats(0.0, 30.0))
def test_imaml_damping_solves_the_damped_system_at_the_undamped_iterate(p, lam, lr, k, damping):
    """``damping`` enters the linear system only: (I + A/(lam + damping))^{-1} grad Lq(phi_k), with
    phi_k the iterate of the proximal loop with lam itself."""
    phi_k = gd_iterate(p, lr, k, lam)
    M = p["I"] + p["A"] / (lam + damping)
    expected = torch.linalg.solve(M, p["B"] @ (phi_k - p["b"]))
    rule = Implicit(InnerProblem(k, lr, lam=lam), linalg.solve_cg(maxiter=p["n"] + 2, tol=1e-14), damping=damping)
    g, stats = rule(QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], expected)
    assert stats["solve_residual"] < 1e-10


@settings(max_examples=40, deadline=None)
@given(problems(), lams, lrs, steps, st.integers(1, 8), st.floats(0.1, 1.0))
def test_neumann_equals_truncated_series(p, lam, lr, k, terms, eta):
    phi_k = gd_iterate(p, lr, k, lam)
    M = p["I"] + p["A"] / lam
    rhs = p["B"] @ (phi_k - p["b"])
    series = sum(torch.linalg.matrix_power(p["I"] - eta * M, j) for j in range(terms))
    expected = eta * series @ rhs
    g, stats = implicit(lr, k, lam, linalg.neumann, terms, eta=eta)(QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], expected)
    residual = torch.linalg.vector_norm(rhs - M @ expected) / torch.linalg.vector_norm(rhs)
    torch.testing.assert_close(stats["solve_residual"], residual, rtol=1e-7, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(problems(), lams, lrs, steps, st.integers(1, 8), st.floats(0.05, 0.95), st.floats(0.0, 30.0))
def test_neumann_damping_sums_the_series_of_the_damped_system(p, lam, lr, k, terms, u, damping):
    """NeumannMAML's rule with ``damping``: eta sum_j (I - eta M)^j grad Lq(phi_k) with
    M = I + A/(lam + damping), phi_k from the proximal loop with lam itself. eta is drawn where the
    damped series converges (A's eigenvalues are at most 1), since the estimator cuts a growing one."""
    eta = u * 2.0 / (1.0 + 1.0 / (lam + damping))
    phi_k = gd_iterate(p, lr, k, lam)
    M = p["I"] + p["A"] / (lam + damping)
    rhs = p["B"] @ (phi_k - p["b"])
    expected = eta * sum(torch.linalg.matrix_power(p["I"] - eta * M, j) for j in range(terms)) @ rhs
    estimator = fewshot.NeumannMAML(lam=lam, inner_steps=k, neumann_terms=terms, neumann_lr=eta,
                                    damping=damping, backtracking=False)  # phi_k: plain descent
    estimator.inner_lr_ = lr  # resolved by meta_fit; the rule is the estimator's own
    estimator.inner_ = estimator._inner_problem(p["theta"])  # built by meta_fit from the network's parameters
    g, _ = estimator._make_rule()(QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], expected)


@settings(max_examples=25, deadline=None)
@given(problems(), st.floats(0.5, 10.0))
def test_neumann_approaches_imaml_as_terms_grow(p, lam):
    # eta = lam / (lam + 1) makes I - eta M have spectral radius < 1 when eigenvalues of A lie in (0, 1].
    eta = lam / (lam + 1.0)
    lr, k = 0.5, 3
    exact, _ = implicit(lr, k, lam, linalg.dense, 0)(QuadraticLoss(), p["theta"], p["task"])
    errors = []
    for terms in (1, 4, 16, 64, 400):
        g, _ = implicit(lr, k, lam, linalg.neumann, terms, eta=eta)(QuadraticLoss(), p["theta"], p["task"])
        errors.append(float(torch.linalg.vector_norm(g["phi"] - exact["phi"])))
    assert all(e2 <= e1 + 1e-12 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] <= 1e-8 * max(1.0, float(torch.linalg.vector_norm(exact["phi"])))


@settings(max_examples=25, deadline=None)
@given(problems(), st.floats(0.5, 5.0))
def test_explicit_maml_on_proximal_loop_approaches_implicit_gradient(p, lam):
    """Unrolling many proximal steps differentiates through theta's two roles (start and centre);
    as the loop converges the start is forgotten and the total derivative tends to iMAML's."""
    lr = 1.0 / (1.0 + lam)
    exact, _ = implicit(lr, 400, lam, linalg.dense, 0)(QuadraticLoss(), p["theta"], p["task"])
    gaps = []
    for k in (5, 50, 400):
        g, _ = Unrolled(InnerProblem(k, lr, lam=lam), query_objective)(QuadraticLoss(), p["theta"], p["task"])
        gaps.append(float(torch.linalg.vector_norm(g["phi"] - exact["phi"])))
    assert gaps[-1] <= 1e-8 * max(1.0, float(torch.linalg.vector_norm(exact["phi"])))
    assert gaps[-1] <= gaps[0] + 1e-12


@settings(max_examples=40, deadline=None)
@given(problems(), lrs, steps, st.floats(0.0, 3.0))
def test_penalty_closed_form(p, lr, k, penalty):
    A, B, a, b, I = p["A"], p["B"], p["a"], p["b"], p["I"]
    phi_k = gd_iterate(p, lr, k)
    jac = torch.linalg.matrix_power(I - lr * A, k)  # d phi_k / d theta (symmetric)
    # d/dphi [Lq + penalty ||A (phi - a)||^2] = B (phi - b) + 2 penalty A A (phi - a)
    expected = jac @ (B @ (phi_k - b) + 2 * penalty * A @ A @ (phi_k - a))
    objective = functools.partial(penalty_objective, penalty=penalty)
    for memory_efficient in (False, True):
        rule = Unrolled(InnerProblem(k, lr), objective, memory_efficient=memory_efficient)
        g, _ = rule(QuadraticLoss(), p["theta"], p["task"])
        close(g["phi"], expected)


def test_inner_loop_reports_support_loss_at_theta():
    rng = np.random.default_rng(0)
    A, a, th = spd(rng, 3, 4.0), torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    _, (loss0, _), path = InnerProblem(2, 0.1).run(QuadraticLoss(), {"phi": th}, A, a, keep_path=True)
    close(loss0, 0.5 * th @ A @ th)
    assert len(path) == 2 and path[0]["phi"] is th


def test_neumann_stop_on_growth_returns_the_best_partial_sum():
    M = torch.diag(torch.tensor([0.5, 5.0], dtype=DT))  # lr=1: I - M has eigenvalue -4, diverges
    b = torch.tensor([1.0, 1.0], dtype=DT)
    plain = linalg.neumann(lambda v: M @ v, b, maxiter=6)
    cut = linalg.neumann(lambda v: M @ v, b, maxiter=6, stop_on_growth=True)
    assert cut.diverged and not plain.diverged
    assert cut.residual < plain.residual and torch.isfinite(cut.x).all()
    torch.testing.assert_close(cut.residual, torch.linalg.vector_norm(b - M @ cut.x))
    converging = linalg.neumann(lambda v: M @ v, b, maxiter=6, lr=0.3, stop_on_growth=True)
    torch.testing.assert_close(converging.x, linalg.neumann(lambda v: M @ v, b, maxiter=6, lr=0.3).x)
    assert not converging.diverged


def test_cg_on_an_indefinite_system_never_returns_worse_than_its_start():
    M = torch.diag(torch.tensor([1.0, 1e-6, -1.0], dtype=DT))
    M = M + 1e-3 * torch.ones(3, 3, dtype=DT)  # symmetric, indefinite, one tiny positive direction
    b = torch.tensor([1.0, 1.0, 1.0], dtype=DT)
    start = b.clone()
    result = linalg.cg(lambda v: M @ v, b, maxiter=10, init=start)
    start_residual = torch.linalg.vector_norm(b - M @ start)
    assert result.residual <= start_residual
    torch.testing.assert_close(result.residual, torch.linalg.vector_norm(b - M @ result.x))
    # ... while CG on the normal equations solves it
    normal = linalg.cg_normal(lambda v: M @ v, b, maxiter=30, tol=1e-14)
    torch.testing.assert_close(normal.x, torch.linalg.solve(M, b))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 8), st.integers(1, 7))
def test_cg_normal_solves_symmetric_indefinite_systems(seed, n, n_negative):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eigenvalues = torch.rand(n, generator=gen, dtype=DT) + 0.5
    eigenvalues[:min(n_negative, n - 1)] *= -1  # indefinite, |eigenvalues| in [0.5, 1.5]
    M = q @ torch.diag(eigenvalues) @ q.T
    M = (M + M.T) / 2
    b = torch.randn(n, generator=gen, dtype=DT)
    result = linalg.cg_normal(lambda v: M @ v, b, maxiter=4 * n, tol=1e-13)
    torch.testing.assert_close(result.x, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(result.residual, torch.linalg.vector_norm(b - M @ result.x))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 8), st.integers(0, 7), st.booleans())
def test_minres_solves_symmetric_indefinite_systems(seed, n, n_negative, start):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eigenvalues = torch.rand(n, generator=gen, dtype=DT) + 0.5
    eigenvalues[:min(n_negative, n - 1)] *= -1  # indefinite unless n_negative == 0
    M = q @ torch.diag(eigenvalues) @ q.T
    M = (M + M.T) / 2
    b = torch.randn(n, generator=gen, dtype=DT)
    init = torch.randn(n, generator=gen, dtype=DT) if start else None
    result = linalg.minres(lambda v: M @ v, b, maxiter=n + 2, tol=1e-13, init=init)
    torch.testing.assert_close(result.x, torch.linalg.solve(M, b), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(result.residual, torch.linalg.vector_norm(b - M @ result.x))
    assert result.n_iter <= n + 1 and not result.negative_curvature


def test_minres_on_dicts_matches_cg_normal_and_its_residual_never_grows():
    gen = torch.Generator().manual_seed(0)
    n = 12
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    M = q @ torch.diag(torch.linspace(-1.0, 3.0, n, dtype=DT) + 0.05) @ q.T
    M = (M + M.T) / 2
    split = lambda v: {"a": v[:5].reshape(5, 1), "b": v[5:]}
    join = lambda t: torch.cat([t["a"].reshape(-1), t["b"]])
    b = torch.randn(n, generator=gen, dtype=DT)
    op = lambda t: split(M @ join(t))
    exact = torch.linalg.solve(M, b)
    torch.testing.assert_close(join(linalg.minres(op, split(b), maxiter=40, tol=1e-14).x), exact)
    torch.testing.assert_close(join(linalg.cg_normal(op, split(b), maxiter=200, tol=1e-14).x), exact)
    residuals = [float(linalg.minres(op, split(b), maxiter=k, tol=None).residual) for k in range(n + 1)]
    assert all(r1 <= r0 * (1 + 1e-10) for r0, r1 in zip(residuals, residuals[1:]))
    assert residuals[-1] < 1e-10 * residuals[0]


@settings(max_examples=30, deadline=None)
@given(problems(), lrs, st.floats(0.1, 2.0), st.integers(1, 12))
def test_backtracking_is_plain_descent_where_the_step_is_stable(p, lr, lam, steps):
    # The proximal objective's curvature is at most 1 + lam; a step below 1 / (1 + lam) decreases it
    # by at least half the linear prediction, so Armijo's condition never halves it.
    lr = lr / (1 + lam)
    args = (QuadraticLoss(), p["theta"], p["A"], p["a"])
    plain, _, _ = InnerProblem(steps, lr, lam=lam).run(*args)
    safe, first, _ = InnerProblem(steps, lr, lam=lam, backtracking=True).run(*args)
    torch.testing.assert_close(safe["phi"], plain["phi"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first[0], QuadraticLoss()(p["theta"], p["A"], p["a"]))


@settings(max_examples=30, deadline=None)
@given(problems(), st.floats(3.0, 50.0), st.floats(0.1, 2.0))
def test_backtracking_never_raises_the_proximal_objective(p, curvature, lam):
    # A step far too large for the curvature: plain descent blows up, backtracking descends.
    A = p["A"] * curvature
    theta, a = p["theta"], p["a"]

    def objective(phi):
        return float(QuadraticLoss()(phi, A, a) + lam / 2 * torch.sum((phi["phi"] - theta["phi"]) ** 2))

    lr = 4.0 / (curvature + lam)
    values = [objective(theta)]
    for steps in range(1, 8):
        phi, _, _ = InnerProblem(steps, lr, lam=lam, backtracking=True).run(QuadraticLoss(), theta, A, a)
        values.append(objective(phi))
    assert all(later <= earlier + 1e-12 for earlier, later in zip(values, values[1:])), values
    plain, _, _ = InnerProblem(7, lr, lam=lam).run(QuadraticLoss(), theta, A, a)
    if objective(plain) > values[0]:  # the top eigenvalue is large enough for plain descent to diverge
        assert values[-1] < values[0]


@settings(max_examples=30, deadline=None)
@given(problems(), st.floats(0.01, 1e4), st.integers(1, 6))
def test_neumann_auto_step_converges_for_any_curvature_scale(p, scale, terms):
    # M = I + scale * A: the series with eta = 1 / rho, rho the power-iteration estimate of
    # lambda_max from b, converges whenever rho > lambda_max / 2, however large the scale: then its
    # residual falls with every term. Four power iterations from a b nearly orthogonal to the top
    # eigenvector can stay below lambda_max / 2 (hypothesis found such a b); then the series grows
    # along that eigenvector, and with stop_on_growth it is cut at its best partial sum, never
    # worse than its first term.
    M = p["I"] + scale * p["A"]
    b = p["b"]
    rho = float(linalg.spectral_radius(lambda v: M @ v, b))
    top = float(torch.linalg.eigvalsh(M).max())
    assert rho <= top * (1 + 1e-9)  # a lower bound
    if rho > top / 2 * (1 + 1e-6):
        residuals = [float(linalg.neumann(lambda v: M @ v, b, maxiter=k, lr="auto").residual)
                     for k in range(1, terms + 2)]
        assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(residuals, residuals[1:]))
        many = linalg.neumann(lambda v: M @ v, b, maxiter=400, lr="auto")
        if float(torch.linalg.cond(M)) < 20:
            torch.testing.assert_close(many.x, torch.linalg.solve(M, b), rtol=1e-6, atol=1e-8)
    cut = linalg.neumann(lambda v: M @ v, b, maxiter=400, lr="auto", stop_on_growth=True)
    first = linalg.neumann(lambda v: M @ v, b, maxiter=1, lr="auto")
    assert float(cut.residual) <= float(first.residual) * (1 + 1e-9)
