"""The estimator layer: the one meta-training loop shared by every solver.

A solver is a subclass that declares its hyperparameters and returns its meta-gradient rule from
``_make_rule`` (built on the estimator's inner problem ``inner_``). The pieces around the loop are
the modules beside this one: ``_params`` (parameters and their checks), ``_setup`` (network, loss,
inner problem, rule), ``_executor`` (how a meta-step runs its tasks), ``_guards`` (divergence,
breakdown, warnings), ``_checkpoint``, ``_distributed``, ``_progress`` and ``_adapted``
(adaptation and scoring).
"""

from __future__ import annotations

import math
import time

import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state

from . import _checkpoint, _distributed, _progress
from ._adapted import Adaptation, AdaptedModel, Evaluation
from ._executor import Executor, task_seeds
from ._guards import Guards
from ._params import COMMON_PARAMS, LR_SCHEDULES, OPTIMIZERS, estimator_init, validate_common
from ._setup import Setup
from ..core.tree import Params, tree_norm
from .._validation import check_labeled_set
from ..tasks import TaskBatch, as_task_batch

__all__ = ["MetaLearner", "AdaptedModel", "Evaluation", "COMMON_PARAMS", "estimator_init"]


class MetaLearner(Setup, Guards, Adaptation, BaseEstimator):
    """Shared machinery of the meta-learning estimators (not used directly).

    Subclasses set ``__init__ = estimator_init(**COMMON_PARAMS, ...)`` and implement
    ``_make_rule()``, the per-task meta-gradient rule (:mod:`fewshot.core.rules`) on ``self.inner_``;
    ``_learn_lr`` (the inner problem's learned steps), ``_per_step()`` (its per-step parameters) and
    ``_lam()`` (its proximal weight) say how their inner problem differs from plain gradient descent.
    """

    _solver_type = "meta"
    _extra_checks: dict = {}
    _min_inner_steps = 1

    # ------------------------------------------------------------------ setup
    def _validate_params(self):
        """Check every parameter (:func:`~fewshot.estimators._params.validate_common`); return the
        resolved ``(device, dtype)``. Overrides scikit-learn's method of that name, which needs
        ``_parameter_constraints``."""
        return validate_common(self)

    # ------------------------------------------------------------------ meta-training
    def meta_fit(self, task_sampler, *, checkpoint=None, checkpoint_every=None):
        """Meta-train on tasks drawn from ``task_sampler``; returns ``self``.

        Each meta-step draws ``meta_batch_size`` tasks, averages the solver's per-task
        meta-gradients and applies the meta-optimizer. A second call starts over unless
        ``warm_start=True``, which continues from the fitted state for ``meta_steps`` more steps.

        Parameters
        ----------
        task_sampler : TaskSampler
            Source of the meta-training tasks.
        checkpoint : str or path-like, optional
            File to save training to and resume it from. If it exists, the estimator is restored
            from it (meta-parameters, meta-optimizer state, task-generator state, ``history_``,
            ``n_iter_``) and training continues; otherwise training starts as usual and the file is
            written. With a checkpoint, ``meta_steps`` is the *total* number of steps: a checkpoint
            written after step ``n`` resumes at step ``n + 1`` and stops when ``n_iter_`` reaches
            ``meta_steps`` (no step runs if it already has; raise ``meta_steps`` to train longer).
            The result is the same as one uninterrupted run with the same ``random_state``. The
            file is written atomically (a temporary file in the same directory, then
            ``os.replace``) and loads with ``torch.load(weights_only=True)``. Networks, loss
            callables and optimizer classes are not saved as code: construct the same estimator to
            resume; a checkpoint of another solver, or of parameters that differ (except
            ``meta_steps``, ``verbose``, ``device``, ``warm_start`` and the test-time
            ``adapt_steps``), is refused with a ``ValueError`` naming the difference.
        checkpoint_every : int, optional
            Also write the checkpoint after every ``checkpoint_every`` steps (it is always written
            after the last step). Needs ``checkpoint``.

        Notes
        -----
        Inside an initialized ``torch.distributed`` process group (for example under
        ``torchrun --nproc_per_node=W``), each meta-batch is split into ``W`` shards of
        ``meta_batch_size / W`` tasks (``meta_batch_size`` must be divisible by ``W``); rank ``r``
        draws shard ``r`` from its own generator, seeded from the task seed (from
        ``random_state``) and ``r``, and the meta-gradient and ``history_`` statistics are
        all-reduced, so the meta-parameters (learned inner steps included) and ``history_``
        (except its wall-clock ``time``) are identical on every rank. Rank 0 alone shows progress
        and writes the checkpoint (which holds every rank's generator state; every rank must see
        the file to resume). See ``docs/distributed.md``.
        """
        device, dtype = validate_common(self)
        self._check_sampler(task_sampler)
        path, every = _checkpoint.check_options(checkpoint, checkpoint_every)
        world = _distributed.current_world()
        self._check_shards(world)
        resume = path is not None and path.is_file()
        _distributed.check_agree(world, int(resume), "whether the checkpoint file exists")
        if not resume and self.warm_start and hasattr(self, "params_"):
            params, optimizer = self.params_, self.optimizer_
            gen = _distributed.restore_streams(world, self._task_rng_state)
        else:
            rs = check_random_state(self.random_state)
            init_seed, self._task_seed = _distributed.broadcast_ints(world, rs.randint(0, 2**31 - 1, size=2))
            params = self._setup(task_sampler, device, dtype, init_seed)
            optimizer = self._make_optimizer(params)
            self.history_, self.n_iter_ = {}, 0
            if resume:
                gen = _checkpoint.restore_training(self, path, world, params, optimizer)
            else:
                _distributed.broadcast_params(world, params)
                gen = _distributed.task_streams(world, self._task_seed)
        rule = self._rule()
        self.params_, self.optimizer_ = params, optimizer
        executor = Executor.choose(self.fmodel_, self._loss_parts, rule, params, self.input_shape_,
                                   self.task_threads)
        # With a checkpoint, meta_steps is the total step count; otherwise the steps of this call.
        target = self.meta_steps if path is not None else self.n_iter_ + self.meta_steps
        shards = _distributed.shard_sampler(task_sampler, world)
        elapsed0 = self.history_["time"][-1] if self.history_.get("time") else 0.0
        start, first_step, self._inner_loop_rising = time.perf_counter(), self.n_iter_, self._rising_run()
        progress = (_progress.progress_bar(self.verbose, max(target - self.n_iter_, 0), type(self).__name__)
                    if world.is_main else None)
        try:
            while self.n_iter_ < target:
                data = self._draw(shards, gen, device, dtype)
                seeds = self._dropout_seeds(world, len(data)) if self.fmodel_.random else None
                step_rule = rule.for_step(self.n_iter_) if rule is not None else None
                grads, stats = self._step(executor, step_rule, params, data, seeds)
                grads, stats = _distributed.all_reduce_mean(world, grads, stats)
                norm = tree_norm(grads)
                names = ["meta_grad_norm", *stats]
                record = dict(zip(names, torch.stack([norm, *stats.values()]).tolist()))  # one host sync
                if not all(math.isfinite(v) for v in record.values()):
                    self._diverged(record)
                self._check_inner_loop(record, step_rule)
                self._schedule_lr(optimizer, self.n_iter_, target)
                self._apply(optimizer, params, grads, norm)
                record["time"] = elapsed0 + time.perf_counter() - start
                for k, v in record.items():
                    self.history_.setdefault(k, []).append(v)
                self.n_iter_ += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(self._progress_postfix(record), refresh=False)
                if path is not None and (self.n_iter_ == target or (every and self.n_iter_ % every == 0)):
                    _checkpoint.save_training(self, path, world, params, optimizer, gen)
        finally:
            self._task_rng_state = gen.get_state()
            if progress is not None:
                progress.close()
            self._warn_about_solves(first_step)
        return self

    def save_meta_params(self, path):
        """Write the meta-trained parameters to ``path``, weights only, for
        :func:`fewshot.load_meta_params`.

        The file holds the estimator's class and constructor parameters, the task shape and the
        meta-parameters (``params_``), as tensors, strings and numbers: it loads with
        ``torch.load(weights_only=True)`` and is written atomically. A network passed as an
        ``nn.Module`` (and any other parameter object) is recorded by name only; pass it again to
        :func:`~fewshot.load_meta_params`. Returns the path.
        """
        from ._export import save_meta_params

        return save_meta_params(self, path)

    def _dropout_seeds(self, world, n: int) -> list[int]:
        """Seeds of the dropout masks of this meta-step's ``n`` tasks, shard by shard (so one
        process simulating a world draws what its processes would)."""
        per_shard = n // len(world.shards)
        return [s for shard in world.shards for s in task_seeds(self._task_seed, self.n_iter_, shard, per_shard)]

    def _draw(self, sampler, gen, device, dtype):
        batch = sampler.sample(self.meta_batch_size, random_state=gen)
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"{type(sampler).__name__}.sample(n_tasks) must return a TaskBatch, "
                            f"got {type(batch).__name__}")
        return self._check_batch(batch.to(device, dtype), name="sampled tasks")

    def _check_batch(self, batch: TaskBatch, name: str) -> TaskBatch:
        """The batch, validated, with integer class labels as int64."""
        kw = dict(input_shape=self.input_shape_, task_type=self.task_type_, n_outputs=self.n_outputs_,
                  batch_dims=2)
        support = check_labeled_set(batch.support, name=f"{name}: support", require_all_classes=True, **kw)
        return TaskBatch(support, check_labeled_set(batch.query, name=f"{name}: query", **kw))

    def _step(self, executor, rule, params, data, seeds):
        """Mean meta-gradient and statistics of one meta-step's data."""
        return executor.mean(rule, params, data, seeds)

    def _progress_postfix(self, record):
        keys = ("query_loss_post", "query_acc_post")
        return {k.replace("_post", ""): f"{record[k]:.3f}" for k in keys if k in record}

    def _make_optimizer(self, params: Params):
        cls = OPTIMIZERS[self.meta_optimizer] if isinstance(self.meta_optimizer, str) else self.meta_optimizer
        return cls(list(params.values()), lr=self._outer_lr())

    def _outer_lr(self):
        return self.meta_lr

    def _schedule_lr(self, optimizer, step: int, total: int):
        """Set the meta learning rate of (0-based) ``step`` of ``total``; a constant schedule leaves
        the optimizer alone. A function of the step count only, so a resumed run follows it exactly."""
        if self.meta_lr_schedule == "constant":
            return
        if self.meta_lr_horizon is not None:
            total = self.meta_lr_horizon
        lr = self._outer_lr() * LR_SCHEDULES[self.meta_lr_schedule](min(step / max(total, 1), 1.0))
        for group in optimizer.param_groups:
            group["lr"] = lr

    def _apply(self, optimizer, params: Params, grads: Params, norm):
        scale = 1.0 if self.grad_clip is None else torch.clamp(self.grad_clip / (norm + 1e-12), max=1.0)
        for k, p in params.items():
            p.grad = grads[k] * scale
        optimizer.step()
        for p in params.values():
            p.grad = None

    # ------------------------------------------------------------------ gradients, adaptation, scores
    def meta_gradient(self, tasks, *, params: Params | None = None) -> list[Params]:
        """This solver's per-task meta-gradients at ``params`` (default ``params_``).

        ``tasks`` is a :class:`~fewshot.tasks.TaskBatch`, a task or a list of tasks. Returns one dict
        shaped like ``params_`` (learned inner steps included) per task: the quantity each meta-step
        averages (for :class:`Reptile`, the pseudo-gradient), for the rule of the estimator's
        current meta-step (MAML++'s schedules). Used by :mod:`fewshot.diagnostics` to compare
        solvers at the same point; ``meta_fit`` with ``meta_steps=0`` prepares an estimator for it.
        Dropout masks come from seeds ``0, 1, ...`` per task.
        """
        self._check_fitted()
        device, dtype = self._device_dtype()
        batch = self._check_batch(as_task_batch(tasks).to(device, dtype), name="tasks")
        theta = self.params_ if params is None else {k: params[k].to(device, dtype) for k in self.params_}
        rule = self._rule().for_step(self.n_iter_)
        return [{k: v.detach() for k, v in g.items()} for g, _ in self._per_task(rule, theta, batch)]

    def _per_task(self, rule, theta: Params, batch: TaskBatch) -> list:
        """``[(g, stats)]`` of ``rule`` on every task of a checked ``batch``, one thread, dropout
        seeds ``0, 1, ...``."""
        executor = Executor.choose(self.fmodel_, self._loss_parts, rule, theta, self.input_shape_, 1)
        return executor.per_task(rule, theta, batch, list(range(len(batch))) if self.fmodel_.random else None)

