"""How long loading data and sampling tasks take next to one meta-step: Omniglot, arrays, an image folder.

Every sampler is timed on meta-batches of 16 5-way 1-shot tasks with 15 queries per class (the
median over ``--batches`` batches, and per task):

* Omniglot (vinyals/train): the cache build time (only if this run had to build it), the cache
  load time, sampling, ``sample_pretraining(256)``;
* ``LabeledTasks`` over arrays: 60,000 ``uint8 [1, 28, 28]`` examples in 10 classes (Fashion-MNIST's
  size; random values, which sampling does not look at), whose large classes take the index-draw
  path; and 1,000 classes of 20 examples, which take the dense path (one sort key per example);
* ``ImageFolderTasks`` over a generated folder of PNGs (written to a temporary directory and
  removed afterwards): the cache build (decoding every file) and the cache load;
* if ``fewshot.FOMAML`` is available, one first-order MAML meta-step on Omniglot (or, without
  Omniglot, on the image folder, whose images have the same shape).

The CPU model, thread count and load average are printed with the figures: on a shared machine
the load matters.

Usage::

    FEWSHOT_DATA=/path/to/data FEWSHOT_CACHE=/path/to/cache python benchmarks/bench_sampling.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import fewshot  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot.datasets import get_cache_home, get_data_home, image_folder_tasks, omniglot_tasks  # noqa: E402
from fewshot.tasks import LabeledTasks  # noqa: E402

N_TASKS, N_WAY, K_SHOT, N_QUERY = 16, 5, 1, 15
SHAPE = dict(n_way=N_WAY, k_shot=K_SHOT, n_query=N_QUERY)
#: The generated image folder: classes x images of side x side grayscale PNGs, resized to 28.
FOLDER_CLASSES, FOLDER_IMAGES, FOLDER_SIDE = 200, 20, 32


def _median_time(fn, repeats, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _sampling_rows(sampler, batches: int) -> tuple[list, float]:
    gen = torch.Generator().manual_seed(0)
    per_batch = _median_time(lambda: sampler.sample(N_TASKS, random_state=gen), max(batches, 50))
    rows = [(f"  sample {N_TASKS} x {N_WAY}-way {K_SHOT}-shot {N_QUERY}-query",
             f"{per_batch * 1e3:.3f} ms per batch"),
            ("    per task", f"{per_batch / N_TASKS * 1e6:.1f} us")]
    return rows, per_batch


def _omniglot_rows(args):
    """Omniglot's rows, its sampler and its per-batch time (``None, None`` without the data)."""
    where = dict(data_home=args.data_home, cache_dir=args.cache_dir)
    cache = Path(get_cache_home(args.cache_dir, args.data_home)) / "omniglot-py"
    had_cache = any(cache.glob("omniglot_28px_*.pt"))
    try:
        sampler, first = _timed(lambda: omniglot_tasks(N_WAY, K_SHOT, N_QUERY, split="vinyals",
                                                       subset="train", **where))
    except FileNotFoundError:
        return [("Omniglot", f"skipped: not in the data home {get_data_home(args.data_home)}")], None, None
    load = _median_time(lambda: omniglot_tasks(N_WAY, K_SHOT, N_QUERY, **where), 3, warmup=0)
    gen = torch.Generator().manual_seed(0)
    pretrain = _median_time(lambda: sampler.sample_pretraining(256, random_state=gen), 50)
    sampling, per_batch = _sampling_rows(sampler, args.batches)
    rows = [
        ("Omniglot (vinyals/train, 4,112 classes of 20)", ""),
        ("  data home", get_data_home(args.data_home)),
        ("  cache", str(cache)),
        ("  cache build (extract + decode 32,460 PNGs)",
         f"{first:.2f} s" if not had_cache else "not needed (cache found)"),
        ("  cache load (omniglot_tasks, vinyals/train)", f"{load * 1e3:.1f} ms"),
        *sampling,
        ("  sample_pretraining(256)", f"{pretrain * 1e3:.3f} ms"),
    ]
    return rows, sampler, per_batch


def _array_rows(title, n_classes, per_class, batches):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_classes * per_class, 1, 28, 28), dtype=np.uint8)
    y = rng.permutation(np.repeat(np.arange(n_classes), per_class))  # unsorted, as files come
    sampler, build = _timed(lambda: LabeledTasks(x, y, **SHAPE))
    sampling, _ = _sampling_rows(sampler, batches)
    return [(title, ""), ("  LabeledTasks(x, y) (sorts the examples by class)", f"{build * 1e3:.1f} ms"),
            *sampling]


def _write_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(FOLDER_CLASSES):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True)
        for i in range(FOLDER_IMAGES):
            pixels = rng.integers(0, 256, (FOLDER_SIDE, FOLDER_SIDE), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")


def _folder_rows(batches):
    """The image folder's rows, its sampler and its per-batch time (``None, None`` without Pillow)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        return [("ImageFolderTasks", "skipped: needs Pillow")], None, None
    tmp = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    try:
        _write_folder(tmp / "images")

        def make():
            return image_folder_tasks(tmp / "images", mode="L", image_size=28, cache_dir=tmp / "cache",
                                      **SHAPE)

        sampler, build = _timed(make)
        load = _median_time(make, 3, warmup=0)
        sampling, per_batch = _sampling_rows(sampler, batches)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = FOLDER_CLASSES * FOLDER_IMAGES
    what = f"{FOLDER_CLASSES} classes of {FOLDER_IMAGES} PNGs, {FOLDER_SIDE}x{FOLDER_SIDE} grayscale -> 28x28"
    return [(f"ImageFolderTasks ({what})", ""),
            (f"  cache build (decode {n:,} PNGs)", f"{build:.2f} s"),
            ("  cache load (scan, stat, read the cache)", f"{load * 1e3:.1f} ms"),
            *sampling], sampler, per_batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=100, help="meta-batches timed (>= 50)")
    parser.add_argument("--data-home", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    rows, omniglot, per_batch = _omniglot_rows(args)
    rows += _array_rows("LabeledTasks, arrays: 60,000 uint8 [1, 28, 28] in 10 classes (index draws)",
                        10, 6000, args.batches)
    rows += _array_rows("LabeledTasks, arrays: 1,000 classes of 20 uint8 [1, 28, 28] (dense draws)",
                        1000, 20, args.batches)
    folder_rows, folder, folder_batch = _folder_rows(args.batches)
    rows += folder_rows
    if omniglot is not None:
        rows += _meta_step_rows(omniglot, per_batch, "Omniglot")
    elif folder is not None:
        rows += _meta_step_rows(folder, folder_batch, "the image folder")
    width = max(len(k) for k, _ in rows)
    load1, _, _ = os.getloadavg()
    threads = torch.get_num_threads()
    print(f"{_cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, {threads} thread"
          f"{'s' * (threads != 1)}; load average {load_before:.1f} at the start, {load1:.1f} at the end")
    if max(load_before, load1) > (os.cpu_count() or 1) - 0.5 and torch.get_num_threads() > 1:
        print("note: the cores are busy with other work; multi-threaded torch ops then wait for "
              "descheduled threads and times can be far higher than on an idle machine (try --threads 1)")
    for key, value in rows:
        print(f"{key:<{width}}  {value}".rstrip())


def _meta_step_rows(sampler, per_batch, on):
    try:
        import fewshot

        FOMAML = fewshot.FOMAML
    except (ImportError, AttributeError) as err:
        return [("FOMAML meta-step", f"unavailable (fewshot.FOMAML cannot be imported: {err})")]
    learner = FOMAML(model="conv4", inner_lr=0.4, inner_steps=5, meta_batch_size=16, meta_steps=3,
                     random_state=0, verbose=0).meta_fit(sampler)
    cumulative = list(learner.history_["time"])
    steps = [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative)]
    # The first step includes warm-up; report the median of the later ones when there are any.
    step = statistics.median(steps[1:] or steps)
    return [(f"FOMAML meta-step on {on} (conv4, 16 tasks, 5 inner steps)", f"{step * 1e3:.1f} ms"),
            ("  sampling share of a meta-step", f"{per_batch / step:.2%}")]


if __name__ == "__main__":
    main()
