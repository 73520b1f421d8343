"""Task containers and the task-sampler protocol.

A *task* is a pair of labelled sets, ``support`` (used to adapt) and ``query`` (used to evaluate the
adapted model). A *meta-batch* stacks several tasks of the same shape along a leading task axis, so
``batch.support.x`` has shape ``[n_tasks, n_support, *input_shape]``.

Samplers draw tasks from an explicit :class:`torch.Generator` (or a seed); they never touch global
random state.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .._validation import as_tensor

__all__ = [
    "LabeledSet",
    "Task",
    "TaskBatch",
    "TaskSampler",
    "check_generator",
    "as_task_batch",
]


@dataclass(frozen=True)
class LabeledSet:
    """A set of examples ``x`` with targets ``y`` (first axis indexes examples).

    ``x`` and ``y`` may be given as anything :func:`torch.as_tensor` accepts (NumPy arrays, nested
    lists); they are stored as tensors, with their dtype (tensors are kept as given, not copied).
    They must have the same length along the first axis. Unpacks like a tuple:
    ``x, y = task.support``.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self):
        x, y = _checked_pair(self.x, self.y, "LabeledSet")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __iter__(self) -> Iterator[Tensor]:
        yield self.x
        yield self.y

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device=None, dtype=None) -> "LabeledSet":
        """Move to ``device``; ``dtype`` casts floating tensors only (labels keep their dtype)."""
        return LabeledSet(_to(self.x, device, dtype), _to(self.y, device, dtype))


@dataclass(frozen=True)
class Task:
    """One few-shot task: ``support`` and ``query`` :class:`LabeledSet` (or ``(x, y)`` pairs of
    arrays, converted to them)."""

    support: LabeledSet
    query: LabeledSet

    def __post_init__(self):
        object.__setattr__(self, "support", _as_set(self.support, "Task.support"))
        object.__setattr__(self, "query", _as_set(self.query, "Task.query"))

    def to(self, device=None, dtype=None) -> "Task":
        return Task(self.support.to(device, dtype), self.query.to(device, dtype))


@dataclass(frozen=True)
class TaskBatch:
    """Tasks of equal shapes stacked on a leading axis: ``support.x`` is ``[n_tasks, n, ...]``.

    Indexing gives a :class:`Task` (an integer) or a smaller :class:`TaskBatch` (a slice);
    iteration yields tasks. ``support`` and ``query`` may be given as ``(x, y)`` pairs of arrays;
    both need the axes ``[n_tasks, n]`` in ``x`` and ``y`` and the same ``n_tasks``.
    """

    support: LabeledSet
    query: LabeledSet

    def __post_init__(self):
        sets = {}
        for part in ("support", "query"):
            name = f"TaskBatch.{part}"
            s = sets[part] = _as_set(getattr(self, part), name)
            if s.x.dim() < 2 or s.y.dim() < 2 or s.x.shape[1] != s.y.shape[1]:
                raise ValueError(
                    f"{name}.x and {name}.y must have shapes [n_tasks, n, ...] with the same n_tasks and n, "
                    f"got {list(s.x.shape)} and {list(s.y.shape)} (one task is a Task, not a TaskBatch)")
            object.__setattr__(self, part, s)
        if len(sets["support"]) != len(sets["query"]):
            raise ValueError(f"TaskBatch.support and TaskBatch.query must hold the same number of tasks, "
                             f"got {len(sets['support'])} and {len(sets['query'])}")

    def __len__(self) -> int:
        return self.support.x.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TaskBatch(
                LabeledSet(self.support.x[index], self.support.y[index]),
                LabeledSet(self.query.x[index], self.query.y[index]),
            )
        return Task(
            LabeledSet(self.support.x[index], self.support.y[index]),
            LabeledSet(self.query.x[index], self.query.y[index]),
        )

    def __iter__(self) -> Iterator[Task]:
        for i in range(len(self)):
            yield self[i]

    def to(self, device=None, dtype=None) -> "TaskBatch":
        return TaskBatch(self.support.to(device, dtype), self.query.to(device, dtype))

    @classmethod
    def stack(cls, tasks: Sequence[Task]) -> "TaskBatch":
        """Stack tasks of equal shapes into one batch."""
        tasks = list(tasks)
        if not tasks:
            raise ValueError("TaskBatch.stack needs at least one task, got an empty sequence")
        shapes = []
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise TypeError(f"TaskBatch.stack needs Task objects, got {type(t).__name__} at position {i}")
            shapes.append([list(a.shape) for a in (t.support.x, t.support.y, t.query.x, t.query.y)])
            if shapes[i] != shapes[0]:
                raise ValueError(
                    "TaskBatch.stack needs tasks of equal shapes; (support.x, support.y, query.x, query.y) "
                    f"of task {i} are {shapes[i]}, of task 0 {shapes[0]}")
        return cls(
            LabeledSet(torch.stack([t.support.x for t in tasks]), torch.stack([t.support.y for t in tasks])),
            LabeledSet(torch.stack([t.query.x for t in tasks]), torch.stack([t.query.y for t in tasks])),
        )


def _checked_pair(x, y, name):
    """``x`` and ``y`` as tensors of the same length along their first axis; errors name ``name``."""
    x, y = as_tensor(x, f"{name}.x"), as_tensor(y, f"{name}.y")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}.x and {name}.y must have the same length along the first axis (one target "
                         f"per example), got shapes {list(x.shape)} and {list(y.shape)}")
    return x, y


def _as_set(value, name) -> LabeledSet:
    """A :class:`LabeledSet` given as one or as an ``(x, y)`` pair."""
    if isinstance(value, LabeledSet):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return LabeledSet(*_checked_pair(value[0], value[1], name))
    raise TypeError(f"{name} must be a LabeledSet or an (x, y) pair of arrays, got {type(value).__name__}")


def _to(t: Tensor, device, dtype) -> Tensor:
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device) if device is not None else t


def check_generator(random_state, device="cpu") -> torch.Generator:
    """Turn ``random_state`` into a :class:`torch.Generator`.

    ``None`` gives a freshly seeded generator (from the operating system's entropy), an integer a
    generator seeded with it, a :class:`numpy.random.RandomState`/``Generator`` a generator seeded
    from it, and a :class:`torch.Generator` is returned unchanged (and advanced by the caller).
    """
    if isinstance(random_state, torch.Generator):
        return random_state
    gen = torch.Generator(device=device)
    if random_state is None:
        gen.seed()
    elif isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer, got {random_state}")
        gen.manual_seed(int(random_state))
    elif isinstance(random_state, np.random.RandomState):
        gen.manual_seed(int(random_state.randint(0, 2**31 - 1)))
    elif isinstance(random_state, np.random.Generator):
        gen.manual_seed(int(random_state.integers(0, 2**63 - 1)))
    else:
        raise TypeError(
            "random_state must be None, an int, a numpy RandomState/Generator or a torch.Generator, "
            f"got {type(random_state).__name__}"
        )
    return gen


class TaskSampler:
    """Base class of task families.

    Subclasses implement :meth:`_sample(n_tasks, generator) <_sample>` returning a
    :class:`TaskBatch` and set the attributes below. Everything else (single tasks, seeds, devices)
    is handled here.

    Attributes
    ----------
    task_type : {"classification", "regression"}
    input_shape : tuple of int
        Shape of one example ``x``.
    n_outputs : int
        Model outputs needed: ``n_way`` for classification, target dimension for regression.
    n_way : int or None
        Classes per task (classification only).
    """

    task_type: str = "regression"
    input_shape: tuple = ()
    n_outputs: int = 1
    n_way: int | None = None

    def sample(self, n_tasks: int | None = None, *, random_state=None, device=None) -> Task | TaskBatch:
        """Draw tasks.

        Parameters
        ----------
        n_tasks : int or None
            ``None`` returns one :class:`Task`; an integer returns a :class:`TaskBatch` of that many.
        random_state : None, int, numpy or torch generator
            Source of randomness; the same seed gives the same tasks. A :class:`torch.Generator` is
            advanced, so successive calls give new tasks.
        device : torch device, optional
            Where the returned tensors live.
        """
        if n_tasks is not None and (
            not isinstance(n_tasks, numbers.Integral) or isinstance(n_tasks, bool) or n_tasks < 1
        ):
            raise ValueError(f"n_tasks must be a positive integer or None, got {n_tasks!r}")
        gen = check_generator(random_state)
        batch = self._sample(1 if n_tasks is None else int(n_tasks), gen)
        if device is not None:
            batch = batch.to(device)
        return batch[0] if n_tasks is None else batch

    def _sample(self, n_tasks: int, generator: torch.Generator) -> TaskBatch:  # pragma: no cover
        raise NotImplementedError

    # Pre-training data for the non-meta FineTune baseline: pooled examples with global targets.
    n_pretrain_outputs: int | None = None

    def sample_pretraining(self, batch_size: int, *, random_state=None, device=None) -> LabeledSet:
        """Pooled examples with *global* targets, for ordinary (non-episodic) pre-training.

        Classification samplers label examples with their class index among all meta-training
        classes (``0 .. n_pretrain_outputs - 1``).
        """
        raise NotImplementedError(
            f"{type(self).__name__} provides no pooled pre-training data, which FineTune needs"
        )

    # The class pool, for class-disjoint splits (fewshot.model_selection.meta_train_test_split).
    def class_groups(self) -> list[list[int]] | None:
        """The classes of a fixed pool (indices ``0 .. n_classes - 1``), in the groups that a
        class-disjoint split keeps on one side; ``None`` when the family has no fixed class pool
        (regression families, whose tasks are independent draws).

        A sampler that returns groups also implements :meth:`restrict_classes`.
        """
        return None

    def restrict_classes(self, classes) -> "TaskSampler":
        """A sampler of the same kind that draws its tasks from the classes ``classes`` (indices
        into the pool) only."""
        raise TypeError(f"{type(self).__name__} has no fixed pool of classes to restrict")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> dict:
        return {}


def as_task_batch(tasks) -> TaskBatch:
    """Accept a :class:`TaskBatch`, a :class:`Task` or a sequence of tasks; return a batch."""
    if isinstance(tasks, TaskBatch):
        return tasks
    if isinstance(tasks, Task):
        return TaskBatch.stack([tasks])
    if isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, Task) for t in tasks):
        return TaskBatch.stack(tasks)
    got = type(tasks).__name__
    if isinstance(tasks, (list, tuple)):
        bad = [(i, type(t).__name__) for i, t in enumerate(tasks) if not isinstance(t, Task)]
        got = f"an empty {got}" if not tasks else f"a {got} whose item {bad[0][0]} is of type {bad[0][1]}"
    raise TypeError(f"expected a TaskSampler, a TaskBatch, a Task or a non-empty list of Task objects, "
                    f"got {got}")
