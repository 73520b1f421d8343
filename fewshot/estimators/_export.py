"""Meta-trained parameters as a file: weights only, loadable without training.

A meta-parameter file holds what a fitted estimator needs to adapt to new tasks: its class and
constructor parameters, the shape of the tasks it was trained on and its meta-parameters (the
network's weights and any learned inner steps). It loads with ``torch.load(weights_only=True)``:
tensors, strings and numbers, no pickled code. A :func:`meta_fit checkpoint
<fewshot.MetaLearner.meta_fit>` holds more (optimizer state, task streams, history) and is for
resuming training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sklearn.utils import check_random_state

from ..tasks import TaskSampler
from . import _checkpoint, _distributed
from ._params import validate_common

__all__ = ["save_meta_params", "load_meta_params"]

FORMAT = "fewshot.meta_params"
VERSION = 1
_BY_NAME = ("nn.Module", "callable", "class", "object")  # how describe_params names non-data values


def save_meta_params(estimator, path) -> Path:
    """Write ``estimator``'s meta-parameters, constructor parameters and task shape to ``path``
    (atomically); see :meth:`fewshot.MetaLearner.save_meta_params`."""
    if not hasattr(estimator, "params_"):
        raise ValueError(f"this {type(estimator).__name__} is not meta-trained yet: call meta_fit first")
    state = {
        "format": FORMAT,
        "version": VERSION,
        "solver": type(estimator).__name__,
        "params": json.dumps(_checkpoint.describe_params(estimator), sort_keys=True),
        "task": {"task_type": estimator.task_type_, "input_shape": list(estimator.input_shape_),
                 "n_outputs": estimator.n_outputs_,
                 # FineTune's network classifies all meta-training classes (its pre-training)
                 "n_pretrain_outputs": getattr(estimator, "n_pretrain_outputs_", None)},
        "n_iter": int(getattr(estimator, "n_iter_", 0)),
        "meta_params": {k: v.detach().cpu() for k, v in estimator.params_.items()},
        "torch_version": str(torch.__version__),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _checkpoint.save(path, state)
    return path


def load_meta_params(path, *, device=None, **params):
    """A meta-trained estimator from a file written by :meth:`~fewshot.MetaLearner.save_meta_params`.

    The estimator is the file's class, constructed with the file's parameters (``params`` override
    them), and holds the file's meta-parameters: ``adapt(support).predict(x)``, ``evaluate`` and
    ``score`` work at once, as after the ``meta_fit`` that produced them. ``meta_fit`` trains it
    afresh; with ``warm_start=True`` it continues from the file's meta-parameters with a fresh
    meta-optimizer and task stream (from ``random_state``).

    Parameters
    ----------
    path : str or path-like
    device : torch device or "auto", optional
        Where the meta-parameters go (default: the file's ``device`` parameter).
    **params
        Estimator parameters to use instead of the file's. A parameter that the file records only by
        name (a network passed as an ``nn.Module``, a loss callable, an optimizer class) must be
        given here: ``load_meta_params(path, model=MyNet())``.

    Returns
    -------
    MetaLearner

    Raises
    ------
    ValueError
        If the file is not a meta-parameter file, names a parameter object that is not given, or
        holds meta-parameters that do not fit the network.
    """
    from .. import SOLVERS

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged or foreign files raise many types
        raise ValueError(f"{path} is not a readable fewshot meta-parameter file (it must load with "
                         f"torch.load(weights_only=True)): {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        hint = (" (it is a meta_fit checkpoint: resume it with meta_fit(checkpoint=...), or save its "
                "estimator's meta-parameters with save_meta_params)"
                if isinstance(state, dict) and state.get("format") == _checkpoint.FORMAT else "")
        raise ValueError(f"{path} is not a fewshot meta-parameter file{hint}")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} has format version {state.get('version')!r}; this fewshot reads {VERSION}")
    solver = state["solver"]
    if solver not in SOLVERS:
        raise ValueError(f"{path} was written by {solver!r}, which this fewshot does not have "
                         f"(its estimators: {list(SOLVERS)})")
    cls = SOLVERS[solver]
    saved = json.loads(state["params"])
    valid = cls().get_params(deep=False)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"{solver} has no parameter(s) {unknown}; its parameters are {sorted(valid)}")
    kwargs = {}
    for name, value in saved.items():
        if name in params:
            kwargs[name] = params[name]
        elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _BY_NAME:
            kind, what = next(iter(value.items()))
            raise ValueError(f"{path} was written by a {solver} whose {name} was a {kind} ({what}), which "
                             f"a weights-only file records by name only: pass it, "
                             f"load_meta_params(path, {name}=...)")
        elif name in valid:
            kwargs[name] = tuple(value) if isinstance(valid[name], tuple) and isinstance(value, list) else value
    if device is not None:
        kwargs["device"] = device
    est = cls(**kwargs)
    device, dtype = validate_common(est)
    task = state["task"]
    spec = TaskSampler()
    spec.task_type, spec.input_shape = task["task_type"], tuple(task["input_shape"])
    spec.n_outputs, spec.n_pretrain_outputs = int(task["n_outputs"]), task["n_pretrain_outputs"]
    est._check_sampler(spec)
    rs = check_random_state(est.random_state)
    init_seed, est._task_seed = (int(v) for v in rs.randint(0, 2**31 - 1, size=2))
    fresh = est._setup(spec, device, dtype, init_seed)
    stored = state["meta_params"]
    if {k: tuple(v.shape) for k, v in stored.items()} != {k: tuple(v.shape) for k, v in fresh.items()}:
        bad = sorted(k for k in set(stored) | set(fresh)
                     if k not in stored or k not in fresh or stored[k].shape != fresh[k].shape)
        raise ValueError(f"{path} holds meta-parameters that do not fit the {solver}'s network: "
                         + ", ".join(f"{k} {tuple(stored[k].shape) if k in stored else None} in the file vs "
                                     f"{tuple(fresh[k].shape) if k in fresh else None}" for k in bad))
    with torch.no_grad():
        for k, v in fresh.items():
            v.copy_(stored[k])
    est.params_ = fresh
    est.optimizer_ = est._make_optimizer(fresh)
    est.history_, est.n_iter_ = {}, int(state.get("n_iter", 0))
    est._task_rng_state = _distributed.task_streams(_distributed.current_world(), est._task_seed).get_state()
    return est
