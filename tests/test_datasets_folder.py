"""Image folders: scanning, preprocessing against Pillow, the cache, episodes and bad inputs.

Every test builds its folder of small PNGs (random pixels, so every image is unique and can be
found again by its bytes) in a temporary directory.
"""

import os
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import fewshot
from fewshot.datasets import ImageFolderTasks, image_folder_tasks
from fewshot.datasets import _folder
from fewshot.model_selection import meta_train_test_split
from fewshot.tasks import LabeledTasks, TaskBatch

import _util

Image = pytest.importorskip("PIL.Image")

H, W = 12, 10  # the files' size; not square, so a swapped height and width shows


def make_folder(root, layout, **kwargs):
    return _util.make_folder(root, layout, **{"size": (H, W), **kwargs})


def pillow(path, *, mode, size=None, resample="LANCZOS", invert=False):
    """What the sampler should hold for ``path``, computed with Pillow directly: float32 [C, H, W]."""
    with Image.open(path) as im:
        im = im.convert(mode)
        if size is not None:
            im = im.resize((size[1], size[0]), getattr(Image.Resampling, resample))
        a = np.asarray(im).astype(np.float32)
    a = 255 - a if invert else a
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a / 255)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSHOT_CACHE", raising=False)
    return tmp_path / "cache"


def tasks(root, cache, **kwargs):
    options = {"n_way": 2, "k_shot": 1, "n_query": 2, "image_size": None, "mode": "L"}
    return image_folder_tasks(root, **{**options, **kwargs}, cache_dir=cache)


# --------------------------------------------------------------------------------------------------
# Classes, names and groups


def test_flat_layout(tmp_path, cache):
    make_folder(tmp_path / "pets", {"emu": 4, "cat": 5, "dog": 3})
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "pets" / "cat" / ".hidden.png").write_bytes(b"ignored")
    (tmp_path / "pets" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "pets" / "dog" / "UPPER.PNG")
    sampler = tasks(tmp_path / "pets", cache)
    assert isinstance(sampler, ImageFolderTasks) and isinstance(sampler, LabeledTasks)
    assert sampler.root == (tmp_path / "pets").resolve()
    assert sampler.class_names == ("cat", "dog", "emu")
    assert sampler.class_counts == (5, 4, 4) and sampler.n_classes == sampler.n_pretrain_outputs == 3
    assert sampler.input_shape == (1, H, W)
    assert sampler.class_groups() == [[0], [1], [2]]
    assert sampler.cache_path.parent == cache / "image_folders"
    assert sampler.cache_path.name.startswith("pets-")
    assert repr(sampler) == (f"ImageFolderTasks(path={str(sampler.root)!r}, n_way=2, k_shot=1, n_query=2, "
                             "image_size=None, mode='L', n_classes=3)")


def test_nested_layout_and_groups(tmp_path, cache):
    layout = {"Greek/alpha": 3, "Greek/beta": 3, "Latin/a": 3, "Latin/b": 3, "Latin/c": 3, "runes/x/y": 3,
              "solo": 3}
    make_folder(tmp_path / "scripts", layout)
    sampler = tasks(tmp_path / "scripts", cache)
    assert sampler.class_names == tuple(sorted(layout))
    assert sampler.class_groups() == [[0, 1], [2, 3, 4], [5], [6]]  # by parent; "solo" on its own
    ungrouped = tasks(tmp_path / "scripts", cache, class_groups=None)
    assert ungrouped.class_groups() == [[c] for c in range(7)]
    by_first = tasks(tmp_path / "scripts", cache, class_groups=lambda name: name[0])
    assert by_first.class_groups() == [[0, 1], [2, 3, 4], [5], [6]]
    for seed in range(4):  # a class-disjoint split keeps each parent folder on one side
        train, test = meta_train_test_split(sampler, test_size=2, random_state=seed)
        sides = [{n.rpartition("/")[0] or n for n in part.class_names} for part in (train, test)]
        assert not sides[0] & sides[1] and len(sides[1]) == 2
        assert isinstance(train, ImageFolderTasks) and train.mode == "L"


def test_links_are_followed_and_cycles_left(tmp_path, cache):
    make_folder(tmp_path / "data", {"g/x": 3, "g/y": 3})
    (tmp_path / "data" / "g" / "back").symlink_to(tmp_path / "data" / "g")  # a cycle: ignored
    (tmp_path / "data" / "z").symlink_to(tmp_path / "data" / "g" / "x")     # a linked class: kept
    sampler = tasks(tmp_path / "data", cache)
    assert sampler.class_names == ("g/x", "g/y", "z") and sampler.class_counts == (3, 3, 3)


# --------------------------------------------------------------------------------------------------
# Preprocessing, against Pillow


@pytest.mark.parametrize("file_mode, options", [
    ("L", {"mode": "L", "image_size": None}),
    ("L", {"mode": "L", "image_size": 7, "invert": True}),
    ("L", {"mode": "RGB", "image_size": (6, 9), "resample": "bilinear"}),
    ("RGB", {"mode": "RGB", "image_size": 8, "resample": "nearest"}),
    ("RGB", {"mode": "L", "image_size": None, "invert": True}),
])
def test_preprocessing_matches_pillow(tmp_path, cache, file_mode, options):
    files = make_folder(tmp_path / "data", {"a": 3, "b": 3}, mode=file_mode)
    sampler = tasks(tmp_path / "data", cache, **options)
    size = options["image_size"]
    size = (size, size) if isinstance(size, int) else size
    expected = torch.stack([pillow(p, mode=options["mode"], size=size, invert=options.get("invert", False),
                                   resample=options.get("resample", "lanczos").upper())
                            for p in files["a"] + files["b"]])
    got = sampler.preprocess(files["a"] + files["b"])
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)
    assert sampler.input_shape == tuple(expected.shape[1:])
    assert torch.equal(sampler.preprocess(str(files["b"][2])), expected[-1])  # one path: one image
    with Image.open(files["a"][0]) as im:  # a PIL image, as well as a file
        assert torch.equal(sampler.preprocess([im]), expected[:1])
    assert_tasks_hold(sampler, {f.relative_to(tmp_path / "data").as_posix(): x
                                for f, x in zip(files["a"] + files["b"], expected)})


def test_normalize(tmp_path, cache):
    files = make_folder(tmp_path / "data", {"a": 3, "b": 3}, mode="RGB")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    sampler = tasks(tmp_path / "data", cache, mode="RGB", image_size=6, normalize=(mean, std))
    assert sampler.normalize == (mean, std)
    raw = torch.stack([pillow(p, mode="RGB", size=(6, 6)) for p in files["a"] + files["b"]])
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    got = sampler.preprocess(files["a"] + files["b"])
    assert_close(got, expected)
    assert_tasks_hold(sampler, {f.relative_to(tmp_path / "data").as_posix(): x
                                for f, x in zip(files["a"] + files["b"], got)})
    gray = tasks(tmp_path / "data", cache, image_size=6, normalize=(0.5, 0.25))  # one number: every channel
    assert gray.normalize == ((0.5,), (0.25,))
    assert_close(gray.preprocess(files["a"][0]), (pillow(files["a"][0], mode="L", size=(6, 6)) - 0.5) / 0.25)
    assert "normalize=((0.5,), (0.25,))" in repr(gray)


def assert_tasks_hold(sampler, images):
    """Every image of the episodes and pre-training batches is one of ``images`` ({relative file:
    float image}), of the class its label says; support and query are disjoint; shapes and labels."""
    index = {x.numpy().tobytes(): name.rpartition("/")[0] for name, x in images.items()}
    assert len(index) == len(images)
    n, k, q = sampler.n_way, sampler.k_shot, sampler.n_query
    batch = sampler.sample(6, random_state=0)
    assert isinstance(batch, TaskBatch)
    assert batch.support.x.shape == (6, n * k, *sampler.input_shape)
    assert batch.query.x.shape == (6, n * q, *sampler.input_shape)
    assert batch.support.x.dtype == torch.float32 and batch.query.y.dtype == torch.int64
    for task in batch:
        assert torch.equal(task.support.y, torch.arange(n).repeat_interleave(k))
        assert torch.equal(task.query.y, torch.arange(n).repeat_interleave(q))
        support = [x.numpy().tobytes() for x in task.support.x]
        query = [x.numpy().tobytes() for x in task.query.x]
        assert not set(support) & set(query) and len(set(support + query)) == n * (k + q)
        label_class = {}
        for key, y in zip(support + query, torch.cat([task.support.y, task.query.y]).tolist()):
            assert label_class.setdefault(y, index[key]) == index[key]
        assert len(set(label_class.values())) == n
    pre = sampler.sample_pretraining(20, random_state=0)
    assert [index[x.numpy().tobytes()] for x in pre.x] == [sampler.class_names[c] for c in pre.y.tolist()]


# --------------------------------------------------------------------------------------------------
# The cache


def _no_decoding(*args, **kwargs):
    raise AssertionError("decoded although the cache is valid")


def test_cache_is_written_once_and_reused(tmp_path, cache, monkeypatch):
    make_folder(tmp_path / "data", {"a": 3, "b": 3})
    first = tasks(tmp_path / "data", cache, image_size=8, invert=True)
    assert first.cache_path.is_file()
    assert not [p for p in first.cache_path.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(_folder, "decode_files", _no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = tasks(tmp_path / "data", cache, image_size=8, invert=True, normalize=(0.5, 0.5))
    assert again.cache_path == first.cache_path  # normalisation is applied when tasks are made
    batch, other = first.sample(3, random_state=1), again.sample(3, random_state=1)
    assert torch.equal((batch.query.x - 0.5) / 0.5, other.query.x)
    with pytest.raises(AssertionError, match="decoded"):  # other options are another cache
        tasks(tmp_path / "data", cache, image_size=8)


def test_cache_needs_no_pillow(tmp_path, cache, monkeypatch):
    make_folder(tmp_path / "data", {"a": 3, "b": 3})
    tasks(tmp_path / "data", cache)
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    assert tasks(tmp_path / "data", cache).sample(2, random_state=0).support.x.shape == (2, 2, 1, H, W)
    with pytest.raises(ImportError, match=r'decoding images needs Pillow.*pip install "fewshot\[datasets\]"'):
        tasks(tmp_path / "data", cache, image_size=5)


def test_changed_folder_is_decoded_again(tmp_path, cache):
    files = make_folder(tmp_path / "data", {"a": 3, "b": 3})
    old = tasks(tmp_path / "data", cache)
    new_image = np.full((H, W), 7, np.uint8)
    Image.fromarray(new_image).save(files["b"][2])
    os.utime(files["b"][2], ns=(1, 1))  # a different modification time even on coarse clocks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an edited folder is no damaged cache: no warning
        changed = tasks(tmp_path / "data", cache)
    assert changed.cache_path == old.cache_path
    assert torch.equal(changed.preprocess(files["b"][2]), torch.full((1, H, W), 7 / 255))
    pre = changed.sample_pretraining(60, random_state=0).x
    assert any(torch.equal(x, torch.full((1, H, W), 7 / 255)) for x in pre)
    assert not any(torch.equal(x, torch.full((1, H, W), 7 / 255))
                   for x in old.sample_pretraining(60, random_state=0).x)
    make_folder(tmp_path / "data", {"c": 3}, seed=1)  # a new class
    assert tasks(tmp_path / "data", cache).class_names == ("a", "b", "c")


@pytest.mark.parametrize("damage", ["truncate", "garble", "foreign"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, cache, damage):
    make_folder(tmp_path / "data", {"a": 3, "b": 3})
    good = tasks(tmp_path / "data", cache)
    path = good.cache_path
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garble":  # flip bytes inside the stored images, keeping the file loadable
        payload = torch.load(path, weights_only=True)
        needle = payload["images"][0].numpy().tobytes()
        at = raw.find(needle)
        assert at > 0
        path.write_bytes(raw[:at] + bytes(255 - b for b in raw[at:at + 40]) + raw[at + 40:])
    else:
        torch.save({"images": torch.zeros(3)}, path)
    with pytest.warns(RuntimeWarning, match=r"image folder cache .* rebuilding it"):
        rebuilt = tasks(tmp_path / "data", cache)
    assert torch.equal(rebuilt.sample(2, random_state=0).query.x, good.sample(2, random_state=0).query.x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks(tmp_path / "data", cache)  # the rewritten cache is valid


def test_unwritable_cache_dir_warns_and_works(tmp_path):
    make_folder(tmp_path / "data", {"a": 3, "b": 3})
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made inside a file, not even by root
    with pytest.warns(RuntimeWarning, match="could not write the image folder cache"):
        sampler = tasks(tmp_path / "data", blocker / "cache")
    assert sampler.n_classes == 2


def test_cache_home_from_environment(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", {"a": 3, "b": 3})
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "env"))
    sampler = image_folder_tasks(tmp_path / "data", n_way=2, k_shot=1, n_query=2, image_size=4)
    assert sampler.cache_path.parent == tmp_path / "env" / "image_folders" and sampler.cache_path.is_file()


# --------------------------------------------------------------------------------------------------
# Using it


def test_meta_training_and_prediction(tmp_path, cache):
    files = make_folder(tmp_path / "data", {c: 4 for c in "abcdef"}, mode="RGB", size=(16, 16))
    sampler = tasks(tmp_path / "data", cache, n_way=3, k_shot=1, n_query=3, mode="RGB", image_size=16,
                    random_state=0)
    model = fewshot.FOMAML(meta_steps=3, meta_batch_size=2, inner_steps=1, random_state=0).meta_fit(sampler)
    support = sampler.sample(random_state=1).support
    new = [files["a"][3], files["b"][3]]
    predictions = model.adapt(support).predict(sampler.preprocess(new).numpy())
    assert predictions.shape == (2,) and set(np.asarray(predictions).tolist()) <= {0, 1, 2}


# --------------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_path_and_file(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere does not exist"):
        tasks(tmp_path / "nowhere", cache)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"file\.png is a file, not a folder"):
        tasks(tmp_path / "file.png", cache)


def test_bad_layouts(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty has no class folders holding images with the extensions"):
        tasks(tmp_path / "empty", cache)
    make_folder(tmp_path / "loose", {"": 3})
    with pytest.raises(ValueError, match=r"holds images \(e\.g\. '00\.png'\) but no class folders"):
        tasks(tmp_path / "loose", cache)
    make_folder(tmp_path / "hole", {"a": 3, "b": 3})
    (tmp_path / "hole" / "c").mkdir()
    (tmp_path / "hole" / "c" / "readme.txt").write_text("")
    with pytest.raises(ValueError, match=r"the class folder 'c' of .*hole holds no images"):
        tasks(tmp_path / "hole", cache)
    make_folder(tmp_path / "mixed", {"a": 3, "a/sub": 3, "b": 3})
    with pytest.raises(ValueError, match=r"folder 'a' of .* holds images .* and also folders of images"):
        tasks(tmp_path / "mixed", cache)


def test_small_classes(tmp_path, cache):
    make_folder(tmp_path / "data", {"a": 4, "b": 2, "c": 4, "d": 4})
    with pytest.raises(ValueError, match=r"1 of the 4 classes has fewer than k_shot \+ n_query = 1 \+ 2 = 3 "
                                         r"examples.*'b' \(2\)"):
        tasks(tmp_path / "data", cache)
    with pytest.warns(UserWarning, match=r"'b' \(2\).*left out"):
        sampler = tasks(tmp_path / "data", cache, small_classes="exclude")
    assert sampler.class_names == ("a", "c", "d") and sampler.class_counts == (4, 4, 4)
    with pytest.raises(ValueError, match=r"n_way=4 is larger than the 3 classes"), pytest.warns(UserWarning):
        tasks(tmp_path / "data", cache, n_way=4, small_classes="exclude")


def test_mixed_sizes(tmp_path, cache):
    make_folder(tmp_path / "data", {"a": 3})
    make_folder(tmp_path / "data", {"b": 3}, size=(8, 9), seed=1)
    with pytest.raises(ValueError, match=r"images differ in size: a/00\.png is 12x10 and b/00\.png is 8x9 "
                                         r"\(height x width\); pass image_size"):
        tasks(tmp_path / "data", cache)
    assert tasks(tmp_path / "data", cache, image_size=(8, 9)).input_shape == (1, 8, 9)
    make_folder(tmp_path / "same", {"a": 3, "b": 3})
    sampler = tasks(tmp_path / "same", cache)
    with pytest.raises(ValueError, match=r"image 0 is \[1, 8, 9\] after decoding, the tasks hold "
                                         r"\[1, 12, 10\]; with image_size=None"):
        sampler.preprocess([tmp_path / "data" / "b" / "00.png"])
    with pytest.raises(TypeError, match="images must be image file paths or PIL images .*got ndarray"):
        sampler.preprocess(np.zeros((H, W)))


def test_unreadable_image_names_the_file(tmp_path, cache):
    make_folder(tmp_path / "data", {"a": 3, "b": 3})
    (tmp_path / "data" / "b" / "broken.webp").write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"cannot decode the image file b/broken\.webp "
                                      r"\(UnidentifiedImageError"):
        tasks(tmp_path / "data", cache)
    assert tasks(tmp_path / "data", cache, extensions=[".PNG", "jpg"]).class_counts == (3, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "RGBA"}, r"mode must be one of \['L', 'RGB'\] \(grayscale or colour\), got 'RGBA'"),
    ({"image_size": 0}, "image_size must be an integer >= 1, got 0"),
    ({"image_size": (8, 0)}, r"image_size must be None \(keep the size\), an integer >= 1 or a \(height, "
                             r"width\) pair of them, got \(8, 0\)"),
    ({"image_size": "28"}, r"image_size must be None"),
    ({"invert": "yes"}, "invert must be True or False, got 'yes'"),
    ({"resample": "cubic"}, r"resample must be one of \['nearest', .*'lanczos'\].*got 'cubic'"),
    ({"normalize": (0.5,)}, r"normalize must be None or a \(mean, std\) pair.*1 numbers"),
    ({"normalize": (0.5, 0.0)}, r"with std > 0; got std 0\.0"),
    ({"normalize": ((0.5, 0.5), 1.0)}, r"normalize must be None or a \(mean, std\) pair"),
    ({"extensions": []}, r"extensions must be a non-empty sequence of file extensions"),
    ({"class_groups": "parents"}, r"class_groups must be 'parent', None, a callable"),
    ({"n_way": 1}, "n_way must be an integer >= 2, got 1"),
    ({"k_shot": 0}, "k_shot must be an integer >= 1, got 0"),
    ({"n_way": 3}, r"n_way=3 is larger than the 2 classes"),
    ({"small_classes": "drop"}, r"small_classes must be one of \['error', 'exclude'\], got 'drop'"),
])
def test_bad_options(tmp_path, cache, kwargs, match):
    make_folder(tmp_path / "data", {"a": 3, "b": 3})
    with pytest.raises(ValueError, match=match):
        tasks(tmp_path / "data", cache, **kwargs)
