"""The preprocessed-image cache shared by the datasets: one ``torch.save`` file a configuration.

A cache file holds ``{"meta", "keys", "images", "checksum"}``: the settings that made it (``meta``,
a plain dict compared for equality on every load), one string key per image or image group
(``keys``), a ``uint8`` tensor (``images``) and a CRC-32 of the image bytes and the keys
(``checksum``). It is written to a temporary file in the same folder and moved into place with
``os.replace``, so a reader never sees half a file, and read with ``torch.load(weights_only=True)``.

A file that cannot be read, was made with other settings, holds the wrong shapes or fails its
checksum is never used: :func:`load_or_build` warns (``RuntimeWarning``, "... rebuilding it") and
builds it again. A cache directory that cannot be written only costs a warning: the images are
decoded again next time.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .._files import atomic_write

__all__ = ["BadCache", "StaleCache", "checksum", "read_cache", "write_cache", "load_or_build"]

_FIELDS = {"meta", "keys", "images", "checksum"}

#: ``validate(images, keys)`` raises :class:`BadCache` when the stored arrays are not what the
#: caller expects (dtype, shape, names).
Validator = Callable[[Tensor, list], None]


class BadCache(Exception):
    """A cache file that must not be used; the message completes "the cache <path> ..."."""


class StaleCache(BadCache):
    """A readable cache made with other settings (``meta``) than those asked for."""


def checksum(images: Tensor, keys: list[str]) -> int:
    """CRC-32 of the bytes of ``images`` followed by the keys joined with newlines."""
    crc = zlib.crc32(images.contiguous().numpy())
    return zlib.crc32("\n".join(keys).encode(), crc)


def read_cache(path: Path, meta: dict, validate: Validator) -> tuple[Tensor, list[str]]:
    """``(images, keys)`` of the cache at ``path``; :class:`BadCache` if it is unusable.

    ``meta`` must equal the stored settings exactly; ``validate`` checks the arrays before the
    checksum is computed.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file raises RuntimeError, EOFError, UnpicklingError, ...
        raise BadCache(f"cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or set(payload) != _FIELDS:
        raise BadCache("does not hold a fewshot image cache")
    if payload["meta"] != meta:
        raise StaleCache(f"was made with other settings: {payload['meta']} instead of {meta}")
    images, keys = payload["images"], payload["keys"]
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise BadCache("does not hold a uint8 image tensor")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise BadCache("does not hold a list of names")
    validate(images, keys)
    if checksum(images, keys) != payload["checksum"]:
        raise BadCache("fails its checksum")
    return images, keys


def write_cache(path: Path, images: Tensor, keys: list[str], meta: dict, *, what: str,
                stacklevel: int = 2) -> None:
    """Write the cache atomically: a temporary file in the same folder, then ``os.replace``.

    A folder that cannot be written gives a ``RuntimeWarning`` naming ``what`` and nothing else.
    """
    payload = {"meta": meta, "keys": list(keys), "images": images, "checksum": checksum(images, keys)}
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as err:
        warnings.warn(f"could not write the {what} cache {path} ({err}); the images will be decoded "
                      "again next time. Pass cache_dir= or set FEWSHOT_CACHE to a writable directory.",
                      RuntimeWarning, stacklevel=stacklevel + 1)


def load_or_build(path: Path, meta: dict, validate: Validator,
                  build: Callable[[], tuple[Tensor, list[str]]], *, what: str, warn_stale: bool = True,
                  stacklevel: int = 2) -> tuple[Tensor, list[str]]:
    """Read the cache at ``path``, else ``build()`` the images and keys and write them there.

    An unusable cache gives a ``RuntimeWarning`` ("the <what> cache <path> <reason>; rebuilding
    it") before it is rebuilt and overwritten; with ``warn_stale=False`` a cache made with other
    settings is rebuilt silently (for caches whose settings record source files that may change).
    ``stacklevel`` is that of the caller's caller, so warnings point at user code.
    """
    if path.exists():
        try:
            return read_cache(path, meta, validate)
        except BadCache as err:
            if warn_stale or not isinstance(err, StaleCache):
                warnings.warn(f"the {what} cache {path} {err}; rebuilding it", RuntimeWarning,
                              stacklevel=stacklevel + 1)
    images, keys = build()
    write_cache(path, images, keys, meta, what=what, stacklevel=stacklevel + 1)
    return images, keys
