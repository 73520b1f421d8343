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

    Unpacks like a tuple: ``x, y = task.support``.
    """

    x: Tensor
    y: Tensor

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
    """One few-shot task: ``support`` and ``query`` :class:`LabeledSet`."""

    support: LabeledSet
    query: LabeledSet

    def to(self, device=None, dtype=None) -> "Task":
        return Task(self.support.to(device, dtype), self.query.to(device, dtype))


@dataclass(frozen=True)
class TaskBatch:
    """Tasks of equal shapes stacked on a leading axis: ``support.x`` is ``[n_tasks, n, ...]``.

    Indexing gives a :class:`Task` (an integer) or a smaller :class:`TaskBatch` (a slice);
    iteration yields tasks.
    """

    support: LabeledSet
    query: LabeledSet

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
        return cls(
            LabeledSet(torch.stack([t.support.x for t in tasks]), torch.stack([t.support.y for t in tasks])),
            LabeledSet(torch.stack([t.query.x for t in tasks]), torch.stack([t.query.y for t in tasks])),
        )


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
    raise TypeError(
        "expected a TaskSampler, a TaskBatch, a Task or a non-empty list of Task objects, "
        f"got {type(tasks).__name__}"
    )
