"""Model selection for meta-learners: a parameter search scored on one fixed pool of
meta-validation tasks, and class-disjoint meta-train/validation splits of task samplers.

See ``docs/model_selection.md``.

>>> from fewshot import IMAML
>>> from fewshot.model_selection import MetaGridSearch, meta_train_test_split
>>> from fewshot.tasks import SinusoidTasks
>>> train, val = meta_train_test_split(SinusoidTasks(k_shot=5, n_query=5), random_state=0)
>>> search = MetaGridSearch(IMAML(meta_steps=2, inner_steps=2, meta_batch_size=2, random_state=0),
...                         {"lam": [0.5, 2.0]}, n_tasks=8, random_state=0).meta_fit(train, val)
>>> sorted(search.best_params_)
['lam']
"""

from __future__ import annotations

import copy
import math
import numbers
import threading
import time
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import FitFailedWarning
from sklearn.model_selection import ParameterGrid
from sklearn.utils import check_random_state

from .estimators._base import AdaptedModel, Evaluation, MetaLearner
from .exceptions import DivergenceError, NotFittedError
from .tasks import Task, TaskBatch, TaskSampler, as_task_batch

__all__ = ["MetaGridSearch", "meta_train_test_split"]


class MetaGridSearch(BaseEstimator):
    """Meta-train every parameter candidate and score it on the same meta-validation tasks.

    Each candidate is ``clone(estimator).set_params(**params)``, meta-trained with
    ``meta_fit(train_sampler)`` and scored by ``evaluate`` on one pool of validation tasks drawn
    once (``n_tasks`` tasks with ``random_state``) and shared by all candidates, so their scores are
    paired comparisons. Candidates run in parallel with :class:`joblib.Parallel`, so
    ``joblib.parallel_config(backend=...)`` can send them to threads, processes, dask or ray.

    Parameters
    ----------
    estimator : MetaLearner
        The solver to tune; its ``random_state`` seeds every candidate's training (set it for
        reproducible searches).
    param_grid : dict, list of dicts, or iterable of dicts
        A dict of parameter lists or a list of such dicts is expanded with
        :class:`sklearn.model_selection.ParameterGrid`, as in ``GridSearchCV``; any other iterable
        of candidate dicts (a :class:`~sklearn.model_selection.ParameterSampler`, a
        ``ParameterGrid``, a generator) is used as it is.
    n_tasks : int, default=600
        Validation tasks drawn when ``meta_fit`` gets a sampler for validation.
    n_jobs : int or None, default=None
        Candidates run at once (``None``: 1 unless inside ``joblib.parallel_config``; -1: all
        cores). When more than one runs at a time, each candidate runs with
        ``torch.set_num_threads(1)`` so that ``n_jobs`` workers do not oversubscribe the cores
        (set in the worker processes; in this process it is restored when the search ends).
        Parallelism comes from processes: the default loky backend, multiprocessing, or dask/ray
        workers. Within one process candidates run one at a time, because torch's forward-mode
        AD state (used by the Hessian-vector products) is process-global; so the threading
        backend gives correct results but no speed-up.
    random_state : None, int, numpy or torch generator, default=None
        Seeds the draw of the validation pool.
    refit : bool, default=True
        Keep the best candidate's meta-trained estimator as ``best_estimator_`` (it is the one
        that was scored, not trained again) and let ``adapt``, ``evaluate`` and ``score`` use it.
    error_score : "raise" or float, default=np.nan
        Score of a candidate whose meta-training diverges (raises
        :class:`~fewshot.exceptions.DivergenceError`), with a :class:`FitFailedWarning`;
        "raise" re-raises the error. Other errors always propagate.

    Attributes
    ----------
    cv_results_ : dict of str to ndarray or list
        In scikit-learn's format: ``params`` (the candidates' dicts), ``param_<name>`` (masked
        arrays, masked where a candidate does not set ``<name>``), ``mean_test_score`` (mean score
        over the validation tasks: accuracy, or negative MSE for regression), ``std_test_score``
        (standard deviation of the per-task scores, where scikit-learn has the deviation over
        folds), ``ci95_test_score`` (half-width of the 95% confidence interval of the mean),
        ``rank_test_score`` (1 is best; ties share the lowest rank; failed candidates rank last),
        ``mean_fit_time``, ``std_fit_time``, ``mean_score_time``, ``std_score_time`` (seconds; the
        standard deviations are 0, one fit per candidate).
    best_index_ : int
        Index of the best candidate (the first of the best ones in candidate order).
    best_params_ : dict
    best_score_ : float
    best_estimator_ : MetaLearner
        Only with ``refit=True``.
    n_candidates_ : int

    Examples
    --------
    >>> from sklearn.model_selection import ParameterSampler
    >>> from scipy.stats import loguniform
    >>> grid = ParameterSampler({"lam": loguniform(0.1, 10), "inner_lr": [0.01, 0.05]}, n_iter=4,
    ...                         random_state=0)
    >>> search = MetaGridSearch(IMAML(random_state=0), grid, n_jobs=2)       # doctest: +SKIP
    """

    def __init__(self, estimator, param_grid, *, n_tasks=600, n_jobs=None, random_state=None, refit=True,
                 error_score=np.nan):
        self.estimator = estimator
        self.param_grid = param_grid
        self.n_tasks = n_tasks
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.refit = refit
        self.error_score = error_score

    def meta_fit(self, train_sampler: TaskSampler, val_tasks) -> "MetaGridSearch":
        """Run the search; returns ``self``.

        Parameters
        ----------
        train_sampler : TaskSampler
            Meta-training tasks of every candidate.
        val_tasks : TaskSampler, TaskBatch, Task or list of Task
            Meta-validation tasks: a sampler gives a pool of ``n_tasks`` tasks drawn once with
            ``random_state``; a batch or list is used as it is. Use tasks the candidates do not
            train on, for example from :func:`meta_train_test_split`.
        """
        self._validate(train_sampler)
        candidates = _candidates(self.param_grid)
        for params in candidates:  # unknown names fail here, before any training
            clone(self.estimator).set_params(**params)
        pool = self._validation_pool(val_tasks)
        one_thread = effective_n_jobs(self.n_jobs) != 1
        threads = torch.get_num_threads()
        try:
            out = Parallel(n_jobs=self.n_jobs)(
                delayed(_fit_and_score)(clone(self.estimator), params, train_sampler, pool, one_thread,
                                        torch.get_default_dtype(), self.refit, self.error_score)
                for params in candidates)
        finally:
            torch.set_num_threads(threads)

        for params, result in zip(candidates, out):
            if result["error"] is not None:
                warnings.warn(f"meta-training diverged for the candidate {params}; its score is set to "
                              f"error_score={self.error_score!r}. {result['error']}", FitFailedWarning,
                              stacklevel=2)
        results = _results(candidates, out)
        if np.all(np.isnan(results["mean_test_score"])):
            raise ValueError(f"all {len(candidates)} candidates failed (non-finite scores or "
                             "diverged meta-training); see the warnings")
        best = int(np.argmin(results["rank_test_score"]))
        if self.refit and out[best]["estimator"] is None:
            raise ValueError(f"the best candidate {candidates[best]} is one whose meta-training diverged "
                             f"(error_score={self.error_score!r} ranks it first); use a lower error_score")
        self.cv_results_ = results
        self.best_index_ = best
        self.best_params_ = candidates[best]
        self.best_score_ = float(results["mean_test_score"][best])
        self.n_candidates_ = len(candidates)
        if self.refit:
            self.best_estimator_ = out[best]["estimator"]
        elif hasattr(self, "best_estimator_"):
            del self.best_estimator_  # left by the last meta_fit
        return self

    def _validate(self, train_sampler):
        if not isinstance(self.estimator, MetaLearner):
            raise TypeError("estimator must be a fewshot meta-learner (a MetaLearner such as "
                            f"fewshot.MAML()), got {type(self.estimator).__name__}")
        if not isinstance(train_sampler, TaskSampler):
            raise TypeError("train_sampler must be a fewshot.tasks.TaskSampler, got "
                            f"{type(train_sampler).__name__}")
        n_tasks = self.n_tasks
        if not isinstance(n_tasks, numbers.Integral) or isinstance(n_tasks, bool) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer, got {self.n_tasks!r}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"refit must be True or False, got {self.refit!r}")
        if not (self.error_score == "raise" or isinstance(self.error_score, numbers.Real)):
            raise ValueError(f"error_score must be 'raise' or a number, got {self.error_score!r}")

    def _validation_pool(self, val_tasks) -> TaskBatch:
        if isinstance(val_tasks, TaskSampler):
            return val_tasks.sample(int(self.n_tasks), random_state=self.random_state)
        if isinstance(val_tasks, (TaskBatch, Task, list, tuple)):
            return as_task_batch(val_tasks)
        raise TypeError("val_tasks must be a TaskSampler, a TaskBatch, a Task or a list of tasks, got "
                        f"{type(val_tasks).__name__}")

    # Delegation to the refitted best estimator, as scikit-learn's searches do.
    def _best(self) -> MetaLearner:
        if not hasattr(self, "cv_results_"):
            raise NotFittedError("This MetaGridSearch instance is not fitted yet. Call 'meta_fit' first.")
        if not self.refit:
            raise AttributeError("this MetaGridSearch was created with refit=False: it keeps no "
                                 "best_estimator_ to adapt or score with")
        return self.best_estimator_

    def adapt(self, support) -> AdaptedModel:
        """``best_estimator_.adapt(support)``."""
        return self._best().adapt(support)

    def evaluate(self, tasks, *, n_tasks=600, random_state=0) -> Evaluation:
        """``best_estimator_.evaluate(tasks, ...)``."""
        return self._best().evaluate(tasks, n_tasks=n_tasks, random_state=random_state)

    def score(self, tasks, n_tasks=600, random_state=0) -> float:
        """``best_estimator_.score(tasks, ...)``."""
        return self._best().score(tasks, n_tasks=n_tasks, random_state=random_state)


def _candidates(param_grid) -> list[dict]:
    if isinstance(param_grid, Mapping) or (isinstance(param_grid, (list, tuple)) and param_grid
                                           and all(isinstance(g, Mapping) for g in param_grid)):
        grid = ParameterGrid(param_grid)
    elif isinstance(param_grid, Iterable) and not isinstance(param_grid, (str, bytes)):
        grid = param_grid
    else:
        raise TypeError("param_grid must be a dict, a list of dicts or an iterable of parameter dicts "
                        f"(ParameterGrid, ParameterSampler), got {type(param_grid).__name__}")
    candidates = [dict(c) for c in _check_dicts(grid)]
    if not candidates:
        raise ValueError("param_grid gives no candidate to try")
    return candidates


def _check_dicts(grid):
    for c in grid:
        if not isinstance(c, Mapping):
            raise TypeError(f"param_grid must give parameter dicts, got a {type(c).__name__}: {c!r}")
        yield c


#: Candidates in one process run one at a time: torch's forward-mode AD levels (used by jvp in the
#: Hessian-vector products) are process-global, so two meta_fit calls in threads of one process
#: interfere. Parallelism comes from processes (loky, multiprocessing, dask or ray workers).
_PROCESS_LOCK = threading.Lock()


def _fit_and_score(estimator, params, sampler, pool, one_thread, default_dtype, keep, error_score) -> dict:
    """Meta-train and score one candidate (run in a joblib worker, with the caller's default dtype:
    networks are built in it, so a worker with another one would start from other weights)."""
    with _PROCESS_LOCK:
        if one_thread:
            torch.set_num_threads(1)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default_dtype)
        try:
            return _run_candidate(estimator, params, sampler, pool, keep, error_score)
        finally:
            torch.set_default_dtype(previous)


def _run_candidate(estimator, params, sampler, pool, keep, error_score) -> dict:
    estimator.set_params(**params)
    if estimator.get_params().get("verbose") == "auto":
        estimator.set_params(verbose=0)  # candidates in parallel would draw interleaved bars
    start = time.perf_counter()
    try:
        estimator.meta_fit(sampler)
    except DivergenceError as err:
        if error_score == "raise":
            raise
        return {"fit_time": time.perf_counter() - start, "score_time": 0.0, "scores": None,
                "estimator": None, "error": str(err), "error_score": float(error_score)}
    fit_time = time.perf_counter() - start
    start = time.perf_counter()
    evaluation = estimator.evaluate(pool)
    return {"fit_time": fit_time, "score_time": time.perf_counter() - start,
            "scores": np.asarray(evaluation.scores, dtype=float), "estimator": estimator if keep else None,
            "error": None}


def _results(candidates: list[dict], out: list[dict]) -> dict:
    n = len(candidates)
    means, stds, cis = np.empty(n), np.empty(n), np.empty(n)
    for i, r in enumerate(out):
        if r["scores"] is None:
            means[i], stds[i], cis[i] = r["error_score"], np.nan, np.nan
        else:
            s = r["scores"]
            means[i], stds[i] = s.mean(), s.std()
            cis[i] = 1.96 * s.std(ddof=1) / math.sqrt(s.size) if s.size > 1 else np.nan
    results = {
        "mean_fit_time": np.array([r["fit_time"] for r in out]),
        "std_fit_time": np.zeros(n),
        "mean_score_time": np.array([r["score_time"] for r in out]),
        "std_score_time": np.zeros(n),
    }
    for name in sorted({k for c in candidates for k in c}):
        column = np.ma.MaskedArray(np.empty(n, dtype=object), mask=True)
        for i, c in enumerate(candidates):
            if name in c:
                column[i] = c[name]
        results[f"param_{name}"] = column
    results["params"] = candidates
    results["mean_test_score"] = means
    results["std_test_score"] = stds
    results["ci95_test_score"] = cis
    results["rank_test_score"] = _rank(means)
    return results


def _rank(scores: np.ndarray) -> np.ndarray:
    """1 for the highest score, ties share the lowest rank, NaN ranks after every number."""
    valid = ~np.isnan(scores)
    ranks = np.full(scores.shape, valid.sum() + 1, dtype=np.int32)
    ranks[valid] = 1 + (scores[valid][None, :] > scores[valid][:, None]).sum(axis=1)
    return ranks


# --------------------------------------------------------------------------------------------------
# Class-disjoint meta-train / validation splits


def meta_train_test_split(sampler: TaskSampler, *, test_size=0.25, random_state=None):
    """Split a task family into meta-training and meta-validation families.

    For classification families with a fixed pool of classes the split is *class-disjoint*: the
    class groups of the pool (:meth:`TaskSampler.class_groups() <fewshot.tasks.TaskSampler.class_groups>`)
    are shuffled with ``random_state`` and the two returned samplers
    (:meth:`~fewshot.tasks.TaskSampler.restrict_classes`) draw their tasks from disjoint parts of the
    pool, so validation measures adaptation to unseen classes. A group is one class unless the
    sampler says otherwise:

    * :class:`~fewshot.datasets.OmniglotTasks`: a group is a *character*, so the rotations of one
      character (``augment_rotations=True``) stay on the same side.
    * :class:`~fewshot.tasks.LabeledTasks` and image folders: the groups given by ``class_groups``.
    * :class:`~fewshot.tasks.GaussianClusterTasks`: each cluster centre.
    * Regression families (sinusoid, linear regression) have no class pool (``class_groups()`` is
      ``None``): every task is an independent draw, so both returned samplers are copies of
      ``sampler``, and the meta-training and validation tasks differ by their random streams (the
      estimator's ``random_state`` and :class:`MetaGridSearch`'s ``random_state``).

    The copies share the sampler's stored examples and default generator.

    Parameters
    ----------
    sampler : TaskSampler
    test_size : float or int, default=0.25
        A fraction of the class groups (characters for Omniglot), rounded up, or their number.
    random_state : None, int or numpy.random.RandomState
        Shuffles the classes.

    Returns
    -------
    train_sampler, test_sampler : TaskSampler

    Raises
    ------
    TypeError
        For classification samplers whose classes cannot be split.
    ValueError
        If a side would have fewer than ``n_way`` classes.
    """
    if not isinstance(sampler, TaskSampler):
        raise TypeError(f"sampler must be a fewshot.tasks.TaskSampler, got {type(sampler).__name__}")
    groups = sampler.class_groups()
    if groups is None:
        if sampler.task_type == "regression":
            return copy.copy(sampler), copy.copy(sampler)
        raise TypeError(f"cannot split the classes of {type(sampler).__name__}: it has no fixed class pool "
                        "(its class_groups() is None); a class-disjoint split needs a sampler that "
                        "implements class_groups() and restrict_classes(), as LabeledTasks does")
    unit = "classes" if all(len(g) == 1 for g in groups) else "class groups"
    n_test = _n_test(test_size, len(groups), unit)
    order = check_random_state(random_state).permutation(len(groups))
    parts = []
    for name, chosen in (("train", order[n_test:]), ("test", order[:n_test])):
        classes = np.sort([c for g in chosen for c in groups[g]])
        if classes.size < sampler.n_way:
            raise ValueError(f"the {name} part would have {classes.size} classes, fewer than "
                             f"n_way={sampler.n_way}; change test_size={test_size!r}")
        parts.append(sampler.restrict_classes(classes))
    return tuple(parts)


def _n_test(test_size, n, unit) -> int:
    if isinstance(test_size, numbers.Integral) and not isinstance(test_size, bool):
        n_test = int(test_size)
    elif isinstance(test_size, numbers.Real) and 0 < test_size < 1:
        n_test = math.ceil(test_size * n)
    else:
        raise ValueError(f"test_size must be a fraction in (0, 1) or a number of {unit}, got {test_size!r}")
    if not 1 <= n_test <= n - 1:
        raise ValueError(f"test_size={test_size!r} leaves {n_test} of the {n} {unit} for the test part; "
                         f"each part needs at least one")
    return n_test
