"""The parameters every estimator shares: defaults, validation and the scikit-learn ``__init__``."""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from torch import nn

from .. import models as _models
from ..core.functional import LOSSES
from .._validation import check_choice, check_number

__all__ = ["COMMON_PARAMS", "AUTO_INNER_LR", "LR_SCHEDULES", "OPTIMIZERS", "estimator_init", "validate_common",
           "resolve_device", "resolve_dtype", "check_inner_params"]

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
    inner_params=None,
)

#: ``inner_lr="auto"`` per task type: MAML's values for Omniglot (0.4) and sinusoid (0.01).
AUTO_INNER_LR = {"classification": 0.4, "regression": 0.01}

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}

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
    see them; one function serves every estimator instead of one hand-copied per estimator.
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


def validate_common(self):
    # Step sizes above 1e6 are certainly mistakes, and beyond float32's range they crash inside
    # the optimizer instead of diverging visibly.
    check_number("inner_lr", self.inner_lr, low=0, low_open=True, high=1e6, allow=("auto",))
    check_number("inner_steps", self.inner_steps, low=self._min_inner_steps, integer=True)
    check_inner_params(self)
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
                             f"{sorted(OPTIMIZERS)} or a torch.optim.Optimizer subclass, got {self.meta_optimizer!r}")
    else:
        check_choice("meta_optimizer", self.meta_optimizer, OPTIMIZERS)
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
    return resolve_device(self), resolve_dtype(self)


def resolve_device(self) -> torch.device:
    if self.device == "auto" or self.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(self.device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto' or a torch device, got {self.device!r}") from None

def resolve_dtype(self) -> torch.dtype:
    if self.dtype in (torch.float32, torch.float64):
        return self.dtype
    if isinstance(self.dtype, str) and self.dtype in _DTYPES:
        return _DTYPES[self.dtype]
    raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


def check_inner_params(self):
    """``inner_params``: None, a name, a list of names, or a callable (when the estimator has it)."""
    if "inner_params" not in self.get_params(deep=False):
        return
    value = self.inner_params
    ok = (value is None or callable(value) or isinstance(value, str)
          or (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)))
    if not ok:
        raise ValueError("inner_params must be None (adapt every parameter), a parameter or module name, "
                         f"a non-empty list of names, or a callable name -> bool, got {value!r}")
