"""N-way K-shot episodes over a folder of images with one subfolder per class.

Layout: ``<root>/<class>/<image>``, or nested groups such as Omniglot's
``<root>/<Alphabet>/<character>/<image>``. A *class* is a leaf folder holding images; its name is its
path relative to the root with ``/`` separators (``"Alphabet/character01"``), and its parent path
(``"Alphabet"``) is its *group*, which a class-disjoint split keeps on one side.

Preprocessing (the shared decoder, also Omniglot's): Pillow's ``convert(mode)``, a resize to
``image_size`` with the ``resample`` filter, an optional inversion ``255 - value``; stored as
``uint8 [N, C, H, W]``. Tasks hold ``float32`` ``value / 255``, normalised per channel when asked.
The decoded images are cached on disk (:mod:`fewshot.datasets._cache`) under a name made from the
folder and the options, with a fingerprint of the file list (relative paths, sizes and modification
times), so a changed folder is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..tasks._labeled import SMALL_CLASSES, LabeledTasks
from ..tasks._synthetic import _check_positive_int
from . import _cache
from ._home import get_cache_home

__all__ = ["ImageFolderTasks", "image_folder_tasks", "decode_image", "decode_files"]

MODES = {"L": 1, "RGB": 3}  # mode -> channels
RESAMPLE = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp")
CLASS_GROUPS = ("parent",)
_FORMAT_VERSION = 1  # bump when the decoding or the cache layout changes
_CACHE_FOLDER = "image_folders"


# --------------------------------------------------------------------------------------------------
# Decoding: one function for every dataset of this package


def _pil_image():
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"decoding images needs Pillow, which could not be imported ({err}); install it "
                          'with `pip install "fewshot[datasets]"` or `pip install pillow`') from err
    return Image


def decode_image(im, *, mode: str, size: tuple[int, int] | None, resample: str,
                 invert: bool) -> np.ndarray:
    """A PIL image -> ``uint8 [C, H, W]``: ``im.convert(mode)``, resized to ``size = (H, W)`` (if
    given and different) with the ``resample`` filter, then ``255 - value`` if ``invert``.

    Converting first matters for 1-bit images (Omniglot's): Pillow ignores the filter for mode
    ``"1"`` and uses nearest neighbour, while an ``"L"`` image gets a real antialiased resize.
    """
    Image = _pil_image()
    im = im.convert(mode)
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), getattr(Image.Resampling, resample.upper()))
    a = np.asarray(im, dtype=np.uint8)
    if invert:
        a = 255 - a
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_files(paths: Sequence, *, mode: str, size: tuple[int, int] | None, resample: str,
                 invert: bool, names: Sequence[str] | None = None) -> np.ndarray:
    """Image files -> ``uint8 [n, C, H, W]`` through :func:`decode_image`.

    With ``size=None`` every image must already have the size of the first; errors name the files
    by ``names`` (default: the paths).
    """
    Image = _pil_image()
    names = [str(p) for p in paths] if names is None else names
    out = None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                a = decode_image(im, mode=mode, size=size, resample=resample, invert=invert)
        except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            raise OSError(f"cannot decode the image file {names[i]} ({type(err).__name__}: {err}); "
                          "remove it or leave its extension out of extensions=") from err
        if out is None:
            out = np.empty((len(paths), *a.shape), dtype=np.uint8)
        elif a.shape != out.shape[1:]:
            (h0, w0), (h1, w1) = out.shape[2:], a.shape[1:]
            raise ValueError(f"images differ in size: {names[0]} is {h0}x{w0} and {names[i]} is "
                             f"{h1}x{w1} (height x width); pass image_size=(height, width) or an int "
                             "to resize every image to one size")
        out[i] = a
    if out is None:
        out = np.empty((0, MODES[mode], *(size or (0, 0))), dtype=np.uint8)
    return out


# --------------------------------------------------------------------------------------------------
# Option checks (before any file is read)


def _check_size(image_size):
    """``image_size`` (None, an int or an ``(h, w)`` pair) -> ``(h, w)`` or None."""
    if image_size is None:
        return None
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        s = _check_positive_int("image_size", image_size)
        return (s, s)
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in image_size):
        return (int(image_size[0]), int(image_size[1]))
    raise ValueError(f"image_size must be None (keep the size), an integer >= 1 or a (height, width) pair "
                     f"of them, got {image_size!r}")


def _check_resample(resample) -> str:
    name = getattr(resample, "name", resample)  # a PIL.Image.Resampling member
    if isinstance(name, str) and name.lower() in RESAMPLE:
        return name.lower()
    raise ValueError(f"resample must be one of {list(RESAMPLE)} (or a PIL.Image.Resampling member), "
                     f"got {resample!r}")


def _check_extensions(extensions) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    try:
        exts = tuple(e.lower().lstrip(".") for e in extensions)
    except (TypeError, AttributeError):
        exts = ()
    if not exts or not all(exts):
        raise ValueError(f"extensions must be a non-empty sequence of file extensions such as ('png', "
                         f"'jpg'), got {extensions!r}")
    return tuple(dict.fromkeys(exts))


def _check_normalize(normalize, channels: int):
    """``(mean, std)``, each a number or one per channel -> two tuples of ``channels`` floats."""
    if normalize is None:
        return None
    expected = (f"normalize must be None or a (mean, std) pair, each a number or a sequence of "
                f"{channels} numbers (one per channel), with std > 0")
    if not isinstance(normalize, (tuple, list)) or len(normalize) != 2:
        raise ValueError(f"{expected}; got {normalize!r}")
    out = []
    for part in normalize:
        values = part if isinstance(part, (tuple, list, np.ndarray, Tensor)) else (part,)
        values = [v.item() if isinstance(v, (np.generic, Tensor)) else v for v in values]
        if len(values) == 1:
            values = values * channels
        if len(values) != channels or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{expected}; got {normalize!r}")
        out.append(tuple(float(v) for v in values))
    if min(out[1]) <= 0:
        raise ValueError(f"{expected}; got std {normalize[1]!r}")
    return tuple(out)


def _check_options(image_size, mode, invert, resample, normalize, extensions, class_groups, small_classes):
    size = _check_size(image_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)} (grayscale or colour), got {mode!r}")
    if not isinstance(invert, (bool, np.bool_)):
        raise ValueError(f"invert must be True or False, got {invert!r}")
    if not (class_groups is None or class_groups in CLASS_GROUPS or callable(class_groups)
            or isinstance(class_groups, Mapping)):
        raise ValueError(f"class_groups must be 'parent', None, a callable (class name -> group) or a "
                         f"mapping, got {class_groups!r}")
    if small_classes not in SMALL_CLASSES:  # LabeledTasks checks it too, after the decoding
        raise ValueError(f"small_classes must be one of {list(SMALL_CLASSES)}, got {small_classes!r}")
    return (size, bool(invert), _check_resample(resample), _check_normalize(normalize, MODES[mode]),
            _check_extensions(extensions))


# --------------------------------------------------------------------------------------------------
# Scanning the folder


def _scan(root: Path, extensions: tuple[str, ...]) -> list[tuple[str, list[os.DirEntry]]]:
    """``[(class name, image entries sorted by file name)]`` sorted by class name.

    Hidden files and folders (names starting with ``.``) are ignored; links are followed.
    """
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is a file, not a folder of class folders")
    classes = []

    def visit(folder: Path, rel: str, above: frozenset) -> bool:
        """Record the classes under ``folder``; True if it or a subfolder holds images."""
        real = os.path.realpath(folder)
        if real in above:  # a link back up the tree
            return False
        images, subfolders = [], []
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    subfolders.append(e.name)
                elif "." in e.name and e.name.rpartition(".")[2].lower() in extensions and e.is_file():
                    images.append(e)
        images.sort(key=lambda e: e.name)
        subfolders.sort()
        found = [visit(folder / s, f"{rel}/{s}" if rel else s, above | {real}) for s in subfolders]
        if images and any(found):
            sub = next(s for s, f in zip(subfolders, found) if f)
            where = f"the folder {rel!r}" if rel else "the root folder"
            raise ValueError(f"{where} of {root} holds images (e.g. {images[0].name!r}) and also folders "
                             f"of images (e.g. {sub!r}); classes are the leaf folders that hold images, so "
                             "move or remove one of them")
        if images:
            if not rel:
                raise ValueError(f"{root} holds images (e.g. {images[0].name!r}) but no class folders: put "
                                 "the images of each class in a subfolder of its own, <root>/<class>/<image>")
            classes.append((rel, images))
            return True
        if not subfolders and rel:
            raise ValueError(f"the class folder {rel!r} of {root} holds no images with the extensions "
                             f"{list(extensions)}; remove it or add images")
        return any(found)

    visit(root, "", frozenset())
    if not classes:
        raise ValueError(f"{root} has no class folders holding images with the extensions "
                         f"{list(extensions)}; expected <root>/<class>/<image> (or nested groups, "
                         "<root>/<group>/<class>/<image>)")
    return sorted(classes, key=lambda c: c[0])


def _fingerprint(classes) -> str:
    h = hashlib.sha256()
    for name, entries in classes:
        for e in entries:
            st = e.stat()
            h.update(f"{name}/{e.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _parent_group(name: str) -> str:
    """A class's group: its parent path, or the class itself when it sits at the root."""
    return name.rpartition("/")[0] or name


# --------------------------------------------------------------------------------------------------
# The sampler


class ImageFolderTasks(LabeledTasks):
    """N-way K-shot classification episodes from a folder of images, one subfolder per class.

    Layouts: ``<path>/<class>/<image>``, or nested, ``<path>/<group>/.../<class>/<image>``. A class
    is a leaf folder holding image files (by extension, case-insensitive); hidden files and
    folders are ignored. Class names are the paths of the class folders relative to ``path``, with
    ``/`` separators, sorted. A folder that holds both images and folders of images, an empty leaf
    folder, or images directly in ``path`` are errors.

    Every image is decoded once: ``PIL.Image.convert(mode)``, resized to ``image_size`` with the
    ``resample`` filter (when its size differs), inverted if ``invert`` (``255 - value``), and
    stored as ``uint8 [N, C, H, W]``. The decoded images are cached in
    ``<cache home>/image_folders/`` (see :func:`~fewshot.datasets.get_cache_home`), under a name
    made from the folder and these options; the cache also records every file's relative path,
    size and modification time, and is rebuilt when they change. Tasks hold ``float32``
    ``value / 255``, then ``(value - mean) / std`` per channel with ``normalize=(mean, std)``.

    Episodes are those of :class:`~fewshot.tasks.LabeledTasks`. ``mode="L", invert=True,
    image_size=28`` (LANCZOS) is Omniglot's preprocessing: over Omniglot's folders it gives the
    images of :class:`~fewshot.datasets.OmniglotTasks`.

    Parameters
    ----------
    path : str or path-like
        The root folder.
    n_way, k_shot, n_query : int
        Classes per task, support and query images per class.
    image_size : int, (height, width) or None, default=28
        Size after resizing; ``None`` keeps the files' size, which must then be the same for all.
    mode : {"RGB", "L"}, default="RGB"
        Colour (3 channels) or grayscale (1 channel); Pillow's ``convert`` (alpha is dropped).
    invert : bool, default=False
        Store ``255 - value`` (dark strokes on white become 1 on 0, as Omniglot's).
    resample : {"lanczos", "bicubic", "bilinear", "hamming", "box", "nearest"}, default="lanczos"
        The resize filter (a ``PIL.Image.Resampling`` member is accepted too).
    normalize : (mean, std), optional
        Per-channel normalisation after ``/ 255``: each a number or one per channel.
    extensions : sequence of str
        File extensions read as images; default ``("png", "jpg", "jpeg", "bmp", "gif", "webp")``.
    class_groups : "parent", None, callable or mapping, default="parent"
        The groups a class-disjoint split (:func:`~fewshot.model_selection.meta_train_test_split`)
        keeps on one side: ``"parent"``, a class's parent folder (a class directly in ``path`` is
        its own group); ``None``, each class on its own; or ``class name -> group``.
    small_classes : {"error", "exclude"}, default="error"
        Classes with fewer than ``k_shot + n_query`` images: raise, or leave out with a warning.
    cache_dir : str or path-like, optional
        Cache home (else ``FEWSHOT_CACHE``, ...: :func:`~fewshot.datasets.get_cache_home`).
    random_state, device
        As in :class:`~fewshot.tasks.LabeledTasks`.

    Attributes
    ----------
    root : pathlib.Path
        The folder, absolute and resolved.
    class_names : tuple of str
        Class ``c`` is ``class_names[c]`` (after ``small_classes="exclude"``).
    class_counts : tuple of int
    n_classes : int
    input_shape : tuple of int
        ``(C, H, W)``.
    image_size, mode, invert, resample, normalize, extensions
        The options, checked: ``image_size`` as given (``None``, an int or a tuple), ``resample`` a
        lower-case name, ``normalize`` ``None`` or ``(mean, std)`` with one float per channel,
        ``extensions`` lower-case without dots.
    cache_path : pathlib.Path
        The cache file.
    files : dict
        Class name -> the class's image files (paths), in the order of its examples.

    Examples
    --------
    >>> sampler = ImageFolderTasks("flowers/", n_way=5, k_shot=1, mode="RGB", image_size=84)  # doctest: +SKIP
    >>> sampler.preprocess(["new/rose.jpg", "new/tulip.jpg"]).shape                          # doctest: +SKIP
    torch.Size([2, 3, 84, 84])
    """

    def __init__(self, path, *, n_way=5, k_shot=1, n_query=15, image_size=28, mode="RGB", invert=False,
                 resample="lanczos", normalize=None, extensions=EXTENSIONS, class_groups="parent",
                 small_classes="error", cache_dir=None, random_state=None, device=None):
        for name, value, low in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1)):
            _check_positive_int(name, value, low)  # before the (slow) decoding; stored by LabeledTasks
        size, invert, resample, norm, exts = _check_options(image_size, mode, invert, resample, normalize,
                                                            extensions, class_groups, small_classes)
        self.image_size, self.mode, self.invert, self.resample = image_size, mode, invert, resample
        self.normalize, self.extensions, self._size = norm, exts, size
        self.root = Path(os.path.abspath(os.fspath(path))).resolve()

        classes = _scan(self.root, exts)
        options = {"mode": mode, "image_size": list(size) if size else None, "resample": resample,
                   "invert": invert}
        meta = {"format_version": _FORMAT_VERSION, **options, "n_files": sum(len(e) for _, e in classes),
                "files": _fingerprint(classes)}
        key = hashlib.sha256(json.dumps([str(self.root), options, exts]).encode()).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", self.root.name or "root")
        self.cache_path = Path(get_cache_home(cache_dir)) / _CACHE_FOLDER / f"{stem}-{key}.pt"
        keys = [f"{name}/{e.name}" for name, entries in classes for e in entries]

        def build():
            paths = [e.path for _, entries in classes for e in entries]
            return torch.from_numpy(decode_files(paths, mode=mode, size=size, resample=resample,
                                                 invert=invert, names=keys)), keys

        def validate(images, stored_keys):
            expected = [len(keys), MODES[mode], *(size or ("H", "W"))]
            if images.dim() != 4 or list(images.shape[:2]) != expected[:2] or (
                    size is not None and tuple(images.shape[2:]) != size):
                raise _cache.BadCache(f"holds images of shape {list(images.shape)}, expected {expected}")
            if stored_keys != keys:
                raise _cache.BadCache("holds another list of files")

        images, _ = _cache.load_or_build(self.cache_path, meta, validate, build, what="image folder",
                                         warn_stale=False, stacklevel=2)
        labels = [k.rpartition("/")[0] for k in keys]
        groups = _parent_group if class_groups == "parent" else class_groups
        super().__init__(images, labels, n_way=n_way, k_shot=k_shot, n_query=n_query, class_groups=groups,
                         small_classes=small_classes, random_state=random_state, device=device)
        self._mean, self._std = (None, None) if norm is None else (
            torch.tensor(v, dtype=torch.float32, device=self.device).view(-1, 1, 1) for v in norm)
        kept = set(self.class_names)
        self.files = {name: tuple(Path(e.path) for e in entries) for name, entries in classes if name in kept}

    def _convert(self, x: Tensor) -> Tensor:
        x = super()._convert(x)
        return x if self._mean is None else x.sub_(self._mean).div_(self._std)

    def preprocess(self, images) -> Tensor:
        """New images as the tasks hold them: ``float32 [C, H, W]`` for one image, ``[n, C, H, W]``
        for a list.

        Parameters
        ----------
        images : path, PIL image, or a list or tuple of them
            Image files (any format Pillow reads) or PIL images, decoded, resized, inverted and
            normalised with this sampler's options.

        Returns
        -------
        Tensor
            On the sampler's ``device``.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        Image = _pil_image()
        out = []
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                out.append(decode_files([item], mode=self.mode, size=self._size, resample=self.resample,
                                        invert=self.invert)[0])
            elif isinstance(item, Image.Image):
                out.append(decode_image(item, mode=self.mode, size=self._size, resample=self.resample,
                                        invert=self.invert))
            else:
                raise TypeError(f"images must be image file paths or PIL images (or a list of them), got "
                                f"{type(item).__name__}" + ("" if single else f" at position {i}"))
            if out[-1].shape != self.input_shape:
                raise ValueError(f"image {item if single else i} is {list(out[-1].shape)} after decoding, "
                                 f"the tasks hold {list(self.input_shape)}; with image_size=None new images "
                                 "must have the size of the folder's")
        x = self._convert(torch.from_numpy(np.stack(out)).to(self.device))
        return x[0] if single else x

    def _repr_args(self):
        args = {"path": str(self.root), "n_way": self.n_way, "k_shot": self.k_shot, "n_query": self.n_query,
                "image_size": self.image_size, "mode": self.mode}
        defaults = {"invert": False, "resample": "lanczos", "normalize": None, "extensions": EXTENSIONS}
        args.update({k: getattr(self, k) for k, v in defaults.items() if getattr(self, k) != v})
        return {**args, "n_classes": self.n_classes}


def image_folder_tasks(path, *, n_way: int = 5, k_shot: int = 1, n_query: int = 15, image_size=28,
                       mode: str = "RGB", invert: bool = False, resample: str = "lanczos", normalize=None,
                       extensions=EXTENSIONS, class_groups="parent", small_classes: str = "error",
                       cache_dir=None, random_state=None, device=None) -> ImageFolderTasks:
    """N-way K-shot episodes over a folder with one subfolder of images per class:
    ``ImageFolderTasks(path, n_way=..., ...)``; see :class:`ImageFolderTasks`.

    Examples
    --------
    >>> sampler = image_folder_tasks("my_images/", n_way=5, k_shot=1, n_query=5)   # doctest: +SKIP
    >>> batch = sampler.sample(16, random_state=0)
    >>> batch.support.x.shape
    torch.Size([16, 5, 3, 28, 28])
    """
    return ImageFolderTasks(path, n_way=n_way, k_shot=k_shot, n_query=n_query, image_size=image_size,
                            mode=mode, invert=invert, resample=resample, normalize=normalize,
                            extensions=extensions, class_groups=class_groups, small_classes=small_classes,
                            cache_dir=cache_dir, random_state=random_state, device=device)
