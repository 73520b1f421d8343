"""Input checks shared by every public entry point. Errors name the argument, what was expected
and what came.

Array arguments go through :func:`as_tensor`, so every entry point that takes tensors also takes
NumPy arrays and nested lists of numbers.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor

# The task containers (fewshot.tasks) convert their arrays with `as_tensor`, so this module imports
# them only inside the functions that need them.

#: How integer-valued inputs should be scaled, said where they are refused.
_FLOAT_INPUTS = ("convert it to floating point first (fewshot's Omniglot images are float32 in [0, 1]: "
                 "8-bit pixel values / 255)")


def as_tensor(value, name: str) -> Tensor:
    """``value`` as a :class:`torch.Tensor`, for the argument called ``name``.

    A tensor is returned unchanged (no copy). Anything else :func:`torch.as_tensor` accepts is
    converted, keeping its dtype: NumPy arrays and scalars of any numeric dtype (sharing memory where
    torch can, copied when read-only or negatively strided), nested lists of numbers, and objects
    with an ``__array__`` method. Casting to the estimator's dtype and device is left to the caller.

    Raises
    ------
    TypeError
        If ``value`` cannot be converted; the message names ``name`` and the type got.
    """
    if isinstance(value, Tensor):
        return value
    if not isinstance(value, (np.ndarray, np.generic, list, tuple)) and hasattr(value, "__array__"):
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and (not value.flags.writeable or any(s < 0 for s in value.strides)):
        value = value.copy()  # torch shares memory only with writeable, positively strided arrays
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        got = type(value).__name__
        if isinstance(value, np.ndarray):
            got = f"numpy.ndarray of dtype {value.dtype}"
        raise TypeError(f"{name} must be a torch.Tensor or an array of numbers (a NumPy array, a nested "
                        f"list), got {got} ({err})") from None


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


def _pair(data, name):
    """``(x, y)`` of a :class:`~fewshot.tasks.LabeledSet` or of a two-element tuple or list."""
    from .tasks import LabeledSet, Task

    if isinstance(data, LabeledSet):
        return data.x, data.y
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    hint = f" (a task's support set is {name}=task.support)" if isinstance(data, Task) else ""
    got = type(data).__name__
    if isinstance(data, (tuple, list)):
        got = f"a {got} of length {len(data)}"
    raise TypeError(f"{name} must be a LabeledSet or an (x, y) pair of arrays, got {got}{hint}")


def check_inputs(x, input_shape, name, *, batch_dims=1) -> Tensor:
    """``x`` as a finite floating-point tensor of shape ``[*batch, *input_shape]`` (``batch_dims``
    leading axes, none of them empty); raises ``TypeError``/``ValueError`` naming ``name``."""
    x = as_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point inputs, got dtype {x.dtype}: {_FLOAT_INPUTS}")
    input_shape = tuple(input_shape)
    expected = (-1,) * batch_dims + input_shape
    if x.dim() != len(expected) or tuple(x.shape[batch_dims:]) != input_shape:
        shown = ("n_tasks, " if batch_dims == 2 else "") + "n" + "".join(f", {s}" for s in input_shape)
        hint = ""
        if batch_dims == 1 and tuple(x.shape) == input_shape:
            hint = f"; for a single example pass {name}[None]"
        elif batch_dims == 1 and input_shape == (1,) and x.dim() == 1:
            hint = f"; for n scalar inputs pass {name}.reshape(-1, 1)"
        raise ValueError(f"{name} must have shape [{shown}], got {list(x.shape)}{hint}")
    if x.shape[batch_dims - 1] == 0:
        raise ValueError(f"{name} is empty (shape {list(x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_targets(y, x, name, *, task_type, n_outputs, batch_dims=1, require_all_classes=False,
                  x_name="x") -> Tensor:
    """``y`` checked against the checked inputs ``x`` (called ``x_name`` in messages).

    Classification: integer labels (any integer dtype, returned as ``int64``), one per example, in
    ``0 .. n_outputs - 1``; with ``require_all_classes`` every class occurs (in every task).
    Regression: finite floating-point targets of shape ``[*batch, n_outputs]``, or ``[*batch]`` when
    ``n_outputs == 1``. Raises ``TypeError``/``ValueError`` naming ``name``.
    """
    y = as_tensor(y, name)
    n = list(x.shape[:batch_dims])
    if task_type == "classification":
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"{name} must hold integer class labels 0..{n_outputs - 1}, got dtype {y.dtype}")
        if list(y.shape) != n:
            raise ValueError(f"{name} must have shape {n} (one label per example of {x_name}), "
                             f"got {list(y.shape)}")
        if y.dtype != torch.int64:
            y = y.long()  # int32 from NumPy on some platforms, uint8, ...; also what the losses need
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_outputs:
            raise ValueError(f"{name} labels must lie in 0..{n_outputs - 1} (n_way={n_outputs}), "
                             f"got labels in {lo}..{hi}")
        if require_all_classes:
            counts = torch.nn.functional.one_hot(y.reshape(-1, n[-1]), n_outputs).sum(1)
            absent = (counts == 0).nonzero()
            if len(absent):
                task = int(absent[0, 0])
                missing = (counts[task] == 0).nonzero().flatten().tolist()
                where = f" (task {task})" if batch_dims == 2 else ""
                raise ValueError(f"{name}{where} is missing class(es) {missing}: every one of the "
                                 f"n_way={n_outputs} classes needs at least one support example")
        return y
    if not y.is_floating_point():
        raise TypeError(f"{name} must hold floating-point regression targets, got dtype {y.dtype}")
    rest = tuple(y.shape[batch_dims:])
    if list(y.shape[:batch_dims]) != n or not (rest == (n_outputs,) or (rest == () and n_outputs == 1)):
        alt = f" or {n}" if n_outputs == 1 else ""
        raise ValueError(f"{name} must have shape {n + [n_outputs]}{alt} (one target per example of "
                         f"{x_name}), got {list(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return y


def check_labeled_set(data, *, input_shape, task_type, n_outputs, name, batch_dims=1,
                      require_all_classes=False):
    """``data`` (a ``LabeledSet`` or an ``(x, y)`` pair) checked by :func:`check_inputs` and
    :func:`check_targets`, as a ``LabeledSet`` of tensors with ``int64`` class labels."""
    from .tasks import LabeledSet

    x, y = _pair(data, name)
    x = check_inputs(x, input_shape, f"{name}.x", batch_dims=batch_dims)
    y = check_targets(y, x, f"{name}.y", task_type=task_type, n_outputs=n_outputs, batch_dims=batch_dims,
                      require_all_classes=require_all_classes, x_name=f"{name}.x")
    if isinstance(data, LabeledSet) and x is data.x and y is data.y:
        return data
    return LabeledSet(x, y)
