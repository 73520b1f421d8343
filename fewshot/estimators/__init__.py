"""The estimators: each solver as a scikit-learn-style meta-learner on :mod:`fewshot.core`.

``_base`` holds the meta-training loop; ``_params`` the shared parameters; ``_setup`` the
network, loss, inner problem and rule; ``_executor`` how a meta-step runs its tasks; ``_guards``,
``_checkpoint``, ``_distributed``, ``_progress`` and ``_adapted`` the loop's other pieces; one
module per family of solvers.
"""

from ._adapted import AdaptedModel, Evaluation
from ._anil import ANIL
from ._base import MetaLearner
from ._export import load_meta_params
from ._finetune import FineTune
from ._mamlpp import MAMLPlusPlus
from ._metasgd import MetaSGD
from ._params import COMMON_PARAMS, estimator_init
from ._solvers import FOMAML, IMAML, MAML, NeumannMAML, PenaltyMAML, Reptile

__all__ = ["MetaLearner", "AdaptedModel", "Evaluation", "MAML", "FOMAML", "Reptile", "IMAML", "NeumannMAML",
           "PenaltyMAML", "FineTune", "ANIL", "MetaSGD", "MAMLPlusPlus", "COMMON_PARAMS", "estimator_init",
           "load_meta_params"]
