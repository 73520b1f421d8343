"""Every solver, with its defaults, trains every offline task family for its full default budget.

Slow (minutes per solver): run with ``python -m pytest -m slow``. Each case meta-trains from
``random_state=0`` for the default ``meta_steps`` and must finish without a ``DivergenceError`` or a
``SolverWarning`` (defaults must not warn in normal use), and end better adapted than it started:
its score after adaptation on 200 held-out tasks beats the same estimator's before meta-training.
"""

import warnings

import pytest

import fewshot
from fewshot.exceptions import SolverWarning
from fewshot.tasks import GaussianClusterTasks, LinearRegressionTasks, SinusoidTasks

FAMILIES = {
    "sinusoid": lambda: SinusoidTasks(k_shot=10, n_query=10),
    "sinusoid-5shot": lambda: SinusoidTasks(k_shot=5, n_query=5),
    "linear": LinearRegressionTasks,
    "clusters": GaussianClusterTasks,
}
#: Settings the README shows, run as written (with the budget they state).
README = [("IMAML", "sinusoid", dict(lam=1.0, inner_steps=10))]

CASES = [(name, family, {}) for name in fewshot.SOLVERS for family in FAMILIES] + README
#: Pre-training on LinearRegressionTasks' pooled examples has nothing to learn: the task weights
#: have mean w_mean=0, so E[y | x] = 0 and the body only loses the random features' information.
NOTHING_TO_PRETRAIN = {("FineTune", "linear")}
CASES = [pytest.param(*case, marks=pytest.mark.xfail(strict=True, reason="E[y | x] = 0 when pooled"))
         if case[:2] in NOTHING_TO_PRETRAIN else case for case in CASES]


def _score(estimator, sampler):
    return estimator.evaluate(sampler, n_tasks=200, random_state=123).mean


@pytest.mark.slow
@pytest.mark.parametrize("name, family, params", CASES,
                         ids=[f"{n}-{f}{'-readme' if p else ''}" for n, f, p in
                              (c.values if hasattr(c, "values") else c for c in CASES)])
def test_defaults_train_full_budget(name, family, params):
    sampler = FAMILIES[family]()
    cls = fewshot.SOLVERS[name]
    untrained = cls(**params, meta_steps=0, random_state=0, verbose=0).meta_fit(sampler)
    estimator = cls(**params, random_state=0, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        estimator.meta_fit(sampler)  # a DivergenceError or SolverWarning fails the test
    assert estimator.n_iter_ == cls().meta_steps
    before, after = _score(untrained, sampler), _score(estimator, sampler)
    assert after > before, f"{name} on {family}: score {after:.4f} after meta-training, {before:.4f} before"
