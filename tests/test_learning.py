"""The estimators actually learn (small, fast settings)."""

import numpy as np
import pytest

import fewshot
from fewshot.tasks import GaussianClusterTasks, SinusoidTasks


def test_maml_on_sinusoid_adaptation_helps():
    sampler = SinusoidTasks(k_shot=10, n_query=10)
    est = fewshot.MAML(inner_lr=0.02, inner_steps=2, meta_steps=400, meta_batch_size=5,
                       random_state=0).meta_fit(sampler)
    h = est.history_
    pre, post = np.mean(h["query_loss_pre"][-50:]), np.mean(h["query_loss_post"][-50:])
    assert post < 0.7 * pre
    assert np.mean(h["query_loss_post"][-50:]) < np.mean(h["query_loss_post"][:50])
    # held-out tasks: adapted predictions far better than predicting zero (MSE ~ E[A^2]/2 ~ 4.2)
    assert -est.score(sampler, n_tasks=100, random_state=123) < 2.5


def test_issue_example_imaml_sinusoid():
    sampler = fewshot.tasks.SinusoidTasks(k_shot=10, n_query=10)
    learner = fewshot.IMAML(lam=1.0, inner_steps=10, meta_steps=60, meta_batch_size=8,
                            random_state=0).meta_fit(sampler)
    task = sampler.sample(random_state=1)
    pred = learner.adapt(task.support).predict(task.query.x)
    assert pred.shape == task.query.y.shape
    assert np.mean(learner.history_["query_loss_post"][-20:]) < np.mean(learner.history_["query_loss_pre"][-20:])


@pytest.mark.parametrize("cls", [fewshot.MAML, fewshot.FOMAML, fewshot.IMAML, fewshot.Reptile,
                                 fewshot.NeumannMAML, fewshot.PenaltyMAML, fewshot.FineTune])
def test_classification_beats_chance(cls):
    sampler = GaussianClusterTasks(n_way=5, k_shot=1, n_query=5, n_features=16, n_classes=64, noise=0.5)
    kw = dict(meta_steps=60, random_state=0)
    est = cls(**kw, **({} if cls is fewshot.FineTune else dict(meta_batch_size=4, inner_steps=3)))
    est.meta_fit(sampler)
    assert est.score(sampler, n_tasks=50, random_state=7) > 0.5  # chance is 0.2
