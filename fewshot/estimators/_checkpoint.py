"""Checkpoints of meta-training: what a file holds, the atomic write, and the checks on resume.

A checkpoint is a ``torch.save`` file of plain containers, numbers, strings and tensors, so it loads
with ``torch.load(weights_only=True)`` and no pickled code runs. It holds everything needed to
continue bit for bit: the meta-parameters, the meta-optimizer's ``state_dict``, the task generators'
states (one per shard of the meta-batch, see :mod:`fewshot._distributed`), ``history_``, the step
count, and, to refuse a checkpoint that does not belong to the estimator resuming it, the solver's
class name, a JSON description of its parameters and the task shapes. A network template (an
``nn.Module``), a loss callable or an optimizer class is described by its class or qualified name
only: the caller constructs the same estimator, and the saved meta-parameters must then fit its
network.
"""

from __future__ import annotations

import inspect
import json
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._files import atomic_write
from .._validation import check_number

__all__ = ["FORMAT", "VERSION", "FREE_PARAMS", "check_options", "describe_params", "make_state",
           "save", "load", "save_training", "restore_training"]

FORMAT = "fewshot.meta_fit.checkpoint"
VERSION = 1
#: Estimator parameters that may differ between the run that wrote a checkpoint and the one that
#: resumes it: the total step target, logging, placement, warm_start (a checkpoint always resumes
#: from the file) and adapt_steps (test-time adaptation only; meta-training never reads it).
FREE_PARAMS = frozenset({"meta_steps", "verbose", "device", "warm_start", "adapt_steps"})
#: Parameters added after checkpoints of this format were first written, with the behaviour the
#: estimators had before (every parameter adapted; MAML++ without per-step batch-norm weights):
#: a checkpoint that lacks one was written with that value.
ADDED_PARAMS = {"inner_params": None, "per_step_bn": False}


def check_options(checkpoint, checkpoint_every):
    """Validate ``meta_fit``'s checkpoint arguments; return ``(Path or None, int or None)``."""
    if checkpoint is None:
        if checkpoint_every is not None:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} needs a checkpoint path, got "
                             "checkpoint=None")
        return None, None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint must be a file path, got the directory {path}")
    if checkpoint_every is not None:
        check_number("checkpoint_every", checkpoint_every, low=1, integer=True)
        checkpoint_every = int(checkpoint_every)
    return path, checkpoint_every


def _describe(value):
    """A JSON-able description of a parameter value (a name for what cannot be saved as data)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, nn.Module):
        return {"nn.Module": _qualname(type(value))}
    if inspect.isclass(value):
        return {"class": _qualname(value)}
    if callable(value):
        target = value if hasattr(value, "__qualname__") else type(value)
        return {"callable": _qualname(target)}
    return {"object": _qualname(type(value))}


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def describe_params(estimator) -> dict:
    return {k: _describe(v) for k, v in sorted(estimator.get_params(deep=False).items())}


def make_state(estimator, params, optimizer, stream_states: list) -> dict:
    """The checkpoint payload of ``estimator`` after ``estimator.n_iter_`` steps."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "solver": type(estimator).__name__,
        "params": json.dumps(describe_params(estimator), sort_keys=True),
        "task": {"task_type": estimator.task_type_, "input_shape": list(estimator.input_shape_),
                 "n_outputs": estimator.n_outputs_},
        "n_iter": int(estimator.n_iter_),
        "meta_params": {k: v.detach() for k, v in params.items()},
        "optimizer": optimizer.state_dict(),
        "task_rng_states": [s.cpu() for s in stream_states],
        "history": {k: [float(v) for v in vs] for k, vs in estimator.history_.items()},
        "torch_version": str(torch.__version__),
    }


def save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (:func:`fewshot._files.atomic_write`): a reader sees
    the previous checkpoint or the new one, never a part."""
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: Path, estimator, params: dict) -> dict:
    """Read the checkpoint at ``path`` with ``weights_only=True`` and check that it belongs to
    ``estimator`` (same solver, same parameters except :data:`FREE_PARAMS`, same task shapes) and
    that its meta-parameters fit ``params`` (the freshly built ones). Raises ``ValueError`` naming
    the mismatch."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged or foreign files raise many types; all mean "cannot resume"
        raise ValueError(f"checkpoint {path} is not a readable fewshot checkpoint (it must load with "
                         f"torch.load(weights_only=True)): {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a fewshot meta_fit checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has format version {state.get('version')!r}; this fewshot "
                         f"reads version {VERSION}")
    solver = type(estimator).__name__
    if state["solver"] != solver:
        raise ValueError(f"checkpoint {path} was written by {state['solver']}, not by {solver}; resume "
                         f"it with a {state['solver']} constructed with the same parameters")
    saved, current = json.loads(state["params"]), describe_params(estimator)
    for name, before in ADDED_PARAMS.items():  # written before the parameter existed
        if name in current:
            saved.setdefault(name, before)
    names = sorted((set(saved) | set(current)) - FREE_PARAMS)
    diff = [n for n in names if saved.get(n, "<missing>") != current.get(n, "<missing>")]
    if diff:
        detail = "; ".join(f"{n}: checkpoint {saved.get(n, '<missing>')!r}, estimator "
                           f"{current.get(n, '<missing>')!r}" for n in diff)
        raise ValueError(f"checkpoint {path} was written by a {solver} with other parameters ({detail}). "
                         f"Construct the estimator with the checkpoint's parameters (only "
                         f"{', '.join(sorted(FREE_PARAMS))} may differ)")
    task = {"task_type": estimator.task_type_, "input_shape": list(estimator.input_shape_),
            "n_outputs": estimator.n_outputs_}
    if state["task"] != task:
        raise ValueError(f"checkpoint {path} was written for tasks {state['task']}, but the task sampler "
                         f"gives {task}")
    shapes = {k: tuple(v.shape) for k, v in state["meta_params"].items()}
    expected = {k: tuple(v.shape) for k, v in params.items()}
    if shapes != expected:
        bad = sorted(k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))
        raise ValueError(f"checkpoint {path} holds meta-parameters that do not fit the model: "
                         + ", ".join(f"{k} {shapes.get(k)} in the checkpoint vs {expected.get(k)}"
                                     for k in bad))
    return state


def save_training(estimator, path, world, params, optimizer, streams) -> None:
    """Write ``estimator``'s training state after ``n_iter_`` steps (a collective: every process
    calls it; the main process writes)."""
    from . import _distributed

    states = _distributed.gather_stream_states(world, streams)
    if world.is_main:
        save(path, make_state(estimator, params, optimizer, states))


def restore_training(estimator, path, world, params, optimizer):
    """Restore the state saved at ``path`` into the freshly built ``params`` and ``optimizer`` and
    the estimator's ``history_`` and ``n_iter_``; return the task generators of this process's
    shards."""
    from . import _distributed

    state = load(path, estimator, params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state["meta_params"][k])
    optimizer.load_state_dict(state["optimizer"])
    estimator.history_ = {k: list(v) for k, v in state["history"].items()}
    estimator.n_iter_ = int(state["n_iter"])
    _distributed.check_agree(world, estimator.n_iter_, "the checkpoint's step count")
    return _distributed.streams_from_checkpoint(world, state["task_rng_states"], path)
