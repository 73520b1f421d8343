"""Data-parallel meta-training: two gloo processes on 127.0.0.1 against one process drawing the same
shards (fewshot.estimators._distributed.simulated_world)."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

import fewshot
from fewshot.estimators._distributed import shard_seed
from fewshot.distributed import simulated_world
from fewshot.tasks import GaussianClusterTasks, SinusoidTasks

PARAMS = dict(meta_batch_size=4, inner_steps=2, meta_steps=4, dtype="float64", random_state=0)

WORKER = textwrap.dedent("""
    import os
    import sys
    import torch
    import torch.distributed as dist
    import fewshot
    from fewshot.tasks import SinusoidTasks

    torch.set_num_threads(1)
    torch.set_default_dtype({default_dtype})  # the test process's (networks are built in it)
    out, checkpoint = sys.argv[1], sys.argv[2]
    {model_source}
    dist.init_process_group("gloo")  # MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE from the environment
    try:
        est = fewshot.{solver}(**{params}, **model_params())
        est.meta_fit(SinusoidTasks(k_shot=5, n_query=5), checkpoint=checkpoint, checkpoint_every=2)
        torch.save({{"params": est.params_, "history": est.history_, "n_iter": est.n_iter_}},
                   f"{{out}}.rank{{dist.get_rank()}}")
        # both ranks finished before either tears its gloo pairs down: without it one run in
        # about five aborted at exit ("terminate called without an active exception", rc -6)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The results are saved; leave without the interpreter's teardown, where gloo's and the TCP
    # store's threads are destroyed in no fixed order: even after the barrier an exit now and then
    # aborted there with the same message (torch 2.13, gloo on loopback).
    sys.stdout.flush()
    os._exit(0)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The MAML run uses the default network; the Meta-SGD run a network with Dropout, so that its
#: learned steps are all-reduced and its dropout masks are drawn per shard.
MODEL_SOURCES = {
    "MAML": "def model_params(): return {}",
    "MetaSGD": "def model_params():\n"
               "        import torch.nn as nn\n"
               "        from fewshot.models import init_parameters\n"
               "        net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))\n"
               "        return {'model': init_parameters(net, torch.Generator().manual_seed(0))}",
}


def _model_params(solver):
    scope = {"torch": torch}
    exec(textwrap.dedent("    " + MODEL_SOURCES[solver]), scope)
    return scope["model_params"]()


def _launch(tmp_path, world_size=2, timeout=120, solver="MAML"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(params=repr(PARAMS), default_dtype=torch.get_default_dtype(), solver=solver,
                                    model_source=MODEL_SOURCES[solver]))
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world_size), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"),
                                       str(tmp_path / "ckpt.pt")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text
    return [torch.load(tmp_path / f"out.rank{r}", weights_only=True) for r in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dist")
    return tmp_path, _launch(tmp_path)


def test_two_processes_match_one_process_with_the_same_shards(two_ranks):
    _, (rank0, rank1) = two_ranks
    # Identical meta-parameters and all-reduced history on every rank.
    assert rank0["n_iter"] == rank1["n_iter"] == PARAMS["meta_steps"]
    assert rank0["params"].keys() == rank1["params"].keys()
    for k in rank0["params"]:
        assert torch.equal(rank0["params"][k], rank1["params"][k])
    no_time = lambda h: {k: v for k, v in h.items() if k != "time"}  # noqa: E731
    assert no_time(rank0["history"]) == no_time(rank1["history"])

    sampler = SinusoidTasks(k_shot=5, n_query=5)
    with simulated_world(2):
        reference = fewshot.MAML(**PARAMS).meta_fit(sampler)
    for k, v in reference.params_.items():
        assert_close(rank0["params"][k], v, rtol=0, atol=1e-5)
    for k, v in no_time(reference.history_).items():
        assert_close(torch.tensor(rank0["history"][k]), torch.tensor(v), rtol=1e-6, atol=1e-8)
    # ... and it is not the one-process stream (rank 1 drew other tasks than shard 0 does alone).
    single = fewshot.MAML(**PARAMS).meta_fit(sampler)
    assert not all(torch.allclose(single.params_[k], v) for k, v in reference.params_.items())


def test_learned_steps_and_dropout_masks_across_two_processes(tmp_path):
    """Meta-SGD on a network with Dropout in two processes: the learned steps are all-reduced with
    the weights (identical on both ranks) and the masks are drawn per shard, as one process
    simulating the two draws them."""
    rank0, rank1 = _launch(tmp_path, solver="MetaSGD")
    assert any(k.startswith("inner_lr.") for k in rank0["params"])
    for k in rank0["params"]:
        assert torch.equal(rank0["params"][k], rank1["params"][k])
    sampler = SinusoidTasks(k_shot=5, n_query=5)
    with simulated_world(2):
        reference = fewshot.MetaSGD(**PARAMS, **_model_params("MetaSGD")).meta_fit(sampler)
    for k, v in reference.params_.items():
        assert_close(rank0["params"][k], v, rtol=0, atol=1e-5)


def test_checkpoint_of_two_processes_resumes_in_one_simulated_process(two_ranks):
    tmp_path, (rank0, _) = two_ranks
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["n_iter"] == PARAMS["meta_steps"] and len(state["task_rng_states"]) == 2
    sampler = SinusoidTasks(k_shot=5, n_query=5)
    longer = dict(PARAMS, meta_steps=PARAMS["meta_steps"] + 2)
    with simulated_world(2):
        resumed = fewshot.MAML(**longer).meta_fit(sampler, checkpoint=tmp_path / "ckpt.pt")
        straight = fewshot.MAML(**longer).meta_fit(sampler)
    assert resumed.n_iter_ == longer["meta_steps"]
    for k, v in straight.params_.items():
        assert_close(resumed.params_[k], v, rtol=0, atol=1e-5)
    # A one-process run cannot continue a two-shard stream.
    with pytest.raises(ValueError, match="2 shard"):
        fewshot.MAML(**longer).meta_fit(sampler, checkpoint=tmp_path / "ckpt.pt")


def test_simulated_world_draws_shard_r_from_its_own_seed():
    seen = []

    class Recording(SinusoidTasks):
        def _sample(self, n_tasks, generator):
            seen.append(generator.initial_seed())
            return super()._sample(n_tasks, generator)

    rec = Recording(k_shot=3, n_query=3)
    with simulated_world(2):
        fewshot.FOMAML(meta_batch_size=4, inner_steps=1, meta_steps=1, random_state=0).meta_fit(rec)
    task_seed = seen[0]
    assert seen == [shard_seed(task_seed, 0), shard_seed(task_seed, 1)] and seen[0] != seen[1]
    # Shard 0 of a W-way split continues the one-process stream.
    seen.clear()
    fewshot.FOMAML(meta_batch_size=4, inner_steps=1, meta_steps=1, random_state=0).meta_fit(rec)
    assert seen == [task_seed]


def test_batch_must_split_evenly():
    with simulated_world(3), pytest.raises(ValueError, match="meta_batch_size=4 must be divisible"):
        fewshot.MAML(meta_batch_size=4, meta_steps=1).meta_fit(SinusoidTasks())
    sampler = GaussianClusterTasks(n_way=3, k_shot=2, n_query=3, n_features=4, n_classes=12)
    with simulated_world(3), pytest.raises(ValueError, match="batch_size=16 must be divisible"):
        fewshot.FineTune(batch_size=16, meta_steps=1).meta_fit(sampler)
    with pytest.raises(ValueError, match="world_size"):
        with simulated_world(0):
            pass


def test_warm_start_needs_the_same_sharding():
    est = fewshot.FOMAML(meta_batch_size=4, inner_steps=1, meta_steps=1, warm_start=True, random_state=0)
    est.meta_fit(SinusoidTasks(k_shot=3, n_query=3))
    with simulated_world(2), pytest.raises(ValueError, match="same sharding"):
        est.meta_fit(SinusoidTasks(k_shot=3, n_query=3))
