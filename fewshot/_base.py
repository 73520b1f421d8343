"""The estimator layer: one meta-training loop, adaptation and scoring shared by every solver.

A solver is a subclass that declares its hyperparameters and returns its meta-gradient rule from
``_make_rule``; everything else (validation, the loop, history, adaptation, scoring) lives here.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from torch import Tensor, nn
from torch.func import vmap

from . import _parallel
from . import models as _models
from ._functional import LOSSES, BatchedTaskLoss, FunctionalModel, TaskLoss, inner_loop
from ._tree import Params, tree_norm
from ._validation import check_choice, check_inputs, check_labeled_set, check_number, check_targets
from .exceptions import DivergenceError, NotFittedError, SolverWarning
from .tasks import Task, TaskBatch, TaskSampler, as_task_batch

__all__ = ["MetaLearner", "AdaptedModel", "Evaluation", "COMMON_PARAMS", "estimator_init"]

#: Parameters every meta-learning estimator takes, with their defaults.
COMMON_PARAMS = dict(
    model="auto",
    loss="auto",
    inner_lr="auto",
    inner_steps=5,
    adapt_steps=None,
    meta_lr=1e-3,
    meta_batch_size=16,
    meta_steps=2000,
    meta_optimizer="adam",
    meta_lr_schedule="constant",
    meta_lr_horizon=None,
    grad_clip=None,
    transductive=True,
    device="auto",
    dtype="float32",
    random_state=None,
    verbose="auto",
    warm_start=False,
    full_history=True,
    task_threads="auto",
)

#: ``inner_lr="auto"`` per task type: MAML's values for Omniglot (0.4) and sinusoid (0.01).
AUTO_INNER_LR = {"classification": 0.4, "regression": 0.01}

_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}

#: ``meta_lr_schedule``: the factor on the meta learning rate at progress ``t = step / total`` in [0, 1).
LR_SCHEDULES = {
    "constant": lambda t: 1.0,
    "linear": lambda t: 1.0 - t,                          # Reptile's annealing to zero
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def estimator_init(**defaults):
    """Build an ``__init__`` that stores keyword parameters unchanged (the scikit-learn contract).

    Its signature lists every parameter with its default, so ``get_params``, ``clone`` and ``help``
    see them; one function serves every estimator instead of seven hand-copied ones.
    """

    def __init__(self, **params):
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) {unknown}; "
                            f"valid parameters are {sorted(defaults)}")
        for name, default in defaults.items():
            setattr(self, name, params.get(name, default))

    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in defaults.items()]
    )
    return __init__


class Evaluation(NamedTuple):
    """Scores of an adapted model over held-out tasks.

    ``mean`` is the mean per-task score (query accuracy for classification, negative query MSE for
    regression), ``ci95`` the half-width of its 95% normal confidence interval
    (``1.96 * std / sqrt(n_tasks)``, the convention of the few-shot literature) and ``scores`` the
    per-task scores.
    """

    mean: float
    ci95: float
    scores: np.ndarray

    def __str__(self):
        return f"{self.mean:.4f} +- {self.ci95:.4f} (95% CI, {len(self.scores)} tasks)"


def _interactive() -> bool:
    """Whether a person is watching this process's output: standard error is a terminal, or the
    process is a Jupyter kernel. False under pytest's capture, in pipes, files and batch jobs."""
    import sys

    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def confidence_interval(scores) -> tuple[float, float]:
    scores = np.asarray(scores, dtype=float)
    if scores.size < 2:
        return float(scores.mean()), float("nan")
    return float(scores.mean()), float(1.96 * scores.std(ddof=1) / math.sqrt(scores.size))


class AdaptedModel:
    """A model adapted to one task's support set: ``predict``, ``predict_proba``, ``score``.

    Created by ``estimator.adapt(support)``; holds its own parameters and never changes the
    estimator. With ``transductive=True`` a batch of inputs is normalised with its own batch
    statistics (BatchNorm in training mode, as MAML evaluates); with ``transductive=False`` each
    input is predicted in a batch made of the support set plus that input alone, so predictions do
    not depend on the other query examples.

    Inputs ``x`` (and ``score``'s targets ``y``) may be tensors or anything :func:`torch.as_tensor`
    accepts (NumPy arrays, nested lists); they are checked as ``adapt`` checks the support set:
    floating-point ``x`` of shape ``[n, *input_shape]`` without NaN or infinities (cast to the
    estimator's dtype and device), integer class labels in ``0 .. n_way - 1``, regression targets of
    shape ``[n, n_outputs]`` (or ``[n]`` for one output). Bad inputs raise ``TypeError`` or
    ``ValueError`` naming the argument.
    """

    def __init__(self, fmodel: FunctionalModel, params: Params, *, task_type, n_outputs, input_shape,
                 support, transductive, dtype, device):
        self.fmodel, self.params = fmodel, params
        self.task_type, self.n_outputs, self.input_shape = task_type, n_outputs, tuple(input_shape)
        self.support, self.transductive = support, transductive
        self.dtype, self.device = dtype, device

    def __repr__(self) -> str:
        outputs = "n_way" if self.task_type == "classification" else "n_outputs"
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"AdaptedModel(task_type={self.task_type!r}, {outputs}={self.n_outputs}, "
                f"input_shape={self.input_shape}, support={len(self.support)} examples, "
                f"transductive={self.transductive}, device={self.device}, dtype={dtype})")

    def _check_x(self, x) -> Tensor:
        x = check_inputs(x, self.input_shape, "x")
        return x.to(device=self.device, dtype=self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Raw outputs (logits for classification), ``[n, n_outputs]``."""
        return self._outputs(self._check_x(x))

    __call__ = forward

    def _outputs(self, x: Tensor) -> Tensor:
        """Outputs for inputs already checked and on the model's device and dtype."""
        with torch.no_grad():
            if self.transductive:
                return self.fmodel(self.params, x)
            xs = self.support.x

            def one(xi):
                return self.fmodel(self.params, torch.cat([xs, xi[None]]))[-1]

            return vmap(one)(x)

    def predict(self, x: Tensor) -> Tensor:
        """Class labels (classification) or predicted targets (regression)."""
        out = self.forward(x)
        return out.argmax(-1) if self.task_type == "classification" else out

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (softmax of the logits); classification only."""
        if self.task_type != "classification":
            raise AttributeError("predict_proba is only available for classification tasks")
        return torch.softmax(self.forward(x), dim=-1)

    def score(self, x: Tensor, y: Tensor) -> float:
        """Accuracy (classification) or negative mean squared error (regression) on ``(x, y)``."""
        x = self._check_x(x)
        y = check_targets(y, x, "y", task_type=self.task_type, n_outputs=self.n_outputs)
        return self._score(x, y)

    def _score(self, x: Tensor, y: Tensor) -> float:
        """``score`` of inputs and targets already checked; ``x`` on the model's device and dtype."""
        out = self._outputs(x)
        y = y.to(out.device)
        if self.task_type == "classification":
            return float((out.argmax(-1) == y).double().mean())
        return -float(((out - y.reshape(out.shape).to(out.dtype)) ** 2).mean())


class MetaLearner(BaseEstimator):
    """Shared machinery of the meta-learning estimators (not used directly).

    Subclasses set ``__init__ = estimator_init(**COMMON_PARAMS, ...)`` and implement
    ``_make_rule()`` (the per-task meta-gradient rule) and, when their inner problem differs,
    ``_inner_lam()``.
    """

    _solver_type = "meta"
    _extra_checks: dict = {}

    # ------------------------------------------------------------------ validation and setup
    def _validate_params(self):
        # Step sizes above 1e6 are certainly mistakes, and beyond float32's range they crash inside
        # the optimizer instead of diverging visibly.
        check_number("inner_lr", self.inner_lr, low=0, low_open=True, high=1e6, allow=("auto",))
        check_number("inner_steps", self.inner_steps, low=self._min_inner_steps, integer=True)
        if self.adapt_steps is not None:
            check_number("adapt_steps", self.adapt_steps, low=0, integer=True)
        check_number("meta_lr", self.meta_lr, low=0, low_open=True, high=1e6)
        if "meta_batch_size" in self.get_params(deep=False):
            check_number("meta_batch_size", self.meta_batch_size, low=1, integer=True)
        check_number("meta_steps", self.meta_steps, low=0, integer=True)
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, low=0, low_open=True)
        if not isinstance(self.meta_optimizer, str):
            if not (inspect.isclass(self.meta_optimizer) and issubclass(self.meta_optimizer, torch.optim.Optimizer)):
                raise ValueError("meta_optimizer must be one of "
                                 f"{sorted(_OPTIMIZERS)} or a torch.optim.Optimizer subclass, got {self.meta_optimizer!r}")
        else:
            check_choice("meta_optimizer", self.meta_optimizer, _OPTIMIZERS)
        check_choice("meta_lr_schedule", self.meta_lr_schedule, LR_SCHEDULES)
        if self.meta_lr_horizon is not None:
            check_number("meta_lr_horizon", self.meta_lr_horizon, low=1, integer=True)
        check_number("task_threads", self.task_threads, low=1, integer=True, allow=("auto",))
        if not isinstance(self.full_history, bool):
            raise ValueError(f"full_history must be True or False, got {self.full_history!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {self.warm_start!r}")
        # What sklearn's check_random_state accepts, checked here so the message names the argument
        # (bool is refused although sklearn takes it as 0/1: it is surely a mistake).
        rs = self.random_state
        if not (rs is None or rs is np.random or isinstance(rs, np.random.RandomState)
                or (isinstance(rs, (int, np.integer)) and not isinstance(rs, bool) and 0 <= rs < 2**32)):
            raise ValueError("random_state must be None, an integer in [0, 2**32) or a numpy RandomState, "
                             f"got {rs!r}")
        if not isinstance(self.transductive, bool):
            raise ValueError(f"transductive must be True or False, got {self.transductive!r}")
        check_number("verbose", self.verbose, low=0, integer=True, allow=("auto",))
        if isinstance(self.loss, str):
            check_choice("loss", self.loss, {"auto", *LOSSES})
        elif not callable(self.loss):
            raise ValueError(f"loss must be 'auto', one of {sorted(LOSSES)} or a callable, got {self.loss!r}")
        if isinstance(self.model, str):
            check_choice("model", self.model, {"auto", *_models.MODELS})
        elif not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be 'auto', one of {sorted(_models.MODELS)} or an nn.Module, "
                             f"got {type(self.model).__name__}")
        for name, check in self._extra_checks.items():
            check(name, getattr(self, name))
        return self._resolve_device(), self._resolve_dtype()

    _min_inner_steps = 1

    def _resolve_device(self) -> torch.device:
        if self.device == "auto" or self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'auto' or a torch device, got {self.device!r}") from None

    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype in (torch.float32, torch.float64):
            return self.dtype
        if isinstance(self.dtype, str) and self.dtype in _DTYPES:
            return _DTYPES[self.dtype]
        raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

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
        """Resolve 'auto' choices against the sampler and build the functional model."""
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
        self._example_flops_cache = None
        self._check_model_outputs(n_out, device, dtype)
        self._loss_parts = (loss_fn, metric)

    def _check_model_outputs(self, n_out, device, dtype):
        x = torch.zeros((2, *self.input_shape_), device=device, dtype=dtype)
        try:
            with torch.no_grad():
                out = self.fmodel_(self.fmodel_.init_params(device, dtype), x)
        except Exception as exc:  # the user's network rejected our input: say which shapes met
            raise ValueError(f"model cannot run on inputs of shape [n, {', '.join(map(str, self.input_shape_))}] "
                             f"from the task sampler: {exc}") from exc
        if out.dim() != 2 or out.shape[1] != n_out:
            raise ValueError(f"model outputs have shape {list(out.shape)} for 2 inputs, but the tasks need "
                             f"[2, {n_out}] (n_outputs={n_out})")

    @property
    def _task_loss(self) -> TaskLoss:
        return TaskLoss(self.fmodel_, *self._loss_parts)

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
        all-reduced, so the meta-parameters and ``history_`` (except its wall-clock ``time``) are
        identical on every rank. Rank 0 alone shows progress and writes the checkpoint (which
        holds every rank's generator state; every rank must see the file to resume). See
        ``docs/distributed.md``.
        """
        return self._fit(task_sampler, checkpoint=checkpoint, checkpoint_every=checkpoint_every)

    def _fit(self, sampler, checkpoint=None, checkpoint_every=None):
        from . import _checkpoint, _distributed

        device, dtype = self._validate_params()
        self._check_sampler(sampler)
        path, every = _checkpoint.check_options(checkpoint, checkpoint_every)
        world = _distributed.current_world()
        self._check_shards(world)
        resume = path is not None and path.is_file()
        _distributed.check_agree(world, int(resume), "whether the checkpoint file exists")
        continuing = not resume and self.warm_start and hasattr(self, "params_")
        if continuing:
            params, optimizer = self.params_, self.optimizer_
            gen = _distributed.restore_streams(world, self._task_rng_state)
        else:
            rs = check_random_state(self.random_state)
            init_seed, task_seed = _distributed.broadcast_ints(world, rs.randint(0, 2**31 - 1, size=2))
            self._setup(sampler, device, dtype, init_seed)
            params = self.fmodel_.init_params(device, dtype)
            optimizer = self._make_optimizer(params)
            self.history_ = {}
            self.n_iter_ = 0
            if resume:
                gen = self._load_checkpoint(path, world, params, optimizer)
            else:
                _distributed.broadcast_params(world, params)
                gen = _distributed.task_streams(world, task_seed)
        rule = self._rule()
        self.params_, self.optimizer_ = params, optimizer
        # With a checkpoint, meta_steps is the total step count; otherwise the steps of this call.
        target = self.meta_steps if path is not None else self.n_iter_ + self.meta_steps
        shards = _distributed.shard_sampler(sampler, world)
        elapsed0 = self.history_.get("time", [0.0])[-1] if self.history_ else 0.0
        start = time.perf_counter()
        first_step = self.n_iter_
        self._inner_loop_rising = 0
        progress = self._progress(max(target - self.n_iter_, 0)) if world.is_main else None
        try:
            while self.n_iter_ < target:
                data = self._draw(shards, gen, device, dtype, first=self.n_iter_ == 0)
                grads, stats = self._step_gradient(rule, params, data)
                grads, stats = _distributed.all_reduce_mean(world, grads, stats)
                norm = tree_norm(grads)
                names = ["meta_grad_norm", *stats]
                values = torch.stack([norm, *stats.values()]).tolist()  # one host sync per step
                record = dict(zip(names, values))
                if not all(math.isfinite(v) for v in values):
                    self._diverged(record)
                self._check_inner_loop(record, rule)
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
                    self._save_checkpoint(path, world, params, optimizer, gen)
        finally:
            self._task_rng_state = gen.get_state()
            if progress is not None:
                progress.close()
            self._warn_about_solves(first_step)
        return self

    #: A fit warns when more than this fraction of the linear solves (tasks times meta-steps) of its
    #: second half failed: then most of its meta-gradients are not the solver's approximation of the
    #: implicit gradient. The first half is left out because at a random initialisation the support
    #: loss is often far from convex at the adapted parameters, and meta-training removes that.
    _SOLVE_FAILURE_WARN = 0.5

    def _warn_about_solves(self, first_step: int):
        """One :class:`~fewshot.exceptions.SolverWarning` per fit when most implicit solves of its
        second half failed: CG stopped at a direction of non-positive curvature (and returned its
        smallest-residual iterate), or the Neumann series diverged (and was cut at its best partial
        sum), in more than ``_SOLVE_FAILURE_WARN`` of them. Rarer or passing failures are normal,
        leave every step finite, and are recorded per meta-step in ``history_``
        (``negative_curvature``, ``solve_diverged``: the fraction of the meta-batch's tasks)."""
        h = self.history_
        unsolved = "solve the inner problem more accurately (more inner_steps, a larger inner_lr)"
        for key, message, remedy in (
            ("negative_curvature",
             "conjugate gradient met non-positive curvature of I + H/(lam + damping) (the Hessian of "
             "the support loss at the adapted parameters has eigenvalues below -(lam + damping), so "
             "the inner problem is not near a minimum) and returned its smallest-residual iterate",
             f"{unsolved}, or raise lam or damping"),
            ("solve_diverged",
             "the Neumann series diverged (0 < neumann_lr * (1 + mu/(lam + damping)) < 2 fails for "
             "some Hessian eigenvalue mu) and was cut at its best partial sum",
             f"use neumann_lr='auto' or a smaller neumann_lr, raise lam or damping, or {unsolved}"),
        ):
            fractions = h.get(key, [])[first_step:]
            fractions = fractions[len(fractions) // 2:]
            failed = sum(fractions) / len(fractions) if fractions else 0.0
            if failed > self._SOLVE_FAILURE_WARN:
                warnings.warn(
                    f"{type(self).__name__}: in {100 * failed:.0f}% of the solves of this fit's second half "
                    f"{message}; "
                    f"its meta-gradients are then mostly not the implicit gradient: {remedy} (see the "
                    "class docstring).", SolverWarning, stacklevel=3)

    def _make_optimizer(self, params: Params):
        cls = _OPTIMIZERS[self.meta_optimizer] if isinstance(self.meta_optimizer, str) else self.meta_optimizer
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

    def _apply(self, optimizer, params: Params, grads: Params, norm: Tensor):
        scale = 1.0
        if self.grad_clip is not None:
            scale = torch.clamp(self.grad_clip / (norm + 1e-12), max=1.0)
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
        finite (IMAML at Adam 5e-3 on Omniglot fell to chance accuracy that way; docs/results.md).
        Only for rules whose inner loop is gradient descent on the support set alone (a rule says
        otherwise with ``fits_support = False``, as Reptile's class batches do)."""
        pre, post = record.get("support_loss_pre"), record.get("support_loss_post")
        if pre is None or post is None or not getattr(rule, "fits_support", True):
            return
        run = self._inner_loop_rising = self._inner_loop_rising + 1 if post > pre else 0
        if run >= self._INNER_LOOP_PATIENCE:
            last = {k: v[-1] for k, v in self.history_.items()} if self.history_ else {}
            raise DivergenceError(
                f"{type(self).__name__} broke down at meta-step {self.n_iter_ + 1}: in each of the last "
                f"{run} meta-steps the inner loop raised the mean support loss (now {pre:.4g} before "
                f"adaptation, {post:.4g} after), so the inner loop diverges at these meta-parameters. "
                f"params_ holds the meta-parameters after {self.n_iter_} steps, already in that region: "
                f"restart from a checkpoint taken earlier with a smaller meta_lr or inner_lr (or, for "
                f"IMAML, more damping).",
                step=self.n_iter_ + 1, solver=type(self).__name__, last_finite=last,
            )

    def _diverged(self, record):
        last = {k: v[-1] for k, v in self.history_.items()} if self.history_ else {}
        bad = sorted(k for k, v in record.items() if not math.isfinite(v))
        raise DivergenceError(
            f"{type(self).__name__} diverged at meta-step {self.n_iter_ + 1}: non-finite {', '.join(bad)}. "
            f"params_ holds the last finite meta-parameters (after {self.n_iter_} steps); last finite "
            f"values: {last}. Lower meta_lr or inner_lr, or set grad_clip.",
            step=self.n_iter_ + 1, solver=type(self).__name__, last_finite=last,
        )

    #: With ``verbose="auto"``, the progress bar appears once a fit has run this many seconds.
    _PROGRESS_DELAY = 2.0

    def _progress(self, total):
        """A tqdm progress bar over ``total`` meta-steps, or ``None`` (see ``verbose``)."""
        auto = isinstance(self.verbose, str)
        if total == 0 or (auto and not _interactive()) or (not auto and not self.verbose):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=type(self).__name__, unit="step", leave=True,
                    delay=self._PROGRESS_DELAY if auto else 0)

    def _progress_postfix(self, record):
        keys = ("query_loss_post", "query_acc_post")
        return {k.replace("_post", ""): f"{record[k]:.3f}" for k in keys if k in record}

    def _draw(self, sampler, gen, device, dtype, first=False):
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

    #: "auto" runs tasks on threads only for networks whose forward pass of one example costs at
    #: least this many FLOPs (matrix products and convolutions).
    _THREADED_EXAMPLE_FLOPS = 1e6

    def _task_workers(self) -> int:
        """Threads that process a meta-batch's tasks: ``task_threads``; "auto" is PyTorch's
        intra-op thread count on CPU (each task thread then runs one intra-op thread) and 1 on
        other devices, whose kernels are asynchronous already, and 1 for small networks."""
        if self.task_threads != "auto":
            return int(self.task_threads)
        device = next(iter(self.params_.values())).device if hasattr(self, "params_") else self._resolve_device()
        if device.type != "cpu" or torch.get_num_threads() == 1:
            return 1
        return 1 if self._small_network() else torch.get_num_threads()

    def _small_network(self) -> bool:
        """Whether a forward pass of one example costs under ``_THREADED_EXAMPLE_FLOPS``: Python
        overhead, not arithmetic, dominates such a network's meta-step."""
        return self._example_flops() < self._THREADED_EXAMPLE_FLOPS

    def _example_flops(self) -> float:
        """FLOPs of the network's forward pass per example (``FlopCounterMode`` on two zero inputs,
        counted once)."""
        if getattr(self, "_example_flops_cache", None) is None:
            from torch.utils.flop_counter import FlopCounterMode

            theta = self.params_ if hasattr(self, "params_") else self.fmodel_.init_params()
            like = next(iter(theta.values()))
            x = torch.zeros((2, *self.input_shape_), device=like.device, dtype=like.dtype)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                self.fmodel_(theta, x)
            self._example_flops_cache = counter.get_total_flops() / 2
        return self._example_flops_cache

    def _batched_tasks(self, rule) -> bool:
        """Whether a meta-step computes all its tasks in one batched computation
        (:class:`~fewshot._functional.BatchedTaskLoss`) rather than task by task: for small networks
        of linear layers (an :class:`~fewshot.models.MLP`), whose per-task meta-step is mostly
        per-operation overhead, and rules that allow it (not the implicit solvers)."""
        return bool(getattr(rule, "batchable", False)) and self.fmodel_.batchable and self._small_network()

    def _step_gradient(self, rule, params: Params, batch: TaskBatch):
        """Mean over the meta-batch of the per-task meta-gradients and statistics."""
        if self._batched_tasks(rule):
            theta = {k: v.expand(len(batch), *v.shape) for k, v in params.items()}
            g, stats = rule(BatchedTaskLoss(self.fmodel_, *self._loss_parts), theta, batch)
            return {k: v.mean(0) for k, v in g.items()}, {k: v.mean() for k, v in stats.items()}
        task_loss, workers = self._task_loss, self._task_workers()
        if workers > 1:
            fmodel, parts = self.fmodel_, self._loss_parts

            def one(task):
                return rule(TaskLoss(_parallel.thread_local_copy(fmodel), *parts), params, task)
        else:
            def one(task):
                return rule(task_loss, params, task)

        # Summed as each task finishes, into buffers allocated before the first task, so that a
        # task's gradient is freed at once: keeping all of them to the end left each one pinning
        # the top of the malloc heap (MAML, omniglot benchmark workload, one task at a time: peak
        # RSS +348 MB over three meta-steps, +162 MB summed as here; learn2learn +205 MB).
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        stats, n = {}, 0
        for g, s in _parallel.imap_tasks(one, batch, workers):
            for k, v in grads.items():
                v.add_(g[k])
            for k, v in s.items():
                stats[k] = stats[k] + v if k in stats else v
            n += 1
            del g, s  # else the loop variables keep this task's gradient alive during the next task
        return {k: v / n for k, v in grads.items()}, {k: v / n for k, v in stats.items()}

    # ------------------------------------------------------------------ the solver's parts
    def _make_rule(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _rule(self):
        rule = self._make_rule()
        if rule is not None:
            rule.full_stats = bool(self.full_history)
            if hasattr(rule, "hvp_mode"):
                # Forward-mode AD is not thread-safe, so threads use reverse-over-reverse. With one
                # thread, forward-over-reverse keeps no graph between products (less memory on large
                # networks); small ones use reverse-over-reverse, cheaper per product (sinusoid MLP,
                # IMAML k=1, one thread: 0.147 s per meta-step with forward-over-reverse, 0.038 s).
                rule.hvp_mode = "revrev" if self._task_workers() > 1 or self._small_network() else "fwdrev"
        return rule

    def _inner_lam(self):
        """Proximal weight of the inner problem (``None``: plain support loss)."""
        return None

    def _adapt_steps(self):
        return self.inner_steps if self.adapt_steps is None else self.adapt_steps

    def _inner_solver(self):
        """The inner loop of meta-training and of ``adapt``: plain gradient descent unless the
        solver's inner problem is proximal with backtracking (:func:`proximal_descent`)."""
        return inner_loop

    def _adapt_params(self, support) -> Params:
        phi, _, _ = self._inner_solver()(self._task_loss, self.params_, support.x, support.y,
                                         lr=self.inner_lr_, steps=self._adapt_steps(), lam=self._inner_lam())
        return {k: v.detach() for k, v in phi.items()}

    def meta_gradient(self, tasks, *, params: Params | None = None) -> list[Params]:
        """This solver's per-task meta-gradients at ``params`` (default ``params_``).

        ``tasks`` is a :class:`~fewshot.tasks.TaskBatch`, a task or a list of tasks. Returns one dict
        shaped like ``params_`` per task: the quantity each meta-step averages (for
        :class:`Reptile`, the pseudo-gradient). Used by :mod:`fewshot.diagnostics` to compare
        solvers at the same point; ``meta_fit`` with ``meta_steps=0`` prepares an estimator for it.
        """
        self._check_fitted()
        batch = as_task_batch(tasks)
        device, dtype = self._device_dtype()
        batch = self._check_batch(batch.to(device, dtype), name="tasks")
        theta = self.params_ if params is None else {k: params[k].to(device, dtype) for k in self.params_}
        rule, task_loss = self._rule(), self._task_loss
        return [{k: v.detach() for k, v in rule(task_loss, theta, task)[0].items()} for task in batch]

    # ------------------------------------------------------------------ adaptation and scoring
    def _device_dtype(self):
        p = next(iter(self.params_.values()))
        return p.device, p.dtype

    def adapt(self, support) -> AdaptedModel:
        """Adapt the meta-parameters to one task's ``support`` set (a ``LabeledSet`` or ``(x, y)``).

        Runs the solver's inner procedure (``adapt_steps``, default ``inner_steps``) and returns a
        new :class:`AdaptedModel`; the estimator is not changed.
        """
        self._check_fitted()
        device, dtype = self._device_dtype()
        support = check_labeled_set(support, input_shape=self.input_shape_, task_type=self.task_type_,
                                    n_outputs=self.n_outputs_, name="support", require_all_classes=True)
        return self._adapted(support.to(device, dtype), device, dtype)

    def _adapted(self, support, device, dtype) -> AdaptedModel:
        """Adapt to a support set already validated and on the estimator's device and dtype."""
        params = self._adapt_params(support)
        return AdaptedModel(self.fmodel_, params, task_type=self.task_type_, n_outputs=self.n_outputs_,
                            input_shape=self.input_shape_, support=support, transductive=self.transductive,
                            dtype=dtype, device=device)

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
        batch = as_task_batch(tasks)
        device, dtype = self._device_dtype()
        batch = self._check_batch(batch.to(device, dtype), name="tasks")  # validated once, for every task
        scores = []
        for task in batch:
            adapted = self._adapted(task.support, device, dtype)
            scores.append(adapted._score(task.query.x, task.query.y))  # checked with the batch
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

    # ------------------------------------------------------------------ sharding and checkpoints
    def _check_shards(self, world):
        """Each of the ``world.n_shards`` processes draws an equal part of the step's batch."""
        params = self.get_params(deep=False)
        name = "meta_batch_size" if "meta_batch_size" in params else "batch_size"
        size = params.get(name)
        if world.n_shards > 1 and size is not None and size % world.n_shards:
            raise ValueError(f"{name}={size} must be divisible by the number of processes "
                             f"({world.n_shards}): each process draws an equal shard of every batch")

    def _save_checkpoint(self, path, world, params: Params, optimizer, streams):
        from . import _checkpoint, _distributed

        states = _distributed.gather_stream_states(world, streams)  # a collective: every rank calls it
        if world.is_main:
            _checkpoint.save(path, _checkpoint.make_state(self, params, optimizer, states))

    def _load_checkpoint(self, path, world, params: Params, optimizer):
        """Restore the state saved at ``path`` into the freshly built ``params`` and ``optimizer``;
        return the task generators of this process's shards."""
        from . import _checkpoint, _distributed

        state = _checkpoint.load(path, self, params)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["meta_params"][k])
        optimizer.load_state_dict(state["optimizer"])
        self.history_ = {k: list(v) for k, v in state["history"].items()}
        self.n_iter_ = int(state["n_iter"])
        _distributed.check_agree(world, self.n_iter_, "the checkpoint's step count")
        return _distributed.streams_from_checkpoint(world, state["task_rng_states"], path)
