import math

import pytest
import torch

from fewshot.tasks import (GaussianClusterTasks, LinearRegressionTasks, SinusoidTasks, Task, TaskBatch,
                           check_generator)


def test_sinusoid_shapes_ranges_and_targets():
    sampler = SinusoidTasks(k_shot=10, n_query=7)
    batch = sampler.sample(50, random_state=0)
    assert isinstance(batch, TaskBatch) and len(batch) == 50
    assert batch.support.x.shape == (50, 10, 1) and batch.query.y.shape == (50, 7, 1)
    x = torch.cat([batch.support.x, batch.query.x], 1)
    y = torch.cat([batch.support.y, batch.query.y], 1)
    assert x.min() >= -5 and x.max() <= 5
    assert y.abs().max() <= 5.0 + 1e-6
    # every task is one sinusoid: y = A sin(x - p) with A in [0.1, 5], p in [0, pi]
    for t in range(3):
        xs, ys = x[t, :, 0].double(), y[t, :, 0].double()
        design = torch.stack([torch.sin(xs), torch.cos(xs)], 1)
        coef = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0]
        amplitude = float(coef.norm())
        phase = math.atan2(-float(coef[1]), float(coef[0]))
        assert 0.1 - 1e-4 <= amplitude <= 5 + 1e-4 and -1e-4 <= phase <= math.pi + 1e-4


def test_single_task_and_reproducibility():
    sampler = SinusoidTasks()
    task = sampler.sample(random_state=1)
    assert isinstance(task, Task) and task.support.x.shape == (10, 1)
    again = sampler.sample(random_state=1)
    assert torch.equal(task.query.x, again.query.x)
    gen = check_generator(3)
    a, b = sampler.sample(2, random_state=gen), sampler.sample(2, random_state=gen)
    assert not torch.equal(a.support.x, b.support.x)  # a generator advances
    x, y = task.support  # unpacks like (x, y)
    assert x is task.support.x and y is task.support.y


def test_sampling_leaves_global_random_state_alone():
    state = torch.get_rng_state()
    GaussianClusterTasks().sample(4, random_state=0)
    SinusoidTasks().sample(4, random_state=0)
    assert torch.equal(state, torch.get_rng_state())


def test_gaussian_clusters_labels_and_classes():
    sampler = GaussianClusterTasks(n_way=4, k_shot=3, n_query=2, n_classes=10)
    batch = sampler.sample(20, random_state=0)
    assert batch.support.y.dtype == torch.int64
    for task in batch:
        assert torch.equal(torch.bincount(task.support.y, minlength=4), torch.full((4,), 3))
        assert torch.equal(torch.bincount(task.query.y, minlength=4), torch.full((4,), 2))
        # support and query of the same label come from the same class centre
        for c in range(4):
            ms, mq = task.support.x[task.support.y == c].mean(0), task.query.x[task.query.y == c].mean(0)
            dists = torch.cdist(mq[None], sampler.centres)[0]
            assert int(dists.argmin()) == int(torch.cdist(ms[None], sampler.centres)[0].argmin())
    pre = sampler.sample_pretraining(32, random_state=0)
    assert pre.x.shape == (32, 16) and int(pre.y.max()) < 10


def test_linear_regression_targets_are_linear():
    sampler = LinearRegressionTasks(n_features=3, noise=0.0)
    task = sampler.sample(random_state=0)
    w = torch.linalg.lstsq(task.support.x, task.support.y).solution
    torch.testing.assert_close(task.query.x @ w, task.query.y, rtol=1e-4, atol=1e-4)


def test_task_batch_indexing_and_stack():
    batch = SinusoidTasks().sample(5, random_state=0)
    assert len(batch[1:3]) == 2
    restacked = TaskBatch.stack(list(batch))
    assert torch.equal(restacked.support.x, batch.support.x)
    with pytest.raises(ValueError, match="at least one"):
        TaskBatch.stack([])


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_shot=0), "k_shot"),
    (dict(n_query=-1), "n_query"),
    (dict(amplitude=(5, 1)), "amplitude"),
])
def test_sinusoid_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinusoidTasks(**kwargs)


def test_cluster_bad_arguments():
    with pytest.raises(ValueError, match="n_way=9 is larger than the n_classes=5"):
        GaussianClusterTasks(n_way=9, n_classes=5)
    with pytest.raises(ValueError, match="n_tasks"):
        GaussianClusterTasks().sample(0)
    with pytest.raises(TypeError, match="random_state"):
        GaussianClusterTasks().sample(2, random_state="seed")
