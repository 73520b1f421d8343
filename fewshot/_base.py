"""The estimator layer: one meta-training loop, adaptation and scoring shared by every solver.

A solver is a subclass that declares its hyperparameters and returns its meta-gradient rule from
``_make_rule``; everything else (validation, the loop, history, adaptation, scoring) lives here.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from torch import Tensor, nn
from torch.func import vmap

from . import models as _models
from ._functional import LOSSES, FunctionalModel, TaskLoss, inner_loop
from ._tree import Params, tree_norm
from ._validation import check_choice, check_labeled_set, check_number
from .exceptions import DivergenceError, NotFittedError
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
    grad_clip=None,
    transductive=True,
    device="auto",
    dtype="float32",
    random_state=None,
    verbose=0,
    warm_start=False,
)

#: ``inner_lr="auto"`` per task type: MAML's values for Omniglot (0.4) and sinusoid (0.01).
AUTO_INNER_LR = {"classification": 0.4, "regression": 0.01}

_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
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
    """

    def __init__(self, fmodel: FunctionalModel, params: Params, *, task_type, n_outputs, input_shape,
                 support, transductive, dtype, device):
        self.fmodel, self.params = fmodel, params
        self.task_type, self.n_outputs, self.input_shape = task_type, n_outputs, tuple(input_shape)
        self.support, self.transductive = support, transductive
        self.dtype, self.device = dtype, device

    def _check_x(self, x) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            raise ValueError(f"x must have shape [n, {', '.join(map(str, self.input_shape))}] like the "
                             f"training inputs, got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        return x.to(device=self.device, dtype=self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Raw outputs (logits for classification)."""
        x = self._check_x(x)
        with torch.no_grad():
            if self.transductive:
                return self.fmodel(self.params, x)
            xs = self.support.x

            def one(xi):
                return self.fmodel(self.params, torch.cat([xs, xi[None]]))[-1]

            return vmap(one)(x)

    __call__ = forward

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
        out = self.forward(x)
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
        check_number("inner_lr", self.inner_lr, low=0, low_open=True, allow=("auto",))
        check_number("inner_steps", self.inner_steps, low=self._min_inner_steps, integer=True)
        if self.adapt_steps is not None:
            check_number("adapt_steps", self.adapt_steps, low=0, integer=True)
        check_number("meta_lr", self.meta_lr, low=0, low_open=True)
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
        if not isinstance(self.transductive, bool):
            raise ValueError(f"transductive must be True or False, got {self.transductive!r}")
        check_number("verbose", self.verbose, low=0, integer=True)
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
        """
        return self._fit(task_sampler, checkpoint=checkpoint, checkpoint_every=checkpoint_every)

    def _fit(self, sampler, checkpoint=None, checkpoint_every=None):
        device, dtype = self._validate_params()
        self._check_sampler(sampler)
        continuing = self.warm_start and hasattr(self, "params_")
        if not continuing:
            rs = check_random_state(self.random_state)
            init_seed, task_seed = (int(s) for s in rs.randint(0, 2**31 - 1, size=2))
            self._setup(sampler, device, dtype, init_seed)
            params = self.fmodel_.init_params(device, dtype)
            self._task_rng_state = torch.Generator().manual_seed(task_seed).get_state()
            self.history_ = {}
            self.n_iter_ = 0
            optimizer = self._make_optimizer(params)
        else:
            params = self.params_
            optimizer = self.optimizer_
        rule = self._make_rule()
        gen = torch.Generator()
        gen.set_state(self._task_rng_state)
        self.params_, self.optimizer_ = params, optimizer
        elapsed0 = self.history_.get("time", [0.0])[-1] if self.history_ else 0.0
        start = time.perf_counter()
        progress = self._progress(self.meta_steps)
        try:
            for _ in range(self.meta_steps):
                data = self._draw(sampler, gen, device, dtype, first=self.n_iter_ == 0)
                grads, stats = self._step_gradient(rule, params, data)
                norm = tree_norm(grads)
                names = ["meta_grad_norm", *stats]
                values = torch.stack([norm, *stats.values()]).tolist()  # one host sync per step
                record = dict(zip(names, values))
                if not all(math.isfinite(v) for v in values):
                    self._diverged(record)
                self._apply(optimizer, params, grads, norm)
                record["time"] = elapsed0 + time.perf_counter() - start
                for k, v in record.items():
                    self.history_.setdefault(k, []).append(v)
                self.n_iter_ += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(self._progress_postfix(record), refresh=False)
        finally:
            self._task_rng_state = gen.get_state()
            if progress is not None:
                progress.close()
        return self

    def _make_optimizer(self, params: Params):
        cls = _OPTIMIZERS[self.meta_optimizer] if isinstance(self.meta_optimizer, str) else self.meta_optimizer
        return cls(list(params.values()), lr=self._outer_lr())

    def _outer_lr(self):
        return self.meta_lr

    def _apply(self, optimizer, params: Params, grads: Params, norm: Tensor):
        scale = 1.0
        if self.grad_clip is not None:
            scale = torch.clamp(self.grad_clip / (norm + 1e-12), max=1.0)
        for k, p in params.items():
            p.grad = grads[k] * scale
        optimizer.step()
        for p in params.values():
            p.grad = None

    def _diverged(self, record):
        last = {k: v[-1] for k, v in self.history_.items()} if self.history_ else {}
        bad = sorted(k for k, v in record.items() if not math.isfinite(v))
        raise DivergenceError(
            f"{type(self).__name__} diverged at meta-step {self.n_iter_ + 1}: non-finite {', '.join(bad)}. "
            f"params_ holds the last finite meta-parameters (after {self.n_iter_} steps); last finite "
            f"values: {last}. Lower meta_lr or inner_lr, or set grad_clip.",
            step=self.n_iter_ + 1, solver=type(self).__name__, last_finite=last,
        )

    def _progress(self, total):
        if not self.verbose or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=type(self).__name__, unit="step", leave=True)

    def _progress_postfix(self, record):
        keys = ("query_loss_post", "query_acc_post")
        return {k.replace("_post", ""): f"{record[k]:.3f}" for k in keys if k in record}

    def _draw(self, sampler, gen, device, dtype, first=False):
        batch = sampler.sample(self.meta_batch_size, random_state=gen)
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"{type(sampler).__name__}.sample(n_tasks) must return a TaskBatch, "
                            f"got {type(batch).__name__}")
        batch = batch.to(device, dtype)
        self._check_batch(batch, name="sampled tasks")
        return batch

    def _check_batch(self, batch: TaskBatch, name: str):
        kw = dict(input_shape=self.input_shape_, task_type=self.task_type_, n_outputs=self.n_outputs_,
                  batch_dims=2)
        check_labeled_set(batch.support, name=f"{name}: support", require_all_classes=True, **kw)
        check_labeled_set(batch.query, name=f"{name}: query", **kw)

    def _step_gradient(self, rule, params: Params, batch: TaskBatch):
        """Mean over the meta-batch of the per-task meta-gradients and statistics."""
        task_loss = self._task_loss
        total, stats_total = None, None
        for task in batch:
            g, stats = rule(task_loss, params, task)
            if total is None:
                total, stats_total = dict(g), dict(stats)
            else:
                for k in total:
                    total[k] = total[k] + g[k]
                for k in stats_total:
                    stats_total[k] = stats_total[k] + stats[k]
        n = len(batch)
        return {k: v / n for k, v in total.items()}, {k: v / n for k, v in stats_total.items()}

    # ------------------------------------------------------------------ the solver's parts
    def _make_rule(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _inner_lam(self):
        """Proximal weight of the inner problem (``None``: plain support loss)."""
        return None

    def _adapt_steps(self):
        return self.inner_steps if self.adapt_steps is None else self.adapt_steps

    def _adapt_params(self, support) -> Params:
        phi, _, _ = inner_loop(self._task_loss, self.params_, support.x, support.y, lr=self.inner_lr_,
                               steps=self._adapt_steps(), lam=self._inner_lam())
        return {k: v.detach() for k, v in phi.items()}

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
        support = support.to(device, dtype)
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
        self._check_batch(batch.to(device, dtype), name="tasks")
        scores = []
        for task in batch:
            task = task.to(device, dtype)
            adapted = self.adapt(task.support)
            scores.append(adapted.score(task.query.x, task.query.y))
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
