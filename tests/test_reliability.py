"""Divergence, ill-conditioned solves and malformed input: loud, early, never silent garbage."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fewshot
from fewshot.exceptions import DivergenceError, SolverWarning
from fewshot.tasks import GaussianClusterTasks, LabeledSet, SinusoidTasks

ESTIMATORS = list(fewshot.SOLVERS.values())


def test_divergence_stops_with_named_error_and_keeps_last_finite_params():
    sampler = SinusoidTasks()
    est = fewshot.FOMAML(meta_optimizer="sgd", meta_lr=50.0, inner_lr=0.01, inner_steps=2, meta_steps=50,
                         meta_batch_size=4, random_state=0)
    with pytest.raises(DivergenceError) as info:
        est.meta_fit(sampler)
    err = info.value
    assert est.n_iter_ >= 1, "this setting should survive at least one step"
    assert err.solver == "FOMAML" and err.step == est.n_iter_ + 1
    assert f"meta-step {err.step}" in str(err) and "FOMAML" in str(err)
    assert err.last_finite == {k: v[-1] for k, v in est.history_.items()}
    assert all(torch.isfinite(p).all() for p in est.params_.values())
    assert all(math.isfinite(v) for values in est.history_.values() for v in values)
    assert len(est.history_["time"]) == est.n_iter_


def test_reptile_with_the_reports_outer_rate_is_caught_or_clipped():
    """The report's Reptile at outer learning rate 0.1 diverged. A large inner step makes it blow up
    here within a few steps: it must raise, and gradient clipping is the documented remedy."""
    sampler = SinusoidTasks()
    kw = dict(outer_stepsize=0.1, inner_lr=0.3, inner_steps=10, meta_batch_size=4, meta_steps=40, random_state=0)
    with pytest.raises(DivergenceError, match="Reptile diverged"):
        fewshot.Reptile(**kw).meta_fit(sampler)


def test_an_inner_loop_that_raises_the_support_loss_stops_training():
    """Adaptation that makes the mean support loss worse in 20 consecutive meta-steps, with every
    value finite (IMAML at Adam 5e-3 on Omniglot fell to chance accuracy that way), raises
    DivergenceError; a stable inner step on the same tasks trains on."""
    from torch import nn

    from fewshot.tasks import LinearRegressionTasks

    sampler = LinearRegressionTasks(n_features=8, k_shot=10, n_query=10)
    # one gradient step of 1.0 on the support MSE overshoots along the Hessian's top eigenvalues (~7)
    kw = dict(model=nn.Sequential(nn.Linear(8, 1)), inner_steps=1, meta_steps=40, meta_batch_size=4,
              random_state=0)
    est = fewshot.MAML(inner_lr=1.0, **kw)
    with pytest.raises(DivergenceError, match="broke down at meta-step 20") as info:
        est.meta_fit(sampler)
    assert info.value.step == 20 and est.n_iter_ == 19 and info.value.solver == "MAML"
    pre, post = est.history_["support_loss_pre"], est.history_["support_loss_post"]
    assert all(math.isfinite(v) for v in pre + post) and all(b > a for a, b in zip(pre, post))
    stable = fewshot.MAML(inner_lr=0.05, **kw).meta_fit(sampler)
    assert stable.n_iter_ == 40
    # Reptile's inner loop on support+query or in class batches need not lower the support loss
    from fewshot.core.inner import InnerProblem
    from fewshot.core.rules import ReptileRule

    inner = InnerProblem(1, 0.1)
    assert ReptileRule(inner).fits_support
    assert not ReptileRule(inner, "task").fits_support and not ReptileRule(inner, shots=1).fits_support


def test_the_breakdown_count_carries_over_resumed_and_warm_started_fits(tmp_path):
    """The 20-step count of rising support losses spans fits: a run in chunks of 7 meta-steps
    (checkpoint resumes, or warm starts) stops at the same meta-step as one uninterrupted fit."""
    from torch import nn

    from fewshot.tasks import LinearRegressionTasks

    sampler = LinearRegressionTasks(n_features=8, k_shot=10, n_query=10)
    kw = dict(model=nn.Sequential(nn.Linear(8, 1)), inner_steps=1, meta_batch_size=4, random_state=0,
              inner_lr=1.0)
    path = tmp_path / "run.pt"
    with pytest.raises(DivergenceError, match="broke down at meta-step 20"):
        for total in range(7, 41, 7):
            fewshot.MAML(meta_steps=total, **kw).meta_fit(sampler, checkpoint=path)
    warm = fewshot.MAML(meta_steps=7, warm_start=True, **kw)
    with pytest.raises(DivergenceError, match="broke down at meta-step 20"):
        for _ in range(6):
            warm.meta_fit(sampler)


def test_grad_clip_bounds_the_update():
    sampler = SinusoidTasks()
    est = fewshot.FOMAML(meta_optimizer="sgd", meta_lr=1.0, grad_clip=1e-3, meta_steps=1,
                         meta_batch_size=4, random_state=0)
    before = {k: v.clone() for k, v in fewshot.FOMAML(meta_steps=0, random_state=0).meta_fit(sampler).params_.items()}
    est.meta_fit(sampler)
    step = torch.sqrt(sum(((est.params_[k] - before[k]) ** 2).sum() for k in before))
    assert float(step) <= 1e-3 * (1 + 1e-5)
    assert est.history_["meta_grad_norm"][0] > 1e-3  # the raw norm is recorded, unclipped


def test_cg_negative_curvature_is_handled_and_warned():
    # A tiny lam makes I + H/lam indefinite wherever H has a negative eigenvalue.
    sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=8, n_classes=12)
    est = fewshot.IMAML(lam=1e-4, inner_steps=3, cg_steps=20, meta_steps=3, meta_batch_size=4, random_state=0)
    with pytest.warns(SolverWarning, match="non-positive curvature"):
        est.meta_fit(sampler)
    assert all(np.isfinite(v).all() for v in est.history_.values())
    assert max(est.history_["negative_curvature"]) > 0


@pytest.mark.parametrize("key, fractions, warns", [
    # the second half of the fit decides: early failures at a random initialisation pass
    ("negative_curvature", [1.0, 1.0, 1.0, 0.0, 0.25, 0.5], False),  # 25% of the second half's solves
    ("negative_curvature", [0.0, 0.0, 0.0, 0.75, 1.0, 0.0], True),   # 58%
    ("solve_diverged", [1.0, 1.0, 0.0, 0.0], False),                # none
    ("solve_diverged", [0.0, 0.0, 1.0, 0.0], False),                # exactly half
    ("solve_diverged", [0.0, 0.0, 1.0, 0.25], True),
])
def test_solver_warning_fires_only_when_most_solves_failed(key, fractions, warns):
    est = fewshot.IMAML(meta_steps=0, random_state=0).meta_fit(SinusoidTasks())  # its rule, unfitted
    est.history_ = {key: [0.0] * 10 + fractions}  # the first 10 steps belong to an earlier fit
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        est._warn_about_solves(first_step=10)
    assert [issubclass(w.category, SolverWarning) for w in record] == ([True] if warns else [])


def test_diverging_neumann_series_is_reported():
    sampler = SinusoidTasks()
    est = fewshot.NeumannMAML(lam=0.01, neumann_terms=6, neumann_lr=1.0, inner_steps=2, meta_steps=2,
                              meta_batch_size=2, meta_lr=1e-6, random_state=0)
    with pytest.warns(SolverWarning, match="Neumann series diverged"):
        est.meta_fit(sampler)
    assert max(est.history_["solve_diverged"]) > 0
    assert all(np.isfinite(v).all() for v in est.history_.values())


def test_solver_diagnostics_are_recorded():
    sampler = SinusoidTasks()
    est = fewshot.IMAML(lam=10.0, cg_steps=4, meta_steps=2, meta_batch_size=2, random_state=0).meta_fit(sampler)
    assert all(1 <= it <= 4 for it in est.history_["solve_iters"])
    assert all(0 <= r < 1 for r in est.history_["solve_residual"])


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_same_random_state_bit_identical_predictions(cls):
    sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=4, n_classes=12)
    kw = dict(meta_steps=3, random_state=7, **({} if cls is fewshot.FineTune else dict(meta_batch_size=3, inner_steps=2)))
    a, b = cls(**kw).meta_fit(sampler), cls(**kw).meta_fit(sampler)
    task = sampler.sample(random_state=3)
    assert torch.equal(a.adapt(task.support).predict_proba(task.query.x),
                       b.adapt(task.support).predict_proba(task.query.x))


# --------------------------------------------------------------------------- fuzzing the entry points
FITTED = {}


def fitted(cls):
    if cls not in FITTED:
        sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=4, n_classes=12)
        kw = dict(meta_steps=1, random_state=0, **({} if cls is fewshot.FineTune else dict(meta_batch_size=2, inner_steps=1)))
        FITTED[cls] = cls(**kw).meta_fit(sampler)
    return FITTED[cls]


@st.composite
def malformed_support(draw):
    n = draw(st.integers(0, 7))
    dims = draw(st.sampled_from([(4,), (5,), (2, 2), ()]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64]))
    x = torch.randn((n, *dims)).to(dtype)
    if draw(st.booleans()) and x.is_floating_point() and x.numel():
        x.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf")]))
    ylabels = draw(st.lists(st.integers(-2, 5), min_size=0, max_size=8))
    ydtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32]))
    y = torch.tensor(ylabels).to(ydtype)
    return x, y


@pytest.mark.parametrize("cls", ESTIMATORS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=malformed_support())
def test_fuzz_adapt_either_works_or_raises_a_clear_error(cls, data):
    est = fitted(cls)
    x, y = data
    try:
        adapted = est.adapt((x, y))
    except (ValueError, TypeError) as exc:
        assert any(w in str(exc) for w in ("support", "x", "y")), str(exc)
        return
    # Accepted only if it really was a valid support set: then predictions are sane.
    assert x.shape[1:] == (4,) and x.is_floating_point() and torch.isfinite(x).all()
    assert set(y.tolist()) == {0, 1, 2} and y.shape == (x.shape[0],)
    proba = adapted.predict_proba(torch.randn(5, 4))
    assert torch.isfinite(proba).all() and torch.allclose(proba.sum(1), torch.ones(5))


class Int32Labels(GaussianClusterTasks):
    """Tasks whose labels come as int32, as from numpy on some platforms."""

    def _sample(self, n, gen):
        good = super()._sample(n, gen)
        return type(good)(*(LabeledSet(part.x, part.y.int()) for part in (good.support, good.query)))


@pytest.mark.parametrize("cls", [fewshot.MAML, fewshot.IMAML, fewshot.FineTune])
def test_integer_labels_of_any_dtype_work_as_int64(cls):
    est = fitted(cls)
    kw = dict(n_way=3, k_shot=2, n_query=2, n_features=4, n_classes=12)
    x, y = GaussianClusterTasks(**kw).sample(random_state=1).support
    query = torch.randn(5, 4)
    expected = est.adapt((x, y)).predict_proba(query)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(est.adapt((x, y.to(dtype))).predict_proba(query), expected)
    assert est.score(Int32Labels(**kw), n_tasks=3) == est.score(GaussianClusterTasks(**kw), n_tasks=3)
    if cls is not fewshot.FineTune:  # meta-training on int32 labels: the same run as on int64
        common = dict(meta_steps=2, random_state=0, meta_batch_size=2, inner_steps=1)
        a = cls(**common).meta_fit(Int32Labels(**kw))
        b = cls(**common).meta_fit(GaussianClusterTasks(**kw))
        for k in a.params_:
            torch.testing.assert_close(a.params_[k], b.params_[k], rtol=0, atol=0)


class BadSampler(fewshot.tasks.TaskSampler):
    task_type, input_shape, n_outputs, n_way = "classification", (4,), 3, 3

    def __init__(self, mode):
        self.mode = mode
        self.n_pretrain_outputs = 3

    def _sample(self, n, gen):
        good = GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=4, n_classes=12)._sample(n, gen)
        if self.mode == "labels":
            return type(good)(LabeledSet(good.support.x, good.support.y + 1), good.query)
        if self.mode == "nan":
            return type(good)(LabeledSet(good.support.x * float("nan"), good.support.y), good.query)
        if self.mode == "shape":
            return type(good)(LabeledSet(good.support.x[..., :3], good.support.y), good.query)
        return [good]  # wrong type

    def sample_pretraining(self, batch_size, *, random_state=None, device=None):
        if self.mode == "nan":
            return LabeledSet(torch.full((batch_size, 4), float("nan")), torch.zeros(batch_size, dtype=torch.int64))
        return LabeledSet(torch.randn(batch_size, 4), torch.zeros(batch_size, dtype=torch.int64))


@pytest.mark.parametrize("cls", [c for c in ESTIMATORS if c is not fewshot.FineTune])
@pytest.mark.parametrize("mode, error, match", [
    ("labels", ValueError, "labels must lie in 0..2"),
    ("nan", ValueError, "NaN"),
    ("shape", ValueError, "shape"),
    ("type", TypeError, "must return a TaskBatch"),
])
def test_bad_sampler_output_is_named(cls, mode, error, match):
    est = cls(meta_steps=2, meta_batch_size=2, inner_steps=1, random_state=0)
    with pytest.raises(error, match=match):
        est.meta_fit(BadSampler(mode))


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 4), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from(["auto", "bogus", "", "float64"]))


@pytest.mark.parametrize("cls", ESTIMATORS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["inner_lr", "inner_steps", "meta_lr", "meta_steps", "adapt_steps", "grad_clip",
                             "meta_optimizer", "loss", "model", "dtype", "task_threads", "transductive"]),
       value=VALUES)
@example(name="meta_lr", value=3.402823466385288e+37)  # once crashed inside Adam (float32 overflow)
def test_fuzz_hyperparameters_work_or_name_the_parameter(cls, name, value):
    sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=4, n_classes=12)
    base = dict(meta_steps=1, random_state=0, **({} if cls is fewshot.FineTune else dict(meta_batch_size=2, inner_steps=1)))
    est = cls(**base).set_params(**{name: value})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            est.meta_fit(sampler)
    except (ValueError, TypeError) as exc:
        assert name in str(exc), f"{name}={value!r}: {exc}"
        return
    except DivergenceError:
        return  # a legal but unstable setting (e.g. a huge step) stops loudly
    assert all(torch.isfinite(p).all() for p in est.params_.values())


class _Terminal:
    """A stand-in for a terminal's standard error (what a person running a script sees)."""

    def __init__(self):
        self.text = []

    def isatty(self):
        return True

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass


@pytest.mark.parametrize("verbose, terminal, shown", [
    ("auto", False, False),   # pytest's capture, pipes, batch jobs: silent
    ("auto", True, True),     # a terminal: a bar (after _progress.DELAY seconds)
    (0, True, False),
    (1, False, True),
])
def test_progress_bar_shows_only_when_a_person_watches(monkeypatch, verbose, terminal, shown):
    import sys

    from fewshot.estimators import _progress

    if terminal:
        monkeypatch.setattr(sys, "stderr", _Terminal())
    est = fewshot.MAML(verbose=verbose)
    bar = _progress.progress_bar(est.verbose, 10, type(est).__name__)  # what meta_fit shows
    try:
        assert (bar is not None) == shown
        if bar is not None:
            assert bar.delay == (_progress.DELAY if verbose == "auto" else 0)
    finally:
        if bar is not None:
            bar.close()


def test_backtracking_keeps_the_implicit_solvers_inner_loop_from_diverging():
    # Steps of 0.5 are far too large for the sinusoid network's support-loss curvature: the fixed
    # step blows the inner loop up at once; with backtracking every step lowers the proximal objective.
    from fewshot.core.inner import InnerProblem

    sampler = SinusoidTasks()
    kw = dict(inner_lr=0.5, inner_steps=5, meta_steps=10, meta_batch_size=4, random_state=0, verbose=0)
    with pytest.raises(DivergenceError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            fewshot.IMAML(backtracking=False, **kw).meta_fit(sampler)
    for cls in (fewshot.IMAML, fewshot.NeumannMAML):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            est = cls(**kw).meta_fit(sampler)
        h = est.history_
        assert all(post <= pre for pre, post in zip(h["support_loss_pre"], h["support_loss_post"]))
        # adapt runs the same inner loop as meta-training
        task = sampler.sample(random_state=1)
        backtracking = InnerProblem(5, 0.5, lam=est.lam, backtracking=True)
        phi, _, _ = backtracking.run(est._task_loss, est.params_, task.support.x, task.support.y)
        expected = est.fmodel_(phi, task.query.x)
        torch.testing.assert_close(est.adapt(task.support).predict(task.query.x), expected)


def test_finetune_head_fit_backtracks_instead_of_diverging():
    # The default head step (0.1) is too large for the sinusoid network's features: fixed steps gave
    # NaN predictions; with backtracking the head loss on the support set never rises.
    sampler = SinusoidTasks()
    est = fewshot.FineTune(meta_steps=20, random_state=0, verbose=0).meta_fit(sampler)
    task = sampler.sample(random_state=1)
    for steps in (0, 1, 10, 100):
        est.set_params(adapt_steps=steps)
        mse = -est.adapt(task.support).score(task.support.x, task.support.y)
        assert math.isfinite(mse)
        if steps:
            assert mse <= previous + 1e-6
        previous = mse
    assert math.isfinite(est.evaluate(sampler, n_tasks=20).mean)
