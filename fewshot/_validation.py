"""Input checks shared by every public entry point. Errors name the argument, what was expected
and what came."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .tasks import LabeledSet


def check_number(name, value, *, low=None, high=None, low_open=False, integer=False, allow=()):
    """Validate a scalar hyperparameter; ``allow`` lists extra accepted non-numeric values."""
    if any(value is a or (isinstance(a, str) and value == a) for a in allow):
        return value
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = "an integer" if integer else "a number"
        extra = f" or one of {list(allow)}" if allow else ""
        raise ValueError(f"{name} must be {expected}{extra}, got {value!r}")
    if not integer and not (float(value) == float(value) and abs(float(value)) != float("inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return value


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def as_labeled_set(data, name="support") -> LabeledSet:
    if isinstance(data, LabeledSet):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            return LabeledSet(x, y)
    raise TypeError(f"{name} must be a LabeledSet or an (x, y) pair of tensors, got {type(data).__name__}")


def check_inputs(x, input_shape, name, *, batch_dims=1):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    expected = (-1,) * batch_dims + tuple(input_shape)
    if x.dim() != len(expected) or tuple(x.shape[batch_dims:]) != tuple(input_shape):
        shown = ("n_tasks, " if batch_dims == 2 else "") + "n, " + ", ".join(map(str, input_shape))
        raise ValueError(f"{name} must have shape [{shown}], got {list(x.shape)}")
    if x.shape[batch_dims - 1] == 0:
        raise ValueError(f"{name} is empty (shape {list(x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def check_targets(y, x, name, *, task_type, n_outputs, batch_dims=1, require_all_classes=False):
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    n = tuple(x.shape[:batch_dims])
    if task_type == "classification":
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
        if tuple(y.shape) != n:
            raise ValueError(f"{name} must have shape {list(n)} (one label per example), got {list(y.shape)}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_outputs:
            raise ValueError(f"{name} labels must lie in 0..{n_outputs - 1} (n_way={n_outputs}), "
                             f"got labels in {lo}..{hi}")
        if require_all_classes:
            counts = torch.nn.functional.one_hot(y.reshape(-1, n[-1]).long(), n_outputs).sum(1)
            absent = (counts == 0).nonzero()
            if len(absent):
                task = int(absent[0, 0])
                missing = (counts[task] == 0).nonzero().flatten().tolist()
                where = f" (task {task})" if batch_dims == 2 else ""
                raise ValueError(f"{name}{where} is missing class(es) {missing}: every one of the "
                                 f"n_way={n_outputs} classes needs at least one support example")
    else:
        if not y.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of regression targets, got dtype {y.dtype}")
        if tuple(y.shape[:batch_dims]) != n or y[(0,) * batch_dims].numel() != n_outputs:
            raise ValueError(f"{name} must have shape {list(n) + [n_outputs]} (or {list(n)} for one output), "
                             f"got {list(y.shape)}")
        if not torch.isfinite(y).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def check_labeled_set(data, *, input_shape, task_type, n_outputs, name, batch_dims=1,
                      require_all_classes=False) -> LabeledSet:
    data = as_labeled_set(data, name)
    check_inputs(data.x, input_shape, f"{name}.x", batch_dims=batch_dims)
    check_targets(data.y, data.x, f"{name}.y", task_type=task_type, n_outputs=n_outputs,
                  batch_dims=batch_dims, require_all_classes=require_all_classes)
    if task_type == "classification" and data.y.dtype != torch.int64:
        data = LabeledSet(data.x, data.y.long())  # any integer labels (int32 from numpy, uint8)
    return data
