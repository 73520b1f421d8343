"""Real datasets: Omniglot few-shot classification, and episodes over your own image folders.

Importing this package is light: PIL is imported only to preprocess, torchvision only to download.
"""

from ._folder import ImageFolderTasks, image_folder_tasks
from ._home import get_cache_home, get_data_home
from ._idx import read_idx
from ._omniglot import OmniglotData, OmniglotTasks, load_omniglot, omniglot_tasks

__all__ = [
    "get_data_home",
    "get_cache_home",
    "load_omniglot",
    "omniglot_tasks",
    "OmniglotTasks",
    "OmniglotData",
    "image_folder_tasks",
    "ImageFolderTasks",
    "read_idx",
]
