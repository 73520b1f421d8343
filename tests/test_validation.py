"""Bad hyperparameters and bad input fail early with errors that name the problem."""

import pytest
import torch

import fewshot
from fewshot.tasks import GaussianClusterTasks, LabeledSet, SinusoidTasks


@pytest.fixture(scope="module")
def sampler():
    return GaussianClusterTasks(n_way=3, k_shot=2, n_query=2, n_features=4, n_classes=10)


@pytest.fixture(scope="module")
def fitted(sampler):
    return fewshot.FOMAML(meta_steps=2, meta_batch_size=2, inner_steps=1, random_state=0).meta_fit(sampler)


@pytest.mark.parametrize("cls, params, match", [
    (fewshot.MAML, dict(inner_lr=-0.1), "inner_lr"),
    (fewshot.MAML, dict(inner_steps=0), "inner_steps"),
    (fewshot.FOMAML, dict(meta_lr=0), "meta_lr"),
    (fewshot.Reptile, dict(meta_batch_size=0), "meta_batch_size"),
    (fewshot.MAML, dict(model="resnet1000"), "model"),
    (fewshot.MAML, dict(loss="hinge"), "loss"),
    (fewshot.MAML, dict(meta_optimizer="lbfgs"), "meta_optimizer"),
    (fewshot.IMAML, dict(lam=0.0), "lam"),
    (fewshot.IMAML, dict(cg_steps=0), "cg_steps"),
    (fewshot.IMAML, dict(damping=-1.0), "damping"),
    (fewshot.NeumannMAML, dict(neumann_terms=0), "neumann_terms"),
    (fewshot.NeumannMAML, dict(neumann_lr=-1.0), "neumann_lr"),
    (fewshot.NeumannMAML, dict(damping=-1.0), "damping"),
    (fewshot.PenaltyMAML, dict(penalty=-1.0), "penalty"),
    (fewshot.Reptile, dict(outer_stepsize=0.0), "outer_stepsize"),
    (fewshot.Reptile, dict(inner_data="query"), "inner_data"),
    (fewshot.Reptile, dict(inner_shots=0), "inner_shots"),
    (fewshot.MAML, dict(meta_lr_schedule="exponential"), "meta_lr_schedule"),
    (fewshot.FineTune, dict(batch_size=0), "batch_size"),
    (fewshot.MAML, dict(dtype="float16"), "dtype"),
    (fewshot.MAML, dict(inner_lr=float("nan")), "inner_lr"),
    (fewshot.MAML, dict(device="gpu9000"), "device"),
])
def test_bad_hyperparameters_raise_when_fit_starts(cls, params, match, sampler):
    est = cls(meta_steps=1, **params)  # constructing never validates (set_params/clone bypass it)
    with pytest.raises(ValueError, match=match):
        est.meta_fit(sampler)
    assert not hasattr(est, "params_")


def test_unknown_constructor_argument():
    with pytest.raises(TypeError, match="lamda"):
        fewshot.IMAML(lamda=1.0)


def test_loss_and_task_type_mismatch(sampler):
    with pytest.raises(ValueError, match="loss='mse' is for regression"):
        fewshot.MAML(loss="mse", meta_steps=1).meta_fit(sampler)


def test_sampler_type_is_checked():
    with pytest.raises(TypeError, match="TaskSampler"):
        fewshot.MAML(meta_steps=1).meta_fit([1, 2, 3])


def test_model_output_mismatch_is_named(sampler):
    wrong = torch.nn.Linear(4, 7)
    with pytest.raises(ValueError, match="n_outputs=3"):
        fewshot.MAML(model=wrong, meta_steps=1).meta_fit(sampler)


def test_adapt_rejects_bad_support(fitted):
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"support.x must have shape \[n, 4\]"):
        fitted.adapt((torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])))
    with pytest.raises(ValueError, match=r"labels must lie in 0..2"):
        fitted.adapt((x, torch.tensor([0, 0, 1, 1, 2, 3])))
    with pytest.raises(ValueError, match=r"missing class\(es\) \[2\]"):
        fitted.adapt((x, torch.tensor([0, 0, 1, 1, 1, 0])))
    with pytest.raises(ValueError, match="NaN"):
        fitted.adapt((x.clone().fill_(float("nan")), torch.tensor([0, 0, 1, 1, 2, 2])))
    with pytest.raises(TypeError, match="integer class labels"):
        fitted.adapt((x, torch.tensor([0.0, 0, 1, 1, 2, 2])))
    with pytest.raises(TypeError, match="LabeledSet or an \\(x, y\\) pair"):
        fitted.adapt(x)
    adapted = fitted.adapt(LabeledSet(x, torch.tensor([0, 0, 1, 1, 2, 2])))
    with pytest.raises(ValueError, match=r"x must have shape \[n, 4\]"):
        adapted.predict(torch.randn(3, 2))


def test_regression_targets_checked():
    est = fewshot.FOMAML(meta_steps=1, meta_batch_size=2, random_state=0).meta_fit(SinusoidTasks())
    with pytest.raises(ValueError, match="support.y must have shape"):
        est.adapt((torch.randn(4, 1), torch.randn(4, 3)))


def test_reptile_inner_shots_needs_classes():
    with pytest.raises(ValueError, match="inner_shots batches the inner loop by class"):
        fewshot.Reptile(inner_shots=1, meta_steps=1, meta_batch_size=2).meta_fit(SinusoidTasks())
