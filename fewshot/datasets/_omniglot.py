"""Omniglot few-shot classification: finding the files, a preprocessed cache, splits, episodes.

Data (Lake, Salakhutdinov and Tenenbaum, 2015): 1,623 handwritten characters from 50 alphabets, 20
drawings of each, as 105x105 PNGs in torchvision's layout
``<data_home>/omniglot-py/images_{background,evaluation}/<Alphabet>/<characterNN>/<id>_<drawer>.png``.

Preprocessing (done once, then cached): each PNG is converted to 8-bit grayscale, resized to
``image_size`` x ``image_size`` with PIL's LANCZOS filter and inverted, so strokes are 1 and the
background is 0 (as MAML's ``1 - image``): the image-folder decoder (``_folder.decode_files``) with
``mode="L", invert=True``. Images are stored as ``uint8`` in the shared cache format
(``_cache``) and returned as ``float32`` in ``[0, 1]`` (``value / 255``). Episodes are those of
:class:`~fewshot.tasks.LabeledTasks` over the subset's drawings.

See ``docs/datasets.md`` for the data-home rule, the splits and their seeds, and the cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..tasks._labeled import LabeledTasks
from ..tasks._synthetic import _check_positive_int
from ._cache import BadCache, load_or_build
from ._folder import decode_files
from ._home import get_cache_home, get_data_home, is_writable

__all__ = ["OmniglotData", "OmniglotTasks", "load_omniglot", "omniglot_tasks"]

SPLITS = ("vinyals", "lake")
SUBSETS = ("train", "val", "test")
#: Seed of the fixed character permutation ("vinyals") and of the held-out alphabets ("lake"),
#: used with ``numpy.random.RandomState`` whose stream numpy keeps stable across versions.
SPLIT_SEED = 0
VINYALS_SIZES = {"train": 1028, "val": 172, "test": 423}
LAKE_N_VAL_ALPHABETS = 5
IMAGES_PER_CHARACTER = 20
ROTATIONS = (0, 90, 180, 270)

_SETS = ("images_background", "images_evaluation")
# (alphabets, characters) of each set; every character has IMAGES_PER_CHARACTER drawings.
_EXPECTED = {"images_background": (30, 964), "images_evaluation": (20, 659)}
_FOLDER = "omniglot-py"  # torchvision's folder name
_ALT_FOLDER = "omniglot"  # where a copy that keeps only the two zips has them (<data_home>/omniglot/)
_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
_MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
_FORMAT_VERSION = 1  # bump when the preprocessing or the cache layout changes


# --------------------------------------------------------------------------------------------------
# Option checks


def _check_options(split, subset, image_size, augment_rotations):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    image_size = _check_positive_int("image_size", image_size)
    if augment_rotations is None:
        augment_rotations = split == "vinyals"
    elif not isinstance(augment_rotations, (bool, np.bool_)):
        raise ValueError(f"augment_rotations must be None, True or False, got {augment_rotations!r}")
    return image_size, bool(augment_rotations)


# --------------------------------------------------------------------------------------------------
# Raw files: find the extracted folders, else extract the zips, else download


def _candidates(data_home: Path, cache_home: Path, name: str, suffix: str) -> list[Path]:
    paths = [data_home / _FOLDER / (name + suffix), data_home / _ALT_FOLDER / (name + suffix),
             cache_home / _FOLDER / (name + suffix)]
    return list(dict.fromkeys(paths))  # cache_home may be data_home


def _locate_sets(data_home: Path, cache_home: Path, download: bool) -> dict[str, Path]:
    """Return the extracted folder of each set, extracting or downloading it if needed."""
    raw_dir = (data_home if is_writable(data_home) else cache_home) / _FOLDER
    found, missing = {}, []
    for name in _SETS:
        folder = next((p for p in _candidates(data_home, cache_home, name, "") if p.is_dir()), None)
        if folder is None:
            archive = next((p for p in _candidates(data_home, cache_home, name, ".zip") if p.is_file()),
                           None)
            if archive is not None:
                folder = _extract(archive, raw_dir, name)
            elif download:
                folder = _download(name, raw_dir)
        if folder is None:
            missing.append(name)
        else:
            found[name] = folder
    if missing:
        raise FileNotFoundError(_missing_message(missing, data_home, cache_home, raw_dir))
    return found


def _missing_message(missing, data_home, cache_home, raw_dir) -> str:
    lines = [f"Omniglot data not found: missing {', '.join(n + '.zip' for n in missing)} "
             f"(or their extracted folders). Looked for:"]
    for name in missing:
        for suffix in ("", ".zip"):
            lines += [f"  {p}{os.sep if not suffix else ''}"
                      for p in _candidates(data_home, cache_home, name, suffix)]
    lines += [
        f"The data home is {data_home} (argument data_home, else $FEWSHOT_DATA, else ~/fewshot_data); "
        f"the cache home is {cache_home} (argument cache_dir, else $FEWSHOT_CACHE, else the data home "
        "if writable, else ~/fewshot_data), which has no usable preprocessed cache either.",
        "To get the files: pass download=True (needs internet and torchvision), or download",
        *[f"  {_URL.format(n)}" for n in missing],
        f"into {raw_dir}{os.sep} (extracting is done for you).",
    ]
    return "\n".join(lines)


def _extract(archive: Path, raw_dir: Path, name: str) -> Path:
    """Extract the ``name/`` folder of ``archive`` into ``raw_dir`` atomically (tmp dir + rename)."""
    dest = raw_dir / name
    raw_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=raw_dir))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.namelist() if m.startswith(name + "/")]
                if not members:
                    raise OSError(f"{archive} has no {name}/ folder inside")
                zf.extractall(tmp, members)
        except zipfile.BadZipFile as err:
            raise OSError(f"{archive} is not a readable zip file ({err}); delete it and get it "
                          "again") from err
        try:
            os.replace(tmp / name, dest)
        except OSError:
            if not dest.is_dir():  # else another process extracted it meanwhile
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download(name: str, raw_dir: Path) -> Path:
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError as err:
        raise ImportError(
            f"download=True needs torchvision, which could not be imported ({err}). Install it, or "
            f"download {_URL.format(name)} into {raw_dir}{os.sep} yourself."
        ) from err
    raw_dir.mkdir(parents=True, exist_ok=True)
    download_and_extract_archive(_URL.format(name), download_root=str(raw_dir), filename=name + ".zip",
                                 md5=_MD5[name])
    return raw_dir / name


def _list_set(folder: Path, name: str) -> list[tuple[str, list[Path]]]:
    """``[(key, png paths)]`` sorted by (alphabet, character, file), after checking the counts."""
    characters = []
    for alphabet in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        for char in sorted(d.name for d in (folder / alphabet).iterdir() if d.is_dir()):
            pngs = sorted(p for p in (folder / alphabet / char).iterdir() if p.suffix == ".png")
            characters.append((f"{name}/{alphabet}/{char}", pngs))
    n_alpha, n_char = _EXPECTED[name]
    found_alpha = len({k.split("/")[1] for k, _ in characters})
    bad = [(k, len(p)) for k, p in characters if len(p) != IMAGES_PER_CHARACTER]
    if found_alpha != n_alpha or len(characters) != n_char or bad:
        detail = f"; e.g. {bad[0][0]} has {bad[0][1]} images" if bad else ""
        raise RuntimeError(
            f"{folder} does not hold the expected Omniglot {name}: expected {n_alpha} alphabets, "
            f"{n_char} characters, {n_char * IMAGES_PER_CHARACTER} images ({IMAGES_PER_CHARACTER} per "
            f"character); found {found_alpha} alphabets, {len(characters)} characters, "
            f"{sum(len(p) for _, p in characters)} images{detail}. Delete the folder to have it "
            "extracted again from the zip."
        )
    return characters


def _decode(paths, image_size: int) -> np.ndarray:
    """PNG files -> ``uint8 [n, S, S]``: the image-folder decoder with Omniglot's options (8-bit
    grayscale, LANCZOS resize, inverted so strokes are 255)."""
    size = (image_size, image_size)
    return decode_files(paths, mode="L", size=size, resample="lanczos", invert=True)[:, 0]


# --------------------------------------------------------------------------------------------------
# The preprocessed cache: one file per image size, validated on every load (fewshot.datasets._cache)


def _cache_path(cache_home: Path, image_size: int) -> Path:
    return cache_home / _FOLDER / f"omniglot_{image_size}px_lanczos_v{_FORMAT_VERSION}.pt"


def _expected_meta(image_size: int) -> dict:
    return {"format_version": _FORMAT_VERSION, "image_size": image_size, "resample": "lanczos",
            "strokes": "one", "images_per_character": IMAGES_PER_CHARACTER,
            "sets": {name: list(_EXPECTED[name]) for name in _SETS}}


def _validator(image_size: int):
    n = sum(c for _, c in _EXPECTED.values())
    shape = (n, IMAGES_PER_CHARACTER, image_size, image_size)

    def validate(images: Tensor, keys: list) -> None:
        if tuple(images.shape) != shape:
            raise BadCache(f"holds images of the wrong shape {list(images.shape)} (expected uint8 {shape})")
        if len(keys) != n:
            raise BadCache(f"holds a wrong list of character names ({len(keys)}, expected {n})")

    return validate


def _load_characters(image_size: int, data_home, cache_dir, download) -> tuple[Tensor, list[str]]:
    """All 1,623 characters: ``uint8 [1623, 20, S, S]`` and keys ``"<set>/<Alphabet>/<characterNN>"``
    sorted by (set, alphabet, character). Reads the cache, else builds and writes it."""
    data_home = Path(get_data_home(data_home))
    cache_home = Path(get_cache_home(cache_dir, data_home))

    def build():
        folders = _locate_sets(data_home, cache_home, bool(download))
        characters = [c for name in _SETS for c in _list_set(folders[name], name)]
        keys = [k for k, _ in characters]
        pngs = [p for _, paths in characters for p in paths]
        images = torch.from_numpy(_decode(pngs, image_size)).view(
            len(keys), IMAGES_PER_CHARACTER, image_size, image_size)
        return images, keys

    return load_or_build(_cache_path(cache_home, image_size), _expected_meta(image_size),
                         _validator(image_size), build, what="Omniglot", stacklevel=3)


# --------------------------------------------------------------------------------------------------
# Splits


def _split_indices(keys: list[str], split: str, subset: str) -> np.ndarray:
    """Indices (ascending) into ``keys`` of the characters of ``subset``."""
    parts = [k.split("/") for k in keys]
    if split == "vinyals":
        n = sum(VINYALS_SIZES.values())
        if len(keys) != n:
            raise RuntimeError(f"the 'vinyals' split needs all {n} Omniglot characters, got {len(keys)}")
        order = sorted(range(n), key=lambda i: parts[i])  # (set, alphabet, character)
        perm = np.asarray(order)[np.random.RandomState(SPLIT_SEED).permutation(n)]
        start = {"train": 0, "val": VINYALS_SIZES["train"],
                 "test": VINYALS_SIZES["train"] + VINYALS_SIZES["val"]}[subset]
        return np.sort(perm[start:start + VINYALS_SIZES[subset]])
    if subset == "test":
        return np.array([i for i, p in enumerate(parts) if p[0] == "images_evaluation"], dtype=np.int64)
    held_out = lake_val_alphabets(keys)
    want_val = subset == "val"
    return np.array([i for i, p in enumerate(parts)
                     if p[0] == "images_background" and (p[1] in held_out) == want_val], dtype=np.int64)


def lake_val_alphabets(keys) -> tuple[str, ...]:
    """The background alphabets held out for meta-validation in the "lake" split (sorted)."""
    alphabets = sorted({k.split("/")[1] for k in keys if k.startswith("images_background/")})
    pick = np.random.RandomState(SPLIT_SEED).permutation(len(alphabets))[:LAKE_N_VAL_ALPHABETS]
    return tuple(sorted(alphabets[i] for i in pick))


def _load_classes(split, subset, image_size, augment_rotations, data_home, cache_dir, download):
    """``uint8 [n_classes, 20, S, S]``, class names and character of each class, for one subset.

    With rotations, class ``4 * i + r`` is character ``i`` of the subset rotated by ``90 * r``
    degrees counter-clockwise (``torch.rot90(image, r)``).
    """
    images, keys = _load_characters(image_size, data_home, cache_dir, download)
    idx = _split_indices(keys, split, subset)
    base = images[torch.from_numpy(idx)]
    chars = [keys[i].split("/", 1)[1] for i in idx]  # "<Alphabet>/<characterNN>"
    if not augment_rotations:
        return base, chars, chars
    rotated = torch.stack([torch.rot90(base, r, dims=(-2, -1)) for r in range(4)], dim=1)
    images = rotated.reshape(len(idx) * 4, IMAGES_PER_CHARACTER, image_size, image_size)
    names = [f"{c}/rot{deg:03d}" for c in chars for deg in ROTATIONS]
    return images, names, [c for c in chars for _ in ROTATIONS]


def _to_float(images: Tensor) -> Tensor:
    return images.to(torch.float32).div_(255)


# --------------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True, repr=False)
class OmniglotData:
    """Class-indexed Omniglot images of one subset of one split.

    Attributes
    ----------
    images : Tensor
        ``float32 [n_classes, 20, 1, S, S]`` in ``[0, 1]``, strokes 1 and background 0.
    class_names : tuple of str
        ``"<Alphabet>/<characterNN>"``, with ``"/rot000"`` ... ``"/rot270"`` appended when rotations
        are classes of their own.
    characters : tuple of str
        The underlying character ``"<Alphabet>/<characterNN>"`` of each class (rotations of one
        character share it). Alphabet names are unique across the background and evaluation sets.
    split, subset : str
    """

    images: Tensor
    class_names: tuple
    characters: tuple
    split: str
    subset: str

    @property
    def n_classes(self) -> int:
        return self.images.shape[0]

    def __len__(self) -> int:
        return self.n_classes

    def __repr__(self) -> str:
        return (f"OmniglotData(split={self.split!r}, subset={self.subset!r}, n_classes={self.n_classes}, "
                f"images={tuple(self.images.shape)})")


def load_omniglot(split: str = "vinyals", subset: str = "train", *, data_home=None, cache_dir=None,
                  download: bool = False, image_size: int = 28,
                  augment_rotations: bool | None = None) -> OmniglotData:
    """Load the class-indexed images of one subset of an Omniglot split.

    Parameters
    ----------
    split : {"vinyals", "lake"}
        ``"vinyals"``: all 1,623 characters split 1,028 / 172 / 423 into train / val / test by a fixed
        permutation (seed ``SPLIT_SEED = 0``). ``"lake"``: the background set (30 alphabets) for
        train minus 5 held-out alphabets for val; the evaluation set (20 new alphabets) for test.
    subset : {"train", "val", "test"}
    data_home : str or path-like, optional
        Where the data is (see :func:`get_data_home`).
    cache_dir : str or path-like, optional
        Where extracted files and the preprocessed cache go (see :func:`get_cache_home`).
    download : bool
        Fetch the zips with torchvision's downloader if they are not found (needs internet).
    image_size : int
        Side of the square images after the LANCZOS resize (28 in MAML).
    augment_rotations : bool or None
        Add rotations by 90, 180 and 270 degrees as new classes. ``None`` means True for
        ``"vinyals"`` and False for ``"lake"``.

    Returns
    -------
    OmniglotData

    Raises
    ------
    FileNotFoundError
        If neither the preprocessed cache, the extracted folders nor the zips are found (and
        ``download`` is False); the message lists the paths looked at.

    Examples
    --------
    >>> data = load_omniglot("vinyals", "val")                         # doctest: +SKIP
    >>> data.images.shape
    torch.Size([688, 20, 1, 28, 28])
    """
    image_size, augment_rotations = _check_options(split, subset, image_size, augment_rotations)
    images, names, chars = _load_classes(split, subset, image_size, augment_rotations, data_home,
                                         cache_dir, download)
    return OmniglotData(_to_float(images).unsqueeze(2), tuple(names), tuple(chars), split, subset)


class OmniglotTasks(LabeledTasks):
    """N-way K-shot classification episodes from Omniglot.

    Each task draws ``n_way`` classes of the subset without replacement, gives them labels
    ``0..n_way-1`` in random order, and draws ``k_shot + n_query`` distinct drawings of each class:
    the first ``k_shot`` go to the support set, the rest to the query set (so they never overlap).
    Support and query are ordered by label (``y = [0]*K + [1]*K + ...``). ``x`` is
    ``float32 [n, 1, S, S]`` in ``[0, 1]`` (strokes 1), ``y`` is ``int64``.

    This is :class:`~fewshot.tasks.LabeledTasks` over the subset's drawings (its episodes and
    pre-training batches), with the rotations precomputed as classes of their own: a whole
    meta-batch is drawn with a few tensor operations (random keys + ``topk`` for classes,
    ``argsort`` for drawings, one gather) from images kept as ``uint8``. A class-disjoint split
    (:func:`~fewshot.model_selection.meta_train_test_split`) keeps the rotations of a character
    together: the class groups are the characters.

    Parameters
    ----------
    n_way, k_shot, n_query : int
        Classes per task, support and query drawings per class (``k_shot + n_query <= 20``).
    split, subset, data_home, cache_dir, download, image_size, augment_rotations
        As in :func:`load_omniglot`.
    random_state : None, int, numpy or torch generator
        Default source of randomness for :meth:`sample` and :meth:`sample_pretraining` calls that
        get none. It is turned into one generator here, so successive calls give new tasks and two
        samplers built with the same seed give the same sequence. ``None`` leaves the calls to
        ``check_generator(None)`` (fresh entropy each call).
    device : torch device, optional
        Where the images are kept and the tasks are made.

    Attributes
    ----------
    n_classes : int
        Classes in the subset (``n_pretrain_outputs`` too).
    class_names, characters : tuple of str
        See :class:`OmniglotData`.

    Notes
    -----
    A fixed evaluation pool is ``sampler.sample(600, random_state=seed)``: the same seed and sizes
    give the same tasks, so every solver can be scored on them. It costs
    ``600 * n_way * (k_shot + n_query) * S * S * 4`` bytes (150 MB for 5-way 1-shot 15-query);
    for a smaller footprint draw it in chunks from one generator,
    ``g = torch.Generator().manual_seed(seed)`` then ``sampler.sample(50, random_state=g)`` 12 times
    (a different but equally fixed pool).
    """

    def __init__(self, n_way=5, k_shot=1, n_query=15, *, split="vinyals", subset="train",
                 data_home=None, cache_dir=None, download=False, random_state=None, image_size=28,
                 augment_rotations=None, device=None):
        n_way = _check_positive_int("n_way", n_way, 2)
        k_shot = _check_positive_int("k_shot", k_shot)
        n_query = _check_positive_int("n_query", n_query)
        if k_shot + n_query > IMAGES_PER_CHARACTER:
            raise ValueError(
                f"k_shot + n_query = {k_shot} + {n_query} = {k_shot + n_query} is larger than the "
                f"{IMAGES_PER_CHARACTER} drawings of each Omniglot character (support and query "
                "drawings are distinct)"
            )
        self.image_size, self.augment_rotations = _check_options(split, subset, image_size,
                                                                 augment_rotations)
        self.split, self.subset = split, subset
        images, names, chars = _load_classes(split, subset, self.image_size, self.augment_rotations,
                                             data_home, cache_dir, download)
        n_classes = images.shape[0]
        if n_way > n_classes:
            raise ValueError(
                f"n_way={n_way} is larger than the {n_classes} classes of Omniglot "
                f"split={split!r}, subset={subset!r} (augment_rotations={self.augment_rotations})"
            )
        # Row c * 20 + e is drawing e of class c; the labels are the class indices, so the pool's
        # class order is the subset's and class_names can be the strings.
        super().__init__(images.reshape(-1, 1, self.image_size, self.image_size),
                         torch.arange(n_classes).repeat_interleave(IMAGES_PER_CHARACTER), n_way=n_way,
                         k_shot=k_shot, n_query=n_query, class_groups=dict(enumerate(chars)),
                         random_state=random_state, device=device)
        self.class_names = tuple(names)

    @property
    def characters(self) -> tuple:
        """The character ``"<Alphabet>/<characterNN>"`` of each class."""
        if not self.augment_rotations:
            return self.class_names
        return tuple(name.rpartition("/")[0] for name in self.class_names)

    def _repr_args(self):
        return {"n_way": self.n_way, "k_shot": self.k_shot, "n_query": self.n_query, "split": self.split,
                "subset": self.subset, "image_size": self.image_size,
                "augment_rotations": self.augment_rotations}


def omniglot_tasks(n_way: int = 5, k_shot: int = 1, n_query: int = 15, split: str = "vinyals",
                   subset: str = "train", data_home=None, download: bool = False, random_state=None,
                   image_size: int = 28, device=None, *, cache_dir=None,
                   augment_rotations: bool | None = None) -> OmniglotTasks:
    """Omniglot N-way K-shot episodes: ``OmniglotTasks(n_way, k_shot, n_query, split=..., ...)``.

    See :class:`OmniglotTasks` for the parameters and :func:`load_omniglot` for the splits.

    Examples
    --------
    >>> sampler = omniglot_tasks(5, 1, 15, split="vinyals", subset="train")   # doctest: +SKIP
    >>> batch = sampler.sample(16, random_state=0)
    >>> batch.support.x.shape, batch.query.x.shape
    (torch.Size([16, 5, 1, 28, 28]), torch.Size([16, 75, 1, 28, 28]))
    """
    return OmniglotTasks(n_way, k_shot, n_query, split=split, subset=subset, data_home=data_home,
                         cache_dir=cache_dir, download=download, random_state=random_state,
                         image_size=image_size, augment_rotations=augment_rotations, device=device)
