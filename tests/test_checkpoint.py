"""meta_fit(checkpoint=..., checkpoint_every=...): atomic writes, exact resume, refusals."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fewshot
from fewshot.tasks import GaussianClusterTasks, SinusoidTasks
from _util import sigkill_once_written

FAST = dict(meta_steps=5, inner_steps=2, random_state=0)


def make(cls, **kw):
    params = dict(FAST, **kw)
    params.update(batch_size=8) if cls is fewshot.FineTune else params.update(meta_batch_size=2)
    return cls(**params)


@pytest.fixture(scope="module")
def sampler():
    return GaussianClusterTasks(n_way=3, k_shot=2, n_query=3, n_features=4, n_classes=12)


def assert_same_run(a, b):
    assert a.n_iter_ == b.n_iter_
    assert a.params_.keys() == b.params_.keys()
    for k in a.params_:
        assert torch.equal(a.params_[k], b.params_[k]), k
    assert {k: v for k, v in a.history_.items() if k != "time"} == \
        {k: v for k, v in b.history_.items() if k != "time"}
    assert len(a.history_["time"]) == a.n_iter_


@pytest.mark.parametrize("cls", list(fewshot.SOLVERS.values()))
def test_resume_equals_uninterrupted_run(cls, sampler, tmp_path):
    path = tmp_path / "run.pt"
    # The meta_lr schedule's horizon spans the whole run and the extra step below (a no-op for
    # constant schedules; a default schedule, as MAMLPlusPlus's cosine, would otherwise end at the
    # interrupted run's 3 steps).
    horizon = dict(meta_lr_horizon=FAST["meta_steps"] + 1)
    straight = make(cls, **horizon).meta_fit(sampler)
    first = make(cls, meta_steps=3, **horizon).meta_fit(sampler, checkpoint=path)
    assert first.n_iter_ == 3 and path.is_file()
    resumed = make(cls, **horizon).meta_fit(sampler, checkpoint=path)  # meta_steps=5 is the total
    assert_same_run(resumed, straight)
    assert os.listdir(tmp_path) == ["run.pt"]  # no temporary file left behind
    # The optimizer state came back too: one more step from either gives the same parameters.
    for est in (resumed, straight):
        est.set_params(warm_start=True, meta_steps=1).meta_fit(sampler)
    assert_same_run(resumed, straight)


def test_crash_then_resume(sampler, tmp_path):
    """An exception mid-run leaves the last periodic checkpoint, from which the run continues."""

    class Failing(GaussianClusterTasks):
        calls = 0

        def _sample(self, n_tasks, generator):
            Failing.calls += 1
            if Failing.calls == 6:
                raise KeyboardInterrupt
            return super()._sample(n_tasks, generator)

    failing = Failing(n_way=3, k_shot=2, n_query=3, n_features=4, n_classes=12)
    path = tmp_path / "run.pt"
    est = make(fewshot.MAML, meta_steps=8)
    with pytest.raises(KeyboardInterrupt):
        est.meta_fit(failing, checkpoint=path, checkpoint_every=2)
    assert est.n_iter_ == 5
    assert torch.load(path, weights_only=True)["n_iter"] == 4
    resumed = make(fewshot.MAML, meta_steps=8).meta_fit(sampler, checkpoint=path, checkpoint_every=2)
    assert_same_run(resumed, make(fewshot.MAML, meta_steps=8).meta_fit(sampler))


KILLED = textwrap.dedent("""
    import sys, time
    import torch
    import fewshot
    from fewshot.tasks import SinusoidTasks

    torch.set_num_threads(1)
    torch.set_default_dtype({default_dtype})  # the test process's (networks are built in it)

    class Slow(SinusoidTasks):  # the same tasks, slowly, so the run can be killed mid-way
        def _sample(self, n_tasks, generator):
            time.sleep(0.1)
            return super()._sample(n_tasks, generator)

    fewshot.IMAML(**{params}).meta_fit(Slow(k_shot=5, n_query=5), checkpoint=sys.argv[1],
                                       checkpoint_every=3)
""")


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    params = dict(meta_steps=20, meta_batch_size=3, inner_steps=2, lam=2.0, random_state=0)
    path = tmp_path / "imaml.pt"
    script = tmp_path / "train.py"
    script.write_text(KILLED.format(params=repr(params), default_dtype=torch.get_default_dtype()))
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sigkill_once_written(proc, path)
    assert proc.returncode == -signal.SIGKILL
    written = torch.load(path, weights_only=True)["n_iter"]
    assert 0 < written < params["meta_steps"] and written % 3 == 0

    sampler = SinusoidTasks(k_shot=5, n_query=5)
    resumed = fewshot.IMAML(**params).meta_fit(sampler, checkpoint=path)
    assert_same_run(resumed, fewshot.IMAML(**params).meta_fit(sampler))


def test_meta_steps_is_the_total(sampler, tmp_path):
    path = tmp_path / "run.pt"
    four = make(fewshot.FOMAML, meta_steps=4).meta_fit(sampler, checkpoint=path)
    # Already past the target: restored from the file, no step runs, the file is untouched.
    mtime = path.stat().st_mtime_ns
    restored = make(fewshot.FOMAML, meta_steps=2).meta_fit(sampler, checkpoint=path)
    assert_same_run(restored, four)
    assert path.stat().st_mtime_ns == mtime
    # The checkpoint wins over warm_start: the fitted estimator is reloaded, then trained to 6.
    four.set_params(warm_start=True, meta_steps=6).meta_fit(sampler, checkpoint=path)
    assert_same_run(four, make(fewshot.FOMAML, meta_steps=6).meta_fit(sampler))


def test_checkpoint_contents_load_with_weights_only(sampler, tmp_path):
    path = tmp_path / "run.pt"
    est = make(fewshot.IMAML, model=torch.nn.Sequential(torch.nn.Linear(4, 3)),
               loss=torch.nn.functional.cross_entropy)
    est.meta_fit(sampler, checkpoint=path, checkpoint_every=2)
    state = torch.load(path, weights_only=True)
    assert state["solver"] == "IMAML" and state["n_iter"] == 5
    assert set(state["meta_params"]) == set(est.params_)
    assert len(state["task_rng_states"]) == 1 and state["task_rng_states"][0].dtype == torch.uint8
    assert state["history"]["meta_grad_norm"] == est.history_["meta_grad_norm"]
    assert "torch.nn.modules.container.Sequential" in state["params"]
    assert "torch.nn.functional.cross_entropy" in state["params"]


def test_parameters_that_may_differ(sampler, tmp_path):
    path = tmp_path / "run.pt"
    make(fewshot.MAML, meta_steps=2).meta_fit(sampler, checkpoint=path)
    est = make(fewshot.MAML, meta_steps=3, verbose=0, device="cpu", warm_start=True)
    assert est.meta_fit(sampler, checkpoint=path).n_iter_ == 3
    # adapt_steps only sets test-time adaptation: training resumes exactly as without the change
    rescored = make(fewshot.MAML, meta_steps=4, adapt_steps=7).meta_fit(sampler, checkpoint=path)
    assert rescored.adapt_steps == 7
    assert_same_run(rescored, make(fewshot.MAML, meta_steps=4).meta_fit(sampler))


def test_refuses_other_solver_or_parameters(sampler, tmp_path):
    path = tmp_path / "run.pt"
    make(fewshot.IMAML, meta_steps=2, lam=1.0).meta_fit(sampler, checkpoint=path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="written by IMAML, not by MAML"):
        make(fewshot.MAML).meta_fit(sampler, checkpoint=path)
    with pytest.raises(ValueError, match=r"lam: checkpoint 1\.0, estimator 0\.5"):
        make(fewshot.IMAML, lam=0.5).meta_fit(sampler, checkpoint=path)
    with pytest.raises(ValueError, match="meta_batch_size"):
        make(fewshot.IMAML).set_params(meta_batch_size=4).meta_fit(sampler, checkpoint=path)
    other_tasks = GaussianClusterTasks(n_way=4, k_shot=2, n_query=3, n_features=4, n_classes=12)
    with pytest.raises(ValueError, match="written for tasks"):
        make(fewshot.IMAML).meta_fit(other_tasks, checkpoint=path)
    assert path.read_bytes() == before


def test_refuses_meta_parameters_that_do_not_fit_the_network(sampler, tmp_path):
    path = tmp_path / "run.pt"
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    make(fewshot.FOMAML, model=small).meta_fit(sampler, checkpoint=path)
    wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"0\.weight \(8, 4\) in the checkpoint vs \(16, 4\)"):
        make(fewshot.FOMAML, model=wide, meta_steps=6).meta_fit(sampler, checkpoint=path)
    same = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    resumed = make(fewshot.FOMAML, model=same, meta_steps=6).meta_fit(sampler, checkpoint=path)
    assert_same_run(resumed, make(fewshot.FOMAML, model=small, meta_steps=6).meta_fit(sampler))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_refuses_files_that_are_not_checkpoints(sampler, tmp_path):
    pickled = tmp_path / "code.pt"
    torch.save({"format": Payload()}, pickled)  # would run a command if unpickled
    with pytest.raises(ValueError, match=r"weights_only=True(.|\n)*system"):
        make(fewshot.MAML).meta_fit(sampler, checkpoint=pickled)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fewshot checkpoint"):
        make(fewshot.MAML).meta_fit(sampler, checkpoint=damaged)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a fewshot meta_fit checkpoint"):
        make(fewshot.MAML).meta_fit(sampler, checkpoint=foreign)


def test_checkpoint_arguments_are_validated(sampler, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every=2 needs a checkpoint path"):
        make(fewshot.MAML).meta_fit(sampler, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        make(fewshot.MAML).meta_fit(sampler, checkpoint=tmp_path / "a.pt", checkpoint_every=0)
    with pytest.raises(ValueError, match="directory"):
        make(fewshot.MAML).meta_fit(sampler, checkpoint=tmp_path)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        make(fewshot.MAML).meta_fit(sampler, checkpoint=3)


class RecordingSGD(torch.optim.SGD):
    """SGD that records the learning rate of every step."""

    seen: list = []

    def step(self, closure=None):
        RecordingSGD.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.mark.parametrize("schedule, factor", [
    ("constant", lambda t: 1.0),
    ("linear", lambda t: 1 - t / 5),
    ("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t / 5))),
])
def test_meta_lr_schedule_sets_each_steps_learning_rate(schedule, factor, sampler):
    RecordingSGD.seen = []
    make(fewshot.FOMAML, meta_optimizer=RecordingSGD, meta_lr=0.3, meta_lr_schedule=schedule).meta_fit(sampler)
    assert RecordingSGD.seen == pytest.approx([0.3 * factor(t) for t in range(5)], rel=1e-12)
    # Reptile's outer step size is its meta learning rate, scheduled the same way
    RecordingSGD.seen = []
    make(fewshot.Reptile, meta_optimizer=RecordingSGD, outer_stepsize=0.5, meta_lr_schedule=schedule).meta_fit(sampler)
    assert RecordingSGD.seen == pytest.approx([0.5 * factor(t) for t in range(5)], rel=1e-12)


@pytest.mark.parametrize("cls", [fewshot.MAML, fewshot.FineTune])
def test_scheduled_run_resumes_and_warm_starts_exactly(cls, sampler, tmp_path):
    path = tmp_path / "run.pt"
    straight = make(cls, meta_lr_schedule="cosine").meta_fit(sampler)
    # (an interruption after step 3 of the 5-step run, stood in for by a 3-step run on its schedule)
    make(cls, meta_steps=3, meta_lr_schedule="cosine", meta_lr_horizon=5).meta_fit(sampler, checkpoint=path)
    resumed = make(cls, meta_lr_schedule="cosine", meta_lr_horizon=5).meta_fit(sampler, checkpoint=path)
    assert_same_run(resumed, straight)
    # warm-started fits of 2 + 3 steps follow the 5-step schedule when given its horizon
    chunked = make(cls, meta_steps=2, meta_lr_schedule="cosine", meta_lr_horizon=5, warm_start=True)
    chunked.meta_fit(sampler).set_params(meta_steps=3).meta_fit(sampler)
    assert_same_run(chunked, straight)
    # ... and not without it: the first fit then decays over its own two steps
    unaware = make(cls, meta_steps=2, meta_lr_schedule="cosine", warm_start=True)
    unaware.meta_fit(sampler).set_params(meta_steps=3).meta_fit(sampler)
    assert not all(torch.equal(unaware.params_[k], straight.params_[k]) for k in straight.params_)


def test_meta_lr_schedule_is_validated(sampler):
    with pytest.raises(ValueError, match="meta_lr_schedule"):
        make(fewshot.MAML, meta_lr_schedule="step").meta_fit(sampler)
    with pytest.raises(ValueError, match="meta_lr_horizon"):
        make(fewshot.MAML, meta_lr_schedule="linear", meta_lr_horizon=0).meta_fit(sampler)


def test_checkpoint_written_before_a_parameter_existed_resumes_with_its_old_behaviour(sampler, tmp_path):
    """A checkpoint without ``per_step_bn`` (written before MAML++ had it) was written without
    per-step batch-norm weights: it resumes an estimator with ``per_step_bn=False`` and is refused
    by one with ``per_step_bn=True``."""
    import json

    path = tmp_path / "ckpt.pt"
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8, track_running_stats=False),
                              torch.nn.ReLU(), torch.nn.Linear(8, 3))
    make(fewshot.MAMLPlusPlus, meta_steps=2, model=net).meta_fit(sampler, checkpoint=path)
    state = torch.load(path, weights_only=True)
    params = json.loads(state["params"])
    del params["per_step_bn"], params["inner_params"]
    state["params"] = json.dumps(params)
    torch.save(state, path)
    resumed = make(fewshot.MAMLPlusPlus, meta_steps=3, model=net).meta_fit(sampler, checkpoint=path)
    assert resumed.n_iter_ == 3
    with pytest.raises(ValueError, match=r"per_step_bn: checkpoint False, estimator True"):
        make(fewshot.MAMLPlusPlus, meta_steps=4, per_step_bn=True, model=net).meta_fit(sampler, checkpoint=path)


def test_written_files_are_complete_and_readable_by_all(sampler, tmp_path):
    """Checkpoints and meta-parameter files go through one atomic write: no temporary file is
    left, and the file is not private to its writer (0o644, as caches and compare's files)."""
    path = tmp_path / "sub" / "ckpt.pt"
    est = make(fewshot.FOMAML, meta_steps=1).meta_fit(sampler, checkpoint=path)
    meta = est.save_meta_params(tmp_path / "sub" / "meta.pt")
    for p in (path, meta):
        assert p.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt", "meta.pt"]
