"""Omniglot: finding/extracting the files, the cache, the splits and episode sampling.

Two kinds of tests:

* ``tiny_*`` tests build a small Omniglot-layout tree of PNGs (3 background + 2 evaluation
  characters) in a temporary directory, so extraction, caching and error paths run fast without
  the real data. They lower the expected counts, which the loader checks, by patching the private
  ``_omniglot._EXPECTED``.
* Tests using the ``omniglot`` fixture need the real data through ``FEWSHOT_DATA`` (and write the
  cache to ``FEWSHOT_CACHE`` or the fallback). They fail when ``FEWSHOT_DATA`` is set but the data
  cannot be loaded, and are skipped when it is not set and the default data home has no Omniglot.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fewshot.datasets import (
    OmniglotData,
    OmniglotTasks,
    get_cache_home,
    get_data_home,
    image_folder_tasks,
    load_omniglot,
    omniglot_tasks,
)
from fewshot.datasets import _omniglot
from fewshot.model_selection import meta_train_test_split
from fewshot.tasks import LabeledSet, LabeledTasks, TaskBatch

SETS = ("images_background", "images_evaluation")
CACHE_NAME = "omniglot_28px_lanczos_v1.pt"


# --------------------------------------------------------------------------------------------------
# Fixtures: a tiny synthetic tree, and the real data


TINY = {"images_background": {"Alpha": 2, "Beta": 1}, "images_evaluation": {"Gamma": 2}}
TINY_EXPECTED = {name: (len(alphabets), sum(alphabets.values())) for name, alphabets in TINY.items()}


def _draw_png(path, seed):
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    im = Image.new("1", (105, 105), 1)  # Omniglot: 1-bit, white background, black strokes
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        draw.line([tuple(int(v) for v in rng.randint(5, 100, 2)) for _ in range(3)], fill=0, width=4)
    im.save(path)


@pytest.fixture(scope="session")
def tiny_zips(tmp_path_factory):
    """``images_background.zip`` and ``images_evaluation.zip`` of a tiny tree (20 PNGs a character)."""
    root = tmp_path_factory.mktemp("tiny_src")
    seed = 0
    for name, alphabets in TINY.items():
        for alphabet, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                folder = root / name / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(1, 21):
                    _draw_png(folder / f"{seed:04d}_{d:02d}.png", seed * 100 + d)
                seed += 1
    zips = root / "zips"
    zips.mkdir()
    for name in SETS:
        with zipfile.ZipFile(zips / f"{name}.zip", "w") as zf:
            for path in sorted((root / name).rglob("*")):
                zf.write(path, path.relative_to(root).as_posix() + ("/" if path.is_dir() else ""))
    return zips


@pytest.fixture
def tiny(tiny_zips, monkeypatch, tmp_path):
    """Expected counts of the tiny tree, clean environment; returns a helper to lay out a home."""
    monkeypatch.setattr(_omniglot, "_EXPECTED", TINY_EXPECTED)
    monkeypatch.delenv("FEWSHOT_DATA", raising=False)
    monkeypatch.delenv("FEWSHOT_CACHE", raising=False)

    def make_home(folder="omniglot-py", sets=SETS):
        home = tmp_path / "home"
        (home / folder).mkdir(parents=True, exist_ok=True)
        for name in sets:
            (home / folder / f"{name}.zip").write_bytes((tiny_zips / f"{name}.zip").read_bytes())
        return home

    return make_home


def _tree(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size if p.is_file() else -1)
                  for p in path.rglob("*"))


def _set_read_only(path, read_only):
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555 if read_only else 0o755)
        else:
            p.chmod(0o444 if read_only else 0o644)


@pytest.fixture(scope="session")
def omniglot():
    """Require the real Omniglot (building the cache once if needed)."""
    env = os.environ.get("FEWSHOT_DATA")
    try:
        omniglot_tasks(split="lake", subset="test")
    except FileNotFoundError as err:
        if env:
            pytest.fail(f"FEWSHOT_DATA={env} is set but Omniglot cannot be loaded:\n{err}")
        pytest.skip(f"real Omniglot not found and FEWSHOT_DATA is not set:\n{err}")


# --------------------------------------------------------------------------------------------------
# Data home and cache home


def test_get_data_home_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("FEWSHOT_DATA", raising=False)
    assert get_data_home() == str(tmp_path / "user" / "fewshot_data")
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "env"))
    assert get_data_home() == str(tmp_path / "env")
    assert get_data_home(tmp_path / "arg") == str(tmp_path / "arg")
    assert not (tmp_path / "env").exists()  # a lookup creates nothing


def test_get_cache_home_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("FEWSHOT_CACHE", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    assert get_cache_home(data_home=data) == str(data)  # writable data home
    data.chmod(0o555)
    try:  # read-only (by its permission bits, even for root): the default home
        assert get_cache_home(data_home=data) == str(tmp_path / "user" / "fewshot_data")
    finally:
        data.chmod(0o755)
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "env"))
    assert get_cache_home(data_home=data) == str(tmp_path / "env")
    assert get_cache_home(tmp_path / "arg", data_home=data) == str(tmp_path / "arg")


def test_import_is_light():
    code = "import sys, fewshot.datasets; print('torchvision' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------------
# Finding, extracting, preprocessing and caching (tiny tree)


def _expected_image(zip_path, member, size=28):
    from PIL import Image

    with zipfile.ZipFile(zip_path) as zf, zf.open(member) as f:
        im = Image.open(f).convert("L").resize((size, size), Image.Resampling.LANCZOS)
        return torch.from_numpy(255 - np.asarray(im)).float() / 255


def test_tiny_extracts_into_writable_data_home_and_caches(tiny, tiny_zips):
    home = tiny("omniglot-py")
    data = load_omniglot("lake", "test", data_home=home)
    assert isinstance(data, OmniglotData)
    assert data.images.shape == (2, 20, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.class_names == ("Gamma/character01", "Gamma/character02") == data.characters
    assert (home / "omniglot-py" / "images_evaluation" / "Gamma" / "character02").is_dir()
    assert (home / "omniglot-py" / CACHE_NAME).is_file()
    # Preprocessing: 8-bit grayscale, LANCZOS, inverted (strokes 1); drawings sorted by file name.
    with zipfile.ZipFile(tiny_zips / "images_evaluation.zip") as zf:
        first = sorted(m for m in zf.namelist() if m.endswith(".png"))[0]
    expected = _expected_image(tiny_zips / "images_evaluation.zip", first)
    assert_close(data.images[0, 0, 0], expected)
    assert 0 < data.images.mean() < 0.5  # mostly background (0)

    # Later loads use the cache alone: remove the zips and the extracted folders.
    for name in SETS:
        (home / "omniglot-py" / f"{name}.zip").unlink()
        shutil.rmtree(home / "omniglot-py" / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_omniglot("lake", "test", data_home=home)
    assert_close(again.images, data.images)


def test_tiny_image_size_keys_the_cache(tiny):
    home = tiny("omniglot-py")
    small = load_omniglot("lake", "test", data_home=home, image_size=14)
    assert small.images.shape == (2, 20, 1, 14, 14)
    load_omniglot("lake", "test", data_home=home)
    assert (home / "omniglot-py" / "omniglot_14px_lanczos_v1.pt").is_file()
    assert (home / "omniglot-py" / CACHE_NAME).is_file()


@pytest.mark.parametrize("how", ["argument", "environment", "fallback"])
def test_tiny_read_only_data_home_writes_elsewhere(tiny, tmp_path, monkeypatch, how):
    home = tiny("omniglot")  # the /work/shared/data layout: <root>/omniglot/<set>.zip
    _set_read_only(home, True)
    before = _tree(home)
    try:
        if how == "argument":
            cache = tmp_path / "cache"
            data = load_omniglot("lake", "test", data_home=home, cache_dir=cache)
        else:
            monkeypatch.setenv("FEWSHOT_DATA", str(home))
            if how == "environment":
                cache = tmp_path / "env_cache"
                monkeypatch.setenv("FEWSHOT_CACHE", str(cache))
            else:
                monkeypatch.setenv("HOME", str(tmp_path / "user"))
                cache = tmp_path / "user" / "fewshot_data"
            data = load_omniglot("lake", "test")
        assert data.images.shape == (2, 20, 1, 28, 28)
        assert _tree(home) == before
        assert (cache / "omniglot-py" / "images_background" / "Beta" / "character01").is_dir()
        assert (cache / "omniglot-py" / CACHE_NAME).is_file()
    finally:
        _set_read_only(home, False)


def test_tiny_missing_data_error_names_files_and_places(tiny, tmp_path):
    home, cache = tmp_path / "empty", tmp_path / "cache"
    with pytest.raises(FileNotFoundError) as info:
        load_omniglot("lake", "test", data_home=home, cache_dir=cache)
    msg = str(info.value)
    for text in ("images_background.zip", "images_evaluation.zip", "download=True",
                 "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
                 str(home / "omniglot-py" / "images_background.zip"),
                 str(home / "omniglot" / "images_evaluation.zip"),
                 str(cache / "omniglot-py" / "images_evaluation.zip"), "FEWSHOT_DATA"):
        assert text in msg, text
    assert not home.exists() and not cache.exists()

    only_background = tiny("omniglot-py", sets=("images_background",))
    with pytest.raises(FileNotFoundError, match="missing images_evaluation.zip \\(") as info:
        load_omniglot("lake", "test", data_home=only_background)
    assert "images_background.zip" not in str(info.value)


def _garble(path, needle):
    raw = bytearray(path.read_bytes())
    at = raw.find(needle)
    assert at > 0
    raw[at:at + 64] = bytes(255 - b for b in raw[at:at + 64])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncate", "empty", "garble", "stale", "foreign"])
def test_tiny_corrupt_or_stale_cache_is_rebuilt(tiny, damage):
    home = tiny("omniglot-py")
    good = load_omniglot("lake", "test", data_home=home)
    path = home / "omniglot-py" / CACHE_NAME
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garble":  # flip bytes inside the stored images, keeping the file loadable
        first = (good.images[0, 0, 0] * 255).round().to(torch.uint8).numpy().tobytes()
        _garble(path, first)
    elif damage == "stale":
        payload = torch.load(path, weights_only=True)
        payload["meta"]["format_version"] = 0
        torch.save(payload, path)
    else:
        torch.save({"images": torch.zeros(3)}, path)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        rebuilt = load_omniglot("lake", "test", data_home=home)
    assert_close(rebuilt.images, good.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_omniglot("lake", "test", data_home=home)  # the rewritten cache is valid
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_tiny_corrupt_cache_without_raw_data_raises(tiny):
    home = tiny("omniglot-py")
    load_omniglot("lake", "test", data_home=home, cache_dir=home / "cache")
    path = home / "cache" / "omniglot-py" / CACHE_NAME
    path.write_bytes(path.read_bytes()[:1000])
    for name in SETS:
        (home / "omniglot-py" / f"{name}.zip").unlink()
    other = home.parent / "other"  # the folders were extracted into home; point at an empty home
    with pytest.warns(RuntimeWarning, match="rebuilding"), pytest.raises(FileNotFoundError):
        load_omniglot("lake", "test", data_home=other, cache_dir=home / "cache")


def test_tiny_incomplete_folder_is_reported(tiny):
    home = tiny("omniglot-py")
    load_omniglot("lake", "test", data_home=home)
    (home / "omniglot-py" / CACHE_NAME).unlink()
    victim = sorted((home / "omniglot-py" / "images_background" / "Alpha" / "character02").iterdir())[0]
    victim.unlink()
    with pytest.raises(RuntimeError, match="Alpha/character02 has 19 images"):
        load_omniglot("lake", "test", data_home=home)


def test_tiny_download_uses_torchvision(tiny, tiny_zips, tmp_path, monkeypatch):
    calls = []

    def download_and_extract_archive(url, download_root, filename=None, md5=None):
        calls.append((url, filename, md5))
        archive = os.path.join(download_root, filename)
        with open(archive, "wb") as f:
            f.write((tiny_zips / filename).read_bytes())
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(download_root)

    utils = types.ModuleType("torchvision.datasets.utils")
    utils.download_and_extract_archive = download_and_extract_archive
    for name, module in [("torchvision", types.ModuleType("torchvision")),
                         ("torchvision.datasets", types.ModuleType("torchvision.datasets")),
                         ("torchvision.datasets.utils", utils)]:
        monkeypatch.setitem(sys.modules, name, module)
    home = tmp_path / "dl"
    with pytest.raises(FileNotFoundError):
        load_omniglot("lake", "test", data_home=home)
    assert calls == []
    data = load_omniglot("lake", "test", data_home=home, download=True)
    assert data.images.shape == (2, 20, 1, 28, 28)
    assert [c[1] for c in calls] == ["images_background.zip", "images_evaluation.zip"]
    assert calls[0][0].endswith("/python/images_background.zip") and len(calls[0][2]) == 32


def test_tiny_download_without_torchvision_says_so(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes the import fail
    with pytest.raises(ImportError, match="download=True needs torchvision"):
        load_omniglot("lake", "test", data_home=tmp_path / "dl", download=True)


def test_tiny_sampler(tiny):
    home = tiny("omniglot-py")
    sampler = OmniglotTasks(2, 3, 4, split="lake", subset="test", data_home=home)
    batch = sampler.sample(5, random_state=0)
    assert batch.support.x.shape == (5, 6, 1, 28, 28) and batch.query.x.shape == (5, 8, 1, 28, 28)
    with pytest.raises(ValueError, match="n_way=3 is larger than the 2 classes"):
        OmniglotTasks(3, 1, 1, split="lake", subset="test", data_home=home)
    assert isinstance(sampler, LabeledTasks)
    assert sampler.class_groups() == [[0], [1]]  # one character a class without rotations


def _folder_equals_omniglot(folder, tmp_path, omniglot_images: dict):
    """``image_folder_tasks`` with Omniglot's options over ``folder`` holds ``omniglot_images``
    (``{"<Alphabet>/<characterNN>": float [20, 1, S, S]}``) exactly: the same uint8 images."""
    sampler = image_folder_tasks(folder, n_way=len(omniglot_images), k_shot=1, n_query=19, mode="L",
                                 invert=True, image_size=28, cache_dir=tmp_path / "folder_cache")
    assert sampler.class_names == tuple(sorted(omniglot_images))
    as_bytes = {name: sorted((x * 255).round().to(torch.uint8).numpy().tobytes() for x in images)
                for name, images in omniglot_images.items()}
    owner = {b: name for name, images in as_bytes.items() for b in images}
    task = sampler.sample(random_state=0)  # every image of every class, labels in random order
    by_label = {}
    for x, y in zip(torch.cat([task.support.x, task.query.x]), torch.cat([task.support.y, task.query.y])):
        by_label.setdefault(int(y), []).append((x * 255).round().to(torch.uint8).numpy().tobytes())
    held = {owner[images[0]]: sorted(images) for images in by_label.values()}
    assert held == as_bytes
    for name, images in omniglot_images.items():  # the files through preprocess: the same images
        assert torch.equal(sampler.preprocess(sorted((folder / name).iterdir())), images)


def test_tiny_image_folder_is_omniglot(tiny):
    home = tiny("omniglot-py")
    images, keys = _omniglot._load_characters(28, home, None, False)  # extracts the folders too
    background = {k.split("/", 1)[1]: images[i].unsqueeze(1).float() / 255
                  for i, k in enumerate(keys) if k.startswith("images_background/")}
    _folder_equals_omniglot(home / "omniglot-py" / "images_background", home, background)


# --------------------------------------------------------------------------------------------------
# Argument checks (these run before any file is touched)


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "omni"}, r"split must be one of \('vinyals', 'lake'\), got 'omni'"),
    ({"subset": "validation"}, r"subset must be one of \('train', 'val', 'test'\), got 'validation'"),
    ({"n_way": 0}, "n_way must be an integer >= 2, got 0"),
    ({"n_way": 1}, "n_way must be an integer >= 2, got 1"),
    ({"k_shot": 0}, "k_shot must be an integer >= 1, got 0"),
    ({"n_query": -1}, "n_query must be an integer >= 1, got -1"),
    ({"n_query": 2.5}, "n_query must be an integer >= 1, got 2.5"),
    ({"image_size": 0}, "image_size must be an integer >= 1, got 0"),
    ({"k_shot": 5, "n_query": 16}, r"k_shot \+ n_query = 5 \+ 16 = 21 is larger than the 20"),
    ({"augment_rotations": "yes"}, "augment_rotations must be None, True or False, got 'yes'"),
])
def test_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        omniglot_tasks(**kwargs, data_home=tmp_path, cache_dir=tmp_path)


def test_bad_arguments_load_omniglot(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_omniglot("Vinyals", data_home=tmp_path)
    with pytest.raises(ValueError, match="subset must be one of"):
        load_omniglot(subset="valid", data_home=tmp_path)


# --------------------------------------------------------------------------------------------------
# Real data: counts and splits


def _sampler(split="vinyals", subset="train", **kwargs):
    return omniglot_tasks(split=split, subset=subset, **kwargs)


def test_counts(omniglot):
    sizes = {"train": 1028, "val": 172, "test": 423}
    for subset, n in sizes.items():
        s = _sampler("vinyals", subset)
        assert (s.n_classes, len(set(s.characters)), s.n_pretrain_outputs) == (4 * n, n, 4 * n)
        assert _sampler("vinyals", subset, augment_rotations=False).n_classes == n
    lake = {subset: _sampler("lake", subset) for subset in sizes}
    assert lake["train"].n_classes + lake["val"].n_classes == 964
    assert lake["test"].n_classes == 659
    assert not lake["train"].augment_rotations
    assert _sampler("lake", "train", augment_rotations=True).n_classes == 4 * lake["train"].n_classes


@pytest.mark.parametrize("split", ["vinyals", "lake"])
def test_subsets_are_disjoint(omniglot, split):
    chars = {subset: set(_sampler(split, subset).characters) for subset in ("train", "val", "test")}
    assert not chars["train"] & chars["val"]
    assert not chars["train"] & chars["test"]
    assert not chars["val"] & chars["test"]
    assert len(chars["train"] | chars["val"] | chars["test"]) == 1623
    if split == "lake":  # new alphabets for validation and for test
        alphabets = {k: {c.split("/")[0] for c in v} for k, v in chars.items()}
        assert not alphabets["train"] & alphabets["val"]
        assert not (alphabets["train"] | alphabets["val"]) & alphabets["test"]
        assert (len(alphabets["train"]), len(alphabets["val"]), len(alphabets["test"])) == (25, 5, 20)
        assert sorted(alphabets["val"]) == ["Arcadian", "Cyrillic", "Grantha", "Sanskrit", "Tagalog"]


def test_vinyals_split_is_pinned(omniglot):
    # The split comes from numpy's RandomState(0), whose stream numpy keeps fixed; pin it anyway.
    pinned = {"train": "7331e73b9053168f", "val": "8937ce1a7b7fbb88", "test": "b950b8894a349b02"}
    for subset, digest in pinned.items():
        chars = _sampler("vinyals", subset, augment_rotations=False).characters
        assert hashlib.sha256("\n".join(chars).encode()).hexdigest()[:16] == digest


def test_rotated_classes(omniglot):
    data = load_omniglot("vinyals", "val")
    assert data.images.shape == (688, 20, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.class_names[:4] == tuple(f"{data.characters[0]}/rot{d:03d}" for d in (0, 90, 180, 270))
    for r in range(4):
        assert_close(data.images[4 + r], torch.rot90(data.images[4], r, dims=(-2, -1)))
    assert data.images.min() == 0 and data.images.max() == 1
    plain = load_omniglot("vinyals", "val", augment_rotations=False)
    assert_close(plain.images, data.images[::4])


def test_cache_loads_fast(omniglot):
    import time

    start = time.perf_counter()
    _sampler("vinyals", "train")
    assert time.perf_counter() - start < 5.0  # typically ~0.05 s; the budget is 2 s


# --------------------------------------------------------------------------------------------------
# Real data: episodes


def test_batch_shapes_dtypes_device(omniglot):
    sampler = _sampler(n_way=5, k_shot=1, n_query=15)
    assert sampler.task_type == "classification"
    assert (sampler.input_shape, sampler.n_outputs, sampler.n_way) == ((1, 28, 28), 5, 5)
    batch = sampler.sample(16, random_state=0)
    assert isinstance(batch, TaskBatch) and len(batch) == 16
    assert batch.support.x.shape == (16, 5, 1, 28, 28) and batch.query.x.shape == (16, 75, 1, 28, 28)
    assert batch.support.x.dtype == batch.query.x.dtype == torch.float32
    assert batch.support.y.shape == (16, 5) and batch.query.y.shape == (16, 75)
    assert batch.support.y.dtype == batch.query.y.dtype == torch.int64
    assert 0 <= batch.query.x.min() and batch.query.x.max() <= 1
    task = sampler.sample(random_state=0)
    assert task.support.x.shape == (5, 1, 28, 28)
    meta = sampler.sample(2, random_state=0, device="meta")
    assert meta.support.x.device.type == "meta" and meta.query.y.device.type == "meta"
    on_meta = _sampler(split="lake", subset="val", device="meta")
    assert on_meta.sample(2, random_state=0).query.x.device.type == "meta"
    assert on_meta.sample_pretraining(3, random_state=0).x.device.type == "meta"


@pytest.fixture(scope="module")
def plain_val():
    """vinyals/val without rotations and a map image bytes -> (class, drawing): every image is unique."""
    data = load_omniglot("vinyals", "val", augment_rotations=False)
    index = {data.images[c, e].numpy().tobytes(): (c, e)
             for c in range(data.n_classes) for e in range(20)}
    assert len(index) == data.n_classes * 20  # unique, so a lookup identifies the drawing
    return data, index


def test_labels_are_remapped_and_sets_disjoint(omniglot, plain_val):
    data, index = plain_val
    n, k, q = 5, 2, 3
    sampler = _sampler("vinyals", "val", n_way=n, k_shot=k, n_query=q, augment_rotations=False)
    batch = sampler.sample(64, random_state=1)
    ascending = 0
    for task in batch:
        assert torch.equal(task.support.y, torch.arange(n).repeat_interleave(k))
        assert torch.equal(task.query.y, torch.arange(n).repeat_interleave(q))
        support = [index[x.numpy().tobytes()] for x in task.support.x]
        query = [index[x.numpy().tobytes()] for x in task.query.x]
        label_class = {}
        for (c, _), y in zip(support + query, torch.cat([task.support.y, task.query.y]).tolist()):
            assert label_class.setdefault(y, c) == c  # one class per label, in support and query
        assert len(set(label_class.values())) == n
        assert not set(support) & set(query) and len(set(support + query)) == n * (k + q)
        ascending += [label_class[y] for y in range(n)] == sorted(label_class.values())
    assert ascending < 10  # labels are assigned in random order (1/120 chance each to be sorted)


def test_same_seed_same_tasks(omniglot):
    sampler = _sampler()
    a, b, c = (sampler.sample(8, random_state=s) for s in (3, 3, 4))
    assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.x, b.query.x)
    assert not torch.equal(a.query.x, c.query.x)
    gen = torch.Generator().manual_seed(3)
    first, second = sampler.sample(8, random_state=gen), sampler.sample(8, random_state=gen)
    assert torch.equal(first.query.x, a.query.x) and not torch.equal(second.query.x, a.query.x)


def test_constructor_random_state_is_the_default_generator(omniglot):
    s1, s2 = _sampler(random_state=7), _sampler(random_state=7)
    x1, x2 = s1.sample(4), s2.sample(4)
    assert torch.equal(x1.query.x, x2.query.x)
    assert not torch.equal(s1.sample(4).query.x, x1.query.x)  # successive calls differ
    s2.sample(4)  # s2 catches up with s1
    assert torch.equal(s1.sample_pretraining(10).y, s2.sample_pretraining(10).y)
    assert torch.equal(s1.sample(4, random_state=0).query.x, _sampler().sample(4, random_state=0).query.x)


def test_pretraining_batch(omniglot, plain_val):
    data, index = plain_val
    sampler = _sampler("vinyals", "val", augment_rotations=False)
    batch = sampler.sample_pretraining(64, random_state=0)
    assert isinstance(batch, LabeledSet)
    assert batch.x.shape == (64, 1, 28, 28) and batch.x.dtype == torch.float32
    assert batch.y.dtype == torch.int64 and 0 <= batch.y.min() and batch.y.max() < sampler.n_pretrain_outputs
    assert [index[x.numpy().tobytes()][0] for x in batch.x] == batch.y.tolist()
    assert torch.equal(batch.y, sampler.sample_pretraining(64, random_state=0).y)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        sampler.sample_pretraining(0)


def test_n_way_larger_than_subset(omniglot):
    with pytest.raises(ValueError, match=r"n_way=200 is larger than the 161 classes .*'lake'.*'val'"):
        _sampler("lake", "val", n_way=200)
    _sampler("lake", "val", n_way=161, k_shot=1, n_query=1).sample(1, random_state=0)


# --------------------------------------------------------------------------------------------------
# Real data: the episodes are pinned (OmniglotTasks is LabeledTasks over the subset's drawings)

# sha256 of support.x, support.y, query.x, query.y (first 16 hex digits) of two batches of 4 tasks
# from torch.Generator().manual_seed(3), and of sample_pretraining(32, random_state=5)'s x and y;
# measured with the sampler written before OmniglotTasks became a LabeledTasks.
PINNED_EPISODES = [
    ({"n_way": 5, "k_shot": 1, "n_query": 15, "split": "vinyals", "subset": "train"},
     ["65a539fae6c57db8", "f39f7f8b0c843490"], "6c52037d91a6fe41"),
    ({"n_way": 20, "k_shot": 5, "n_query": 5, "split": "vinyals", "subset": "test"},
     ["56efaa518fc388a1", "2ae13c58bf5af751"], "6d5349798e9b3aa4"),
    ({"n_way": 5, "k_shot": 1, "n_query": 1, "split": "lake", "subset": "val"},
     ["ba94303bcec6a1ec", "967d4cffed51f1f3"], "3d3e0e475e53ee6f"),
]


def _digest(batch) -> str:
    h = hashlib.sha256()
    for t in (batch.support.x, batch.support.y, batch.query.x, batch.query.y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("config, batches, pretraining", PINNED_EPISODES)
def test_episodes_are_pinned(omniglot, config, batches, pretraining):
    sampler = omniglot_tasks(**config)
    assert isinstance(sampler, LabeledTasks)
    gen = torch.Generator().manual_seed(3)
    assert [_digest(sampler.sample(4, random_state=gen)) for _ in range(2)] == batches
    pre = sampler.sample_pretraining(32, random_state=5)
    assert hashlib.sha256(pre.x.numpy().tobytes() + pre.y.numpy().tobytes()).hexdigest()[:16] == pretraining


def test_class_disjoint_split_is_pinned(omniglot):
    sampler = omniglot_tasks(5, 1, 15)
    train, test = meta_train_test_split(sampler, test_size=0.2, random_state=0)
    assert (train.n_classes, test.n_classes) == (3288, 824)
    assert [_digest(part.sample(4, random_state=1)) for part in (train, test)] == \
        ["11c224fc3be62e85", "67128f6db86c8ba9"]
    assert isinstance(train, OmniglotTasks) and repr(train) == repr(sampler)
    assert not set(train.characters) & set(test.characters)  # the rotations of a character stay together
    assert len(set(test.characters)) == 206 and len(test.characters) == 4 * 206
    assert test.class_names[:4] == tuple(f"{test.characters[0]}/rot{d:03d}" for d in (0, 90, 180, 270))


def test_image_folder_is_omniglot(omniglot, tmp_path):
    """image_folder_tasks(mode="L", invert=True, image_size=28) over Omniglot's own folders holds
    the images of OmniglotTasks, on a few characters of two alphabets."""
    data_home = get_data_home()
    folder = _omniglot._locate_sets(Path(data_home), Path(get_cache_home(None, data_home)),
                                    False)["images_background"]
    data = load_omniglot("lake", "train", augment_rotations=False)
    alphabets = sorted({c.split("/")[0] for c in data.characters})[:2]
    picked = {c: data.images[i] for i, c in enumerate(data.characters) if c.split("/")[0] in alphabets
              and c.endswith(("character01", "character02"))}
    assert len(picked) == 4
    for name in picked:
        shutil.copytree(folder / name, tmp_path / "background" / name)
    _folder_equals_omniglot(tmp_path / "background", tmp_path, picked)
