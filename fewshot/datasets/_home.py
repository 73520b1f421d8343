"""Where datasets live (the data home) and where derived files go (the cache home).

The rule follows scikit-learn's ``SCIKIT_LEARN_DATA``:

* data home: the ``data_home`` argument, else the environment variable ``FEWSHOT_DATA``, else
  ``~/fewshot_data``.
* cache home (extracted archives, preprocessed tensors): the ``cache_dir`` argument, else the
  environment variable ``FEWSHOT_CACHE``, else the data home if it is writable, else
  ``~/fewshot_data``.

A directory counts as writable when the process may write to it *and* its permission bits allow
writing to someone; so a directory marked read-only (``r-xr-xr-x``) is left alone even by root, who
could write to it anyway.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["get_data_home", "get_cache_home"]

DATA_ENV = "FEWSHOT_DATA"
CACHE_ENV = "FEWSHOT_CACHE"
DEFAULT_HOME = os.path.join("~", "fewshot_data")


def _as_dir(path) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def get_data_home(data_home: str | os.PathLike | None = None) -> str:
    """Return the directory where fewshot looks for datasets.

    Parameters
    ----------
    data_home : str or path-like, optional
        Explicit directory. When ``None``, the environment variable ``FEWSHOT_DATA`` is used if it is
        set and non-empty, else ``~/fewshot_data``.

    Returns
    -------
    str
        Absolute path, with ``~`` expanded. The directory is not created.
    """
    if data_home is None:
        data_home = os.environ.get(DATA_ENV) or DEFAULT_HOME
    return _as_dir(data_home)


def get_cache_home(cache_dir: str | os.PathLike | None = None,
                   data_home: str | os.PathLike | None = None) -> str:
    """Return the writable directory for extracted archives and preprocessed caches.

    Parameters
    ----------
    cache_dir : str or path-like, optional
        Explicit directory; wins over everything else.
    data_home : str or path-like, optional
        As in :func:`get_data_home`.

    Returns
    -------
    str
        ``cache_dir`` if given, else ``FEWSHOT_CACHE`` if set and non-empty, else the data home if it
        is writable (or can be created), else ``~/fewshot_data``. The directory is not created.
    """
    if cache_dir is not None:
        return _as_dir(cache_dir)
    if os.environ.get(CACHE_ENV):
        return _as_dir(os.environ[CACHE_ENV])
    home = get_data_home(data_home)
    if is_writable(home):
        return home
    return _as_dir(DEFAULT_HOME)


def is_writable(path) -> bool:
    """True if ``path`` is a writable directory, or does not exist and could be created.

    Permission bits are honoured even for root: a directory without any write bit is read-only.
    """
    p = Path(_as_dir(path))
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    if not p.is_dir():
        return False
    mode = p.stat().st_mode
    return os.access(p, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
