"""How a meta-step runs its tasks: one by one, on task threads, or batched; chosen once per fit.

An :class:`Executor` is built from the network, the rule and the estimator's ``task_threads`` before
the first meta-step and fixes three things: whether the meta-batch runs as one batched computation
(:class:`~fewshot.core.functional.BatchedTaskLoss`, for small networks of linear layers and rules
that allow it), how many threads run tasks otherwise, and which Hessian-vector product the task
losses it hands to the rule carry. The rule is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _parallel
from ..core.functional import BatchedTaskLoss, FunctionalModel, TaskLoss
from ..core.inner import network_params
from ..core.tree import Params
from ..tasks import TaskBatch

__all__ = ["Executor", "example_flops", "THREADED_EXAMPLE_FLOPS"]

#: Task threads and the batched path are for networks under / over this many FLOPs per example.
THREADED_EXAMPLE_FLOPS = 1e6


def example_flops(fmodel: FunctionalModel, params: Params, input_shape) -> float:
    """FLOPs of the network's forward pass per example (``FlopCounterMode`` on two zero inputs)."""
    from torch.utils.flop_counter import FlopCounterMode

    weights = network_params(params)  # not the learned inner steps, which the network does not take
    like = next(iter(weights.values()))
    x = torch.zeros((2, *input_shape), device=like.device, dtype=like.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fmodel(weights, x)
    return counter.get_total_flops() / 2


def task_seeds(task_seed: int, step: int, stream: int, n: int) -> list[int]:
    """Dropout seeds of the ``n`` tasks of meta-step ``step`` drawn by process ``stream``: a function
    of these numbers only, so resumed and distributed runs draw the same masks."""
    return [int(s) for s in np.random.SeedSequence([int(task_seed), int(step), int(stream)]).generate_state(n)]


@dataclass
class Executor:
    """Runs a rule over a meta-batch. ``batched``: one computation with a leading task axis;
    otherwise ``workers`` threads (1: the calling thread). ``hvp_mode``: the Hessian-vector product
    of the task losses handed to the rule."""

    fmodel: FunctionalModel
    loss_parts: tuple
    batched: bool
    workers: int
    hvp_mode: str

    @classmethod
    def choose(cls, fmodel: FunctionalModel, loss_parts, rule, params: Params, input_shape,
               task_threads="auto") -> "Executor":
        """The executor for ``rule`` on this network: ``task_threads`` threads ("auto": PyTorch's
        intra-op thread count on CPU for networks of at least :data:`THREADED_EXAMPLE_FLOPS` per
        example, else 1); batched for smaller networks of linear layers when the rule allows it.
        Forward-mode AD is not thread-safe, so threads use reverse-over-reverse products; so do
        small networks, for which it is cheaper per product (sinusoid MLP, IMAML k=1, one thread:
        0.147 s per meta-step with forward-over-reverse, 0.038 s); one thread on a large network
        uses forward-over-reverse, which keeps no graph between products."""
        device = next(iter(params.values())).device
        small = example_flops(fmodel, params, input_shape) < THREADED_EXAMPLE_FLOPS
        if task_threads != "auto":
            workers = int(task_threads)
        elif device.type != "cpu" or torch.get_num_threads() == 1 or small:
            workers = 1
        else:
            workers = torch.get_num_threads()
        batched = bool(getattr(rule, "batchable", False)) and fmodel.batchable and small
        hvp_mode = "revrev" if workers > 1 or small else "fwdrev"
        return cls(fmodel, tuple(loss_parts), batched, workers, hvp_mode)

    def task_loss(self, fmodel: FunctionalModel | None = None) -> TaskLoss:
        return TaskLoss(fmodel or self.fmodel, *self.loss_parts, hvp_mode=self.hvp_mode)

    def _run_task(self, rule, params, task, seed, fmodel=None):
        gen = None
        if seed is not None and self.fmodel.random:
            gen = torch.Generator(next(iter(params.values())).device).manual_seed(seed)
        with FunctionalModel.seeded(gen):
            return rule(self.task_loss(fmodel), params, task)

    def per_task(self, rule, params: Params, batch: TaskBatch, seeds=None) -> list:
        """``[(g, stats)]`` of every task, in order, one task at a time on the calling thread."""
        seeds = seeds or [None] * len(batch)
        return [self._run_task(rule, params, task, s) for task, s in zip(batch, seeds)]

    def mean(self, rule, params: Params, batch: TaskBatch, seeds=None):
        """Mean over the meta-batch of the per-task meta-gradients and statistics."""
        if self.batched:
            theta = {k: v.expand(len(batch), *v.shape) for k, v in params.items()}
            loss = BatchedTaskLoss(self.fmodel, *self.loss_parts, hvp_mode=self.hvp_mode)
            g, stats = rule(loss, theta, batch)
            return {k: v.mean(0) for k, v in g.items()}, {k: v.mean() for k, v in stats.items()}
        seeds = seeds or [None] * len(batch)
        if self.workers > 1:
            def one(item):
                task, seed = item
                return self._run_task(rule, params, task, seed, _parallel.thread_local_copy(self.fmodel))
        else:
            def one(item):
                return self._run_task(rule, params, *item)

        # Summed as each task finishes, into buffers allocated before the first task, so that a
        # task's gradient is freed at once: keeping all of them to the end left each one pinning
        # the top of the malloc heap (MAML, omniglot benchmark workload, one task at a time: peak
        # RSS +348 MB over three meta-steps, +162 MB summed as here; learn2learn +205 MB).
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        stats, n = {}, 0
        for g, s in _parallel.imap_tasks(one, list(zip(batch, seeds)), self.workers):
            for k, v in grads.items():
                v.add_(g[k])
            for k, v in s.items():
                stats[k] = stats[k] + v if k in stats else v
            n += 1
            del g, s  # else the loop variables keep this task's gradient alive during the next task
        return {k: v / n for k, v in grads.items()}, {k: v / n for k, v in stats.items()}
