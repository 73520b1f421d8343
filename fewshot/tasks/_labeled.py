"""N-way K-shot episodes over labelled examples: arrays, tensors or any map-style dataset.

:class:`LabeledTasks` holds a fixed pool of classes, each with its examples, in memory (read once),
and draws classification episodes from it with explicit generators. The Omniglot and image-folder
samplers of :mod:`fewshot.datasets` are configurations of it.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from .._validation import as_tensor
from ._base import LabeledSet, TaskBatch, TaskSampler, check_generator
from ._synthetic import _check_positive_int

__all__ = ["LabeledTasks"]

#: Classes with at most this many examples (or ``4 (K + Q)^2`` if larger) draw their examples by
#: sorting one random key per example; larger classes draw ``K + Q`` indices and redraw the rare
#: task whose indices repeat (probability below 1/8), so a draw costs ``O(K + Q)``, not ``O(count)``.
DENSE_COUNT = 256
SMALL_CLASSES = ("error", "exclude")


class LabeledTasks(TaskSampler):
    """N-way K-shot classification episodes from a fixed pool of labelled examples.

    Each task draws ``n_way`` classes of the pool without replacement, gives them the labels
    ``0..n_way-1`` in the order drawn, and draws ``k_shot + n_query`` distinct examples of each
    class: the first ``k_shot`` go to the support set, the rest to the query set, so the two never
    share an example. Support and query are ordered by label (``y = [0]*K + [1]*K + ...``, ``int64``).
    The same random stream as :class:`~fewshot.datasets.OmniglotTasks`: an Omniglot pool given to
    this class gives the same episodes.

    Parameters
    ----------
    x : array-like or map-style dataset
        Either the examples, ``[n, *example_shape]`` (a tensor, a NumPy array, anything
        :func:`torch.as_tensor` takes), with their labels in ``y``; or a dataset (an object with
        ``__len__`` and ``__getitem__``, such as a ``torch.utils.data.Dataset``, torchvision's
        ``ImageFolder`` or ``datasets.Omniglot``) whose items are ``(example, label)`` pairs, with
        ``y=None``. Every example is read once, here, and kept in memory.
    y : array-like, optional
        One label per example: integers or strings (one kind, not both; floats and booleans are
        refused). Needed with arrays, refused with a dataset.
    n_way, k_shot, n_query : int
        Classes per task, support and query examples per class.
    transform : callable, optional
        Applied once to every example as it is read (for instance a torchvision transform); it is
        not re-drawn per episode, so random augmentations are fixed.
    class_groups : callable or mapping, optional
        ``label -> group key``: classes of one group stay on one side of a class-disjoint split
        (:func:`fewshot.model_selection.meta_train_test_split`). By default each class is its own
        group.
    small_classes : {"error", "exclude"}, default="error"
        What to do with classes of fewer than ``k_shot + n_query`` examples: raise a ValueError
        naming them, or leave them out of the pool with a warning.
    random_state : None, int, numpy or torch generator
        Default source of randomness of :meth:`sample` and :meth:`sample_pretraining` calls that
        get none (one generator, so successive calls give new tasks).
    device : torch device, optional
        Where the examples are kept and the tasks are made.

    Examples are kept as they come, with these conversions: PIL images become ``uint8 [C, H, W]``
    (modes ``"1"`` and ``"L"``: one channel, ``"RGB"``: three); ``uint8`` examples are kept as
    ``uint8`` and returned as ``float32`` divided by 255 (images in ``[0, 1]``); floating-point
    examples are returned unchanged. Other integer types are refused (scale them first). Every
    example must have the same shape.

    Attributes
    ----------
    class_names : tuple
        The distinct labels, sorted; class ``c`` of the pool (and of :meth:`sample_pretraining`'s
        targets) is ``class_names[c]``.
    class_counts : tuple of int
        Examples of each class.
    n_classes : int
    input_shape : tuple of int
        The shape of one example.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).random((60, 1, 8, 8), dtype=np.float32)
    >>> y = np.repeat(np.arange(6), 10)
    >>> sampler = LabeledTasks(x, y, n_way=3, k_shot=2, n_query=4)
    >>> batch = sampler.sample(5, random_state=0)
    >>> batch.support.x.shape, batch.query.y.shape
    (torch.Size([5, 6, 1, 8, 8]), torch.Size([5, 12]))
    """

    task_type = "classification"

    def __init__(self, x, y=None, *, n_way=5, k_shot=1, n_query=15, transform=None, class_groups=None,
                 small_classes="error", random_state=None, device=None):
        self.n_way = _check_positive_int("n_way", n_way, 2)
        self.k_shot = _check_positive_int("k_shot", k_shot)
        self.n_query = _check_positive_int("n_query", n_query)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if class_groups is not None and not isinstance(class_groups, Mapping) and not callable(class_groups):
            raise TypeError("class_groups must be a callable (label -> group) or a mapping, got "
                            f"{type(class_groups).__name__}")
        if small_classes not in SMALL_CLASSES:
            raise ValueError(f"small_classes must be one of {list(SMALL_CLASSES)}, got {small_classes!r}")
        self.small_classes = small_classes
        self.random_state = random_state
        self._generator = None if random_state is None else check_generator(random_state)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

        examples, labels = _read(x, y, transform)
        names, codes = _encode_labels(labels)
        codes, examples, names = self._drop_small(codes, examples, names)
        order = torch.argsort(codes, stable=True)
        if not torch.equal(order, torch.arange(order.numel())):
            examples, codes = examples.index_select(0, order), codes[order]
        groups = None if class_groups is None else [_group_of(class_groups, n) for n in names]
        self._set_pool(examples.to(self.device), torch.bincount(codes, minlength=len(names)), names, groups)

    # ----------------------------------------------------------------------------------------------
    # The pool

    def _drop_small(self, codes, examples, names):
        counts = torch.bincount(codes, minlength=len(names))
        need = self.k_shot + self.n_query
        small = torch.nonzero(counts < need).flatten().tolist()
        if small:
            listed = ", ".join(f"{names[c]!r} ({int(counts[c])})" for c in small[:10])
            listed += f" and {len(small) - 10} more" if len(small) > 10 else ""
            verb = "has" if len(small) == 1 else "have"
            what = (f"{len(small)} of the {len(names)} classes {verb} fewer than k_shot + n_query = "
                    f"{self.k_shot} + {self.n_query} = {need} examples (support and query examples are "
                    f"distinct): {listed}")
            if self.small_classes == "error":
                raise ValueError(f"{what}. Lower k_shot or n_query, or pass small_classes='exclude' to "
                                 "leave these classes out")
            warnings.warn(f"{what}; they are left out (small_classes='exclude')", UserWarning, stacklevel=4)
            keep = counts >= need
            rows = keep[codes]
            remap = torch.cumsum(keep, 0) - 1
            codes, examples = remap[codes[rows]], examples[rows]
            names = tuple(n for n, k in zip(names, keep.tolist()) if k)
        if len(names) < self.n_way:
            raise ValueError(f"n_way={self.n_way} is larger than the {len(names)} classes available"
                             + (f" with at least {need} examples each" if small else ""))
        return codes, examples, names

    def _set_pool(self, examples: Tensor, counts: Tensor, names, groups) -> None:
        """Keep ``examples`` (rows grouped by class, in class order), the per-class ``counts`` and
        the class ``names``; derive the sampling tables."""
        self._x = examples
        self.class_names = tuple(names)
        self.class_counts = tuple(int(c) for c in counts.tolist())
        self._counts = counts.to(torch.int64)
        self._offsets = torch.cumsum(self._counts, 0) - self._counts
        self._groups = groups
        self.n_classes = self.n_pretrain_outputs = len(names)
        self.input_shape = tuple(examples.shape[1:])
        self.n_outputs = self.n_way
        limit = max(DENSE_COUNT, 4 * (self.k_shot + self.n_query) ** 2)
        self._dense = self._counts <= limit
        self._dense_width = int(self._counts[self._dense].max()) if bool(self._dense.any()) else 0
        self._all_dense = bool(self._dense.all())
        self._equal_counts = bool((self._counts == self._dense_width).all())

    def _convert(self, x: Tensor) -> Tensor:
        """Stored examples -> what tasks hold: ``uint8`` to ``float32 / 255``, others unchanged."""
        return x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x

    def _rows(self, rows: Tensor) -> Tensor:
        return self._convert(self._x.index_select(0, rows.to(self._x.device)))

    # ----------------------------------------------------------------------------------------------
    # The split protocol

    def class_groups(self) -> list[list[int]]:
        """The classes (indices into :attr:`class_names`) in the groups a class-disjoint split keeps
        together, in the order of their first class."""
        if self._groups is None:
            return [[c] for c in range(self.n_classes)]
        index: dict = {}
        for c, g in enumerate(self._groups):
            index.setdefault(g, []).append(c)
        return list(index.values())

    def restrict_classes(self, classes) -> "LabeledTasks":
        """A copy that draws its tasks from ``classes`` (indices into :attr:`class_names`) only.

        The copy keeps this sampler's settings and default generator; class ``i`` of the copy is
        class ``classes[i]`` of this one.
        """
        classes = as_tensor(classes, "classes").to(torch.int64).flatten().cpu()
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.n_classes):
            raise ValueError(f"classes must be indices in [0, {self.n_classes}), got {classes.tolist()}")
        if classes.unique().numel() != classes.numel():
            raise ValueError(f"classes must be distinct, got {classes.tolist()}")
        if classes.numel() < self.n_way:
            raise ValueError(f"restrict_classes needs at least n_way={self.n_way} classes, got "
                             f"{classes.numel()}")
        counts, offsets = self._counts[classes], self._offsets[classes]
        rows = torch.repeat_interleave(offsets - torch.cumsum(counts, 0) + counts, counts) \
            + torch.arange(int(counts.sum()))
        part = copy.copy(self)
        idx = classes.tolist()
        part._set_pool(self._x.index_select(0, rows.to(self._x.device)), counts,
                       [self.class_names[i] for i in idx],
                       None if self._groups is None else [self._groups[i] for i in idx])
        return part

    # ----------------------------------------------------------------------------------------------
    # Episodes

    def sample(self, n_tasks=None, *, random_state=None, device=None):
        if random_state is None and self._generator is not None:
            random_state = self._generator
        return super().sample(n_tasks, random_state=random_state, device=device)

    sample.__doc__ = TaskSampler.sample.__doc__

    def _sample(self, n_tasks, generator):
        n, k, q = self.n_way, self.k_shot, self.n_query
        dev = generator.device
        # The top-n of iid keys is a uniformly random ordered n-subset: its order is the label order.
        # float64 keys make ties (which would bias the choice) practically impossible.
        classes = torch.rand((n_tasks, self.n_classes), generator=generator, dtype=torch.float64,
                             device=dev).topk(n, dim=1).indices.reshape(-1).cpu()
        picks = self._draw_examples(classes, k + q, generator)           # [T * n, k + q]
        rows = (self._offsets[classes].unsqueeze(-1) + picks).view(n_tasks, n, k + q)
        labels = torch.arange(n, device=self._x.device)

        def gather(r, per_class):
            x = self._rows(r.reshape(-1))
            y = labels.repeat_interleave(per_class).expand(n_tasks, -1).contiguous()
            return LabeledSet(x.view(n_tasks, n * per_class, *self.input_shape), y)

        return TaskBatch(gather(rows[..., :k], k), gather(rows[..., k:], q))

    def _draw_examples(self, classes: Tensor, m: int, generator) -> Tensor:
        """``m`` distinct positions within each class of ``classes``, uniformly (ordered)."""
        dev = generator.device
        if self._all_dense:  # one key per example and class: the first m of a random order
            keys = torch.rand((classes.numel(), self._dense_width), generator=generator, device=dev).cpu()
            if not self._equal_counts:
                keys.masked_fill_(torch.arange(self._dense_width) >= self._counts[classes].unsqueeze(-1), 2.0)
            return keys.argsort(dim=-1)[:, :m]
        counts = self._counts[classes]
        dense = self._dense[classes]
        out = torch.empty((classes.numel(), m), dtype=torch.int64)
        if bool(dense.any()):
            c = counts[dense]
            keys = torch.rand((c.numel(), self._dense_width), generator=generator, device=dev).cpu()
            keys.masked_fill_(torch.arange(self._dense_width) >= c.unsqueeze(-1), 2.0)
            out[dense] = keys.argsort(dim=-1)[:, :m]
        if not bool(dense.all()):
            c = counts[~dense].unsqueeze(-1).to(torch.float64)
            picks = _distinct_draws(c, m, generator)
            out[~dense] = picks
        return out

    def sample_pretraining(self, batch_size, *, random_state=None, device=None):
        """``batch_size`` examples drawn uniformly (with replacement) from the whole pool, labelled
        with their class index ``0 .. n_classes - 1`` (an index into :attr:`class_names`)."""
        batch_size = _check_positive_int("batch_size", batch_size)
        if random_state is None and self._generator is not None:
            random_state = self._generator
        gen = check_generator(random_state)
        rows = torch.randint(self._x.shape[0], (batch_size,), generator=gen, device=gen.device).cpu()
        y = torch.searchsorted(self._offsets, rows, right=True) - 1
        return LabeledSet(self._rows(rows), y.to(self._x.device)).to(device)

    def _repr_args(self):
        return {"n_way": self.n_way, "k_shot": self.k_shot, "n_query": self.n_query,
                "n_classes": self.n_classes, "input_shape": self.input_shape}


def _distinct_draws(counts: Tensor, m: int, generator) -> Tensor:
    """Per row, ``m`` distinct integers in ``[0, count)``: iid uniform draws, with rows that repeat
    an integer drawn again (rejection keeps the distinct ordered tuples uniform)."""
    dev = generator.device
    out = torch.empty((counts.shape[0], m), dtype=torch.int64)
    todo = torch.arange(counts.shape[0])
    while todo.numel():
        u = torch.rand((todo.numel(), m), generator=generator, dtype=torch.float64, device=dev).cpu()
        draw = torch.minimum((u * counts[todo]).long(), counts[todo].long() - 1)
        s = draw.sort(dim=-1).values
        bad = (s[:, 1:] == s[:, :-1]).any(dim=-1)
        out[todo[~bad]] = draw[~bad]
        todo = todo[bad]
    return out


# --------------------------------------------------------------------------------------------------
# Reading examples and labels


def _is_dataset(x) -> bool:
    return (not isinstance(x, (Tensor, np.ndarray, list, tuple, str, bytes))
            and hasattr(x, "__getitem__") and hasattr(x, "__len__") and not hasattr(x, "__array__"))


def _read(x, y, transform):
    """``(examples tensor [n, ...], labels list or array)`` from arrays or a dataset."""
    if _is_dataset(x):
        if y is not None:
            raise ValueError(f"y must be None when x is a dataset ({type(x).__name__} yields (example, "
                             "label) pairs); pass labels only with arrays")
        n = len(x)
        if n == 0:
            raise ValueError(f"the dataset ({type(x).__name__}) is empty")
        examples, labels = [], []
        for i in range(n):
            item = x[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError(f"item {i} of the dataset ({type(x).__name__}) is a {type(item).__name__}, "
                                "expected an (example, label) pair")
            example = item[0] if transform is None else transform(item[0])
            examples.append(_example(example, i))
            labels.append(_label(item[1], i))
        return _stack(examples), labels
    if y is None:
        raise ValueError("y (one label per example) is needed when x is an array; pass a dataset of "
                         "(example, label) pairs as x to read the labels from it")
    if transform is not None:
        xs = x if isinstance(x, (Tensor, np.ndarray)) else as_tensor(x, "x")
        examples = _stack([_example(transform(xs[i]), i) for i in range(len(xs))])
    else:
        examples = _check_dtype(as_tensor(x, "x"), "x")
        if examples.dim() < 1 or examples.shape[0] == 0:
            raise ValueError(f"x must hold at least one example along its first axis, got shape "
                             f"{list(examples.shape)}")
    labels = _labels_of(y)
    if len(labels) != examples.shape[0]:
        raise ValueError(f"x and y must have the same length (one label per example), got {examples.shape[0]} "
                         f"examples and {len(labels)} labels")
    if examples.is_floating_point() and not bool(torch.isfinite(examples).all()):
        raise ValueError("x holds NaN or infinite values")
    return examples, labels


def _example(value, i) -> Tensor:
    """One example as a tensor: PIL images as ``uint8 [C, H, W]``."""
    if hasattr(value, "mode") and hasattr(value, "getbands"):  # a PIL image
        mode = value.mode
        if mode == "1":
            value = value.convert("L")
        elif mode not in ("L", "RGB"):
            raise ValueError(f"example {i} is a PIL image of mode {mode!r}; convert it to 'L' (grayscale) "
                             "or 'RGB' first, e.g. transform=lambda im: im.convert('RGB')")
        a = np.array(value, dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a))  # a copy: PIL's buffer is read-only
    try:
        t = as_tensor(value, f"example {i}")
    except TypeError as err:
        raise TypeError(f"{err}; a transform that returns tensors (e.g. torchvision's ToTensor) "
                        "turns other examples into arrays") from None
    return _check_dtype(t, f"example {i}")


def _check_dtype(t: Tensor, name: str) -> Tensor:
    if t.is_floating_point() or t.dtype == torch.uint8:
        return t
    raise TypeError(f"{name} has dtype {t.dtype}: examples must be floating point, or uint8 images "
                    "(returned as float32 / 255); scale other integers to floating point first")


def _stack(examples) -> Tensor:
    shapes = {}
    for i, e in enumerate(examples):
        shapes.setdefault((tuple(e.shape), e.dtype), i)
        if len(shapes) > 1:
            (s0, d0), i0 = next(iter(shapes.items()))
            s1, d1 = tuple(e.shape), e.dtype
            raise ValueError(f"examples {i0} and {i} differ: shape {list(s0)} {d0} and {list(s1)} {d1}. "
                             "Every example must have one shape and dtype: resize them with a transform "
                             "(e.g. torchvision's Resize), or for an image folder pass image_size")
    return torch.stack(examples)


def _label(value, i):
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise TypeError(f"label {i} is {value!r} ({type(value).__name__}): labels must be integers or strings")
    return int(value) if isinstance(value, numbers.Integral) else value


def _labels_of(y) -> list:
    if isinstance(y, (list, tuple)):  # checked item by item: numpy would turn [0, "a"] into strings
        return [_label(v, i) for i, v in enumerate(y)]
    if isinstance(y, Tensor):
        y = y.detach().cpu().numpy()
    a = np.asarray(y) if not isinstance(y, np.ndarray) else y
    if a.ndim != 1:
        raise ValueError(f"y must be one label per example (1-d), got shape {list(a.shape)}")
    if a.dtype.kind in "iu":
        return a.tolist()
    if a.dtype.kind in "US":
        return [str(v) for v in a.tolist()]
    if a.dtype.kind == "O":
        return [_label(v, i) for i, v in enumerate(a.tolist())]
    raise TypeError(f"y has dtype {a.dtype}: labels must be integers or strings")


def _encode_labels(labels) -> tuple[tuple, Tensor]:
    """Sorted distinct labels and each example's index among them."""
    kinds = {type(v) is str for v in labels}
    if len(kinds) > 1:
        first_str = next(i for i, v in enumerate(labels) if isinstance(v, str))
        first_int = next(i for i, v in enumerate(labels) if not isinstance(v, str))
        raise TypeError(f"labels mix integers and strings (label {first_int} is {labels[first_int]!r}, label "
                        f"{first_str} is {labels[first_str]!r}); use one kind")
    names = sorted(set(labels))
    index = {name: c for c, name in enumerate(names)}
    return tuple(names), torch.tensor([index[v] for v in labels], dtype=torch.int64)


def _group_of(class_groups, name):
    if isinstance(class_groups, Mapping):
        if name not in class_groups:
            raise ValueError(f"class_groups has no group for class {name!r}")
        return class_groups[name]
    return class_groups(name)
