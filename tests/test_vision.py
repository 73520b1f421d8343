"""LabeledTasks over torchvision datasets: ImageFolder on generated PNGs, and Omniglot.

These tests need torchvision (the ``fewshot[vision]`` extra) and are skipped without it. torchvision
wheels are built against one torch release, so they run in a second environment:
``python3.11 -m venv .venv-vision && .venv-vision/bin/pip install torch==2.14.1 torchvision==0.29.1
-e ".[test,vision]"`` then ``.venv-vision/bin/python -m pytest tests/test_vision.py`` (see README.md).

The Omniglot test needs the real data (``FEWSHOT_DATA``, as ``tests/test_datasets_omniglot.py``).
"""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from torch.utils.data import Subset  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.datasets import ImageFolder, Omniglot  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

import fewshot  # noqa: E402
from fewshot.datasets import get_data_home, load_omniglot  # noqa: E402
from fewshot.tasks import LabeledTasks, TaskBatch  # noqa: E402

CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")
PER_CLASS = 7
SIDE = 20


# --------------------------------------------------------------------------------------------------
# A generated image folder: <root>/<class>/<i>.png, every image distinct


def _pixels(c: int, i: int, side: int = SIDE) -> np.ndarray:
    """``uint8 [side, side, 3]``: a class-dependent pattern plus noise; pixel (0, 0) encodes (c, i),
    so each image is unique and can be looked up from its values."""
    rng = np.random.RandomState(1000 * c + i)
    yy, xx = np.mgrid[:side, :side]
    base = np.stack([(xx * (c + 1) * 11) % 256, (yy * (c + 2) * 7) % 256, ((xx + yy) * 13 * c) % 256], -1)
    a = np.clip(base + rng.randint(-20, 21, base.shape), 0, 255).astype(np.uint8)
    a[0, 0] = (c, i, 200)
    return a


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_folder")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(_pixels(c, i)).save(root / name / f"{i:02d}.png")
    return root


def _lookup(folder_root):
    """``{bytes of the uint8 [C, H, W] image: (class name, file name)}`` read with PIL directly."""
    table = {}
    for name in CLASSES:
        for path in sorted((folder_root / name).iterdir()):
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.uint8)
            table[np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes()] = (name, path.name)
    return table


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    """Sampler output (``float32`` = ``uint8 / 255``) back to ``uint8``; exact."""
    u = (x * 255).round()
    torch.testing.assert_close(u / 255, x, rtol=0, atol=1e-6)
    return u.to(torch.uint8).numpy()


def _check_episodes(batch: TaskBatch, sampler, table):
    """Every task: labels 0..n-1 with K / Q examples each (support first), each label one folder
    class, distinct classes per task, no example in both support and query."""
    n, k, q = sampler.n_way, sampler.k_shot, sampler.n_query
    expected_y = torch.arange(n).repeat_interleave
    for task in batch:
        assert torch.equal(task.support.y, expected_y(k)) and torch.equal(task.query.y, expected_y(q))
        seen, files = {}, []
        for part in (task.support, task.query):
            for xi, yi in zip(part.x, part.y):
                name, file = table[_as_uint8(xi).tobytes()]
                assert seen.setdefault(int(yi), name) == name  # one class per label
                files.append((name, file))
        assert len(set(seen.values())) == n  # the labels are different classes
        assert len(set(files)) == n * (k + q)  # distinct examples, support and query disjoint


# --------------------------------------------------------------------------------------------------
# ImageFolder


def test_image_folder_pil_images_become_uint8_chw(folder):
    ds = ImageFolder(folder)
    assert tuple(ds.classes) == CLASSES
    sampler = LabeledTasks(ds, n_way=4, k_shot=2, n_query=3, random_state=0)
    # ImageFolder's targets are indices into ds.classes (sorted folder names).
    assert sampler.class_names == tuple(range(len(CLASSES)))
    assert sampler.class_counts == (PER_CLASS,) * len(CLASSES)
    assert sampler.n_classes == sampler.n_pretrain_outputs == len(CLASSES)
    assert sampler.input_shape == (3, SIDE, SIDE)
    assert sampler.task_type == "classification" and sampler.n_outputs == 4

    batch = sampler.sample(20)
    assert batch.support.x.shape == (20, 8, 3, SIDE, SIDE) and batch.query.x.shape == (20, 12, 3, SIDE, SIDE)
    assert batch.support.x.dtype == torch.float32 and batch.support.y.dtype == torch.int64
    assert 0 <= float(batch.query.x.min()) and float(batch.query.x.max()) <= 1
    _check_episodes(batch, sampler, _lookup(folder))

    # Pretraining targets index class_names, which index the folder classes.
    table = _lookup(folder)
    pre = sampler.sample_pretraining(40, random_state=1)
    for xi, yi in zip(pre.x, pre.y):
        assert table[_as_uint8(xi).tobytes()][0] == ds.classes[sampler.class_names[int(yi)]]


def test_image_folder_string_labels_are_the_folder_names(folder):
    ds = ImageFolder(folder)
    ds.target_transform = lambda c: ds.classes[c]
    sampler = LabeledTasks(ds, n_way=3, k_shot=1, n_query=2)
    assert sampler.class_names == CLASSES
    table = _lookup(folder)
    pre = sampler.sample_pretraining(30, random_state=0)
    for xi, yi in zip(pre.x, pre.y):
        assert table[_as_uint8(xi).tobytes()][0] == sampler.class_names[int(yi)]


def test_same_seed_same_episodes(folder):
    a = LabeledTasks(ImageFolder(folder), n_way=3, k_shot=1, n_query=2, random_state=5)
    b = LabeledTasks(ImageFolder(folder), n_way=3, k_shot=1, n_query=2, random_state=5)
    ta, tb = a.sample(4), b.sample(4)
    assert torch.equal(ta.support.x, tb.support.x) and torch.equal(ta.query.x, tb.query.x)
    assert not torch.equal(ta.query.x, a.sample(4).query.x)  # the default generator advances


GRAY = transforms.Compose([transforms.Grayscale(), transforms.Resize((16, 16)), transforms.ToTensor()])


def test_torchvision_transform_in_the_dataset_or_in_the_sampler(folder):
    in_dataset = LabeledTasks(ImageFolder(folder, transform=GRAY), n_way=3, k_shot=2, n_query=2)
    in_sampler = LabeledTasks(ImageFolder(folder), n_way=3, k_shot=2, n_query=2, transform=GRAY)
    for sampler in (in_dataset, in_sampler):
        assert sampler.input_shape == (1, 16, 16) and sampler.class_names == tuple(range(len(CLASSES)))
    a, b = in_dataset.sample(6, random_state=2), in_sampler.sample(6, random_state=2)
    assert a.support.x.dtype == torch.float32  # ToTensor's floats are kept as given
    torch.testing.assert_close(a.support.x, b.support.x, rtol=0, atol=0)
    torch.testing.assert_close(a.query.x, b.query.x, rtol=0, atol=0)

    # The examples are the transform's outputs on the files, class by class.
    expected = {}
    for name in CLASSES:
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as im:
                expected[GRAY(im.convert("RGB")).numpy().tobytes()] = name
    pre = in_sampler.sample_pretraining(30, random_state=3)
    for xi, yi in zip(pre.x, pre.y):
        assert expected[xi.numpy().tobytes()] == CLASSES[in_sampler.class_names[int(yi)]]


def test_tiny_estimator_meta_fits_on_an_image_folder(folder):
    sampler = LabeledTasks(ImageFolder(folder, transform=GRAY), n_way=3, k_shot=2, n_query=3,
                           random_state=0)
    learner = fewshot.FOMAML(meta_steps=3, meta_batch_size=4, inner_steps=1, random_state=0,
                             verbose=0).meta_fit(sampler)
    assert learner.input_shape_ == (1, 16, 16) and learner.n_iter_ == 3
    task = sampler.sample(random_state=1)
    adapted = learner.adapt(task.support)
    pred = adapted.predict(task.query.x)
    assert pred.shape == (9,) and pred.dtype == torch.int64
    assert int(pred.min()) >= 0 and int(pred.max()) < 3
    assert 0.0 <= learner.score(sampler, n_tasks=5) <= 1.0


def test_subset_of_a_dataset(folder):
    ds = ImageFolder(folder)
    keep = [i for i, (_, c) in enumerate(ds.samples) if c != 2]  # drop "cat"
    sampler = LabeledTasks(Subset(ds, keep), n_way=3, k_shot=1, n_query=2)
    assert sampler.class_names == (0, 1, 3, 4, 5)
    assert sampler.class_counts == (PER_CLASS,) * 5


# --------------------------------------------------------------------------------------------------
# Bad inputs


def test_mixed_image_sizes_are_an_error_that_says_to_resize(tmp_path):
    for c, name in enumerate(("a", "b", "c")):
        (tmp_path / name).mkdir()
        for i in range(3):
            side = 12 if (c, i) != (1, 2) else 14  # one odd image
            Image.fromarray(_pixels(c, i, side)).save(tmp_path / name / f"{i}.png")
    ds = ImageFolder(tmp_path)
    odd = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith(os.path.join("b", "2.png")))
    shapes = r"\[3, 12, 12\].*\[3, 14, 14\]"
    with pytest.raises(ValueError, match=rf"examples 0 and {odd} differ: shape {shapes}.*resize"):
        LabeledTasks(ds, n_way=2, k_shot=1, n_query=1)
    sampler = LabeledTasks(ds, n_way=2, k_shot=1, n_query=1, transform=transforms.Resize((12, 12)))
    assert sampler.input_shape == (3, 12, 12)


def _pil_loader(path):
    with Image.open(path) as im:
        im.load()
        return im  # the file's own mode (ImageFolder's default loader converts to RGB)


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "I;16", "CMYK"])
def test_pil_modes_that_need_conversion(tmp_path, mode):
    for c, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        for i in range(2):
            im = Image.fromarray(_pixels(c, i, 8))
            im = im.convert("RGBA").convert(mode) if mode in ("LA", "I;16") else im.convert(mode)
            im.save(tmp_path / name / (f"{i}.tiff" if mode == "CMYK" else f"{i}.png"))
    ds = ImageFolder(tmp_path, loader=_pil_loader, is_valid_file=lambda p: True)
    assert ds[0][0].mode == mode
    with pytest.raises(ValueError, match=rf"mode {mode!r}.*convert"):
        LabeledTasks(ds, n_way=2, k_shot=1, n_query=1)
    sampler = LabeledTasks(ds, n_way=2, k_shot=1, n_query=1, transform=lambda im: im.convert("RGB"))
    assert sampler.input_shape == (3, 8, 8)


@pytest.mark.parametrize("mode, channels", [("1", 1), ("L", 1), ("RGB", 3)])
def test_pil_modes_taken_as_they_are(tmp_path, mode, channels):
    for c, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(_pixels(c, i, 8)).convert(mode).save(tmp_path / name / f"{i}.png")
    ds = ImageFolder(tmp_path, loader=_pil_loader)
    assert ds[0][0].mode == mode
    sampler = LabeledTasks(ds, n_way=2, k_shot=1, n_query=1)
    assert sampler.input_shape == (channels, 8, 8)
    x = sampler.sample_pretraining(8, random_state=0).x
    if mode == "1":  # 1-bit images are read as 0 and 255
        assert set(torch.unique(x).tolist()) <= {0.0, 1.0}


class _ImagesOnly(torch.utils.data.Dataset):
    """A dataset whose items are bare images, not (image, label) pairs."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][0]


def test_dataset_of_non_pairs_is_an_error(folder):
    with pytest.raises(TypeError, match=r"item 0 .*Image.*expected an \(example, label\) pair"):
        LabeledTasks(_ImagesOnly(ImageFolder(folder)), n_way=2, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="y must be None"):
        LabeledTasks(ImageFolder(folder), [0] * len(CLASSES) * PER_CLASS, n_way=2, k_shot=1, n_query=1)


# --------------------------------------------------------------------------------------------------
# torchvision's Omniglot against fewshot's preprocessing

# A few characters of each set: (set, alphabet, characters).
OMNIGLOT_PICK = (
    ("images_background", "Greek", ("character01", "character07", "character24")),
    ("images_background", "Korean", ("character02", "character40")),
    ("images_evaluation", "Kannada", ("character01", "character13")),
    ("images_evaluation", "ULOG", ("character05",)),
)
#: Resize then invert: fewshot's preprocessing written as a torchvision transform (torchvision's
#: Omniglot opens every PNG with ``.convert("L")``, as fewshot does before resizing).
FEWSHOT_LIKE = transforms.Compose([transforms.Resize((28, 28), transforms.InterpolationMode.LANCZOS),
                                   transforms.Lambda(TF.invert)])


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    """``(root, dataset class)``: a torchvision Omniglot root, ``<root>/omniglot-py/``, holding the
    zips (linked: torchvision wants them beside the folders, and checks their MD5) and the picked
    characters extracted from them."""
    home = Path(get_data_home())
    zips = {}
    for name in ("images_background", "images_evaluation"):
        found = [p for p in (home / "omniglot-py" / f"{name}.zip", home / "omniglot" / f"{name}.zip")
                 if p.is_file()]
        if not found:
            if os.environ.get("FEWSHOT_DATA"):
                pytest.fail(f"FEWSHOT_DATA={home} is set but has no omniglot/{name}.zip or "
                            f"omniglot-py/{name}.zip")
            pytest.skip(f"real Omniglot not found in {home} (set FEWSHOT_DATA; docs/datasets.md)")
        zips[name] = found[0]
    # Re-packed zips (as in the shared data) hold the original PNGs but have other MD5s, which
    # torchvision refuses; a subclass whose `zips_md5` (a public class attribute) is those of the
    # files at hand accepts them. The test compares the images themselves.
    md5 = {name: hashlib.md5(archive.read_bytes()).hexdigest() for name, archive in zips.items()}
    dataset = Omniglot if md5 == Omniglot.zips_md5 else type("Repacked", (Omniglot,), {"zips_md5": md5})
    root = tmp_path_factory.mktemp("tv_omniglot")
    (root / "omniglot-py").mkdir()
    for name, archive in zips.items():
        (root / "omniglot-py" / f"{name}.zip").symlink_to(archive.resolve())
        prefixes = tuple(f"{name}/{alphabet}/{c}/" for s, alphabet, chars in OMNIGLOT_PICK if s == name
                         for c in chars)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(root / "omniglot-py", [m for m in zf.namelist() if m.startswith(prefixes)])
    return root, dataset


def _fewshot_images():
    """``{"<Alphabet>/<characterNN>": uint8 [20, 28, 28]}`` from fewshot's cache, for all characters
    (the "lake" split's three subsets cover both sets, without rotations)."""
    out = {}
    for subset in ("train", "val", "test"):
        data = load_omniglot("lake", subset, augment_rotations=False)
        for name, images in zip(data.class_names, data.images):
            out[name] = (images[:, 0] * 255).round().to(torch.uint8)
    return out


def test_torchvision_omniglot_matches_fewshot_preprocessing(omniglot_root):
    root, dataset = omniglot_root
    reference = _fewshot_images()
    for background in (True, False):
        ds = dataset(root, background=background, transform=FEWSHOT_LIKE)
        # torchvision's class index is the position in its (unsorted, os.listdir) list of characters;
        # `_characters` is the only place that names them.
        names = [c.replace(os.sep, "/") for c in ds._characters]
        picked = {f"{a}/{c}" for s, a, chars in OMNIGLOT_PICK if (s == "images_background") == background
                  for c in chars}
        assert set(names) == picked and len(ds) == 20 * len(picked)
        images = {}
        for i in range(len(ds)):
            im, target = ds[i]
            assert im.mode == "L" and im.size == (28, 28)
            images.setdefault(names[target], []).append(np.asarray(im))
        for name, ims in images.items():
            # fewshot keeps a character's drawings in file-name order; torchvision in listdir order.
            files = [f for f, _ in ds._character_images[names.index(name)]]
            ims = np.stack([ims[j] for j in np.argsort(files)])
            np.testing.assert_array_equal(ims, reference[name].numpy(), err_msg=name)

        # Through LabeledTasks: stored as uint8 [1, 28, 28], returned as float / 255.
        sampler = LabeledTasks(ds, n_way=2, k_shot=1, n_query=19, random_state=0)
        assert sampler.input_shape == (1, 28, 28) and sampler.class_counts == (20,) * len(picked)
        for task in sampler.sample(3):
            drawn = {}
            for part in (task.support, task.query):
                for xi, yi in zip(part.x, part.y):
                    u = torch.from_numpy(_as_uint8(xi[0]))
                    hits = [(name, j) for name, ref in reference.items() if name in picked
                            for j in range(20) if torch.equal(u, ref[j])]
                    assert len(hits) == 1
                    drawn.setdefault(int(yi), set()).add(hits[0])
            chars = [{name for name, _ in d} for d in drawn.values()]
            assert all(len(c) == 1 for c in chars) and len(set.union(*chars)) == 2
            assert all(len(d) == 20 for d in drawn.values())  # 1 + 19 distinct drawings
        pre = sampler.sample_pretraining(50, random_state=2)
        for xi, yi in zip(pre.x, pre.y):
            char = names[sampler.class_names[int(yi)]]
            u = torch.from_numpy(_as_uint8(xi[0]))
            assert any(torch.equal(u, r) for r in reference[char]), char


def test_importing_fewshot_does_not_import_torchvision():
    code = ("import sys, fewshot, fewshot.datasets, fewshot.tasks, fewshot.model_selection; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'PIL')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
