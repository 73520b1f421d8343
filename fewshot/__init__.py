"""fewshot: gradient-based meta-learning (MAML and its solvers) as scikit-learn estimators.

>>> import fewshot
>>> sampler = fewshot.tasks.SinusoidTasks(k_shot=10, n_query=10)
>>> learner = fewshot.IMAML(lam=1.0, inner_steps=10, meta_steps=3, random_state=0).meta_fit(sampler)
>>> task = sampler.sample(random_state=1)
>>> learner.adapt(task.support).predict(task.query.x).shape
torch.Size([10, 1])
"""

from . import core, exceptions, models, tasks
from .core import linalg
from .estimators import (ANIL, FOMAML, IMAML, MAML, AdaptedModel, Evaluation, FineTune, MAMLPlusPlus, MetaLearner,
                         MetaSGD, NeumannMAML, PenaltyMAML, Reptile, load_meta_params)

__version__ = "0.1.0"

#: Every estimator, by name.
SOLVERS = {cls.__name__: cls for cls in (MAML, FOMAML, Reptile, IMAML, NeumannMAML, PenaltyMAML, FineTune, ANIL,
                                         MetaSGD, MAMLPlusPlus)}

__all__ = [
    "MAML",
    "FOMAML",
    "Reptile",
    "IMAML",
    "NeumannMAML",
    "PenaltyMAML",
    "FineTune",
    "ANIL",
    "MetaSGD",
    "MAMLPlusPlus",
    "MetaLearner",
    "AdaptedModel",
    "Evaluation",
    "SOLVERS",
    "load_meta_params",
    "core",
    "exceptions",
    "linalg",
    "models",
    "tasks",
]


def __getattr__(name):
    # Optional parts are imported on first use, so `import fewshot` stays light.
    if name in ("datasets", "diagnostics", "model_selection", "compare", "plotting"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fewshot' has no attribute {name!r}")
