"""The estimator contract, run over every estimator (the scikit-learn check_estimator idea)."""

import pickle

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone

import fewshot
from fewshot.exceptions import NotFittedError
from fewshot.tasks import GaussianClusterTasks, SinusoidTasks

ESTIMATORS = list(fewshot.SOLVERS.values())
FAST = dict(meta_steps=3, inner_steps=2, random_state=0)


def make(cls, **kw):
    params = dict(FAST, **kw)
    if cls is fewshot.FineTune:
        params.update(batch_size=16, inner_steps=5)
    else:
        params.update(meta_batch_size=2)
    return cls(**params)


@pytest.fixture(scope="module")
def sampler():
    return GaussianClusterTasks(n_way=3, k_shot=2, n_query=3, n_features=4, n_classes=12)


@pytest.fixture(scope="module")
def fitted(sampler):
    return {cls: make(cls).meta_fit(sampler) for cls in ESTIMATORS}


def params_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_init_only_stores_parameters(cls):
    est = cls()
    assert vars(est) == est.get_params(deep=False)
    assert not [k for k in vars(est) if k.endswith("_")]


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_get_set_params_and_clone(cls):
    est = make(cls, meta_lr=0.01)
    params = est.get_params()
    assert params["meta_lr"] == 0.01
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    assert est.set_params(meta_lr=0.5) is est and est.meta_lr == 0.5
    with pytest.raises(ValueError):
        est.set_params(no_such_parameter=1)
    assert repr(est).startswith(cls.__name__ + "(")


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_unfitted_use_raises(cls, sampler):
    est = make(cls)
    task = sampler.sample(random_state=0)
    with pytest.raises(NotFittedError):
        est.adapt(task.support)
    with pytest.raises(NotFittedError):
        est.score(sampler, n_tasks=2)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fit_returns_self_and_sets_fitted_state(cls, sampler, fitted):
    est = fitted[cls]
    assert est.n_iter_ == 3
    weights = dict(est.fmodel_.module.named_parameters())
    # the network's parameters, and the inner problem's own meta-parameters (learned steps) if any
    assert set(est.params_) == set(weights) | set(est.inner_.meta_parameters(weights))
    for values in est.history_.values():
        assert len(values) == 3 and all(np.isfinite(values))
    if cls is not fewshot.FineTune:
        for key in ("support_loss_pre", "query_loss_pre", "support_loss_post", "query_loss_post",
                    "support_acc_pre", "query_acc_post", "meta_grad_norm", "time"):
            assert key in est.history_
    fresh = make(cls)
    assert fresh.meta_fit(sampler) is fresh


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_same_random_state_same_result(cls, sampler, fitted):
    again = make(cls).meta_fit(sampler)
    assert params_equal(again.params_, fitted[cls].params_)
    other = make(cls, random_state=1).meta_fit(sampler)
    assert not params_equal(other.params_, fitted[cls].params_)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_adapt_predict_and_does_not_mutate(cls, sampler, fitted):
    est = fitted[cls]
    before = {k: v.clone() for k, v in est.params_.items()}
    state = dict(vars(est))
    task = sampler.sample(random_state=5)
    adapted = est.adapt(task.support)
    proba = adapted.predict_proba(task.query.x)
    assert proba.shape == (9, 3)
    torch.testing.assert_close(proba.sum(1), torch.ones(9))
    labels = adapted.predict(task.query.x)
    assert labels.dtype == torch.int64 and torch.equal(labels, proba.argmax(1))
    assert 0.0 <= adapted.score(task.query.x, task.query.y) <= 1.0
    assert params_equal(est.params_, before)
    assert vars(est).keys() == state.keys()
    ev = est.evaluate(sampler, n_tasks=4, random_state=0)
    assert len(ev.scores) == 4 and ev.ci95 >= 0 and est.score(sampler, n_tasks=4) == pytest.approx(ev.mean)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_pickle_and_joblib_round_trip(cls, sampler, fitted, tmp_path):
    est = fitted[cls]
    task = sampler.sample(random_state=6)
    expected = est.adapt(task.support).predict_proba(task.query.x)
    for restored in (pickle.loads(pickle.dumps(est)),
                     joblib.load(joblib.dump(est, tmp_path / "est.joblib")[0])):
        assert params_equal(restored.params_, est.params_)
        assert torch.equal(restored.adapt(task.support).predict_proba(task.query.x), expected)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_warm_start_continues(cls, sampler):
    est = make(cls, warm_start=True).meta_fit(sampler)
    first = {k: v.clone() for k, v in est.params_.items()}
    est.meta_fit(sampler)
    assert est.n_iter_ == 6 and len(est.history_["time"]) == 6
    assert not params_equal(est.params_, first)
    cold = make(cls).meta_fit(sampler)
    cold.meta_fit(sampler)
    assert cold.n_iter_ == 3


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_regression_tasks(cls):
    sampler = SinusoidTasks(k_shot=5, n_query=5)
    est = make(cls).meta_fit(sampler)
    task = sampler.sample(random_state=1)
    pred = est.adapt(task.support).predict(task.query.x)
    assert pred.shape == (5, 1)
    assert est.score(sampler, n_tasks=3) <= 0
    with pytest.raises(AttributeError):
        est.adapt(task.support).predict_proba(task.query.x)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_user_module_template_is_not_mutated(cls, sampler):
    template = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    if cls is fewshot.FineTune:
        template[-1] = torch.nn.Linear(8, 12)  # pre-training head: one output per global class
    before = {k: v.clone() for k, v in template.state_dict().items()}
    est = make(cls, model=template).meta_fit(sampler)
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())
    assert not params_equal(est.params_, dict(template.named_parameters()))


def test_callable_loss_matches_named_loss(sampler):
    named = fewshot.FOMAML(meta_steps=2, meta_batch_size=2, inner_steps=1, random_state=0).meta_fit(sampler)
    custom = fewshot.FOMAML(loss=torch.nn.functional.cross_entropy, meta_steps=2, meta_batch_size=2,
                            inner_steps=1, random_state=0).meta_fit(sampler)
    assert params_equal(named.params_, custom.params_)
    assert "query_acc_post" in custom.history_


def test_non_transductive_prediction_is_per_example():
    sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=64, n_classes=12)

    class Images(type(sampler)):
        def _sample(self, n, gen):
            b = super()._sample(n, gen)
            reshape = lambda s: fewshot.tasks.LabeledSet(s.x.reshape(n, -1, 1, 8, 8), s.y)
            return fewshot.tasks.TaskBatch(reshape(b.support), reshape(b.query))

    images = Images(n_way=3, k_shot=2, n_query=2, n_features=64, n_classes=12)
    images.input_shape = (1, 8, 8)
    est = fewshot.FOMAML(model=torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1),
                                                   torch.nn.BatchNorm2d(4, track_running_stats=False),
                                                   torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 3)),
                         transductive=False, meta_steps=1, meta_batch_size=2, inner_steps=1,
                         dtype="float64", random_state=0).meta_fit(images)
    task = images.sample(random_state=1).to(dtype=torch.float64)
    adapted = est.adapt(task.support)
    out = adapted.forward(task.query.x)
    for i in range(len(task.query.x)):  # each query normalised with the support set plus itself only
        alone = adapted.fmodel(adapted.params, torch.cat([adapted.support.x, task.query.x[i:i + 1]]))[-1]
        torch.testing.assert_close(out[i], alone, rtol=1e-12, atol=1e-12)
    # and it does not depend on the other queries
    torch.testing.assert_close(adapted.forward(task.query.x[:2]), out[:2], rtol=1e-12, atol=1e-12)
