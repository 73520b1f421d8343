"""Data-parallel meta-training over ``torch.distributed``: which tasks each process draws, and the
few collectives the training loop needs.

Sharding (see ``docs/distributed.md``). With ``W`` processes in the default process group, each
meta-step's batch of ``B`` tasks (``meta_batch_size``; for :class:`~fewshot.FineTune`, its
``batch_size`` pre-training examples) is ``W`` shards of ``B / W`` (``B % W == 0`` is required).
Shard ``r`` is drawn by rank ``r`` from its own generator, seeded with
``shard_seed(task_seed, r)`` where ``task_seed`` is the estimator's task seed (drawn from
``random_state``, and broadcast from rank 0 so that ``random_state=None`` works too). Shard 0's
seed is ``task_seed`` itself: a one-process run is the ``W = 1`` case and draws exactly the tasks of
a run without ``torch.distributed``. Each process averages the meta-gradient and the statistics
over its shard; one all-reduce averages them over the processes, which is the mean over the whole
meta-batch because the shards have equal sizes. Every process then takes the same optimizer step
from the same meta-parameters (broadcast from rank 0 at the start), so they stay identical.

:func:`simulated_world` makes one process draw all ``W`` shards of every meta-batch, in rank order,
so a ``W``-process run can be reproduced (up to floating-point summation order) without
``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..core.tree import Params
from ..tasks import LabeledSet, TaskBatch, TaskSampler

__all__ = ["World", "current_world", "simulated_world", "shard_seed", "ShardStreams", "task_streams",
           "restore_streams", "streams_from_checkpoint", "gather_stream_states", "ShardedSampler",
           "shard_sampler", "broadcast_ints", "broadcast_params", "all_reduce_mean", "check_agree"]


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, drawing ``shards`` of the
    ``n_shards`` shards of every meta-batch."""

    rank: int = 0
    size: int = 1
    n_shards: int = 1
    shards: tuple = (0,)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that shows progress and writes checkpoints."""
        return self.rank == 0


_SIMULATED: contextvars.ContextVar = contextvars.ContextVar("fewshot_simulated_world", default=None)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def current_world() -> World:
    """The world of the default ``torch.distributed`` process group, else of
    :func:`simulated_world`, else a single process drawing the whole meta-batch."""
    simulated = _SIMULATED.get()
    if _initialized():
        if simulated is not None:
            raise RuntimeError("simulated_world() reproduces a multi-process run in one process; it "
                               "cannot be used inside an initialized torch.distributed process group")
        import torch.distributed as dist

        rank, size = dist.get_rank(), dist.get_world_size()
        return World(rank=rank, size=size, n_shards=size, shards=(rank,))
    if simulated is not None:
        return World(rank=0, size=1, n_shards=simulated, shards=tuple(range(simulated)))
    return World()


@contextlib.contextmanager
def simulated_world(world_size: int):
    """Within this context, ``meta_fit`` in this one process draws every meta-batch as the
    ``world_size`` shards a ``world_size``-process run would draw (shard 0 first) and averages over
    all of them, so it reproduces that run's meta-parameters up to floating-point summation order.
    Checkpoints written in either can be resumed in the other.

    >>> with simulated_world(2):                          # doctest: +SKIP
    ...     reference = fewshot.MAML(meta_batch_size=8, random_state=0).meta_fit(sampler)
    """
    if not isinstance(world_size, numbers.Integral) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    token = _SIMULATED.set(int(world_size))
    try:
        yield
    finally:
        _SIMULATED.reset(token)


# --------------------------------------------------------------------------------------------------
# Task streams: one generator per shard


def shard_seed(task_seed: int, shard: int) -> int:
    """Seed of shard ``shard``'s task generator: ``task_seed`` for shard 0, else 32 bits of
    ``numpy.random.SeedSequence([task_seed, shard])`` (independent streams, stable across numpy
    versions)."""
    if shard == 0:
        return int(task_seed)
    return int(np.random.SeedSequence([int(task_seed), int(shard)]).generate_state(1)[0])


class ShardStreams:
    """The task generators of the shards one process draws, with a ``torch.Generator``-like
    ``get_state``/``set_state``. Used only when a meta-batch has several shards; a one-shard run
    uses a plain ``torch.Generator``."""

    def __init__(self, n_shards: int, shards: tuple, generators: list):
        self.n_shards, self.shards, self.generators = n_shards, tuple(shards), list(generators)

    def get_state(self) -> dict:
        return {"n_shards": self.n_shards, "shards": self.shards,
                "states": [g.get_state() for g in self.generators]}


def task_streams(world: World, task_seed: int):
    """Fresh generators for the shards this process draws (a ``torch.Generator`` for one shard)."""
    gens = [torch.Generator().manual_seed(shard_seed(task_seed, r)) for r in world.shards]
    return gens[0] if world.n_shards == 1 else ShardStreams(world.n_shards, world.shards, gens)


def restore_streams(world: World, state):
    """Generators in the state saved by ``get_state`` (a warm start within the same world)."""
    if isinstance(state, Tensor):
        layout = (1, (0,))
    else:
        layout = (state["n_shards"], tuple(state["shards"]))
    if layout != (world.n_shards, world.shards):
        raise ValueError(f"warm_start needs the same sharding as the previous meta_fit: it drew "
                         f"shards {list(layout[1])} of {layout[0]}, this process draws shards "
                         f"{list(world.shards)} of {world.n_shards}")
    states = [state] if isinstance(state, Tensor) else state["states"]
    return _from_states(world, states)


def _from_states(world: World, states):
    gens = []
    for s in states:
        g = torch.Generator()
        g.set_state(s)
        gens.append(g)
    return gens[0] if world.n_shards == 1 else ShardStreams(world.n_shards, world.shards, gens)


def streams_from_checkpoint(world: World, states: list, path) -> object:
    """Generators of this process's shards from the states of all shards saved in a checkpoint."""
    if len(states) != world.n_shards:
        raise ValueError(
            f"checkpoint {path} was written by a run whose meta-batches had {len(states)} shard(s) "
            f"(processes); this run has {world.n_shards}. Resume with the same number of processes "
            "(or, in one process, within fewshot._distributed.simulated_world(n))")
    return _from_states(world, [states[r] for r in world.shards])


def gather_stream_states(world: World, streams) -> list:
    """The generator states of all ``n_shards`` shards, in shard order (a collective: every process
    must call it at the same step)."""
    own = [streams.get_state()] if isinstance(streams, torch.Generator) else streams.get_state()["states"]
    if world.size == 1:
        return own
    import torch.distributed as dist

    device = _comm_device()
    mine = own[0].to(device)
    out = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(out, mine)
    return [t.cpu() for t in out]


# --------------------------------------------------------------------------------------------------
# The sampler seen by the training loop


class ShardedSampler(TaskSampler):
    """The shards of ``sampler`` one process draws.

    ``sample(n, random_state=streams)`` returns ``n / n_shards`` tasks from each of the process's
    shard generators, concatenated in shard order; ``sample_pretraining`` does the same with
    examples. Everything else is ``sampler``'s.
    """

    def __init__(self, sampler: TaskSampler, n_shards: int):
        self.sampler, self.n_shards = sampler, n_shards
        for name in ("task_type", "input_shape", "n_outputs", "n_way", "n_pretrain_outputs"):
            setattr(self, name, getattr(sampler, name, None))

    def _per_shard(self, n, streams):
        if not isinstance(streams, ShardStreams):
            raise TypeError(f"ShardedSampler draws from ShardStreams, got {type(streams).__name__}")
        if n % self.n_shards:
            raise ValueError(f"a batch of {n} cannot be split into {self.n_shards} equal shards")
        return n // self.n_shards

    def sample(self, n_tasks, *, random_state, device=None):
        per = self._per_shard(n_tasks, random_state)
        parts = [self.sampler.sample(per, random_state=g, device=device) for g in random_state.generators]
        if not all(isinstance(p, TaskBatch) for p in parts):
            return parts[0]  # let the caller report the wrong type
        return TaskBatch(_cat([p.support for p in parts]), _cat([p.query for p in parts]))

    def sample_pretraining(self, batch_size, *, random_state, device=None):
        per = self._per_shard(batch_size, random_state)
        return _cat([self.sampler.sample_pretraining(per, random_state=g, device=device)
                     for g in random_state.generators])

    def _repr_args(self):
        return {"sampler": self.sampler, "n_shards": self.n_shards}


def _cat(sets: list[LabeledSet]) -> LabeledSet:
    if len(sets) == 1:
        return sets[0]
    return LabeledSet(torch.cat([s.x for s in sets]), torch.cat([s.y for s in sets]))


def shard_sampler(sampler: TaskSampler, world: World) -> TaskSampler:
    """``sampler`` itself for one shard, else the :class:`ShardedSampler` of this process."""
    return sampler if world.n_shards == 1 else ShardedSampler(sampler, world.n_shards)


# --------------------------------------------------------------------------------------------------
# Collectives (no-ops in a one-process world)


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_ints(world: World, values) -> tuple:
    """Rank 0's integers, on every process."""
    values = tuple(int(v) for v in values)
    if world.size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    return tuple(t.tolist())


def _flat(tensors: list[Tensor]):
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


def broadcast_params(world: World, params: Params) -> None:
    """Overwrite ``params`` (in place) with rank 0's."""
    if world.size == 1 or not params:
        return
    import torch.distributed as dist

    values = list(params.values())
    flat = _flat(values)
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        for p, v in zip(values, _unflat(flat, values)):
            p.copy_(v)


def all_reduce_mean(world: World, grads: Params, stats: dict) -> tuple[Params, dict]:
    """Means over the processes of the per-shard mean meta-gradients and statistics, in one
    all-reduce. Returns its arguments unchanged in a one-process world."""
    if world.size == 1:
        return grads, stats
    import torch.distributed as dist

    like = [*grads.values(), *stats.values()]
    flat = _flat(like)
    dist.all_reduce(flat)
    flat /= world.size
    values = _unflat(flat, like)
    return dict(zip(grads, values[:len(grads)])), dict(zip(stats, values[len(grads):]))


def check_agree(world: World, value: int, what: str) -> None:
    """Raise on every process if the processes hold different values of an integer."""
    if world.size == 1:
        return
    import torch.distributed as dist

    t = torch.tensor([value, -value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    low, high = -int(t[1]), int(t[0])
    if low != high:
        raise RuntimeError(f"the processes disagree on {what} (from {low} to {high}); every rank must "
                           "see the same checkpoint file (use a shared file system)")
