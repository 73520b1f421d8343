"""Task families that need no download: sinusoid and linear regression, Gaussian-cluster
classification."""

from __future__ import annotations

import copy
import math
import numbers

import torch

from ._base import LabeledSet, TaskBatch, TaskSampler, check_generator

__all__ = ["SinusoidTasks", "LinearRegressionTasks", "GaussianClusterTasks"]


def _check_positive_int(name, value, minimum=1):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name, value, *, non_negative=False):
    kind = "a non-negative number" if non_negative else "a number"
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or (non_negative and value < 0):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_range(name, value):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name} must be finite with low <= high, got {value!r}")
    return lo, hi


def _uniform(gen, shape, lo, hi):
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


class SinusoidTasks(TaskSampler):
    """Sinusoid regression, as in the MAML paper: ``y = A sin(x - phase)``.

    Amplitude ``A ~ U[0.1, 5]``, phase ``~ U[0, pi]``, inputs ``x ~ U[-5, 5]``; ``k_shot`` support
    and ``n_query`` query points per task. ``x`` and ``y`` have shape ``[n, 1]``.
    """

    task_type = "regression"
    input_shape = (1,)
    n_outputs = 1

    def __init__(self, k_shot=10, n_query=10, *, amplitude=(0.1, 5.0), phase=(0.0, math.pi),
                 x_range=(-5.0, 5.0), noise=0.0):
        self.k_shot = _check_positive_int("k_shot", k_shot)
        self.n_query = _check_positive_int("n_query", n_query)
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        self.noise = _check_real("noise", noise, non_negative=True)
        self.n_pretrain_outputs = 1

    def _functions(self, n, gen):
        amp = _uniform(gen, (n, 1, 1), *self.amplitude)
        phase = _uniform(gen, (n, 1, 1), *self.phase)
        return amp, phase

    def _points(self, amp, phase, n_points, gen):
        x = _uniform(gen, (amp.shape[0], n_points, 1), *self.x_range)
        y = amp * torch.sin(x - phase)
        if self.noise:
            y = y + self.noise * torch.randn(y.shape, generator=gen)
        return LabeledSet(x, y)

    def _sample(self, n_tasks, generator):
        amp, phase = self._functions(n_tasks, generator)
        return TaskBatch(self._points(amp, phase, self.k_shot, generator),
                         self._points(amp, phase, self.n_query, generator))

    def sample_pretraining(self, batch_size, *, random_state=None, device=None):
        """Points from ``batch_size`` different random sinusoids (one point each), pooled."""
        gen = check_generator(random_state)
        amp, phase = self._functions(batch_size, gen)
        s = self._points(amp, phase, 1, gen)
        return LabeledSet(s.x[:, 0], s.y[:, 0]).to(device)

    def _repr_args(self):
        return {"k_shot": self.k_shot, "n_query": self.n_query}


class LinearRegressionTasks(TaskSampler):
    """Linear regression tasks ``y = x @ w + noise`` with ``w ~ N(0, I)``, ``x ~ N(0, I)``.

    The closed-form structure (quadratic losses) makes it the family for checking meta-gradients.
    ``x`` has shape ``[n, n_features]`` and ``y`` ``[n, 1]``.
    """

    task_type = "regression"
    n_outputs = 1

    def __init__(self, n_features=8, k_shot=10, n_query=10, *, noise=0.1, w_mean=0.0, w_std=1.0):
        self.n_features = _check_positive_int("n_features", n_features)
        self.k_shot = _check_positive_int("k_shot", k_shot)
        self.n_query = _check_positive_int("n_query", n_query)
        self.noise = _check_real("noise", noise, non_negative=True)
        self.w_mean = _check_real("w_mean", w_mean)
        self.w_std = _check_real("w_std", w_std, non_negative=True)
        self.input_shape = (self.n_features,)
        self.n_pretrain_outputs = 1

    def _weights(self, n, gen):
        return self.w_mean + self.w_std * torch.randn((n, self.n_features, 1), generator=gen)

    def _points(self, w, n_points, gen):
        x = torch.randn((w.shape[0], n_points, self.n_features), generator=gen)
        y = x @ w + self.noise * torch.randn((w.shape[0], n_points, 1), generator=gen)
        return LabeledSet(x, y)

    def _sample(self, n_tasks, generator):
        w = self._weights(n_tasks, generator)
        return TaskBatch(self._points(w, self.k_shot, generator), self._points(w, self.n_query, generator))

    def sample_pretraining(self, batch_size, *, random_state=None, device=None):
        gen = check_generator(random_state)
        s = self._points(self._weights(batch_size, gen), 1, gen)
        return LabeledSet(s.x[:, 0], s.y[:, 0]).to(device)

    def _repr_args(self):
        return {"n_features": self.n_features, "k_shot": self.k_shot, "n_query": self.n_query}


class GaussianClusterTasks(TaskSampler):
    """N-way K-shot classification of Gaussian clusters (no download needed).

    A fixed pool of ``n_classes`` class centres is drawn once from ``seed``; each task picks
    ``n_way`` classes without replacement, remaps them to labels ``0..n_way-1`` in random order and
    draws ``k_shot`` support and ``n_query`` query examples per class as
    ``centre + noise * N(0, I)``. ``x`` has shape ``[n, n_features]`` and ``y`` is ``int64``.
    Support and query are ordered by class (``y = [0]*k + [1]*k + ...``) after the random remap.
    """

    task_type = "classification"

    def __init__(self, n_way=5, k_shot=1, n_query=5, *, n_features=16, n_classes=64, noise=0.5,
                 seed=0):
        self.n_way = _check_positive_int("n_way", n_way, 2)
        self.k_shot = _check_positive_int("k_shot", k_shot)
        self.n_query = _check_positive_int("n_query", n_query)
        self.n_features = _check_positive_int("n_features", n_features)
        self.n_classes = _check_positive_int("n_classes", n_classes, 2)
        if self.n_way > self.n_classes:
            raise ValueError(f"n_way={self.n_way} is larger than the n_classes={self.n_classes} available")
        self.noise = _check_real("noise", noise, non_negative=True)
        self.seed = _check_positive_int("seed", seed, 0)
        self.centres = torch.randn((self.n_classes, self.n_features),
                                   generator=torch.Generator().manual_seed(self.seed))
        self.input_shape = (self.n_features,)
        self.n_outputs = self.n_way
        self.n_pretrain_outputs = self.n_classes

    def _draw(self, classes, n_per_class, gen):
        # classes: [n_tasks, n_way] global indices -> x [n_tasks, n_way * n_per_class, d]
        centres = self.centres[classes].repeat_interleave(n_per_class, dim=1)
        return centres + self.noise * torch.randn(centres.shape, generator=gen)

    def _sample(self, n_tasks, generator):
        classes = torch.stack([torch.randperm(self.n_classes, generator=generator)[: self.n_way]
                               for _ in range(n_tasks)])
        labels = torch.arange(self.n_way)
        ys = labels.repeat_interleave(self.k_shot).expand(n_tasks, -1)
        yq = labels.repeat_interleave(self.n_query).expand(n_tasks, -1)
        return TaskBatch(LabeledSet(self._draw(classes, self.k_shot, generator), ys.clone()),
                         LabeledSet(self._draw(classes, self.n_query, generator), yq.clone()))

    def sample_pretraining(self, batch_size, *, random_state=None, device=None):
        gen = check_generator(random_state)
        y = torch.randint(self.n_classes, (batch_size,), generator=gen)
        x = self.centres[y] + self.noise * torch.randn((batch_size, self.n_features), generator=gen)
        return LabeledSet(x, y).to(device)

    def class_groups(self):
        """Each cluster centre is a class of its own."""
        return [[c] for c in range(self.n_classes)]

    def restrict_classes(self, classes):
        """A copy whose pool is the centres ``classes`` (indices), in that order."""
        classes = torch.as_tensor(classes, dtype=torch.int64).flatten()
        if classes.numel() < self.n_way or classes.unique().numel() != classes.numel() or (
                classes.numel() and not (0 <= int(classes.min()) and int(classes.max()) < self.n_classes)):
            raise ValueError(f"classes must be at least n_way={self.n_way} distinct indices in "
                             f"[0, {self.n_classes}), got {classes.tolist()}")
        part = copy.copy(self)
        part.centres = self.centres[classes]
        part.n_classes = part.n_pretrain_outputs = classes.numel()
        return part

    def _repr_args(self):
        return {"n_way": self.n_way, "k_shot": self.k_shot, "n_query": self.n_query,
                "n_features": self.n_features, "n_classes": self.n_classes}
