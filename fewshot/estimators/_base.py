"""The estimator layer: one meta-training loop, adaptation and scoring shared by every solver.

A solver is a subclass that declares its hyperparameters and returns its meta-gradient rule from
``_make_rule`` (built on the estimator's inner problem ``inner_``); the parameters, the step
executor, checkpoints, distributed glue and progress are the small modules beside this one.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from torch import nn

from . import _checkpoint, _distributed, _progress
from ._adapted import AdaptedModel, Evaluation, confidence_interval
from ._executor import Executor, task_seeds
from ._params import (AUTO_INNER_LR, COMMON_PARAMS, LR_SCHEDULES, OPTIMIZERS, estimator_init,
                      validate_common)
from .. import models as _models
from ..core.functional import LOSSES, FunctionalModel, TaskLoss
from ..core.inner import LR_PREFIX, STEP_PREFIX, InnerProblem
from ..core.tree import Params, tree_norm
from .._validation import check_choice, check_labeled_set, check_number
from ..exceptions import DivergenceError, NotFittedError
from ..tasks import TaskBatch, TaskSampler, as_task_batch

__all__ = ["MetaLearner", "AdaptedModel", "Evaluation", "COMMON_PARAMS", "estimator_init"]


class MetaLearner(BaseEstimator):
    """Shared machinery of the meta-learning estimators (not used directly).

    Subclasses set ``__init__ = estimator_init(**COMMON_PARAMS, ...)`` and implement
    ``_make_rule()``, the per-task meta-gradient rule (:mod:`fewshot.core.rules`) on ``self.inner_``;
    ``_learn_lr`` (the inner problem's learned steps), ``_per_step()`` (its per-step parameters) and
    ``_lam()`` (its proximal weight) say how their inner problem differs from plain gradient descent.
    """

    _solver_type = "meta"
    _extra_checks: dict = {}
    _min_inner_steps = 1
    _learn_lr = None

    # ------------------------------------------------------------------ setup
    def _validate_params(self):
        """Check every parameter (:func:`~fewshot.estimators._params.validate_common`); return the
        resolved ``(device, dtype)``. Overrides scikit-learn's method of that name, which needs
        ``_parameter_constraints``."""
        return validate_common(self)

    def _check_sampler(self, sampler):
        if not isinstance(sampler, TaskSampler):
            raise TypeError("meta_fit expects a fewshot.tasks.TaskSampler (for example "
                            f"fewshot.tasks.SinusoidTasks()), got {type(sampler).__name__}")
        # _setup builds the model from these three attributes, so a bad one fails here, by name.
        name = type(sampler).__name__
        check_choice(f"{name}.task_type", sampler.task_type, {"classification", "regression"})
        shape = sampler.input_shape
        if not (isinstance(shape, (tuple, list)) and all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"{name}.input_shape must be a tuple of positive integers, got {shape!r}")
        check_number(f"{name}.n_outputs", sampler.n_outputs, low=1, integer=True)

    def _n_model_outputs(self, sampler) -> int:
        return sampler.n_outputs

    def _setup(self, sampler, device, dtype, seed):
        """Resolve 'auto' choices against the sampler, build the functional model and the inner
        problem; return the initial meta-parameters."""
        self.task_type_ = sampler.task_type
        self.input_shape_ = tuple(sampler.input_shape)
        self.n_outputs_ = int(sampler.n_outputs)
        if isinstance(self.loss, str):
            name = self.loss if self.loss != "auto" else (
                "cross_entropy" if sampler.task_type == "classification" else "mse")
            loss_fn, metric, loss_type = LOSSES[name]
            if loss_type != sampler.task_type:
                raise ValueError(f"loss={name!r} is for {loss_type} but the sampler gives "
                                 f"{sampler.task_type} tasks")
            self.loss_ = name
        else:
            loss_fn = self.loss
            metric = LOSSES["cross_entropy"][1] if sampler.task_type == "classification" else None
            self.loss_ = loss_fn
        self._loss_parts = (loss_fn, metric)
        self.inner_lr_ = AUTO_INNER_LR[sampler.task_type] if self.inner_lr == "auto" else float(self.inner_lr)
        n_out = self._n_model_outputs(sampler)
        if isinstance(self.model, nn.Module):
            module = self.model
        else:
            name = self.model
            if name == "auto":
                name = "conv4" if len(self.input_shape_) == 3 else "mlp"
            module = _models.build_model(name, self.input_shape_, n_out, torch.Generator().manual_seed(seed))
        self.fmodel_ = FunctionalModel(module).to(device=device, dtype=dtype)
        weights = self.fmodel_.init_params(device, dtype)
        self._check_model(weights, n_out, device, dtype)
        self.inner_ = self._inner_problem(weights)
        return {**weights, **self.inner_.meta_parameters(weights)}

    def _check_model(self, weights, n_out, device, dtype):
        clash = [k for k in weights if k.startswith((LR_PREFIX, STEP_PREFIX))]
        if clash:
            raise ValueError(f"the model's parameters {clash} start with {LR_PREFIX!r} or {STEP_PREFIX!r}, the "
                             "prefixes of the inner problem's meta-parameters; rename that submodule")
        x = torch.zeros((2, *self.input_shape_), device=device, dtype=dtype)
        try:
            # first, and alone: it puts the global random state back; a plain forward pass of such a
            # model would move it
            global_rng = self.fmodel_.draws_global_randomness(weights, x)
            if not global_rng:
                with torch.no_grad():
                    out = self.fmodel_(weights, x)
        except Exception as exc:  # the user's network rejected our input: say which shapes met
            raise ValueError(f"model cannot run on inputs of shape [n, {', '.join(map(str, self.input_shape_))}] "
                             f"from the task sampler: {exc}") from exc
        if global_rng:
            raise ValueError("the model draws random numbers from torch's global generator in its forward "
                             "pass (torch.nn.functional.dropout, torch.rand, ...), which fewshot cannot seed "
                             "from random_state: use nn.Dropout/Dropout1d/2d/3d layers, whose masks fewshot "
                             "draws from the estimator's own generator")
        if out.dim() != 2 or out.shape[1] != n_out:
            raise ValueError(f"model outputs have shape {list(out.shape)} for 2 inputs, but the tasks need "
                             f"[2, {n_out}] (n_outputs={n_out})")

    def _lam(self):
        """Proximal weight of the inner problem (``None``: plain support loss)."""
        return None

    def _per_step(self):
        """Parameters of the inner problem with a meta-learned copy per step (``None``: none)."""
        return None

    def _inner_problem(self, weights: Params) -> InnerProblem:
        """The inner problem of meta-training and ``adapt`` (``inner_params`` resolved: see
        :func:`_select`)."""
        inner = InnerProblem(int(self.inner_steps), self.inner_lr_, _select(self, weights), self._learn_lr,
                             self._per_step(), self._lam(), bool(getattr(self, "backtracking", False)))
        inner.adapted(weights)  # a name that matches nothing fails here
        return inner

    @property
    def _task_loss(self) -> TaskLoss:
        return TaskLoss(self.fmodel_, *self._loss_parts)

    def _make_rule(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _rule(self):
        rule = self._make_rule()
        if rule is not None and rule.deterministic and self.fmodel_.random:
            raise ValueError(f"{type(self).__name__} (as configured) needs a deterministic support loss, but "
                             "the model has dropout layers: remove them or set their p to 0")
        return rule

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
            ``meta_steps``, ``verbose``, ``device`` and ``warm_start``), is refused with a
            ``ValueError`` naming the difference.
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

    def _dropout_seeds(self, world, n: int) -> list[int]:
        """Seeds of the dropout masks of this meta-step's ``n`` tasks, shard by shard (so one
        process simulating a world draws what its processes would)."""
        per_shard = n // len(world.shards)
        return [s for shard in world.shards for s in task_seeds(self._task_seed, self.n_iter_, shard, per_shard)]

    def _warn_about_solves(self, first_step: int):
        """The rule's warnings about the statistics of ``history_`` from ``first_step`` on."""
        rule = self._make_rule()
        if rule is not None:
            rule.check_fit(self.history_, first_step, type(self).__name__)

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

    #: Consecutive meta-steps in which adaptation raises the mean support loss before meta-training
    #: is stopped (no tuned Omniglot run had more than 2 in a row; a broken-down one, hundreds).
    _INNER_LOOP_PATIENCE = 20

    def _check_inner_loop(self, record, rule):
        """Stop with :class:`DivergenceError` when adaptation has raised the meta-batch's mean support
        loss in ``_INNER_LOOP_PATIENCE`` consecutive meta-steps: the meta-parameters have reached a
        region where the inner loop diverges, and training has broken down even if every value is
        finite (IMAML at Adam 5e-3 on Omniglot fell to chance accuracy that way). Only for rules
        whose inner loop is descent on the support set alone (``rule.fits_support``)."""
        pre, post = record.get("support_loss_pre"), record.get("support_loss_post")
        if pre is None or post is None or not getattr(rule, "fits_support", True):
            return
        run = self._inner_loop_rising = self._inner_loop_rising + 1 if post > pre else 0
        if run >= self._INNER_LOOP_PATIENCE:
            raise DivergenceError(
                f"{type(self).__name__} broke down at meta-step {self.n_iter_ + 1}: in each of the last "
                f"{run} meta-steps the inner loop raised the mean support loss (now {pre:.4g} before "
                f"adaptation, {post:.4g} after), so the inner loop diverges at these meta-parameters. "
                f"params_ holds the meta-parameters after {self.n_iter_} steps, already in that region: "
                f"restart from a checkpoint taken earlier with a smaller meta_lr or inner_lr (or, for "
                f"IMAML, more damping).",
                step=self.n_iter_ + 1, solver=type(self).__name__, last_finite=self._last_record())

    def _rising_run(self) -> int:
        """Consecutive meta-steps at the end of ``history_`` whose adaptation raised the support
        loss: a resumed or warm-started fit continues the count of the one before it."""
        pre, post = self.history_.get("support_loss_pre", []), self.history_.get("support_loss_post", [])
        run = 0
        for a, b in zip(reversed(pre), reversed(post)):
            if not b > a:
                break
            run += 1
        return run

    def _last_record(self):
        return {k: v[-1] for k, v in self.history_.items()} if self.history_ else {}

    def _diverged(self, record):
        bad = sorted(k for k, v in record.items() if not math.isfinite(v))
        raise DivergenceError(
            f"{type(self).__name__} diverged at meta-step {self.n_iter_ + 1}: non-finite {', '.join(bad)}. "
            f"params_ holds the last finite meta-parameters (after {self.n_iter_} steps); last finite "
            f"values: {self._last_record()}. Lower meta_lr or inner_lr, or set grad_clip.",
            step=self.n_iter_ + 1, solver=type(self).__name__, last_finite=self._last_record())

    def _check_shards(self, world):
        """Each of the ``world.n_shards`` processes draws an equal part of the step's batch."""
        params = self.get_params(deep=False)
        name = "meta_batch_size" if "meta_batch_size" in params else "batch_size"
        size = params.get(name)
        if world.n_shards > 1 and size is not None and size % world.n_shards:
            raise ValueError(f"{name}={size} must be divisible by the number of processes "
                             f"({world.n_shards}): each process draws an equal shard of every batch")

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

    def _device_dtype(self):
        p = next(iter(self.params_.values()))
        return p.device, p.dtype

    def _adapt_steps(self):
        return self.inner_steps if self.adapt_steps is None else self.adapt_steps

    def _adapt_params(self, support) -> Params:
        """The inner problem's answer on ``support`` (``adapt_steps`` steps, dropout off)."""
        return self.inner_.run(self._task_loss, self.params_, support.x, support.y, steps=self._adapt_steps()).phi

    def adapt(self, support) -> AdaptedModel:
        """Adapt the meta-parameters to one task's ``support`` set (a ``LabeledSet`` or ``(x, y)``).

        Runs the estimator's inner problem ``inner_`` (``adapt_steps``, default ``inner_steps``;
        dropout layers off, so the result is a function of the support set) and returns a new
        :class:`AdaptedModel`; the estimator is not changed.
        """
        self._check_fitted()
        device, dtype = self._device_dtype()
        support = check_labeled_set(support, input_shape=self.input_shape_, task_type=self.task_type_,
                                    n_outputs=self.n_outputs_, name="support", require_all_classes=True)
        return self._adapted(support.to(device, dtype), device, dtype)

    def _adapted(self, support, device, dtype) -> AdaptedModel:
        """Adapt to a support set already validated and on the estimator's device and dtype."""
        return AdaptedModel(self.fmodel_, self._adapt_params(support), task_type=self.task_type_,
                            n_outputs=self.n_outputs_, input_shape=self.input_shape_, support=support,
                            transductive=self.transductive, dtype=dtype, device=device)

    def evaluate(self, tasks, *, n_tasks=600, random_state=0) -> Evaluation:
        """Adapt to each task's support set and score its query set.

        ``tasks`` is a :class:`~fewshot.tasks.TaskSampler` (``n_tasks`` tasks are drawn with
        ``random_state``, so the same seed gives the same pool for every estimator), a
        :class:`~fewshot.tasks.TaskBatch`, a :class:`~fewshot.tasks.Task` or a list of tasks.
        """
        self._check_fitted()
        if isinstance(tasks, TaskSampler):
            check_number("n_tasks", n_tasks, low=1, integer=True)
            tasks = tasks.sample(n_tasks, random_state=random_state)
        device, dtype = self._device_dtype()
        batch = self._check_batch(as_task_batch(tasks).to(device, dtype), name="tasks")  # checked once
        scores = [self._adapted(task.support, device, dtype)._score(task.query.x, task.query.y)
                  for task in batch]
        mean, ci = confidence_interval(scores)
        return Evaluation(mean, ci, np.asarray(scores))

    def score(self, tasks, n_tasks=600, random_state=0) -> float:
        """Mean query accuracy (classification) or negative MSE (regression) after adaptation over
        held-out tasks; :meth:`evaluate` also gives the 95% confidence interval."""
        return self.evaluate(tasks, n_tasks=n_tasks, random_state=random_state).mean

    def _check_fitted(self):
        # sklearn's check_is_fitted insists on a `fit` method; meta-learners have `meta_fit`.
        if not hasattr(self, "params_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet. Call "
                                 "'meta_fit' with a task sampler before using this estimator.")

    def __sklearn_is_fitted__(self):
        return hasattr(self, "params_")


def _select(est, weights: Params):
    """``inner_params`` for :class:`~fewshot.core.inner.InnerProblem`: ``"head"`` names the module or
    parameter called ``head`` when the network has one, else its last ``nn.Linear`` layer."""
    value = getattr(est, "inner_params", None)
    if value != "head" or any(n == "head" or n.startswith("head.") for n in weights):
        return value
    linear = [name for name, m in est.fmodel_.module.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("inner_params='head' found neither a 'head' module nor an nn.Linear layer in the model")
    return linear[-1]
