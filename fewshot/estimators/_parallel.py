"""Running the tasks of a meta-batch on several CPU threads.

On a CPU, the per-task computations of a meta-step are many small operations (a 5-image support
batch, a few convolutions) that intra-op threading parallelises poorly. Running whole tasks on
``n`` Python threads, each with one intra-op thread, keeps every core busy instead (PyTorch
releases the GIL inside its kernels). Two things make this safe:

- each thread runs its own copy of the network module, because ``functional_call`` temporarily
  swaps tensors into the module it is given (a shared module would mix threads' parameters);
- Hessian-vector products use reverse-over-reverse autograd, because forward-mode AD's dual levels
  are process-global (``jvp`` from two threads at once fails).

Results are reduced in task order, so the mean meta-gradient does not depend on thread timing.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["imap_tasks", "thread_local_copy", "intra_op_threads"]

_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
_LOCAL = threading.local()


def _executor(workers: int) -> ThreadPoolExecutor:
    with _LOCK:
        if workers not in _EXECUTORS:
            _EXECUTORS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fewshot-task")
        return _EXECUTORS[workers]


def thread_local_copy(obj):
    """A deep copy of ``obj`` private to the calling thread (made once per thread and object)."""
    copies = getattr(_LOCAL, "copies", None)
    if copies is None:
        copies = _LOCAL.copies = weakref.WeakKeyDictionary()
    if obj not in copies:
        copies[obj] = copy.deepcopy(obj)
    return copies[obj]


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Temporarily set PyTorch's intra-op thread count."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def imap_tasks(fn, tasks, workers: int):
    """``fn(t)`` for ``t`` in ``tasks``, yielded in order as they finish, on ``workers`` threads with
    one intra-op thread each (the thread count is restored when the iterator is exhausted or closed).

    A result is dropped by the pool once yielded, so a caller that reduces as it iterates holds
    at most the results that finished ahead of it."""
    tasks = list(tasks)
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield fn(t)
        return
    with intra_op_threads(1):
        yield from _executor(workers).map(fn, tasks)
