"""Multi-process meta-training with ``torch.distributed``: the public side.

``meta_fit`` shards meta-batches across the ranks of an initialised process group by itself
(``docs/distributed.md``); :func:`simulated_world` reproduces such a run in one process.

>>> from fewshot.distributed import simulated_world
>>> with simulated_world(4):                                                     # doctest: +SKIP
...     reference = fewshot.MAML(meta_batch_size=32, random_state=0).meta_fit(sampler)
"""

from .estimators._distributed import simulated_world

__all__ = ["simulated_world"]
