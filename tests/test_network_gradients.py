"""Meta-gradients on small networks, float64: against finite differences and against a plain
per-task autograd implementation, for a network with BatchNorm (batch statistics)."""

import contextlib
import dataclasses
import functools
import types

import numpy as np

import pytest
import torch
from torch import nn

from fewshot import linalg
from fewshot.core.functional import LOSSES, FunctionalModel, TaskLoss, make_hvp
from fewshot.core.inner import InnerProblem
from fewshot.core.rules import FirstOrder, Implicit, Unrolled, penalty_objective, query_objective
from fewshot.core.tree import tree_norm
from fewshot.estimators._executor import Executor, example_flops
from fewshot.models import MLP, Conv4, init_parameters
from fewshot.tasks import GaussianClusterTasks, SinusoidTasks

DT = torch.float64


def rel_err(a, b):
    return float(tree_norm({k: a[k] - b[k] for k in a}) / tree_norm(b))


def support_hvp(task_loss, theta, xs, ys, mode):
    """The Hessian-vector product of the support loss at theta."""
    return make_hvp(lambda p: task_loss(p, xs, ys), theta, mode)


def executor(est, params=None):
    """The :class:`Executor` ``meta_fit`` chooses for ``est`` (after ``meta_fit`` or ``_setup``)."""
    params = est.params_ if params is None else params
    return Executor.choose(est.fmodel_, est._loss_parts, est._rule(), params, est.input_shape_,
                           est.task_threads)


@contextlib.contextmanager
def task_by_task():
    """A context in which ``meta_fit`` runs every meta-batch task by task (never batched)."""
    choose = Executor.choose
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Executor, "choose", classmethod(
            lambda cls, *args, **kwargs: dataclasses.replace(choose(*args, **kwargs), batched=False)))
        yield


def smooth_mlp():
    # tanh keeps the loss smooth, so central differences are accurate
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)


def sinusoid_task():
    return SinusoidTasks(k_shot=6, n_query=7).sample(random_state=3).to(dtype=DT)


def finite_difference(fn, theta, eps=1e-6):
    out = {}
    for k, v in theta.items():
        g = torch.zeros_like(v)
        for i in range(v.numel()):
            plus = {n: t.clone() for n, t in theta.items()}
            minus = {n: t.clone() for n, t in theta.items()}
            plus[k].view(-1)[i] += eps
            minus[k].view(-1)[i] -= eps
            g.view(-1)[i] = (fn(plus) - fn(minus)) / (2 * eps)
        out[k] = g
    return out


def unrolled_value(task_loss, task, lr, steps, penalty=0.0):
    """The meta-objective as a plain function of theta (forward only), for finite differences."""
    (xs, ys), (xq, yq) = task.support, task.query

    def value(theta):
        phi = dict(theta)
        for _ in range(steps):
            with torch.enable_grad():
                leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
                g = torch.autograd.grad(task_loss(leaves, xs, ys), list(leaves.values()))
            phi = {k: phi[k] - lr * gi for k, gi in zip(phi, g)}
        out = task_loss(phi, xq, yq)
        if penalty:
            with torch.enable_grad():
                leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
                g = torch.autograd.grad(task_loss(leaves, xs, ys), list(leaves.values()))
            out = out + penalty * sum((gi ** 2).sum() for gi in g)
        return float(out)

    return value


@pytest.mark.parametrize("penalty", [0.0, 0.3])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_maml_and_penalty_match_finite_differences(penalty, memory_efficient):
    fm = FunctionalModel(smooth_mlp())
    tl = TaskLoss(fm, *LOSSES["mse"][:2])
    theta, task, lr, steps = fm.init_params(), sinusoid_task(), 0.05, 3
    objective = functools.partial(penalty_objective, penalty=penalty) if penalty else query_objective
    g, _ = Unrolled(InnerProblem(steps, lr), objective, memory_efficient=memory_efficient)(tl, theta, task)
    fd = finite_difference(unrolled_value(tl, task, lr, steps, penalty), theta)
    assert rel_err(g, fd) < 1e-6


def conv_task_loss():
    """A small Conv4 (8 filters) with batch-statistics BatchNorm, in float64."""
    sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=1 * 16 * 16)
    small = init_parameters(Conv4(in_channels=1, n_outputs=3, hidden=8, image_size=16),
                            torch.Generator().manual_seed(1)).to(DT)
    fm = FunctionalModel(small)
    batch = sampler.sample(2, random_state=0).to(dtype=DT)
    tasks = [type(t)(type(t.support)(t.support.x.reshape(-1, 1, 16, 16), t.support.y),
                     type(t.query)(t.query.x.reshape(-1, 1, 16, 16), t.query.y)) for t in batch]
    return TaskLoss(fm, *LOSSES["cross_entropy"][:2]), fm.init_params(), tasks


def autograd_maml(task_loss, theta, task, lr, steps):
    """Reference: plain torch.autograd with create_graph, one task at a time."""
    (xs, ys), (xq, yq) = task.support, task.query
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    phi = dict(leaves)
    for _ in range(steps):
        g = torch.autograd.grad(task_loss(phi, xs, ys), list(phi.values()), create_graph=True)
        phi = {k: p - lr * gi for (k, p), gi in zip(phi.items(), g)}
    out = torch.autograd.grad(task_loss(phi, xq, yq), list(leaves.values()))
    return dict(zip(leaves, out))


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_maml_matches_plain_autograd_through_batchnorm(memory_efficient):
    tl, theta, tasks = conv_task_loss()
    for task in tasks:
        g, _ = Unrolled(InnerProblem(2, 0.4), query_objective, memory_efficient=memory_efficient)(tl, theta, task)
        assert rel_err(g, autograd_maml(tl, theta, task, 0.4, 2)) < 1e-10


def test_first_order_matches_plain_autograd_through_batchnorm():
    tl, theta, tasks = conv_task_loss()
    task = tasks[0]
    (xs, ys), (xq, yq) = task.support, task.query
    phi = dict(theta)
    for _ in range(2):
        leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        g = torch.autograd.grad(tl(leaves, xs, ys), list(leaves.values()))
        phi = {k: phi[k] - 0.4 * gi for k, gi in zip(phi, g)}
    leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    ref = dict(zip(leaves, torch.autograd.grad(tl(leaves, xq, yq), list(leaves.values()))))
    g, _ = FirstOrder(InnerProblem(2, 0.4))(tl, theta, task)
    assert rel_err(g, ref) < 1e-12


@pytest.mark.parametrize("mode", ["fwdrev", "revrev"])
def test_hvp_matches_finite_difference_of_gradients_through_batchnorm(mode):
    tl, theta, tasks = conv_task_loss()
    (xs, ys) = tasks[0].support
    v = {k: torch.randn(t.shape, dtype=DT, generator=torch.Generator().manual_seed(7)) for k, t in theta.items()}
    norm = tree_norm(v)
    v = {k: t / norm for k, t in v.items()}
    hv = support_hvp(tl, theta, xs, ys, mode)(v)
    grad_at = lambda s: torch.func.grad(tl)({k: theta[k] + s * v[k] for k in theta}, xs, ys)
    eps = 1e-6
    plus, minus = grad_at(eps), grad_at(-eps)
    fd = {k: (plus[k] - minus[k]) / (2 * eps) for k in theta}
    assert rel_err(hv, fd) < 1e-6


def test_implicit_gradient_matches_dense_solve_through_batchnorm():
    tl, theta, tasks = conv_task_loss()
    # lam large enough that I + H/lam is positive definite for this network
    rule = lambda solve: Implicit(InnerProblem(3, 0.1, lam=20.0), solve)
    exact, _ = rule(linalg.solve_dense())(tl, theta, tasks[0])
    g, stats = rule(linalg.solve_cg(maxiter=200, tol=1e-12))(tl, theta, tasks[0])
    assert rel_err(g, exact) < 1e-8
    assert float(stats["negative_curvature"]) == 0.0


class StockConv4(nn.Module):
    """The textbook block order [conv, batch norm, ReLU, nn.MaxPool2d] with ``fast``'s weights."""

    def __init__(self, fast: Conv4):
        super().__init__()
        blocks = [nn.Sequential(b[0], b[1], nn.ReLU(), nn.MaxPool2d(2)) for b in fast.features[:4]]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = fast.head

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("image_size", [28, 16])
def test_fast_pooling_conv4_matches_textbook_conv4(image_size):
    fast = init_parameters(Conv4(in_channels=1, n_outputs=3, hidden=8, image_size=image_size),
                           torch.Generator().manual_seed(2)).to(DT)
    ref = StockConv4(fast)
    f_fast, f_ref = FunctionalModel(fast), FunctionalModel(ref)
    theta = f_fast.init_params()
    assert set(theta) == set(f_ref.init_params())
    gen = torch.Generator().manual_seed(0)
    xs, xq = (torch.rand((n, 1, image_size, image_size), generator=gen, dtype=DT) for n in (6, 9))
    ys, yq = torch.arange(3).repeat(2), torch.arange(3).repeat(3)
    task = type(sinusoid_task())(type(sinusoid_task().support)(xs, ys), type(sinusoid_task().query)(xq, yq))
    torch.testing.assert_close(f_fast(theta, xq), f_ref(theta, xq), rtol=1e-12, atol=1e-12)
    losses = [TaskLoss(f, *LOSSES["cross_entropy"][:2]) for f in (f_fast, f_ref)]
    g_fast, g_ref = (Unrolled(InnerProblem(2, 0.4), query_objective)(tl, theta, task)[0] for tl in losses)
    assert rel_err(g_fast, g_ref) < 1e-12
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in theta.items()}
    h_fast, h_ref = (support_hvp(tl, theta, xs, ys, "fwdrev")(v) for tl in losses)
    assert rel_err(h_fast, h_ref) < 1e-12
    # vmap (used for non-transductive prediction) through the fast pooling
    batched = torch.func.vmap(lambda x: f_fast(theta, x))(xq.reshape(3, 3, 1, image_size, image_size))
    looped = torch.stack([f_ref(theta, x) for x in xq.reshape(3, 3, 1, image_size, image_size)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["MAML", "FOMAML", "IMAML", "NeumannMAML", "PenaltyMAML", "Reptile"])
def test_task_threads_give_the_same_meta_gradients(name):
    """The threaded path (per-thread module copies, reverse-over-reverse Hessian-vector products)
    against the sequential one, on a network with batch-statistics BatchNorm, in float64."""
    import fewshot
    from fewshot.tasks import LabeledSet, TaskBatch

    class Images(GaussianClusterTasks):
        def _sample(self, n, gen):
            b = super()._sample(n, gen)
            as_images = lambda s: LabeledSet(s.x.reshape(n, -1, 1, 16, 16), s.y)
            return TaskBatch(as_images(b.support), as_images(b.query))

    sampler = Images(n_way=3, k_shot=2, n_query=2, n_features=256, n_classes=12)
    sampler.input_shape = (1, 16, 16)
    model = init_parameters(Conv4(in_channels=1, n_outputs=3, hidden=4, image_size=16),
                            torch.Generator().manual_seed(0))
    est = getattr(fewshot, name)(model=model, meta_steps=2, meta_batch_size=6, inner_steps=2,
                                 dtype="float64", random_state=0)
    one = est.set_params(task_threads=1).meta_fit(sampler)
    two = fewshot.SOLVERS[name](**est.get_params()).set_params(task_threads=3).meta_fit(sampler)
    for k in one.params_:
        torch.testing.assert_close(one.params_[k], two.params_[k], rtol=1e-8, atol=1e-10)
    for k in one.history_:
        if k != "time":
            np.testing.assert_allclose(one.history_[k], two.history_[k], rtol=1e-8, atol=1e-10)


BATCHED_CASES = [("MAML", {}), ("MAML", {"memory_efficient": True}), ("FOMAML", {}), ("Reptile", {}),
                 ("PenaltyMAML", {"penalty": 0.5})]


@pytest.mark.parametrize("sampler", [SinusoidTasks(k_shot=4, n_query=3),
                                     GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=6)],
                         ids=["mse", "cross_entropy"])
@pytest.mark.parametrize("name,options", BATCHED_CASES,
                         ids=lambda v: v if isinstance(v, str) else str(v or ""))
def test_batched_tasks_give_the_same_meta_steps(name, options, sampler):
    """A small network of linear layers runs the meta-batch as one batched computation; its
    meta-gradients, parameters and history equal the task-by-task path's in float64."""
    import fewshot

    def fit(batched):
        model = init_parameters(MLP(sampler.input_shape[0], sampler.n_outputs, (7, 5)),
                                torch.Generator().manual_seed(0))
        est = fewshot.SOLVERS[name](model=model, meta_steps=3, meta_batch_size=5, inner_steps=2,
                                    dtype="float64", random_state=0, **options)
        if not batched:
            with task_by_task():
                return est.meta_fit(sampler)
        return est.meta_fit(sampler)

    batched, looped = fit(True), fit(False)
    assert executor(batched).batched
    for k in looped.params_:
        torch.testing.assert_close(batched.params_[k], looped.params_[k], rtol=1e-12, atol=1e-14)
    assert sorted(batched.history_) == sorted(looped.history_)
    for k in looped.history_:
        if k != "time":
            np.testing.assert_allclose(batched.history_[k], looped.history_[k], rtol=1e-12, atol=1e-14)


def test_batched_tasks_only_where_exact_and_cheaper():
    """Batching needs a rule without inner products across the parameters (not IMAML's CG or the
    Neumann series), per-task example indexing (not Reptile's class batches or support+query inner
    loop) and a network of linear layers; anything else runs task by task."""
    import fewshot

    def batched(name, model=None, sampler=None, **options):
        est = fewshot.SOLVERS[name](model=model or "auto", meta_steps=0, random_state=0, **options)
        return executor(est.meta_fit(sampler or SinusoidTasks())).batched

    assert batched("MAML") and batched("FOMAML") and batched("Reptile") and batched("PenaltyMAML")
    assert not batched("IMAML") and not batched("NeumannMAML")
    assert batched("Reptile", sampler=GaussianClusterTasks())
    assert not batched("Reptile", sampler=GaussianClusterTasks(), inner_shots=1)
    assert not batched("Reptile", inner_data="task")
    tanh = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))  # no direct plan
    assert not batched("MAML", model=tanh)
    assert not FunctionalModel(Conv4(hidden=4)).batchable
    assert not FunctionalModel(nn.Sequential(nn.Flatten(0), nn.Linear(4, 1))).batchable


def test_batched_forward_is_the_per_task_forward():
    """Linear layers with and without bias, on inputs with extra axes, and a Flatten past them."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).to(DT)
    fm = FunctionalModel(net)
    assert fm.batchable
    params = {k: torch.randn(5, *v.shape, generator=gen, dtype=DT) for k, v in net.named_parameters()}
    x = torch.randn(5, 6, 2, 3, generator=gen, dtype=DT)
    looped = torch.stack([fm({k: v[t] for k, v in params.items()}, x[t]) for t in range(5)])
    torch.testing.assert_close(fm.batched(params, x), looped, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot run tasks batched"):
        FunctionalModel(Conv4(hidden=4)).batched({}, x)


def test_batched_tasks_with_a_custom_loss():
    """A loss given as a callable is applied task by task inside the batched computation."""
    import fewshot

    huber = lambda out, y: torch.nn.functional.huber_loss(out, y.reshape(out.shape), delta=0.3)
    runs = []
    for batched in (True, False):
        est = fewshot.MAML(loss=huber, meta_steps=2, meta_batch_size=4, inner_steps=2, dtype="float64",
                           random_state=0)
        if batched:
            runs.append(est.meta_fit(SinusoidTasks()))
        else:
            with task_by_task():
                runs.append(est.meta_fit(SinusoidTasks()))
    assert executor(runs[0]).batched
    for k in runs[0].params_:
        torch.testing.assert_close(runs[0].params_[k], runs[1].params_[k], rtol=1e-12, atol=1e-14)


def test_a_meta_step_frees_each_task_gradient_once_summed():
    """Keeping all per-task gradients to the end of a meta-step raised MAML's peak memory (the
    gradients pinned the top of the malloc heap): each must be freed before the next task ends.
    One task thread, so the order is deterministic (with threads the reduction is the same loop,
    and test_task_threads_give_the_same_meta_gradients checks its values). The mean itself is
    checked against an explicit average of the per-task gradients."""
    import gc
    import weakref

    import fewshot
    est = fewshot.FOMAML(model=MLP(1, 1, hidden=(8,)), meta_steps=0, meta_batch_size=8, inner_steps=1,
                         dtype="float64", random_state=0, task_threads=1).meta_fit(SinusoidTasks())
    batch = SinusoidTasks().sample(8, random_state=1).to("cpu", torch.float64)
    alive, rule = [], FirstOrder(est.inner_)
    peak = []

    class Tracked(dict):  # a plain dict cannot be weakly referenced
        pass

    def tracked_rule(task_loss, theta, task):
        g, stats = rule(task_loss, theta, task)
        gc.collect()
        peak.append(sum(r() is not None for r in alive))
        g = Tracked(g)
        alive.append(weakref.ref(g))
        return g, stats

    step_executor = Executor.choose(est.fmodel_, est._loss_parts, tracked_rule, est.params_, est.input_shape_,
                                    est.task_threads)
    assert not step_executor.batched and step_executor.workers == 1
    grads, _ = est._step(step_executor, tracked_rule, est.params_, batch, None)
    assert len(peak) == 8 and max(peak) == 0  # no earlier task's gradient is alive when one ends
    per_task = est.meta_gradient(batch)
    for k in grads:
        torch.testing.assert_close(grads[k], sum(g[k] for g in per_task) / len(per_task))


@pytest.mark.parametrize("inner_data", ["support", "task"])
def test_reptile_matches_plain_autograd_through_batchnorm(inner_data):
    from fewshot.core.rules import ReptileRule

    tl, theta, tasks = conv_task_loss()
    for task in tasks:
        (xs, ys), (xq, yq) = task.support, task.query
        x, y = (xs, ys) if inner_data == "support" else (torch.cat([xs, xq]), torch.cat([ys, yq]))
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        for _ in range(3):
            g = torch.autograd.grad(tl(phi, x, y), list(phi.values()))
            phi = {k: (p - 0.4 * gi).detach().requires_grad_(True) for (k, p), gi in zip(phi.items(), g)}
        g, stats = ReptileRule(InnerProblem(3, 0.4), inner_data)(tl, theta, task)
        assert rel_err(g, {k: theta[k] - phi[k].detach() for k in theta}) < 1e-12
        # the reported support loss is on the support set alone, whatever the inner loop used
        torch.testing.assert_close(stats["support_loss_pre"], tl(theta, xs, ys).detach())
        if inner_data == "task":  # (the batch statistics of the union differ from the support's)
            assert rel_err(g, ReptileRule(InnerProblem(3, 0.4))(tl, theta, task)[0]) > 1e-3


def test_reptile_mini_batches_match_plain_autograd_through_batchnorm():
    """inner_shots=1 on support and query: inner step j on the j-th example of every class."""
    from fewshot.core.rules import ReptileRule

    tl, theta, tasks = conv_task_loss()  # 3 classes, 2 support + 2 query examples per class
    for task in tasks:
        (xs, ys), (xq, yq) = task.support, task.query
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        for j in range(6):  # 4 examples per class: the fifth and sixth steps start over
            batch = torch.stack([torch.nonzero(y == c).flatten()[j % 4] for c in range(3)])
            g = torch.autograd.grad(tl(phi, x[batch], y[batch]), list(phi.values()))
            phi = {k: (p - 0.4 * gi).detach().requires_grad_(True) for (k, p), gi in zip(phi.items(), g)}
        g, stats = ReptileRule(InnerProblem(6, 0.4), "task", 1)(tl, theta, task)
        assert rel_err(g, {k: theta[k] - phi[k].detach() for k in theta}) < 1e-12
        torch.testing.assert_close(stats["support_loss_pre"], tl(theta, xs, ys).detach())


def test_class_batches():
    from fewshot.core.rules import _class_batches

    y = torch.tensor([2, 0, 1, 0, 1, 2, 0, 1, 2])  # three examples of each class
    assert [b.tolist() for b in _class_batches(y, 1, 4)] == [[1, 2, 0], [3, 4, 5], [6, 7, 8], [1, 2, 0]]
    assert [b.tolist() for b in _class_batches(y, 2, 2)] == [[1, 3, 2, 4, 0, 5], [6, 1, 7, 2, 8, 0]]
    with pytest.raises(ValueError, match="same number of examples of every class"):
        _class_batches(torch.tensor([0, 0, 1]), 1, 1)


class Conv4Subclass(Conv4):
    def forward(self, x):  # a different function: the direct path must not be used
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("kind", ["conv4", "mlp"])
def test_direct_forward_of_reference_networks_matches_functional_call(kind):
    """fewshot.models' Conv4 and MLP run layer by layer on the parameter dict (no functional_call);
    values, second-order meta-gradients and Hessian-vector products are those through the module."""
    gen = torch.Generator().manual_seed(4)
    if kind == "conv4":
        module = init_parameters(Conv4(in_channels=1, n_outputs=3, hidden=8, image_size=16), gen).to(DT)
        xs, xq = (torch.rand((n, 1, 16, 16), generator=gen, dtype=DT) for n in (6, 9))
        ys, yq = torch.arange(3).repeat(2), torch.arange(3).repeat(3)
        loss = LOSSES["cross_entropy"][:2]
    else:
        module = init_parameters(MLP(1, 1, (8, 8)), gen).to(DT)
        xs, xq = (torch.rand((n, 1), generator=gen, dtype=DT) for n in (6, 9))
        ys, yq = torch.rand(6, generator=gen, dtype=DT), torch.rand(9, generator=gen, dtype=DT)
        loss = LOSSES["mse"][:2]
    fmodel = FunctionalModel(module)
    assert fmodel._plan is not None  # the direct path is the one under test
    theta = fmodel.init_params()
    torch.testing.assert_close(fmodel(theta, xq), fmodel.call_module(theta, xq), rtol=0, atol=0)

    class ThroughModule(FunctionalModel):
        __call__ = FunctionalModel.call_module

    task = type(sinusoid_task())(type(sinusoid_task().support)(xs, ys), type(sinusoid_task().query)(xq, yq))
    losses = [TaskLoss(f, *loss) for f in (fmodel, ThroughModule(module))]
    g_direct, g_module = (Unrolled(InnerProblem(2, 0.4), query_objective)(tl, theta, task)[0] for tl in losses)
    assert rel_err(g_direct, g_module) < 1e-12
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in theta.items()}
    h_direct, h_module = (support_hvp(tl, theta, xs, ys, "fwdrev")(v) for tl in losses)
    assert rel_err(h_direct, h_module) < 1e-12


def test_direct_forward_only_for_unmodified_reference_networks():
    assert FunctionalModel(Conv4(hidden=4))._plan is not None
    assert FunctionalModel(Conv4Subclass(hidden=4))._plan is None
    assert FunctionalModel(smooth_mlp())._plan is None  # Tanh: not a layer the direct path knows
    relu_mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 1))).to(DT)
    plain = FunctionalModel(relu_mlp)
    assert plain._plan is not None  # a plain Sequential of known layers
    x = torch.rand(5, 1, dtype=DT)
    torch.testing.assert_close(plain(dict(relu_mlp.named_parameters()), x), relu_mlp(x), rtol=0, atol=0)
    tracked = Conv4(hidden=4)
    tracked.features[0][1] = nn.BatchNorm2d(4)  # running statistics: buffers
    assert FunctionalModel(tracked)._plan is None
    hooked = Conv4(hidden=4)
    hooked.features[1].register_forward_hook(lambda m, i, o: None)  # only runs through the module
    assert FunctionalModel(hooked)._plan is None
    odd = MLP(1, 1, (4,))
    odd.features[2] = nn.Tanh()  # a layer the direct path does not know
    assert FunctionalModel(odd)._plan is None
    x = torch.rand(3, 1)
    torch.testing.assert_close(FunctionalModel(odd)(dict(odd.named_parameters()), x), odd(x))


def test_auto_task_threads_follow_the_cost_of_a_forward_pass():
    """"auto" threads tasks for networks of at least 1 MFLOP per example (Omniglot's Conv4: 19.6)
    and runs small ones (the sinusoid MLP: 3.4 kFLOP) on one thread."""
    import fewshot

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = fewshot.MAML(meta_steps=1, meta_batch_size=2, random_state=0).meta_fit(SinusoidTasks())
        assert example_flops(small.fmodel_, small.params_, small.input_shape_) == 2 * (1 * 40 + 40 * 40 + 40 * 1)
        assert executor(small).workers == 1
        assert executor(small.set_params(task_threads=2)).workers == 2  # an explicit count is kept
        # Omniglot's tasks without the data: what _setup reads of a sampler
        omniglot = types.SimpleNamespace(task_type="classification", input_shape=(1, 28, 28), n_outputs=5)
        conv = fewshot.MAML(model=Conv4(n_outputs=5), meta_steps=0)
        theta = conv._setup(omniglot, torch.device("cpu"), torch.float32, 0)
        assert abs(example_flops(conv.fmodel_, theta, conv.input_shape_) - 19.63e6) < 0.01e6  # docs/benchmarks.md's count by hand
        assert executor(conv, theta).workers == 2
        # Hessian-vector products on one thread: reverse-over-reverse for the small network
        # (cheaper per product), forward-over-reverse for Conv4 (no graph kept between products);
        # the task losses handed to the rule carry the choice
        small_imaml = fewshot.IMAML(task_threads=1, meta_steps=1, meta_batch_size=2).meta_fit(SinusoidTasks())
        assert executor(small_imaml).hvp_mode == "revrev" == executor(small_imaml).task_loss().hvp_mode
        conv_imaml = fewshot.IMAML(model=Conv4(n_outputs=5), task_threads=1)
        theta = conv_imaml._setup(omniglot, torch.device("cpu"), torch.float32, 0)
        assert executor(conv_imaml, theta).hvp_mode == "fwdrev" == executor(conv_imaml, theta).task_loss().hvp_mode
    finally:
        torch.set_num_threads(before)
