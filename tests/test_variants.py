"""The inner-loop variants (ANIL, Meta-SGD, MAML++) and subset adaptation, float64.

- Meta-SGD against its closed forms on random quadratics (one step and the Jacobian recursion of k
  steps, second and first order);
- ANIL against MAML with a zero inner step on the body, and the body computed once;
- the implicit gradient with a subset adapted (ANIL-style iMAML) against the closed-form minimiser
  of a head that is linear in the body's features;
- MAML++ against MAML, FOMAML and the explicit multi-step loss; its weights;
- every new estimator's meta-gradient against central finite differences of an independent
  implementation of its meta-objective;
- dropout models (reproducible, global random state untouched, refused where the rule needs a
  deterministic loss) and learned rates through checkpoints.
"""

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

import fewshot
from fewshot.core import LOSSES, LR_PREFIX, FunctionalModel, InnerProblem, TaskLoss
from fewshot.core import linalg
from fewshot.core.rules import FirstOrder, Implicit, Unrolled
from fewshot.estimators._mamlpp import NON_FINAL_FLOOR, MultiStepSchedule, multi_step_weights
from fewshot.models import MLP, Conv4, init_parameters
from fewshot.tasks import GaussianClusterTasks, LabeledSet, SinusoidTasks, Task, TaskBatch

from _util import QuadraticLoss, spd

DT = torch.float64
EPS = torch.finfo(DT).eps
close = functools.partial(torch.testing.assert_close, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# helpers


@st.composite
def metasgd_problems(draw):
    n = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    A, B = spd(rng, n, draw(st.floats(1.0, 20.0))), spd(rng, n, draw(st.floats(1.0, 20.0)))
    a, b, theta = (torch.tensor(rng.standard_normal(n)) for _ in range(3))
    alpha = torch.tensor(rng.uniform(0.05, 0.9, n))  # a random positive step per coordinate
    return dict(n=n, A=A, B=B, a=a, b=b, alpha=alpha, theta={"phi": theta, "inner_lr.phi": alpha},
                task=Task(LabeledSet(A, a), LabeledSet(B, b)), I=torch.eye(n, dtype=DT))


def max_ulps(a: dict, b: dict, keys=None) -> float:
    """The largest difference of ``a`` and ``b`` over ``keys``, in units of float64 epsilon times the
    largest magnitude of the reference ``b`` over those keys (some entries, such as the gradient of a
    convolution's bias before batch norm, are zero up to rounding)."""
    keys = list(b if keys is None else keys)
    scale = max(float(b[k].abs().max()) for k in keys)
    return max(float((a[k] - b[k]).abs().max()) for k in keys) / (EPS * max(scale, 1e-300))


def weights_of(theta):
    return {k: v for k, v in theta.items() if not k.startswith(LR_PREFIX)}


def classification_setup(kind, seed=0, n_tasks=2):
    """A small float64 network of :mod:`fewshot.models` with its cross-entropy task loss, its
    weights and ``n_tasks`` 3-way tasks: an MLP on 4 features or a Conv4 (4 filters) on 1x16x16
    images (16 is the smallest side four 2x2 pools allow)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        module = init_parameters(MLP(4, 3, (8, 8)), gen).to(DT)
        sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=3, n_features=4)
        shape = (4,)
    else:
        module = init_parameters(Conv4(in_channels=1, n_outputs=3, hidden=4, image_size=16), gen).to(DT)
        sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=3, n_features=256)
        shape = (1, 16, 16)
    batch = sampler.sample(n_tasks, random_state=seed).to(dtype=DT)
    tasks = [Task(LabeledSet(t.support.x.reshape(-1, *shape), t.support.y),
                  LabeledSet(t.query.x.reshape(-1, *shape), t.query.y)) for t in batch]
    fm = FunctionalModel(module)
    return module, TaskLoss(fm, *LOSSES["cross_entropy"][:2]), fm.init_params(), tasks


class Wrapped(nn.Module):
    """The same layers as a network of :mod:`fewshot.models`, in a module fewshot does not run layer
    by layer (a subclass of nn.Module with its own forward): no split is possible."""

    def __init__(self, net):
        super().__init__()
        self.features, self.head = net.features, net.head

    def forward(self, x):
        return self.head(self.features(x))


class CountCalls(TorchFunctionMode):
    """Counts calls of ``F.linear``/``F.conv2d`` by the shape of their weight argument."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv2d):
            shape = tuple((args[1] if len(args) > 1 else kwargs["weight"]).shape)
            self.calls[shape] = self.calls.get(shape, 0) + 1
        return func(*args, **kwargs)


def sinusoid_batch(n_tasks=2, seed=1, k_shot=5, n_query=6):
    return SinusoidTasks(k_shot=k_shot, n_query=n_query).sample(n_tasks, random_state=seed).to(dtype=DT)


# ---------------------------------------------------------------------------------------------
# 1. Meta-SGD on random quadratics


@settings(max_examples=30, deadline=None)
@given(metasgd_problems())
def test_metasgd_one_step_closed_form(p):
    A, B, a, b, alpha, th = p["A"], p["B"], p["a"], p["b"], p["alpha"], p["theta"]["phi"]
    grad_ls = A @ (th - a)
    phi_1 = th - alpha * grad_ls
    gq = B @ (phi_1 - b)
    # d phi_1 / d theta = I - diag(alpha) A, so the gradient is its transpose (I - A diag(alpha)) gq
    expected_theta = gq - A @ (alpha * gq)
    expected_alpha = -grad_ls * gq
    g, stats = Unrolled(InnerProblem(1, 0.1, learn_lr="per_parameter"))(QuadraticLoss(), p["theta"], p["task"])
    assert list(g) == ["phi", "inner_lr.phi"]
    close(g["phi"], expected_theta)
    close(g["inner_lr.phi"], expected_alpha)
    close(stats["query_loss_post"], 0.5 * (phi_1 - b) @ B @ (phi_1 - b))


def metasgd_recursion(p, k):
    """phi_k, d phi_k / d theta and d phi_k / d alpha by the explicit Jacobian recursion, and the
    support gradients grad Ls(phi_j), j < k."""
    A, a, alpha, I = p["A"], p["a"], p["alpha"], p["I"]
    phi, j_theta, j_alpha, support_grads = p["theta"]["phi"].clone(), I.clone(), torch.zeros_like(I), []
    step = I - torch.diag(alpha) @ A
    for _ in range(k):
        gs = A @ (phi - a)
        support_grads.append(gs)
        j_alpha = step @ j_alpha - torch.diag(gs)
        j_theta = step @ j_theta
        phi = phi - alpha * gs
    return phi, j_theta, j_alpha, support_grads


@settings(max_examples=30, deadline=None)
@given(metasgd_problems(), st.integers(1, 6))
def test_metasgd_k_steps_against_jacobian_recursion(p, k):
    phi_k, j_theta, j_alpha, _ = metasgd_recursion(p, k)
    gq = p["B"] @ (phi_k - p["b"])
    close(j_theta, torch.linalg.matrix_power(p["I"] - torch.diag(p["alpha"]) @ p["A"], k))
    g, _ = Unrolled(InnerProblem(k, 0.1, learn_lr="per_parameter"))(QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], j_theta.T @ gq)
    close(g["inner_lr.phi"], j_alpha.T @ gq)
    # the estimator's own rule is the same
    est = fewshot.MetaSGD(inner_steps=k)
    est.inner_lr_ = 0.1  # resolved by meta_fit
    est.inner_ = est._inner_problem({"phi": p["theta"]["phi"]})
    g_est, _ = est._make_rule()(QuadraticLoss(), p["theta"], p["task"])
    assert torch.equal(g_est["phi"], g["phi"]) and torch.equal(g_est["inner_lr.phi"], g["inner_lr.phi"])


@settings(max_examples=30, deadline=None)
@given(metasgd_problems(), st.integers(1, 6))
def test_metasgd_first_order_closed_form(p, k):
    phi_k, _, _, support_grads = metasgd_recursion(p, k)
    gq = p["B"] @ (phi_k - p["b"])
    g, _ = Unrolled(InnerProblem(k, 0.1, learn_lr="per_parameter"), first_order=True)(
        QuadraticLoss(), p["theta"], p["task"])
    close(g["phi"], gq)
    close(g["inner_lr.phi"], -sum(support_grads) * gq)
    est = fewshot.MetaSGD(inner_steps=k, first_order=True)
    est.inner_lr_ = 0.1
    est.inner_ = est._inner_problem({"phi": p["theta"]["phi"]})
    g_est, _ = est._make_rule()(QuadraticLoss(), p["theta"], p["task"])
    assert torch.equal(g_est["phi"], g["phi"]) and torch.equal(g_est["inner_lr.phi"], g["inner_lr.phi"])


# ---------------------------------------------------------------------------------------------
# 2. ANIL is MAML with a zero inner step on the body


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_equals_maml_with_zero_body_step(kind, first_order):
    _, tl, theta, tasks = classification_setup(kind)
    k, lr = 3, 0.3
    head = ("head.weight", "head.bias")
    rates = {LR_PREFIX + n: torch.full_like(v, lr if n in head else 0.0) for n, v in theta.items()}
    anil = Unrolled(InnerProblem(k, lr, adapt="head"), first_order=first_order)
    zero_body = Unrolled(InnerProblem(k, lr, learn_lr="per_parameter"), first_order=first_order)
    for task in tasks:
        g_anil, s_anil = anil(tl, theta, task)
        g_maml, s_maml = zero_body(tl, {**theta, **rates}, task)
        assert list(g_anil) == list(theta)
        # Same values; only the order in which the body's gradient sums its uses may differ.
        assert max_ulps(g_anil, g_maml, theta) <= 64, max_ulps(g_anil, g_maml, theta)
        torch.testing.assert_close(s_anil["query_loss_post"], s_maml["query_loss_post"], rtol=1e-14, atol=0)
        assert all(float(g_anil[n].abs().max()) > 1e-3 for n in theta if n.endswith("weight"))  # the body learns


def test_anil_estimator_is_its_rule():
    module, _, _, tasks = classification_setup("mlp")
    sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=3, n_features=4)
    common = dict(model=module, inner_lr=0.3, inner_steps=3, meta_steps=0, dtype="float64", random_state=0)
    batch = TaskBatch.stack(tasks)
    for first_order in (False, True):
        est = fewshot.ANIL(first_order=first_order, **common).meta_fit(sampler)
        assert est.inner_.adapted(est.params_) == ("head.weight", "head.bias")
        tl = TaskLoss(est.fmodel_, *LOSSES["cross_entropy"][:2])
        inner = InnerProblem(3, 0.3, adapt=("head.weight", "head.bias"))
        rule = FirstOrder(inner) if first_order else Unrolled(inner)
        for g, task in zip(est.meta_gradient(batch), tasks):
            expected, _ = rule(tl, est.params_, task)
            assert all(torch.equal(g[n], expected[n]) for n in expected)
        # MAML restricted to the head is ANIL
        other = (fewshot.FOMAML if first_order else fewshot.MAML)(inner_params="head", **common).meta_fit(sampler)
        for g, h in zip(est.meta_gradient(batch), other.meta_gradient(batch, params=est.params_)):
            assert all(torch.equal(g[n], h[n]) for n in g)
    # ... and Meta-SGD with a zero step on the body (estimator level)
    anil = fewshot.ANIL(**common).meta_fit(sampler)
    msgd = fewshot.MetaSGD(**common).meta_fit(sampler)
    params = {**anil.params_, **{LR_PREFIX + n: torch.full_like(v, 0.3 if n.startswith("head.") else 0.0)
                                 for n, v in anil.params_.items()}}
    for g, h in zip(anil.meta_gradient(batch), msgd.meta_gradient(batch, params=params)):
        assert max_ulps(g, h, anil.params_) <= 64


# ---------------------------------------------------------------------------------------------
# 3. ANIL's body runs once


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_anil_features_are_computed_once(kind):
    module, tl, theta, tasks = classification_setup(kind)
    task, k, lr = tasks[0], 4, 0.3
    head = ("head.weight", "head.bias")
    assert tl.split(head) is not None
    first = tuple(theta["features.1.weight" if kind == "mlp" else "features.0.0.weight"].shape)
    inner = InnerProblem(k, lr, adapt="head")
    with CountCalls() as count:
        inner.run(tl, theta, *task.support)
    assert count.calls[first] == 1  # not once per step
    assert count.calls[tuple(theta["head.weight"].shape)] == k
    with CountCalls() as count:
        Unrolled(inner, full_stats=False)(tl, theta, task)
    assert count.calls[first] == 2  # support features once, the query forward pass once

    # Without the split (same layers, a module fewshot cannot split) the iterates and the
    # meta-gradient are the same
    plain_fm = FunctionalModel(Wrapped(module))
    plain = TaskLoss(plain_fm, *LOSSES["cross_entropy"][:2])
    assert plain.split(head) is None
    with CountCalls() as count:
        phi_plain = inner.run(plain, theta, *task.support).phi
    assert count.calls[first] == k
    phi_split = inner.run(tl, theta, *task.support).phi
    for n in theta:
        torch.testing.assert_close(phi_split[n], phi_plain[n], rtol=0, atol=1e-12)
    assert not torch.equal(phi_split["head.weight"], theta["head.weight"])
    g_split, _ = Unrolled(inner)(tl, theta, task)
    g_plain, _ = Unrolled(inner)(plain, theta, task)
    for n in theta:
        torch.testing.assert_close(g_split[n], g_plain[n], rtol=0, atol=1e-12)


def test_anil_estimator_adapt_runs_the_body_once():
    module, _, _, tasks = classification_setup("mlp")
    sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=3, n_features=4)
    est = fewshot.ANIL(model=module, inner_lr=0.3, inner_steps=4, meta_steps=1, meta_batch_size=2,
                       dtype="float64", random_state=0).meta_fit(sampler)
    first = tuple(est.params_["features.1.weight"].shape)
    with CountCalls() as count:
        adapted = est.adapt(tasks[0].support)
    assert count.calls[first] == 1
    plain = fewshot.ANIL(model=Wrapped(module), inner_lr=0.3, inner_steps=4, meta_steps=0,
                         dtype="float64", random_state=0).meta_fit(sampler)
    plain.params_ = est.params_
    out = plain.adapt(tasks[0].support).forward(tasks[0].query.x)
    torch.testing.assert_close(adapted.forward(tasks[0].query.x), out, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 4. The implicit gradient with a subset adapted


def head_regression_setup(kind, seed, n_s=7, n_q=9, d=2, m=4):
    """A body of one layer (tanh through functional_call, or fewshot's ReLU MLP, split) and a linear
    head; MSE support and query sets."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "tanh":
        module = nn.Sequential(nn.Linear(d, m), nn.Tanh(), nn.Linear(m, 1))
        body_names, head_names = ("0.weight", "0.bias"), ("2.weight", "2.bias")
        act = torch.tanh
    else:
        module = MLP(d, 1, (m,))
        body_names, head_names = ("features.1.weight", "features.1.bias"), ("head.weight", "head.bias")
        act = torch.relu
    module = init_parameters(module, gen).to(DT)
    fm = FunctionalModel(module)
    theta = fm.init_params()
    with torch.no_grad():  # a steeper first layer: features far from linear in the inputs
        theta[body_names[0]].mul_(2.0)
    xs, xq = (torch.randn(n, d, generator=gen, dtype=DT) for n in (n_s, n_q))
    ys, yq = (torch.randn(n, 1, generator=gen, dtype=DT) for n in (n_s, n_q))
    task = Task(LabeledSet(xs, ys), LabeledSet(xq, yq))
    return TaskLoss(fm, LOSSES["mse"][0], None), theta, task, body_names, head_names, act


def closed_form_implicit(theta, task, body_names, head_names, act, lam):
    """Lq(b, h*(b, h0)) with h* the minimiser of Ls(b, h) + lam/2 ||h - h0||^2 solved in closed form
    (differentiably), its exact total derivative with respect to (b, h0), the partial derivative in b
    with h* held fixed (the gradient without the mixed term), and h*."""
    leaves = {n: theta[n].detach().clone().requires_grad_(True) for n in theta}
    W, c = leaves[body_names[0]], leaves[body_names[1]]

    def design(x):  # [features(x), 1]: the head is linear in it
        f = act(x @ W.T + c)
        return torch.cat([f, torch.ones(len(x), 1, dtype=DT)], 1)

    (xs, ys), (xq, yq) = task.support, task.query
    ps, pq = design(xs), design(xq)
    h0 = torch.cat([leaves[head_names[0]].reshape(-1), leaves[head_names[1]].reshape(-1)])
    n = len(xs)
    # grad_h [mean((ps h - ys)^2) + lam/2 ||h - h0||^2] = 0
    system = 2.0 / n * ps.T @ ps + lam * torch.eye(len(h0), dtype=DT)
    h_star = torch.linalg.solve(system, 2.0 / n * ps.T @ ys.reshape(-1) + lam * h0)
    lq = torch.mean((pq @ h_star - yq.reshape(-1)) ** 2)
    total = dict(zip(leaves, torch.autograd.grad(lq, list(leaves.values()), retain_graph=True)))
    fixed = h_star.detach()
    direct = torch.autograd.grad(torch.mean((pq @ fixed - yq.reshape(-1)) ** 2), [W, c])
    return total, dict(zip(body_names, direct)), h_star.detach(), system.detach()


def proximal_steps(system, lam, tol=1e-15):
    """Step 1/L and the number of steps after which gradient descent on the strongly convex proximal
    problem (Hessian ``system``, eigenvalues in [lam, L]) is within ``tol`` of its minimiser."""
    top = float(torch.linalg.eigvalsh(system).max())
    return 1.0 / top, int(np.ceil(np.log(tol) / np.log(1 - lam / top))) + 1, top


@pytest.mark.parametrize("kind", ["tanh", "mlp"])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), lam=st.floats(0.5, 3.0))
def test_implicit_with_subset_against_closed_form(kind, seed, lam):
    tl, theta, task, body_names, head_names, act = head_regression_setup(kind, seed)
    if kind == "mlp":
        assert tl.split(head_names) is not None  # the head's problem runs on the body's features
    total, direct, h_star, system = closed_form_implicit(theta, task, body_names, head_names, act, lam)
    lr, steps, top = proximal_steps(system, lam)
    inner = InnerProblem(steps, lr, adapt=head_names, lam=lam)
    phi = inner.run(tl, theta, *task.support).phi
    torch.testing.assert_close(torch.cat([phi[head_names[0]].reshape(-1), phi[head_names[1]]]), h_star,
                               rtol=0, atol=1e-12)
    body_scale = max(float(total[n].abs().max()) for n in body_names)
    assert body_scale > 1e-3  # the body has a gradient to check
    for solve in (linalg.solve_dense(), linalg.solve_cg(maxiter=50, tol=1e-14)):
        g, stats = Implicit(inner, solve)(tl, theta, task)
        assert list(g) == list(theta)
        for n in theta:
            torch.testing.assert_close(g[n], total[n], rtol=1e-9, atol=1e-11)
        assert float(stats["solve_residual"]) < 1e-10
    # the mixed term matters: the body's direct query gradient alone is far from the answer
    gap = max(float((direct[n] - total[n]).abs().max()) for n in body_names)
    assert gap > 1e-2 * body_scale
    # The Neumann series (NeumannMAML) with a step that makes it converge (M = I + H/lam has
    # eigenvalues in [1, top/lam]) and enough terms
    eta = lam / top
    terms = int(np.ceil(np.log(1e-13) / np.log(1 - eta))) + 1
    g, _ = Implicit(inner, linalg.solve_neumann(terms=terms, lr=eta, stop_on_growth=False))(tl, theta, task)
    for n in theta:
        torch.testing.assert_close(g[n], total[n], rtol=1e-7, atol=1e-9)
    # With backtracking (the implicit estimators' default): the same, to the accuracy its inner loop
    # reaches (see test_backtracking_follows_a_step_that_suits_the_curvature)
    g, _ = Implicit(InnerProblem(steps, lr, adapt=head_names, lam=lam, backtracking=True),
                    linalg.solve_cg(maxiter=50, tol=1e-14))(tl, theta, task)
    for n in theta:
        torch.testing.assert_close(g[n], total[n], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("seed, lam", [(0, 1.0), (1, 2.5)])
def test_backtracking_follows_a_step_that_suits_the_curvature(seed, lam):
    """InnerProblem's documented promise: "where lr suits the curvature nothing is halved and the
    iterates are the fixed step's". With lr = 1/L on a strongly convex quadratic every fixed step
    satisfies Armijo's condition in exact arithmetic, so both loops must reach the minimiser."""
    tl, theta, task, body_names, head_names, act = head_regression_setup("tanh", seed)
    _, _, h_star, system = closed_form_implicit(theta, task, body_names, head_names, act, lam)
    lr, steps, _ = proximal_steps(system, lam)
    fixed = InnerProblem(steps, lr, adapt=head_names, lam=lam).run(tl, theta, *task.support).phi
    searched = InnerProblem(steps, lr, adapt=head_names, lam=lam, backtracking=True).run(tl, theta, *task.support).phi
    for n in head_names:
        torch.testing.assert_close(searched[n], fixed[n], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([searched[head_names[0]].reshape(-1), searched[head_names[1]]]), h_star,
                               rtol=0, atol=1e-12)


def test_imaml_estimator_with_head_subset_against_closed_form():
    """IMAML(inner_params="head") on a Sequential: "head" is its last linear layer, and the rule the
    estimator runs is the implicit gradient of that subset."""
    tl, theta, task, body_names, head_names, act = head_regression_setup("tanh", 5, d=1)
    lam = 1.0
    total, _, _, system = closed_form_implicit(theta, task, body_names, head_names, act, lam)
    lr, steps, _ = proximal_steps(system, lam)
    module = copy.deepcopy(tl.fmodel.module)
    with torch.no_grad():  # the template carries theta
        for n, p in module.named_parameters():
            p.copy_(theta[n])
    est = fewshot.IMAML(model=module, inner_params="head", lam=lam, inner_lr=lr, inner_steps=steps,
                        backtracking=False, cg_steps=50, cg_tol=1e-14, meta_steps=0, dtype="float64",
                        random_state=0)
    est.meta_fit(SinusoidTasks(k_shot=7, n_query=9))
    assert est.inner_.adapted(est.params_) == head_names
    assert all(torch.equal(est.params_[n], theta[n]) for n in theta)
    (g,) = est.meta_gradient(task)
    for n in theta:
        torch.testing.assert_close(g[n], total[n], rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# 5. MAML++


def sinusoid_estimators(**extra):
    common = dict(inner_lr=0.05, inner_steps=3, meta_steps=0, dtype="float64", random_state=3)
    common.update(extra)
    return common


def test_mamlpp_without_msl_and_da_is_maml():
    sampler = SinusoidTasks(k_shot=5, n_query=6)
    batch = sinusoid_batch(3)
    pp = fewshot.MAMLPlusPlus(multi_step_loss_steps=0, first_order_steps=0, **sinusoid_estimators()).meta_fit(sampler)
    maml = fewshot.MAML(**sinusoid_estimators()).meta_fit(sampler)
    weights = weights_of(pp.params_)
    assert all(torch.equal(weights[n], maml.params_[n]) for n in maml.params_)
    assert all(torch.equal(v, torch.full((3,), 0.05, dtype=DT)) for k, v in pp.params_.items() if k.startswith(LR_PREFIX))
    for g, h in zip(pp.meta_gradient(batch), maml.meta_gradient(batch, params=weights)):
        assert set(g) == set(pp.params_)
        assert max_ulps(g, h, weights) <= 4, max_ulps(g, h, weights)
        assert all(float(g[k].abs().max()) > 0 for k in g)  # the rates get a gradient too


def _bn_clusters_estimator(**extra):
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    with torch.no_grad():  # weights and biases away from BatchNorm's 1 and 0, so every term shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 0.3)
    sampler = GaussianClusterTasks(n_features=16)
    est = fewshot.MAMLPlusPlus(model=model, multi_step_loss_steps=4, inner_lr=0.3, inner_steps=3, meta_steps=0,
                               dtype="float64", random_state=0, **extra).meta_fit(sampler)
    return est, sampler.sample(2, random_state=5).to(dtype=DT)


def test_mamlpp_per_step_bn_with_equal_copies_is_mamlpp_without_them():
    """With every per-step copy equal to the batch-norm parameter it copies, BNWB computes the same
    function as adapting only the other layers, so the copies' gradients add up to the shared
    parameter's gradient there and every other gradient is unchanged; the copies are not adapted
    (the adapted network uses copy k)."""
    bnwb, batch = _bn_clusters_estimator(per_step_bn=True)
    plain, _ = _bn_clusters_estimator(inner_params=["0", "3"])
    stepped = ("1.weight", "1.bias")
    assert bnwb.inner_.stepped(bnwb.params_) == stepped
    assert all(f"inner_step.{j}.{n}" in bnwb.params_ for j in (1, 2, 3) for n in stepped)
    assert not set(stepped) & set(bnwb.inner_.adapted(bnwb.params_))
    for g, h in zip(bnwb.meta_gradient(batch), plain.meta_gradient(batch, params=plain.params_)):
        for name in plain.params_:
            expected = h[name]
            got = g[name] + sum(g[f"inner_step.{j}.{name}"] for j in (1, 2, 3)) if name in stepped else g[name]
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        assert all(float(g[f"inner_step.{j}.{n}"].abs().max()) > 0 for j in (1, 2, 3) for n in stepped)
    adapted = bnwb.inner_.run(bnwb._task_loss, bnwb.params_, batch[0].support.x, batch[0].support.y).phi
    assert all(torch.equal(adapted[n], bnwb.params_[f"inner_step.3.{n}"]) for n in stepped)


def test_mamlpp_per_step_bn_gradient_matches_finite_differences():
    est, batch = _bn_clusters_estimator(per_step_bn=True)
    theta = {k: v.clone() for k, v in est.params_.items()}
    task = batch[0]
    rule = est._rule().for_step(0)
    g, _ = rule(est._task_loss, theta, task)
    gen = torch.Generator().manual_seed(1)

    def objective(th):
        inner = est.inner_  # the multi-step loss of meta-step 0, by running the loop without a graph
        phis, total = [], 0.0
        for k in range(1, inner.steps + 1):
            phis.append(inner.run(est._task_loss, th, task.support.x, task.support.y, steps=k).phi)
        for w, phi in zip(rule.step_weights, phis):
            total = total + w * est._task_loss(phi, task.query.x, task.query.y)
        return float(total)

    eps = 1e-6
    for name in ("inner_step.2.1.weight", "inner_step.3.1.bias", "1.weight", "inner_lr.0.weight"):
        d = torch.randn(theta[name].shape, generator=gen, dtype=DT)
        plus = {**theta, name: theta[name] + eps * d}
        minus = {**theta, name: theta[name] - eps * d}
        fd = (objective(plus) - objective(minus)) / (2 * eps)
        assert abs(fd - float(torch.sum(g[name] * d))) <= 1e-6 * max(1.0, abs(fd)), name


def test_mamlpp_step_weights_on_the_last_step_only_is_the_plain_rule():
    _, tl, theta, tasks = classification_setup("mlp")
    k = 3
    inner = InnerProblem(k, 0.3, learn_lr="per_layer_per_step")
    rates = inner.meta_parameters(theta)
    rates = {n: v * torch.tensor([1.0, 0.5, 1.5], dtype=DT) for n, v in rates.items()}
    theta = {**theta, **rates}
    for task in tasks:
        g_last, _ = Unrolled(inner, step_weights=(0.0,) * (k - 1) + (1.0,))(tl, theta, task)
        g, _ = Unrolled(inner)(tl, theta, task)
        assert list(g_last) == list(theta)
        assert all(torch.equal(g_last[n], g[n]) for n in theta)


def test_mamlpp_derivative_order_annealing_is_fomaml():
    sampler = SinusoidTasks(k_shot=5, n_query=6)
    batch = sinusoid_batch(3)
    pp = fewshot.MAMLPlusPlus(multi_step_loss_steps=0, first_order_steps=2, **sinusoid_estimators()).meta_fit(sampler)
    fo = fewshot.FOMAML(**sinusoid_estimators()).meta_fit(sampler)
    weights = weights_of(pp.params_)
    for g, h in zip(pp.meta_gradient(batch), fo.meta_gradient(batch, params=weights)):
        assert all(torch.equal(g[n], h[n]) for n in weights)
        assert all(float(g[k].abs().max()) > 0 for k in g if k.startswith(LR_PREFIX))
    # The schedule switches to second order at meta-step first_order_steps
    pp.set_params(meta_steps=2, meta_lr=0.01).meta_fit(sampler)
    assert pp.n_iter_ == 2
    tl = TaskLoss(pp.fmodel_, *pp._loss_parts)
    for first_order_steps, first_order in ((2, False), (3, True)):
        pp.first_order_steps = first_order_steps
        for g, task in zip(pp.meta_gradient(batch), batch):
            expected, _ = Unrolled(pp.inner_, first_order=first_order)(tl, pp.params_, task)
            assert all(torch.equal(g[n], expected[n]) for n in expected)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_multi_step_weights(k, p1, p2):
    lo, hi = min(p1, p2), max(p1, p2)
    w0 = multi_step_weights(k, 0.0)
    assert len(w0) == k
    assert all(abs(w - 1.0 / k) < 1e-15 for w in w0)
    a, b = multi_step_weights(k, lo), multi_step_weights(k, hi)
    for w in (a, b):
        assert abs(sum(w) - 1.0) < 1e-12
        assert all(x >= NON_FINAL_FLOOR / k - 1e-15 for x in w[:-1])
        assert w[-1] <= 1.0 + 1e-15
    assert all(y <= x + 1e-15 for x, y in zip(a[:-1], b[:-1]))  # non-final weights fall
    assert b[-1] >= a[-1] - 1e-15  # the final one rises
    w1 = multi_step_weights(k, 1.0)
    assert all(abs(x - 0.03 / k) < 1e-15 for x in w1[:-1])
    assert abs(w1[-1] - (1.0 - (k - 1) * 0.03 / k)) < 1e-12


def test_multi_step_schedule_for_step():
    inner = InnerProblem(4, 0.1, learn_lr="per_layer_per_step")
    schedule = MultiStepSchedule(inner, msl_steps=10, first_order_steps=3)
    for n in range(14):
        rule = schedule.for_step(n)
        assert rule.first_order == (n < 3)
        assert rule.step_weights == (multi_step_weights(4, n / 10) if n < 10 else None)
    one_step = MultiStepSchedule(InnerProblem(1, 0.1, learn_lr="per_layer_per_step"), msl_steps=10)
    assert one_step.for_step(0).step_weights is None


def test_mamlpp_multi_step_loss_is_the_sum_of_per_step_query_gradients():
    _, tl, theta, tasks = classification_setup("mlp")
    k = 3
    inner = InnerProblem(k, 0.3, learn_lr="per_layer_per_step")
    rates = {n: v * torch.tensor([1.0, 0.5, 1.5], dtype=DT) for n, v in inner.meta_parameters(theta).items()}
    theta = {**theta, **rates}
    weights = multi_step_weights(k, 0.4)
    for task in tasks:
        g, _ = Unrolled(inner, step_weights=weights)(tl, theta, task)
        # d Lq(phi_j) / d(theta, rates) for each j separately: an inner problem of j steps (which
        # uses the first j rates; the others get zero)
        per_step = [Unrolled(InnerProblem(j, 0.3, learn_lr="per_layer_per_step"))(tl, theta, task)[0]
                    for j in range(1, k + 1)]
        for n in theta:
            expected = sum(w * gj[n] for w, gj in zip(weights, per_step))
            torch.testing.assert_close(g[n], expected, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(g["head.weight"], per_step[-1]["head.weight"])
    # through the estimator (meta-step 0 of the annealing: all weights 1/k), sinusoid tasks
    sampler = SinusoidTasks(k_shot=5, n_query=6)
    batch = sinusoid_batch(2)
    est = fewshot.MAMLPlusPlus(multi_step_loss_steps=10, **sinusoid_estimators()).meta_fit(sampler)
    tl = TaskLoss(est.fmodel_, *est._loss_parts)
    for g, task in zip(est.meta_gradient(batch), batch):
        per_step = [Unrolled(InnerProblem(j, 0.05, learn_lr="per_layer_per_step"))(tl, est.params_, task)[0]
                    for j in range(1, 4)]
        for n in est.params_:
            torch.testing.assert_close(g[n], sum(gj[n] for gj in per_step) / 3, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 6. Finite differences of each new estimator's meta-objective


def reference_objective(module, kind, adapted, task, lr, k, weights=None):
    """The meta-objective of ``kind`` as a plain function of the meta-parameters, computed
    independently of fewshot (``functional_call`` on the template, MSE, an explicit loop over the
    parameters ``adapted`` with the support gradients taken as values: no graph is kept)."""
    (xs, ys), (xq, yq) = task.support, task.query
    net = copy.deepcopy(module)

    def loss(params, x, y):
        return torch.mean((torch.func.functional_call(net, params, (x,)) - y.reshape(-1, 1)) ** 2)

    def value(theta):
        phi = weights_of(theta)
        total = 0.0
        for j in range(k):
            with torch.enable_grad():
                leaves = {n: phi[n].detach().requires_grad_(True) for n in adapted}
                g = dict(zip(adapted, torch.autograd.grad(loss({**phi, **leaves}, xs, ys), list(leaves.values()))))
            with torch.no_grad():
                for n in adapted:
                    if kind == "anil":
                        step = lr
                    elif kind == "metasgd":
                        step = theta[LR_PREFIX + n]
                    else:
                        step = theta[LR_PREFIX + n][j]
                    phi = {**phi, n: phi[n] - step * g[n]}
                if weights is not None:
                    total = total + weights[j] * float(loss(phi, xq, yq))
        with torch.no_grad():
            return total if weights is not None else float(loss(phi, xq, yq))

    return value


def fd_model(net):
    """fewshot's ReLU MLP (run layer by layer; ANIL splits it) or a smooth tanh Sequential (run
    through functional_call)."""
    gen = torch.Generator().manual_seed(2)
    if net == "mlp":
        return init_parameters(MLP(1, 1, (8,)), gen).to(DT)
    return init_parameters(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)), gen).to(DT)


@pytest.mark.parametrize("net", ["mlp", "tanh"])
@pytest.mark.parametrize("kind", ["anil", "metasgd", "mamlpp"])
def test_new_estimators_meta_gradient_matches_finite_differences(kind, net):
    module = fd_model(net)
    sampler = SinusoidTasks(k_shot=5, n_query=6)
    task = sinusoid_batch(1, seed=4)[0]
    k, lr = 3, 0.05
    common = dict(model=module, inner_lr=lr, inner_steps=k, dtype="float64", random_state=0, meta_batch_size=2)
    weights = None
    if kind == "anil":
        est = fewshot.ANIL(meta_steps=0, **common).meta_fit(sampler)
        params = dict(est.params_)
        assert len(est.inner_.adapted(params)) == 2
    elif kind == "metasgd":
        est = fewshot.MetaSGD(meta_steps=0, **common).meta_fit(sampler)
        gen = torch.Generator().manual_seed(5)
        params = {n: v * (0.5 + torch.rand(v.shape, generator=gen, dtype=DT)) if n.startswith(LR_PREFIX) else v
                  for n, v in est.params_.items()}
    else:  # a few steps into the annealing of the multi-step loss: unequal weights and rates
        est = fewshot.MAMLPlusPlus(meta_steps=3, meta_lr=0.01, multi_step_loss_steps=10,
                                   **common).meta_fit(sampler)
        params = dict(est.params_)
        weights = multi_step_weights(k, 0.3)
        assert est._rule().for_step(est.n_iter_).step_weights == weights
        assert not est._rule().for_step(est.n_iter_).first_order
        rates = torch.stack([v for n, v in params.items() if n.startswith(LR_PREFIX)])
        assert float(rates.max() - rates.min()) > 1e-4  # the rates have learned apart
    (g,) = est.meta_gradient(task, params=params)
    assert set(g) == set(params)
    f = reference_objective(module, kind, est.inner_.adapted(params), task, lr, k, weights)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6  # the objective is strongly curved in the rates: central differences err by O(eps^2)
    for name in params:  # random directions in every meta-parameter, learned rates included
        for _ in range(2):
            v = torch.randn(params[name].shape, generator=gen, dtype=DT)
            fd = (f({**params, name: params[name] + eps * v}) - f({**params, name: params[name] - eps * v})) / (2 * eps)
            analytic = float(torch.sum(g[name] * v))
            assert abs(analytic - fd) <= 1e-6 * max(abs(fd), 1e-3), (name, analytic, fd)


@pytest.mark.parametrize("cls", [fewshot.MetaSGD, fewshot.MAMLPlusPlus])
def test_learned_rates_with_a_module_run_through_functional_call(cls):
    """A network fewshot does not run layer by layer (any nn.Module but its reference networks and
    plain Sequentials of their layers) is called through functional_call with the network's
    parameters only: learned rates are meta-parameters, not parameters of the module."""
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    est = cls(model=net, inner_steps=2, meta_steps=1, meta_batch_size=2, random_state=0, dtype="float64")
    est.meta_fit(SinusoidTasks(k_shot=5, n_query=5))
    assert {n for n in est.params_ if n.startswith(LR_PREFIX)} == {LR_PREFIX + n for n, _ in net.named_parameters()}
    (g,) = est.meta_gradient(sinusoid_batch(1)[0])
    assert set(g) == set(est.params_)


# ---------------------------------------------------------------------------------------------
# 7. Dropout


def dropout_model(p=0.5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 1))


@pytest.mark.parametrize("cls", [fewshot.MAML, fewshot.ANIL, fewshot.MetaSGD, fewshot.MAMLPlusPlus])
def test_dropout_model_is_reproducible_and_leaves_global_rng_alone(cls):
    sampler = SinusoidTasks(k_shot=5, n_query=5)
    settings_ = dict(meta_steps=3, meta_batch_size=2, inner_steps=2, meta_lr=0.01, random_state=0, dtype="float64")
    model = dropout_model()
    state = torch.random.get_rng_state()
    a = cls(model=model, **settings_).meta_fit(sampler)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = cls(model=model, **settings_).meta_fit(sampler)
    assert list(a.params_) == list(b.params_)
    assert all(torch.equal(a.params_[n], b.params_[n]) for n in a.params_)
    # the masks are drawn: without dropout the same run differs
    c = cls(model=dropout_model(0.0), **settings_).meta_fit(sampler)
    assert not all(torch.equal(a.params_[n], c.params_[n]) for n in a.params_)
    task = sampler.sample(random_state=9).to(dtype=DT)
    state = torch.random.get_rng_state()
    adapted = a.adapt(task.support)
    first, second = adapted.predict(task.query.x), adapted.predict(task.query.x)
    again = a.adapt(task.support).predict(task.query.x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, second) and torch.equal(first, again)
    # meta_gradient draws masks from fixed seeds: repeatable
    g1, g2 = a.meta_gradient(task), a.meta_gradient(task)
    assert all(torch.equal(g1[0][n], g2[0][n]) for n in g1[0])
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("make", [lambda: fewshot.IMAML(), lambda: fewshot.NeumannMAML(),
                                  lambda: fewshot.MAML(memory_efficient=True)])
def test_rules_needing_a_deterministic_loss_refuse_dropout(make):
    est = make().set_params(model=dropout_model(), meta_steps=1, meta_batch_size=2, random_state=0)
    with pytest.raises(ValueError, match="dropout"):
        est.meta_fit(SinusoidTasks(k_shot=5, n_query=5))


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(1, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.out(F.dropout(torch.relu(self.hidden(x)), 0.5, training=self.training))


@pytest.mark.parametrize("cls", [fewshot.MAML, fewshot.ANIL, fewshot.MetaSGD, fewshot.MAMLPlusPlus])
def test_dropout_from_the_global_generator_is_refused(cls):
    torch.manual_seed(0)
    est = cls(model=FunctionalDropout(), meta_steps=1, meta_batch_size=2, random_state=0)
    with pytest.raises(ValueError, match="global generator") as info:
        est.meta_fit(SinusoidTasks(k_shot=5, n_query=5))
    assert "dropout" in str(info.value)
    assert not hasattr(est, "params_")


def test_refusing_global_dropout_leaves_the_global_generator_alone():
    """FunctionalModel.draws_global_randomness puts the user's global state back; the whole check
    at meta_fit must leave it as it was too."""
    torch.manual_seed(0)
    model = FunctionalDropout()
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="global generator"):
        fewshot.MAML(model=model, meta_steps=1, meta_batch_size=2, random_state=0).meta_fit(
            SinusoidTasks(k_shot=5, n_query=5))
    assert torch.equal(torch.random.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------
# 8. Learned rates are meta-parameters: params_, checkpoints, meta_gradient


@pytest.mark.parametrize("cls", [fewshot.MetaSGD, fewshot.MAMLPlusPlus])
def test_learned_rates_survive_a_checkpoint_round_trip(cls, tmp_path):
    sampler = SinusoidTasks(k_shot=5, n_query=5)
    common = dict(model=init_parameters(MLP(1, 1, (8,)), torch.Generator().manual_seed(0)), inner_steps=2,
                  inner_lr=0.05, meta_lr=0.01, meta_batch_size=2, meta_lr_horizon=4, random_state=0,
                  dtype="float64")
    once = cls(meta_steps=4, **common).meta_fit(sampler, checkpoint=tmp_path / "once.pt")
    cls(meta_steps=2, **common).meta_fit(sampler, checkpoint=tmp_path / "twice.pt")
    twice = cls(meta_steps=4, **common).meta_fit(sampler, checkpoint=tmp_path / "twice.pt")
    assert twice.n_iter_ == once.n_iter_ == 4
    rates = [n for n in once.params_ if n.startswith(LR_PREFIX)]
    names = [n for n in once.params_ if not n.startswith(LR_PREFIX)]
    assert rates == [LR_PREFIX + n for n in names]
    for n in names:
        shape = once.params_[n].shape if cls is fewshot.MetaSGD else (2,)
        assert once.params_[LR_PREFIX + n].shape == shape
    assert list(twice.params_) == list(once.params_)
    assert all(torch.equal(twice.params_[n], once.params_[n]) for n in once.params_)
    assert all(not torch.equal(once.params_[n], torch.full_like(once.params_[n], 0.05)) for n in rates)  # learned
    saved = torch.load(tmp_path / "twice.pt", weights_only=True)
    flat = repr(saved)
    assert all(n in flat for n in rates)
    (g,) = once.meta_gradient(sampler.sample(random_state=3))
    assert list(g) == list(once.params_)
    assert all(float(g[n].abs().max()) > 0 for n in rates)


@pytest.mark.parametrize("cls", [fewshot.MetaSGD, fewshot.MAMLPlusPlus])
def test_adapt_uses_the_learned_rates(cls):
    """``adapt`` runs the learned steps (MAML++: the last step's rate beyond inner_steps)."""
    sampler = SinusoidTasks(k_shot=5, n_query=5)
    est = cls(model=init_parameters(MLP(1, 1, (8,)), torch.Generator().manual_seed(0)), inner_steps=2,
              adapt_steps=4, inner_lr=0.05, meta_lr=0.05, meta_steps=3, meta_batch_size=2, random_state=0,
              dtype="float64").meta_fit(sampler)
    task = sinusoid_batch(1, seed=8)[0]
    tl = TaskLoss(est.fmodel_, *est._loss_parts)
    phi = weights_of(est.params_)
    for j in range(4):
        leaves = {n: v.detach().requires_grad_(True) for n, v in phi.items()}
        g = torch.autograd.grad(tl(leaves, *task.support), list(leaves.values()))
        with torch.no_grad():
            rate = {n: est.params_[LR_PREFIX + n] if cls is fewshot.MetaSGD else est.params_[LR_PREFIX + n][min(j, 1)]
                    for n in phi}
            phi = {n: phi[n] - rate[n] * gi for n, gi in zip(phi, g)}
    adapted = est.adapt(task.support)
    for n in phi:
        torch.testing.assert_close(adapted.params[n], phi[n], rtol=1e-13, atol=1e-15)
    rates = torch.cat([v.reshape(-1) for n, v in est.params_.items() if n.startswith(LR_PREFIX)])
    assert float(rates.max() - rates.min()) > 1e-4  # learned apart, so the check can tell them apart


@pytest.mark.parametrize("make", [lambda: fewshot.MetaSGD(inner_steps=2),
                                  lambda: fewshot.MAMLPlusPlus(inner_steps=3, multi_step_loss_steps=10),
                                  lambda: fewshot.MAMLPlusPlus(inner_steps=3, first_order_steps=5),
                                  lambda: fewshot.ANIL(inner_steps=3)])
def test_batched_meta_step_equals_task_by_task(make):
    """The meta-batch as one computation with a leading task axis (learned rates and ANIL's split
    included) gives the mean of the per-task meta-gradients."""
    from fewshot.estimators._executor import Executor

    est = make().set_params(model=init_parameters(MLP(1, 1, (8, 8)), torch.Generator().manual_seed(0)),
                            meta_steps=0, dtype="float64", random_state=0, inner_lr=0.05)
    est.meta_fit(SinusoidTasks(k_shot=5, n_query=5))
    gen = torch.Generator().manual_seed(1)
    params = {n: v * (0.5 + torch.rand(v.shape, generator=gen, dtype=DT)) if n.startswith(LR_PREFIX) else v
              for n, v in est.params_.items()}
    batch = sinusoid_batch(3)
    rule = est._rule().for_step(0)
    executor = Executor.choose(est.fmodel_, est._loss_parts, rule, params, est.input_shape_, 1)
    assert executor.batched
    g, stats = executor.mean(rule, params, batch)
    per_task = est.meta_gradient(batch, params=params)
    for n in params:
        torch.testing.assert_close(g[n], sum(t[n] for t in per_task) / len(per_task), rtol=1e-12, atol=1e-14)
