"""Real datasets: Omniglot few-shot classification.

Importing this package is light: PIL is imported only to preprocess, torchvision only to download.
"""

from ._home import get_cache_home, get_data_home
from ._omniglot import OmniglotData, OmniglotTasks, load_omniglot, omniglot_tasks

__all__ = [
    "get_data_home",
    "get_cache_home",
    "load_omniglot",
    "omniglot_tasks",
    "OmniglotTasks",
    "OmniglotData",
]
