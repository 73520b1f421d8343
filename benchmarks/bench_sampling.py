"""How long Omniglot data loading takes next to one meta-step.

Prints: the cache build time (only if this run had to build it), the cache load time, the time per
task of sampling one meta-batch of 16 5-way 1-shot tasks with 15 queries per class (median over
``--batches`` batches), and, if ``fewshot.FOMAML`` is available, the time of one first-order MAML
meta-step on the same sampler.

Usage::

    FEWSHOT_DATA=/path/to/data FEWSHOT_CACHE=/path/to/cache python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import fewshot  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot.datasets import get_cache_home, get_data_home, omniglot_tasks  # noqa: E402


def _median_time(fn, repeats, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=100, help="meta-batches timed (>= 50)")
    parser.add_argument("--data-home", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_tasks, n_way, k_shot, n_query = 16, 5, 1, 15
    where = dict(data_home=args.data_home, cache_dir=args.cache_dir)

    cache = Path(get_cache_home(args.cache_dir, args.data_home)) / "omniglot-py"
    had_cache = any(cache.glob("omniglot_28px_*.pt"))
    start = time.perf_counter()
    sampler = omniglot_tasks(n_way, k_shot, n_query, split="vinyals", subset="train", **where)
    first = time.perf_counter() - start
    load = _median_time(lambda: omniglot_tasks(n_way, k_shot, n_query, **where), 3, warmup=0)

    gen = torch.Generator().manual_seed(0)
    per_batch = _median_time(lambda: sampler.sample(n_tasks, random_state=gen), max(args.batches, 50))
    pretrain = _median_time(lambda: sampler.sample_pretraining(256, random_state=gen), 50)

    rows = [
        ("data home", get_data_home(args.data_home)),
        ("cache", str(cache)),
        ("cache build (extract + decode 32,460 PNGs)",
         f"{first:.2f} s" if not had_cache else "not needed (cache found)"),
        ("cache load (omniglot_tasks, vinyals/train)", f"{load * 1e3:.1f} ms"),
        (f"sample {n_tasks} x {n_way}-way {k_shot}-shot {n_query}-query",
         f"{per_batch * 1e3:.3f} ms per batch"),
        ("  per task", f"{per_batch / n_tasks * 1e6:.1f} us"),
        ("sample_pretraining(256)", f"{pretrain * 1e3:.3f} ms"),
    ]
    rows += _meta_step_rows(sampler, per_batch)
    width = max(len(k) for k, _ in rows)
    load1, _, _ = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average {load1:.1f}")
    if load1 > (os.cpu_count() or 1) - 0.5 and torch.get_num_threads() > 1:
        print("note: the cores are busy with other work; multi-threaded torch ops then wait for "
              "descheduled threads and times can be far higher than on an idle machine (try --threads 1)")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _meta_step_rows(sampler, per_batch):
    try:
        import fewshot

        FOMAML = fewshot.FOMAML
    except (ImportError, AttributeError) as err:
        return [("FOMAML meta-step", f"unavailable (fewshot.FOMAML cannot be imported: {err})")]
    learner = FOMAML(model="conv4", inner_lr=0.4, inner_steps=5, meta_batch_size=16, meta_steps=3,
                     random_state=0).meta_fit(sampler)
    cumulative = list(learner.history_["time"])
    steps = [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative)]
    # The first step includes warm-up; report the median of the later ones when there are any.
    step = statistics.median(steps[1:] or steps)
    return [("FOMAML meta-step (conv4, 16 tasks, 5 inner steps)", f"{step * 1e3:.1f} ms"),
            ("  sampling share of a meta-step", f"{per_batch / step:.2%}")]


if __name__ == "__main__":
    main()
