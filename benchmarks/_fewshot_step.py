"""One fewshot measurement in its own process, for ``bench_solvers.py``; prints one JSON line.

Subcommands::

    python benchmarks/_fewshot_step.py time --solver MAML --workload omniglot --inner-steps 5 \\
        --threads 2 --steps 10 --warmup 3 [--options '{"memory_efficient": true}'] [--flops]
    python benchmarks/_fewshot_step.py matmul --size 4096 --repeats 5 --threads 2
    python benchmarks/_fewshot_step.py check-flops --inner-steps 1 --threads 2
    python benchmarks/_fewshot_step.py profile --solver MAML --workload omniglot --inner-steps 5

``time`` meta-trains the estimator with ``meta_fit`` for ``warmup + steps`` meta-steps on the peer
benchmark's workload (``benchmarks/peers/configs.py``) and its random tasks
(``peer_step.make_tasks``, drawn once before timing, as the peers' harness does), with
``full_history=False`` (the peers compute no logging passes). The time of each meta-step comes
from ``history_["time"]`` (cumulative wall seconds); memory is ``ru_maxrss`` before and after the
meta-steps (after a ``meta_fit`` with no steps has done the one-off setup). With ``--flops`` it
then counts the FLOPs of one meta-batch's meta-gradient with
``torch.utils.flop_counter.FlopCounterMode`` (after the memory reading, so it does not change it).

``matmul`` measures the machine's float32 matrix-multiply rate; ``check-flops`` checks that
``FlopCounterMode`` counts the work under ``torch.func`` correctly (against a count of the
network's convolutions by hand and against the same computation in plain autograd); ``profile``
prints ``torch.profiler`` key averages of one meta-step (not JSON). ``--device`` (``time``,
``matmul``, ``profile``) runs on another torch device, e.g. ``cuda``; there ``time`` also reports
the peak memory allocated on the device during the timed meta-steps (``peak_device_mb``).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import configs  # benchmarks/peers is not a package
import peer_step

try:
    import fewshot
except ImportError:  # a source checkout without an install
    sys.path.insert(0, str(HERE.parent))
    import fewshot
from fewshot.tasks import LabeledSet, TaskBatch, TaskSampler


class WorkloadTasks(TaskSampler):
    """The peer benchmark's random tasks for ``workload``, drawn once and returned for every
    meta-batch (the same tensors as ``peer_step.make_tasks`` with the same seed), so that drawing
    tasks costs nothing inside the timed meta-steps, as in the peers' harness."""

    def __init__(self, workload_name: str, seed: int = 0):
        workload = configs.WORKLOADS[workload_name]
        tasks = peer_step.make_tasks(workload, torch.float32, torch.Generator().manual_seed(seed + 1))
        xs, ys, xq, yq = (torch.stack(part) for part in zip(*tasks))
        self._batch = TaskBatch(LabeledSet(xs, ys), LabeledSet(xq, yq))
        if workload["model"] == "conv4":
            self.task_type, self.n_outputs, self.n_way = "classification", workload["n_way"], workload["n_way"]
            self.input_shape = tuple(workload["image_shape"])
        else:
            self.task_type, self.n_outputs, self.input_shape = "regression", 1, (1,)

    def _sample(self, n_tasks, generator):
        if n_tasks > len(self._batch):
            raise ValueError(f"n_tasks must be at most {len(self._batch)} for this workload, got {n_tasks}")
        return self._batch[:n_tasks]


def make_estimator(solver: str, options: dict, workload_name: str, inner_steps: int, meta_steps: int,
                   task_threads="auto", device="cpu"):
    """``solver`` (a fewshot class name) set up like the peers: the workload's inner lr and
    meta-batch, Adam at ``configs.META_LR``, float32, no logging-only passes; on ``device``."""
    workload = configs.WORKLOADS[workload_name]
    cls = fewshot.SOLVERS[solver]
    options = dict(options)
    task_threads = options.pop("task_threads", task_threads)  # a variant's own setting wins
    return cls(model=workload["model"], inner_lr=workload["inner_lr"], inner_steps=inner_steps,
               meta_lr=configs.META_LR, meta_batch_size=workload["n_tasks"], meta_steps=meta_steps,
               meta_optimizer="adam", device=device, dtype="float32", random_state=0,
               full_history=False, task_threads=task_threads, **options)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _step_times(history) -> list[float]:
    cumulative = history["time"]
    return [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative)]


def _task_threads(value: str):
    return value if value == "auto" else int(value)


def _resolved_task_threads(value) -> int:
    return torch.get_num_threads() if value == "auto" else int(value)


def count_flops(fn) -> tuple[int, dict]:
    """Total FLOPs of ``fn()`` as ``FlopCounterMode`` counts them (matrix products and
    convolutions, forward and backward; element-wise work is not counted), and the count by op."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def _environment(threads, device="cpu") -> dict:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"python": platform.python_version(), "executable": sys.executable,
            "torch_version": torch.__version__, "fewshot_version": fewshot.__version__,
            "threads": threads, "device": str(device), "device_name": name}


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _reset_device_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _device_memory_mb(device) -> dict:
    """Peak memory allocated on a CUDA ``device`` since the last reset (empty elsewhere)."""
    if torch.device(device).type != "cuda":
        return {}
    return {"peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20}


# --------------------------------------------------------------------------------------------
def cmd_time(args) -> dict:
    torch.set_num_threads(args.threads)
    options = json.loads(args.options)
    sampler = WorkloadTasks(args.workload, seed=args.seed)
    # meta_fit with no steps first: the estimator's one-off setup (network, optimizer, modules it
    # imports on first use: about 70 MB) happens before the memory reading, as the peers' harness
    # builds its model and imports its library before its own. Then the timed meta-steps continue.
    rss_start = _max_rss_mb()
    estimator = make_estimator(args.solver, options, args.workload, args.inner_steps, 0,
                               _task_threads(args.task_threads), args.device).meta_fit(sampler)
    rss_before = _max_rss_mb()
    _reset_device_memory(args.device)
    estimator.set_params(warm_start=True, meta_steps=args.warmup + args.steps)
    estimator.meta_fit(sampler)  # each meta-step's time is read after a host sync (its statistics)
    rss_after = _max_rss_mb()
    device_memory = _device_memory_mb(args.device)
    times = _step_times(estimator.history_)[args.warmup:]
    result = {
        "library": "fewshot", "solver": args.solver, "options": options,
        "inner_steps": args.inner_steps, "workload": args.workload,
        "seconds_per_step": statistics.median(times), "all_times": times,
        "steps": args.steps, "warmup": args.warmup,
        "peak_rss_mb": rss_after - rss_before, "peak_rss_abs_mb": rss_after, "rss_before_mb": rss_before,
        "setup_rss_mb": rss_before - rss_start,
        "task_threads": _resolved_task_threads(estimator.task_threads),
        "params_finite": all(bool(torch.isfinite(p).all()) for p in estimator.params_.values()),
        **device_memory, **_environment(args.threads, args.device),
    }
    if "solve_iters" in estimator.history_:
        result["mean_solve_iters"] = statistics.mean(estimator.history_["solve_iters"])
    if args.flops:
        # One meta-batch's meta-gradients, task after task on this thread (FlopCounterMode only sees
        # this thread), with the same rule as the timed steps (including its Hessian-vector-product
        # mode, which depends on task_threads). Adam's update (~10 FLOPs per parameter) is left out.
        batch = sampler.sample(configs.WORKLOADS[args.workload]["n_tasks"], random_state=0)
        result["flops"], result["flops_by_op"] = count_flops(functools.partial(estimator.meta_gradient, batch))
    return result


def cmd_matmul(args) -> dict:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(args.size, args.size, generator=gen).to(args.device)
    b = torch.randn(args.size, args.size, generator=gen).to(args.device)
    torch.mm(a, b)  # warm-up
    _synchronize(args.device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(args.device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"size": args.size, "repeats": args.repeats, "seconds": seconds, "all_times": times,
            "gflops": 2 * args.size ** 3 / seconds / 1e9, **_environment(args.threads, args.device)}


# --------------------------------------------------------------------------------------------
# check-flops: is FlopCounterMode's count under torch.func plausible?


def forward_conv_flops_by_hand(module: nn.Module, input_shape) -> tuple[int, int]:
    """FLOPs of one example's forward pass through ``module``'s convolutions and linear layers,
    counted from their shapes (2 x multiply-adds): ``(convolutions, linear layers)``."""
    counts = {"conv": 0, "linear": 0}

    def conv_hook(m, _, out):
        kh, kw = m.kernel_size
        counts["conv"] += 2 * (m.in_channels // m.groups) * m.out_channels * kh * kw * out.shape[-2] * out.shape[-1]

    def linear_hook(m, _, out):
        counts["linear"] += 2 * m.in_features * m.out_features

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(torch.zeros((2, *input_shape)))  # batch norm needs 2 examples; hooks count one
    finally:
        for h in handles:
            h.remove()
    return counts["conv"], counts["linear"]


def plain_autograd_meta_gradient(estimator, task, second_order: bool):
    """MAML's (``second_order``) or FOMAML's meta-gradient for one task with ``torch.autograd``
    only (no ``torch.func`` transform): the same work as fewshot's rules, for comparing counts."""
    fmodel, lr, steps = estimator.fmodel_, estimator.inner_lr_, estimator.inner_steps
    loss = F.cross_entropy
    (xs, ys), (xq, yq) = task.support, task.query
    theta = {k: v.detach().requires_grad_(True) for k, v in estimator.params_.items()}
    phi = theta
    for _ in range(steps):
        grads = torch.autograd.grad(loss(fmodel(phi, xs), ys), list(phi.values()), create_graph=second_order)
        phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads)}
        if not second_order:
            phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    wrt = theta if second_order else phi
    return torch.autograd.grad(loss(fmodel(phi, xq), yq), list(wrt.values()))


def cmd_check_flops(args) -> dict:
    torch.set_num_threads(args.threads)
    workload = configs.WORKLOADS["omniglot"]
    sampler = WorkloadTasks("omniglot")
    task = sampler.sample(1, random_state=0)
    n_support = workload["n_way"] * workload["n_shot"]
    n_query = workload["n_way"] * workload["n_query"]
    result = {"workload": "omniglot", "inner_steps": args.inner_steps, "n_support": n_support,
              "n_query": n_query, **_environment(args.threads)}
    for solver, second_order in (("FOMAML", False), ("MAML", True)):
        estimator = make_estimator(solver, {}, "omniglot", args.inner_steps, meta_steps=0,
                                   task_threads=1).meta_fit(sampler)
        if solver == "FOMAML":
            conv, linear = forward_conv_flops_by_hand(estimator.fmodel_.module, sampler.input_shape)
            result["forward_flops_per_example_by_hand"] = {"conv": conv, "linear": linear}
            # FOMAML's forward passes: k on the support set, one on the query set.
            result["fomaml_forward_conv_flops_by_hand"] = (args.inner_steps * n_support + n_query) * conv
        func_total, func_ops = count_flops(functools.partial(estimator.meta_gradient, task))
        plain = functools.partial(plain_autograd_meta_gradient, estimator, task[0], second_order)
        plain_total, plain_ops = count_flops(plain)
        result[solver] = {"torch_func": func_total, "torch_func_by_op": func_ops,
                          "plain_autograd": plain_total, "plain_autograd_by_op": plain_ops}
    return result


# --------------------------------------------------------------------------------------------
def cmd_profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    options = json.loads(args.options)
    sampler = WorkloadTasks(args.workload)
    estimator = make_estimator(args.solver, options, args.workload, args.inner_steps, args.warmup,
                               _task_threads(args.task_threads), args.device).meta_fit(sampler)
    estimator.set_params(warm_start=True, meta_steps=1)
    # The tasks run on worker threads (task_threads), which the profiler records only with
    # profile_all_threads; without that option, profile with one task thread instead.
    try:
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        kwargs, note = {"experimental_config": config}, "all threads"
    except (AttributeError, TypeError):
        estimator.set_params(task_threads=1)
        kwargs, note = {}, "task_threads=1 (this torch cannot profile worker threads)"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if "cuda" in args.device else [])
    with profile(activities=activities, **kwargs) as prof:
        estimator.meta_fit(sampler)
    step = _step_times(estimator.history_)[-1]
    print(f"# fewshot {args.solver} {options or ''} {args.workload} inner_steps={args.inner_steps}, "
          f"threads={args.threads}, task_threads={_resolved_task_threads(estimator.task_threads)}, "
          f"device={args.device}, "
          f"profiled: {note}; this meta-step took {step:.3f} s under the profiler")
    key = "self_device_time_total" if "cuda" in args.device else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


# --------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, solver=True, device=True):
        p.add_argument("--threads", type=int, default=configs.DEFAULT_THREADS)
        if device:
            p.add_argument("--device", default="cpu", help="torch device of the estimator (default cpu)")
        if solver:
            p.add_argument("--solver", required=True, choices=sorted(fewshot.SOLVERS))
            p.add_argument("--options", default="{}", help="estimator parameters as a JSON object")
            p.add_argument("--workload", default="omniglot", choices=sorted(configs.WORKLOADS))
            p.add_argument("--inner-steps", type=int, default=1)
            p.add_argument("--task-threads", default="auto")

    p = sub.add_parser("time", help="time meta-steps and measure peak memory")
    common(p)
    p.add_argument("--steps", type=int, default=configs.DEFAULT_STEPS)
    p.add_argument("--warmup", type=int, default=configs.DEFAULT_WARMUP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops", action="store_true", help="also count the FLOPs of one meta-step")
    p = sub.add_parser("matmul", help="float32 matrix-multiply GFLOP/s")
    common(p, solver=False)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("check-flops", help="FlopCounterMode under torch.func vs by hand and plain autograd")
    common(p, solver=False, device=False)
    p.add_argument("--inner-steps", type=int, default=1)
    p = sub.add_parser("profile", help="torch.profiler key averages of one meta-step")
    common(p)
    p.add_argument("--warmup", type=int, default=configs.DEFAULT_WARMUP)
    p.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)

    if args.command == "profile":
        cmd_profile(args)
        return
    command = {"time": cmd_time, "matmul": cmd_matmul, "check-flops": cmd_check_flops}[args.command]
    print(json.dumps(command(args)), flush=True)


if __name__ == "__main__":
    main()
