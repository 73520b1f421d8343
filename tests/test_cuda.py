"""The solvers on an accelerator against the same computation on the CPU, in float64.

Skipped where the device is missing. The device is ``cuda`` unless ``FEWSHOT_TEST_DEVICE`` names
another (``cuda:1``, ``mps``, or ``cpu`` to check these tests' own logic on a machine without one).
``benchmarks/device_check.sh`` runs this module, the whole test suite and the solver benchmark on
a CUDA machine.
"""

import os

import numpy as np
import pytest
import torch
from torch import nn

import fewshot
from fewshot.models import MLP, Conv4, init_parameters
from fewshot.tasks import LabeledTasks, SinusoidTasks


def _device():
    name = os.environ.get("FEWSHOT_TEST_DEVICE", "cuda")
    try:
        device = torch.device(name)
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError):
        return None
    return device


DEVICE = _device()
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no accelerator (FEWSHOT_TEST_DEVICE, default cuda)")

#: Solver -> its parameters for the small network and tasks below (4 tasks a meta-step; FineTune
#: pre-trains on batches of 12 examples; at a random start the support loss's Hessian has eigenvalues
#: below -10, and IMAML's and NeumannMAML's lam=100 keeps their linear systems positive definite).
SOLVER_OPTIONS = {name: {"meta_batch_size": 4} for name in fewshot.SOLVERS}
SOLVER_OPTIONS["FineTune"] = {"batch_size": 12}
SOLVER_OPTIONS["IMAML"]["lam"] = SOLVER_OPTIONS["NeumannMAML"]["lam"] = 100.0


def _image_pool():
    """16 x 16 one-channel images of 8 classes, 10 each: a random pattern per class plus noise."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(8), 10)
    x = rng.random((8, 1, 16, 16))[y] + 0.3 * rng.standard_normal((80, 1, 16, 16))
    return x, y


def _images(**options):
    return LabeledTasks(*_image_pool(), n_way=3, k_shot=2, n_query=3, **options)


def _conv4(n_outputs=3):
    return init_parameters(Conv4(in_channels=1, n_outputs=n_outputs, hidden=6, image_size=16),
                           torch.Generator().manual_seed(0))


def _estimator(name, device, **params):
    model = _conv4(8 if name == "FineTune" else 3)  # FineTune pre-trains on all 8 classes
    options = dict(SOLVER_OPTIONS[name], model=model, inner_steps=2,
                   dtype="float64", device=str(device), random_state=0, verbose=0)
    return fewshot.SOLVERS[name](**{**options, **params})


def _assert_params_close(a, b, *, device, rtol, atol):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].device.type == device.type, k
        torch.testing.assert_close(a[k].cpu(), b[k].cpu(), rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("name", [n for n in fewshot.SOLVERS if n != "FineTune"])
def test_meta_gradients_on_the_device_equal_the_cpu_ones(name):
    """Per-task meta-gradients of every solver (Reptile's pseudo-gradient) through a Conv4 with
    batch-statistics BatchNorm, on the device against the CPU, same point, same tasks."""
    sampler = _images()
    batch = sampler.sample(3, random_state=1)
    on_cpu = _estimator(name, CPU, meta_steps=0).meta_fit(sampler)
    on_device = _estimator(name, DEVICE, meta_steps=0).meta_fit(sampler)
    _assert_params_close(on_device.params_, on_cpu.params_, device=DEVICE, rtol=0, atol=0)
    for g_device, g_cpu in zip(on_device.meta_gradient(batch), on_cpu.meta_gradient(batch), strict=True):
        _assert_params_close(g_device, g_cpu, device=DEVICE, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(fewshot.SOLVERS))
def test_meta_fit_on_the_device_follows_the_cpu_run(name):
    """Three meta-steps from the same random_state: the same tasks, the same meta-parameters and
    history up to float64 rounding, and predictions of an adapted model on the device."""
    sampler = _images()
    on_cpu = _estimator(name, CPU, meta_steps=3).meta_fit(sampler)
    on_device = _estimator(name, DEVICE, meta_steps=3).meta_fit(sampler)
    _assert_params_close(on_device.params_, on_cpu.params_, device=DEVICE, rtol=1e-7, atol=1e-9)
    assert sorted(on_device.history_) == sorted(on_cpu.history_)
    for k in on_cpu.history_:
        if k != "time":
            np.testing.assert_allclose(on_device.history_[k], on_cpu.history_[k], rtol=1e-7, atol=1e-9,
                                       err_msg=k)
    task = sampler.sample(1, random_state=5)[0]
    support = (task.support.x.numpy(), task.support.y.numpy())  # host arrays go to the device
    proba = on_device.adapt(support).predict_proba(task.query.x)
    assert proba.device.type == DEVICE.type
    torch.testing.assert_close(proba.cpu(), on_cpu.adapt(support).predict_proba(task.query.x),
                               rtol=1e-7, atol=1e-9)
    assert on_device.score(sampler, n_tasks=4) == pytest.approx(on_cpu.score(sampler, n_tasks=4))


def test_a_checkpointed_run_on_the_device_resumes(tmp_path):
    """Stopped at step 2 of 4 and resumed from its checkpoint on the device, a run ends where the
    run without the stop ends (to rounding: the device's kernels need not be deterministic)."""
    sampler = _images()
    whole = _estimator("MAML", DEVICE, meta_steps=4).meta_fit(sampler)
    path = tmp_path / "run.pt"
    _estimator("MAML", DEVICE, meta_steps=2).meta_fit(sampler, checkpoint=path)
    resumed = _estimator("MAML", DEVICE, meta_steps=4).meta_fit(sampler, checkpoint=path)
    assert resumed.n_iter_ == 4
    _assert_params_close(resumed.params_, whole.params_, device=DEVICE, rtol=1e-10, atol=1e-12)


def test_meta_params_saved_on_the_device_load_anywhere(tmp_path):
    trained = _estimator("MetaSGD", DEVICE, meta_steps=2).meta_fit(_images())
    path = trained.save_meta_params(tmp_path / "meta.pt")
    for device in (CPU, DEVICE):
        loaded = fewshot.load_meta_params(path, device=str(device), model=_conv4())
        _assert_params_close(loaded.params_, trained.params_, device=device, rtol=0, atol=0)


def test_tasks_made_on_the_device_are_the_cpu_tasks():
    on_cpu = _images().sample(5, random_state=3)
    on_device = _images(device=DEVICE).sample(5, random_state=3)
    for a, b in ((on_device.support, on_cpu.support), (on_device.query, on_cpu.query)):
        assert a.x.device.type == DEVICE.type
        torch.testing.assert_close(a.x.cpu(), b.x)
        torch.testing.assert_close(a.y.cpu(), b.y)


def test_dropout_on_the_device_is_seeded_and_leaves_global_state_alone():
    """Dropout masks on the device come from the estimator's own generator: the same random_state
    gives the same meta-parameters, and neither torch's CPU generator nor the device's moves."""
    sampler = SinusoidTasks(k_shot=5, n_query=5)

    def fit(model):
        return fewshot.MAML(model=model, meta_steps=3, inner_steps=2, meta_batch_size=4, device=str(DEVICE),
                            dtype="float64", random_state=0, verbose=0).meta_fit(sampler)

    models = [nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1)) for _ in range(2)]
    for model in models:
        init_parameters(model, torch.Generator().manual_seed(0))
    cpu_state = torch.get_rng_state()  # after the layers' constructors, which draw from it
    device_state = torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else None
    first, second = fit(models[0]), fit(models[1])
    _assert_params_close(first.params_, second.params_, device=DEVICE, rtol=1e-12, atol=1e-14)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if device_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(DEVICE), device_state)


def test_device_auto_chooses_the_accelerator():
    if DEVICE.type != "cuda":
        pytest.skip("device='auto' chooses CUDA only")
    est = fewshot.FOMAML(model=MLP(1, 1, (8,)), meta_steps=1, random_state=0, verbose=0)
    est.meta_fit(SinusoidTasks())
    assert next(iter(est.params_.values())).device.type == "cuda"
