"""LabeledTasks: episodes from arrays and datasets, the class-split protocol, bad inputs."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fewshot
from fewshot.model_selection import meta_train_test_split
from fewshot.tasks import LabeledTasks, TaskSampler
from fewshot.tasks import _labeled


def _pool(counts, shape=(3,)):
    """Examples whose first feature is their row index (so draws can be traced), labels by class."""
    n = sum(counts)
    x = torch.zeros((n, *shape), dtype=torch.float64)
    x.view(n, -1)[:, 0] = torch.arange(n, dtype=torch.float64)
    y = np.repeat(np.arange(len(counts)), counts)
    return x, y


def _ids(labeled_set):
    return labeled_set.x.reshape(*labeled_set.x.shape[:2], -1)[..., 0].long()


def _check_episodes(sampler, batch, y):
    """Each task: n_way distinct classes, labels 0..n-1 in blocks, support/query of one class each
    and disjoint."""
    n, k, q = sampler.n_way, sampler.k_shot, sampler.n_query
    sid, qid = _ids(batch.support), _ids(batch.query)
    assert torch.equal(batch.support.y, torch.arange(n).repeat_interleave(k).expand(len(batch), -1))
    assert torch.equal(batch.query.y, torch.arange(n).repeat_interleave(q).expand(len(batch), -1))
    for t in range(len(batch)):
        s, qq = sid[t].view(n, k), qid[t].view(n, q)
        rows = torch.cat([s, qq], 1)
        classes = [set(y[r].tolist()) for r in rows.numpy()]
        assert all(len(c) == 1 for c in classes)           # one class per label
        assert len({c.pop() for c in classes}) == n        # n distinct classes
        assert rows.unique().numel() == n * (k + q)        # support and query disjoint, no repeats


def test_arrays_episodes_shapes_and_dtypes():
    x, y = _pool([10] * 6, shape=(1, 4, 4))
    sampler = LabeledTasks(x.numpy(), y, n_way=3, k_shot=2, n_query=4)
    assert (sampler.n_classes, sampler.input_shape, sampler.n_outputs) == (6, (1, 4, 4), 3)
    assert sampler.class_names == tuple(range(6)) and sampler.class_counts == (10,) * 6
    batch = sampler.sample(7, random_state=0)
    assert batch.support.x.shape == (7, 6, 1, 4, 4) and batch.query.x.shape == (7, 12, 1, 4, 4)
    assert batch.support.x.dtype == torch.float64 and batch.support.y.dtype == torch.int64
    _check_episodes(sampler, batch, y)
    task = sampler.sample(random_state=1)
    assert task.support.x.shape == (6, 1, 4, 4)


def test_uint8_examples_are_returned_as_float_in_unit_interval():
    x = np.arange(4 * 6 * 2, dtype=np.uint8).reshape(24, 2) * 5
    sampler = LabeledTasks(x, np.repeat(["a", "b", "c", "d"], 6), n_way=2, k_shot=1, n_query=2)
    assert sampler._x.dtype == torch.uint8  # stored compactly
    batch = sampler.sample(3, random_state=0)
    assert batch.query.x.dtype == torch.float32
    rows = [int(v) for v in (batch.support.x[:, :, 0] * 255 / 10).round().flatten()]
    assert torch.equal(batch.support.x[:, :, 0].flatten(), torch.from_numpy(x[rows, 0]).float() / 255)


def test_string_labels_sorted_and_remapped_per_task():
    x, _ = _pool([5] * 4)
    y = np.repeat(["dog", "cat", "emu", "ant"], 5)
    sampler = LabeledTasks(x, list(y), n_way=4, k_shot=1, n_query=1)
    assert sampler.class_names == ("ant", "cat", "dog", "emu")
    orders = set()
    for t in range(20):
        batch = sampler.sample(random_state=t)
        orders.add(tuple(y[_ids_one(batch.support)]))
    assert len(orders) > 5  # the labels are a random order of the classes


def _ids_one(labeled_set):
    return labeled_set.x[:, 0].long().numpy()


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(2, 40), min_size=2, max_size=8), k=st.integers(1, 3),
       q=st.integers(1, 3), n_way=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_unequal_class_sizes_give_valid_episodes(counts, k, q, n_way, seed):
    counts = [c for c in counts if c >= k + q]
    if len(counts) < max(n_way, 2):
        return
    n_way = min(n_way, len(counts))
    x, y = _pool(counts)
    sampler = LabeledTasks(x, y, n_way=n_way, k_shot=k, n_query=q)
    _check_episodes(sampler, sampler.sample(5, random_state=seed), y)


def test_large_classes_draw_distinct_examples_uniformly(monkeypatch):
    """Classes above the dense limit draw indices and redraw repeats: every example is used, none
    twice in a task, each about equally often; mixed with small classes in one pool."""
    monkeypatch.setattr(_labeled, "DENSE_COUNT", 16)
    counts = [400, 9, 120, 300]  # 9 and 120 <= 4 (K + Q)^2 = 144: keys; 300 and 400: index draws
    x, y = _pool(counts)
    sampler = LabeledTasks(x, y, n_way=4, k_shot=2, n_query=4)
    assert sampler._dense.tolist() == [False, True, True, False]
    batch = sampler.sample(3000, random_state=0)
    _check_episodes(sampler, batch[:200], y)
    ids = torch.cat([_ids(batch.support), _ids(batch.query)], 1).flatten()
    freq = torch.bincount(ids, minlength=sum(counts)).double()
    start = 0
    for c in counts:
        f = freq[start:start + c]
        expected = 3000 * 6 / c  # every class is in every task (n_way = 4 of 4)
        assert f.min() > 0 and abs(float(f.mean()) - expected) < 1e-9
        # Poisson-like spread: a biased draw (e.g. favouring low indices) would fail this.
        assert float(f.std()) < 1.5 * math.sqrt(expected)
        assert abs(float(f[: c // 2].mean() - f[c // 2:].mean())) < 4 * math.sqrt(expected / (c / 2))
        start += c


def test_same_seed_same_tasks_and_generators_advance():
    x, y = _pool([8] * 5)
    sampler = LabeledTasks(x, y, n_way=3, k_shot=1, n_query=2)
    a, b = sampler.sample(4, random_state=3), sampler.sample(4, random_state=3)
    assert torch.equal(a.query.x, b.query.x)
    own = LabeledTasks(x, y, n_way=3, k_shot=1, n_query=2, random_state=3)
    first, second = own.sample(4), own.sample(4)
    assert torch.equal(first.query.x, a.query.x) and not torch.equal(second.query.x, first.query.x)
    state = torch.random.get_rng_state()
    sampler.sample(4)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_classes_are_chosen_uniformly():
    x, y = _pool([4] * 10)
    batch = LabeledTasks(x, y, n_way=2, k_shot=1, n_query=1).sample(5000, random_state=0)
    classes = torch.from_numpy(y)[_ids(batch.support).flatten()]
    freq = torch.bincount(classes, minlength=10).double()
    assert float((freq - 1000).abs().max()) < 4 * math.sqrt(1000)


def test_pretraining_batch_labels_are_class_indices():
    x, y = _pool([3, 7, 5])
    sampler = LabeledTasks(x, np.array(["b", "a", "c"])[y], n_way=2, k_shot=1, n_query=1)
    batch = sampler.sample_pretraining(500, random_state=0)
    names = np.array(sampler.class_names)[batch.y.numpy()]  # the label of each drawn example
    source = np.array(["b", "a", "c"])[y]                    # x[:, 0] is an example's row in x
    assert (names == source[batch.x[:, 0].long().numpy()]).all()
    assert set(batch.y.tolist()) == {0, 1, 2}


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_map_style_dataset_with_transform_read_once():
    x, y = _pool([6] * 4, shape=(2,))
    calls = []

    def transform(example):
        calls.append(1)
        return example * 2

    ds = _PairDataset([(x[i], torch.tensor(int(y[i]))) for i in range(len(y))])
    sampler = LabeledTasks(ds, n_way=2, k_shot=2, n_query=3, transform=transform)
    assert len(calls) == 24 and sampler.class_names == (0, 1, 2, 3)
    batch = sampler.sample(10, random_state=0)
    assert len(calls) == 24  # not re-applied per episode
    assert torch.equal(batch.support.x[..., 1], torch.zeros(10, 4, dtype=torch.float64))
    assert (batch.support.x[..., 0] % 2 == 0).all()


def test_pil_images_become_uint8_channels_first():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 256, (5, 6), dtype=np.uint8) for _ in range(8)]
    ds = _PairDataset([(Image.fromarray(a, "L"), "ab"[i % 2]) for i, a in enumerate(gray)])
    sampler = LabeledTasks(ds, n_way=2, k_shot=1, n_query=3)
    assert sampler.input_shape == (1, 5, 6) and sampler._x.dtype == torch.uint8
    stored = sampler._x.numpy()[:, 0]
    order = [i for c in "ab" for i in range(8) if "ab"[i % 2] == c]
    assert (stored == np.stack(gray)[order]).all()
    rgb = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(4)]
    ds = _PairDataset([(Image.fromarray(a, "RGB"), i % 2) for i, a in enumerate(rgb)])
    s = LabeledTasks(ds, n_way=2, k_shot=1, n_query=1)
    assert s.input_shape == (3, 4, 4)
    assert (s._x[0].numpy() == rgb[0].transpose(2, 0, 1)).all()
    ds = _PairDataset([(Image.fromarray(a, "L").convert("P"), 0) for a in gray])
    with pytest.raises(ValueError, match=r"example 0 is a PIL image of mode 'P'; convert it"):
        LabeledTasks(ds, n_way=2)


def test_small_classes_error_or_excluded_with_warning():
    x, y = _pool([5, 2, 5, 3, 5])
    with pytest.raises(ValueError, match=r"2 of the 5 classes have fewer than k_shot \+ n_query = 1 \+ 3 = 4 "
                                         r"examples .*: 1 \(2\), 3 \(3\)\. .*small_classes='exclude'"):
        LabeledTasks(x, y, n_way=2, k_shot=1, n_query=3)
    with pytest.warns(UserWarning, match=r"2 of the 5 classes .* left out"):
        sampler = LabeledTasks(x, y, n_way=3, k_shot=1, n_query=3, small_classes="exclude")
    assert sampler.class_names == (0, 2, 4) and sampler.class_counts == (5, 5, 5)
    _check_episodes(sampler, sampler.sample(20, random_state=0), y)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"n_way=4 is larger than the 3 classes "
                                                                    r"available with at least 4 examples"):
        LabeledTasks(x, y, n_way=4, k_shot=1, n_query=3, small_classes="exclude")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LabeledTasks(x, y, n_way=2, k_shot=1, n_query=1)  # no class is small: no warning


def test_class_groups_and_restrict():
    x, y = _pool([4] * 6)
    names = np.array(["a/1", "a/2", "b/1", "b/2", "c/1", "c/2"])
    sampler = LabeledTasks(x, names[y], n_way=2, k_shot=1, n_query=2,
                           class_groups=lambda name: name.split("/")[0])
    assert sampler.class_groups() == [[0, 1], [2, 3], [4, 5]]
    part = sampler.restrict_classes([4, 1])
    assert part.class_names == ("c/1", "a/2") and part.class_groups() == [[0], [1]]
    assert torch.equal(part._x[:4], sampler._x[16:20]) and torch.equal(part._x[4:], sampler._x[4:8])
    assert sampler.n_classes == 6  # the original is unchanged
    train, test = meta_train_test_split(sampler, test_size=1, random_state=0)
    groups = lambda s: {n.split("/")[0] for n in s.class_names}  # noqa: E731
    assert groups(train).isdisjoint(groups(test)) and len(groups(test)) == 1
    assert sorted(train.class_names + test.class_names) == sorted(sampler.class_names)
    _check_episodes(train, train.sample(5, random_state=0),
                    np.searchsorted(train.class_names, names[y]).clip(0, train.n_classes - 1))
    mapped = LabeledTasks(x, names[y], n_way=2, class_groups={n: n[-1] for n in names}, k_shot=1, n_query=1)
    assert mapped.class_groups() == [[0, 2, 4], [1, 3, 5]]
    for bad, match in [([0], r"at least n_way=2 classes"), ([0, 0, 1], "distinct"), ([0, 9], r"in \[0, 6\)")]:
        with pytest.raises(ValueError, match=match):
            sampler.restrict_classes(bad)


def test_protocol_defaults_on_task_sampler():
    assert fewshot.tasks.SinusoidTasks().class_groups() is None
    with pytest.raises(TypeError, match="no fixed pool of classes"):
        TaskSampler().restrict_classes([0])
    clusters = fewshot.tasks.GaussianClusterTasks(3, 1, 2, n_classes=8)
    assert clusters.class_groups() == [[c] for c in range(8)]
    part = clusters.restrict_classes([5, 2, 7])
    assert torch.equal(part.centres, clusters.centres[[5, 2, 7]]) and part.n_classes == 3


def test_meta_fit_and_predict_on_arrays():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8)).astype(np.float32)
    y = np.repeat(np.arange(12), 10)
    x = centres[y] + 0.3 * rng.normal(size=(120, 8)).astype(np.float32)
    train, test = meta_train_test_split(LabeledTasks(x, y, n_way=3, k_shot=2, n_query=3), test_size=4,
                                        random_state=0)
    est = fewshot.FOMAML(meta_steps=20, inner_steps=3, random_state=0).meta_fit(train)
    task = test.sample(random_state=0)
    pred = est.adapt((task.support.x.numpy(), task.support.y.numpy())).predict(task.query.x.numpy())
    assert pred.shape == (9,)
    assert float(est.evaluate(test.sample(50, random_state=1)).mean) > 0.6  # chance is 1/3


@pytest.mark.parametrize("kwargs, match, error", [
    (dict(y=[0, "a"] * 5), r"labels mix integers and strings \(label 0 is 0, label 1 is 'a'\)", TypeError),
    (dict(y=np.linspace(0, 1, 10)), r"y has dtype float64: labels must be integers or strings", TypeError),
    (dict(y=np.ones(10, dtype=bool)), r"y has dtype bool", TypeError),
    (dict(y=[0] * 9), r"x and y must have the same length .* 10 examples and 9 labels", ValueError),
    (dict(y=np.zeros((10, 1), dtype=int)), r"y must be one label per example \(1-d\), got shape \[10, 1\]",
     ValueError),
    (dict(y=None), r"y \(one label per example\) is needed when x is an array", ValueError),
    (dict(x=np.arange(10)[:, None] * np.ones(3, dtype=np.int64)), r"x has dtype torch.int64: .*uint8 images",
     TypeError),
    (dict(x=np.full((10, 3), np.nan)), r"x holds NaN or infinite values", ValueError),
    (dict(x=np.zeros((0, 3)), y=[]), r"x must hold at least one example", ValueError),
    (dict(x="images/"), r"x must be a torch.Tensor or an array of numbers", TypeError),
    (dict(n_way=1), r"n_way must be an integer >= 2, got 1", ValueError),
    (dict(k_shot=0), r"k_shot must be an integer >= 1, got 0", ValueError),
    (dict(n_query=1.5), r"n_query must be an integer >= 1, got 1.5", ValueError),
    (dict(n_way=3), r"n_way=3 is larger than the 2 classes available", ValueError),
    (dict(small_classes="drop"), r"small_classes must be one of \['error', 'exclude'\], got 'drop'", ValueError),
    (dict(transform="resize"), r"transform must be callable, got str", TypeError),
    (dict(class_groups=3), r"class_groups must be a callable .* or a mapping, got int", TypeError),
    (dict(class_groups={0: "a"}), r"class_groups has no group for class 1", ValueError),
    (dict(random_state="seed"), r"random_state must be None, an int", TypeError),
])
def test_bad_arguments(kwargs, match, error):
    args = dict(x=np.zeros((10, 3), dtype=np.float32), y=[0, 1] * 5, n_way=2, k_shot=1, n_query=1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        LabeledTasks(args.pop("x"), args.pop("y"), **args)


def test_bad_datasets():
    pairs = [(torch.zeros(2), i % 2) for i in range(6)]
    with pytest.raises(ValueError, match=r"y must be None when x is a dataset"):
        LabeledTasks(_PairDataset(pairs), [0, 1] * 3, n_way=2)
    with pytest.raises(TypeError, match=r"item 0 of the dataset \(_PairDataset\) is a Tensor, expected an "
                                        r"\(example, label\) pair"):
        LabeledTasks(_PairDataset([torch.zeros(2)] * 4), n_way=2)
    with pytest.raises(ValueError, match=r"the dataset \(_PairDataset\) is empty"):
        LabeledTasks(_PairDataset([]), n_way=2)
    mixed = pairs[:3] + [(torch.zeros(3), 1)] + pairs[4:]
    with pytest.raises(ValueError, match=r"examples 0 and 3 differ: shape \[2\] torch.float32 and \[3\] "
                                         r"torch.float32.*Resize.*image_size"):
        LabeledTasks(_PairDataset(mixed), n_way=2)
    with pytest.raises(TypeError, match=r"label 2 is 1.5 \(float\): labels must be integers or strings"):
        LabeledTasks(_PairDataset(pairs[:2] + [(torch.zeros(2), 1.5)] + pairs[3:]), n_way=2)
    with pytest.raises(TypeError, match=r"example 0 must be a torch.Tensor or an array.*ToTensor"):
        LabeledTasks(_PairDataset([(object(), 0)] * 4), n_way=2)
