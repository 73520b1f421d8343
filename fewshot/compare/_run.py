"""The runner behind ``fewshot compare``: several solvers, one task family, one protocol.

Layout of the output folder ``out``::

    out/<solver>/config.json        the solver's resolved settings (what identifies its run)
    out/<solver>/checkpoint.pt      the estimator's meta_fit checkpoint, written after every chunk
    out/<solver>/state.json         what is not estimator state: sessions, CPU instruction sets,
                                    peak memory, status
    out/<solver>/history.json       estimator.history_ (learning curves)
    out/<solver>/meta_params.pt     the meta-trained parameters, weights only (fewshot.load_meta_params)
    out/<solver>/val_curve.json     validation accuracy against meta-steps (with val_every)
    out/<solver>/result.json        score, times, memory: written last, marks the solver finished
    out/<solver>/error.txt          traceback of a failed run (the other solvers carry on)
    out/results.csv, results.json   the table, assembled from the result files
    out/fidelity.csv, fidelity.json the meta-gradient fidelity table
    out/curves_loss.png, curves_accuracy.png, score_vs_time.png, curves_validation.png

Each solver runs in its own process (``python -m fewshot compare --worker out/<solver>``), so its
peak memory is its own and a crash does not stop the others. Meta-training runs in chunks of
``chunk_size`` meta-steps, each one ``meta_fit(train, checkpoint=out/<solver>/checkpoint.pt)`` with
``meta_steps`` raised to the chunk's end: the estimator restores itself from the checkpoint
(meta-parameters, optimizer state, task-stream state, history) and writes it after its last step, so
an interrupted comparison resumes where it stopped and the result is bit-identical to an
uninterrupted run. A folder of the earlier format (a ``checkpoint.joblib``) is refused.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .._files import atomic_write as _atomic_write
from . import _protocols

__all__ = ["run_comparison", "load_results", "format_table", "format_fidelity", "Comparison",
           "UsageError", "SOLVER_TYPES", "TABLE_FIELDS", "FIDELITY_FIELDS"]

#: The report's classification of each method (Table 2).
SOLVER_TYPES = {
    "MAML": "Explicit 2nd-Order",
    "FOMAML": "1st-Order",
    "Reptile": "1st-Order",
    "IMAML": "Implicit 2nd-Order",
    "NeumannMAML": "Approx. 2nd-Order",
    "PenaltyMAML": "Penalty 2nd-Order",
    "FineTune": "Non-Meta",
    "ANIL": "Explicit 2nd-Order, head only",
    "MetaSGD": "Explicit 2nd-Order, learned steps",
    "MAMLPlusPlus": "Explicit 2nd-Order, learned steps",
}

#: Columns of results.csv / results.json.
TABLE_FIELDS = ("method", "type", "metric", "score_mean", "score_ci95", "n_eval_tasks", "val_score_mean",
                "val_score_ci95", "meta_steps", "train_time_s", "s_per_step", "peak_rss_mb", "eval_time_s",
                "status")
#: Columns of fidelity.csv / fidelity.json.
FIDELITY_FIELDS = ("method", "reference", "n_tasks", "cosine_mean", "cosine_std", "rel_error_mean",
                   "rel_error_std", "norm_ratio_mean", "reference_residual_max")

CONFIG, CHECKPOINT, STATE, HISTORY, RESULT, ERROR = ("config.json", "checkpoint.pt", "state.json",
                                                     "history.json", "result.json", "error.txt")
META_PARAMS, VAL_CURVE = "meta_params.pt", "val_curve.json"
#: The estimator pickle of the earlier format (before checkpoint.pt): refused, never resumed.
OLD_CHECKPOINT = "checkpoint.joblib"
#: Environment of the solver processes. OpenMP threads that wait for work spin by default; on a busy
#: machine they then hold a core another thread needs, which slows a loaded machine many times
#: over ("PASSIVE": wait asleep; the measurement is in docs/compare.md, "Threads"). Only set when
#: the user has not set it.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
EVAL_CHUNK = 50  # evaluation tasks are drawn (and scored) 50 at a time from one seeded generator
_FORMAT = 1  # bump when the files' meaning changes


class UsageError(ValueError):
    """Settings that cannot run (unknown names, conflicting runs in the output folder, ...)."""


class Comparison(NamedTuple):
    """What :func:`run_comparison` returns: the output folder and the two tables (lists of rows)."""

    out: Path
    results: list
    fidelity: list


# --------------------------------------------------------------------------------------------------
# Small file helpers: every write is atomic (a temporary file in the same folder, then os.replace)


def _jsonable(obj):
    """NaN and infinities become ``null`` (valid JSON); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_json(path: Path, obj) -> None:
    text = json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode()))


def _read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def _write_csv(path: Path, rows, fields) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    _atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _peak_rss_mb() -> float:
    """High-water mark of this process's resident set size, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Samplers and estimators from a resolved configuration


class Samplers(NamedTuple):
    """The task families of a comparison: meta-training, meta-test, and meta-validation (``None``
    for families without a validation split)."""

    train: object
    test: object
    val: object = None


def make_samplers(config: dict) -> Samplers:
    """The samplers of a resolved configuration.

    The meta-test sampler draws tasks with ``eval_query`` query examples (per class) from held-out
    data: Omniglot's test characters, new Gaussian clusters (other centres), new sinusoids, an image
    folder's test classes. Omniglot (its split's validation characters) and image folders (their
    validation classes) also have a meta-validation sampler, with ``eval_query`` queries.
    """
    from .. import tasks

    ds = config["dataset"]
    k, q, qe = config["k_shot"], config["n_query"], config["eval_query"]
    if ds == "sinusoid":
        return Samplers(tasks.SinusoidTasks(k, q), tasks.SinusoidTasks(k, qe))
    if ds == "clusters":
        n = config["n_way"]
        return Samplers(tasks.GaussianClusterTasks(n, k, q, seed=0), tasks.GaussianClusterTasks(n, k, qe, seed=1))
    if ds == "omniglot":
        from ..datasets import omniglot_tasks

        n, split = config["n_way"], config["split"]
        return Samplers(omniglot_tasks(n, k, q, split=split, subset="train"),
                        omniglot_tasks(n, k, qe, split=split, subset="test"),
                        omniglot_tasks(n, k, qe, split=split, subset="val"))
    if ds == "folder":
        return _folder_samplers(config)
    raise ValueError(f"dataset must be one of {sorted(_protocols.DATASETS)}, got {ds!r}")


def _folder_samplers(config: dict) -> Samplers:
    """An image folder's classes split into train / validation / test (class-disjoint, by class
    group, from ``split_seed``): the same split for the ``n_query`` and the ``eval_query`` sampler."""
    from ..datasets import image_folder_tasks
    from ..model_selection import meta_train_test_split

    def split(query):
        sampler = image_folder_tasks(config["data_dir"], n_way=config["n_way"], k_shot=config["k_shot"],
                                     n_query=query, image_size=config["image_size"], mode=config["mode"],
                                     invert=config["invert"])
        n = len(sampler.class_groups())
        n_test = math.ceil(config["test_size"] * n)
        n_val = math.ceil(config["val_size"] * n)
        if n - n_test - n_val < 1:
            raise ValueError(f"{config['data_dir']} has {n} class groups: too few for a train / validation "
                             f"/ test split with val_size={config['val_size']}, test_size={config['test_size']}")
        rest, test = meta_train_test_split(sampler, test_size=n_test, random_state=config["split_seed"])
        train, val = meta_train_test_split(rest, test_size=n_val, random_state=config["split_seed"])
        return train, val, test

    train, _, _ = split(config["n_query"])
    _, val, test = split(config["eval_query"])
    return Samplers(train, test, val)


def make_estimator(name: str, params: dict):
    """A fresh estimator of solver ``name`` with ``params``."""
    from .. import SOLVERS

    return SOLVERS[name](**params)


def _run_estimator(spec: dict):
    """The estimator of a solver's run, built the same way by every session: the config's
    parameters, and for a decaying meta learning rate ``meta_lr_horizon`` = the run's meta-steps
    (unless the config sets it), so that the schedule spans the whole run and not one chunk. It is
    not a free parameter of the checkpoint, so every ``meta_fit`` call of the run must have it."""
    est = make_estimator(spec["solver"], spec["params"])
    if _schedule_of(est) != "constant" and spec["params"].get("meta_lr_horizon") is None:
        est.set_params(meta_lr_horizon=spec["params"]["meta_steps"])
    return est


def _checkpoint_steps(path: Path) -> int:
    """The number of meta-steps saved in the checkpoint at ``path`` (0 when there is none)."""
    import torch

    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["n_iter"])


def _refuse_old_format(solver_dir: Path) -> None:
    old = solver_dir / OLD_CHECKPOINT
    if old.exists():
        raise UsageError(f"{old} is a checkpoint of an earlier fewshot compare format, which cannot be "
                         f"resumed: delete the run directory {solver_dir} (or pass force=True / --force "
                         "to discard it), or choose a new out folder (--out)")


def _solver_spec(config: dict, name: str) -> dict:
    shared = {k: v for k, v in config.items() if k not in ("solvers", "solver_tasks")}
    own = config.get("solver_tasks", {}).get(name, {})
    return {"format": _FORMAT, "solver": name, **shared, **own, "params": config["solvers"][name]}


# --------------------------------------------------------------------------------------------------
# One solver: resume, meta-train in chunks with checkpoints, evaluate, write the result


def _evaluate(est, sampler, n_tasks: int, seed: int, progress=None):
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    scores, left = [], n_tasks
    while left > 0:
        n = min(EVAL_CHUNK, left)
        scores.extend(est.evaluate(sampler.sample(n, random_state=gen)).scores.tolist())
        left -= n
        if progress is not None:
            progress.update(n)
    a = np.asarray(scores, dtype=float)
    ci = 1.96 * a.std(ddof=1) / math.sqrt(a.size) if a.size > 1 else float("nan")
    return float(a.mean()), float(ci), scores


_NO_VALIDATION = "val_every needs a task family with a validation split (omniglot, folder), not {!r}"


class _ValCurve:
    """Validation accuracy against meta-steps, in ``<solver>/val_curve.json``: the first ``n_tasks``
    tasks of the validation pool that ends the run (same seed), scored every ``every`` meta-steps.

    Scoring reads the estimator between chunks only; every chunk restores the run from its
    checkpoint, so the curve leaves training bit for bit as it is without it.
    """

    def __init__(self, solver_dir: Path, spec: dict, every: int, n_tasks: int, sampler):
        self.path, self.every, self.sampler = solver_dir / VAL_CURVE, every, sampler
        self.header = {"n_tasks": n_tasks, "eval_seed": spec["eval_seed"], "every": every}
        self.points = []
        if self.path.exists():
            saved = _read_json(self.path)
            if any(saved.get(k) != self.header[k] for k in ("n_tasks", "eval_seed")):
                raise UsageError(f"{self.path} was scored on {saved.get('n_tasks')} validation tasks "
                                 f"(seed {saved.get('eval_seed')}); pass val_tasks={saved.get('n_tasks')} "
                                 f"(--val-tasks) or delete the file")
            self.points = saved["points"]

    def due(self, step: int) -> bool:
        return step % self.every == 0 and all(p["meta_step"] != step for p in self.points)

    def score(self, est, step: int, quiet: bool) -> None:
        bar = None
        if not quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.header["n_tasks"], desc=f"{est.__class__.__name__:<11} val", unit="task",
                       leave=False, dynamic_ncols=True)
        try:
            mean, ci, _ = _evaluate(est, self.sampler, self.header["n_tasks"], self.header["eval_seed"], bar)
        finally:
            if bar is not None:
                bar.close()
        self.points = sorted([*self.points, {"meta_step": step, "score_mean": mean, "score_ci95": ci}],
                             key=lambda p: p["meta_step"])
        _write_json(self.path, {**self.header, "points": self.points})


def _update_memory(state: dict, baseline: float) -> None:
    peak = _peak_rss_mb()
    state.update(peak_rss_mb=max(state["peak_rss_mb"], peak),
                 train_rss_mb=max(state["train_rss_mb"], peak - baseline))


def run_solver(solver_dir, *, chunk_size: int = 50, quiet: bool = False, max_chunks: int | None = None,
               rss_scope: str = "process", val_every: int = 0, val_tasks: int = 100) -> dict | None:
    """Run (or resume) the solver whose ``config.json`` is in ``solver_dir``; return its result.

    Meta-trains in chunks of ``chunk_size`` meta-steps, each a ``meta_fit`` with
    ``checkpoint=checkpoint.pt`` (which restores the run from that file and writes it after the
    chunk's last step) followed by ``state.json`` (sessions, CPU instruction sets, memory, status),
    then evaluates and writes ``history.json`` and ``result.json``. A finished solver (``result.json`` present) is not
    run again. ``max_chunks`` stops after that many chunks and returns ``None`` (as an interruption
    would; used to test resuming). ``val_every`` (a multiple of ``chunk_size``; 0: never) scores
    ``val_tasks`` validation tasks at every multiple of it, the run's current step included, into
    ``val_curve.json``.
    """
    import torch

    from ..exceptions import DivergenceError, SolverWarning

    solver_dir = Path(solver_dir)
    _refuse_old_format(solver_dir)
    if (solver_dir / RESULT).exists():
        return _read_json(solver_dir / RESULT)
    spec = _read_json(solver_dir / CONFIG)
    name, total = spec["solver"], spec["params"]["meta_steps"]
    for stale in solver_dir.glob("*.tmp"):  # left by a process killed while writing
        stale.unlink()
    (solver_dir / ERROR).unlink(missing_ok=True)
    train, test, val = make_samplers(spec)
    curve = None
    if val_every:
        if val is None:
            raise UsageError(_NO_VALIDATION.format(spec["dataset"]))
        curve = _ValCurve(solver_dir, spec, val_every, val_tasks, val)
    baseline = _peak_rss_mb()
    checkpoint = solver_dir / CHECKPOINT
    state = {"format": _FORMAT, "sessions": 0, "peak_rss_mb": 0.0, "train_rss_mb": 0.0,
             "status": "running"}
    if (solver_dir / STATE).exists():
        state.update(_read_json(solver_dir / STATE))
    state["sessions"] += 1
    # Kernels differ by instruction set (AVX-512, AVX2, ...): a run resumed on another one continues
    # correctly but not bit for bit as it would have on the first.
    cpu = torch.backends.cpu.get_cpu_capability()
    seen = state.setdefault("cpu_capabilities", [])
    if cpu not in seen:
        if seen and not quiet:
            print(f"{name}: resumed on a {cpu} CPU after {', '.join(seen)}; the run continues correctly, "
                  "but not bit for bit as it would have on the first CPU", flush=True)
        seen.append(cpu)
    _write_json(solver_dir / STATE, state)  # counts this session even if it is stopped in its first chunk
    est = _run_estimator(spec)
    verbose = est.verbose
    est.set_params(verbose=0)  # this loop shows the run's progress, not the estimator
    # A run saved as diverged is trained again from its checkpoint (taken before the divergence),
    # and diverges again at the same step: that restores its history.
    done = first = _checkpoint_steps(checkpoint)
    status = "running"
    if curve is not None and curve.due(done):  # the starting point (initialisation, or the checkpoint)
        est.set_params(meta_steps=done).meta_fit(train, checkpoint=checkpoint if done else None)
        curve.score(est, done, quiet)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, desc=f"{name:<11}", unit="step", dynamic_ncols=True)
    try:
        chunks = 0
        while done < total and status == "running":
            if max_chunks is not None and chunks >= max_chunks:
                return None
            est.set_params(meta_steps=min(done + chunk_size, total))  # the total to reach
            try:
                with warnings.catch_warnings():  # summarised once per session below, not per chunk
                    warnings.simplefilter("ignore", SolverWarning)
                    est.meta_fit(train, checkpoint=checkpoint)
            except DivergenceError as err:  # params_ holds the last finite meta-parameters
                status = f"diverged at meta-step {err.step}"
            _update_memory(state, baseline)
            if status == "running" and est.n_iter_ >= total:
                status = "ok"
            state["status"] = status
            _write_json(solver_dir / STATE, state)
            chunks += 1
            if curve is not None and not status.startswith("diverged") and curve.due(est.n_iter_):
                curve.score(est, est.n_iter_, quiet)
            if bar is not None:
                last = {k: v[-1] for k, v in est.history_.items()}
                bar.set_postfix({k.replace("_post", ""): f"{last[k]:.3f}" for k in
                                 ("query_loss_post", "query_acc_post", "train_loss") if k in last},
                                refresh=False)
                bar.update(est.n_iter_ - done)
            done = est.n_iter_
    finally:
        if bar is not None:
            bar.close()
    if getattr(est, "n_iter_", 0) > first:
        est._warn_about_solves(first)  # history_ is the whole run's: judge this session's steps
    if not hasattr(est, "params_"):
        # no chunk ran in this session (the run was trained to the end before): restore it from the
        # checkpoint without a step, or with meta_steps=0 set the estimator up without training
        est.set_params(meta_steps=done).meta_fit(train, checkpoint=checkpoint)
    est.set_params(verbose=verbose)
    if status == "running":  # meta_steps=0, or trained to the end in an earlier session
        status = "ok"
    _update_memory(state, baseline)  # peak memory of meta-training, before evaluation
    _write_json(solver_dir / HISTORY, est.history_)
    if status == "ok":
        est.save_meta_params(solver_dir / META_PARAMS)

    score, ci, scores, eval_time, val_score, val_ci = None, None, [], None, None, None
    if status == "ok":
        ebar = None
        if not quiet:
            from tqdm.auto import tqdm

            pools = 1 if val is None else 2  # the test pool, then the validation pool
            ebar = tqdm(total=pools * spec["eval_tasks"], desc=f"{name:<11} eval", unit="task", leave=False,
                        dynamic_ncols=True)
        start = time.perf_counter()
        try:
            score, ci, scores = _evaluate(est, test, spec["eval_tasks"], spec["eval_seed"], ebar)
            if val is not None:
                val_score, val_ci, _ = _evaluate(est, val, spec["eval_tasks"], spec["eval_seed"], ebar)
        finally:
            if ebar is not None:
                ebar.close()
        eval_time = time.perf_counter() - start
    train_time = est.history_["time"][-1] if est.history_.get("time") else 0.0
    steps = est.n_iter_
    result = {
        "method": name, "type": SOLVER_TYPES.get(name, ""),
        "metric": "accuracy" if est.task_type_ == "classification" else "neg_mse",
        "score_mean": score, "score_ci95": ci, "n_eval_tasks": len(scores),
        "val_score_mean": val_score, "val_score_ci95": val_ci, "meta_steps": steps,
        "train_time_s": train_time, "s_per_step": train_time / steps if steps else None,
        "peak_rss_mb": state["peak_rss_mb"], "train_rss_mb": state["train_rss_mb"],
        "rss_scope": rss_scope, "eval_time_s": eval_time, "status": status,
        "sessions": state["sessions"], "cpu_capabilities": state["cpu_capabilities"],
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_version": torch.__version__, "scores": scores,
    }
    _write_json(solver_dir / RESULT, result)
    return _read_json(solver_dir / RESULT)


def _worker(solver_dir, *, chunk_size: int, quiet: bool, threads: int | None = None, val_every: int = 0,
            val_tasks: int = 100) -> int:
    """Entry of the per-solver subprocess: run, and on failure leave ``error.txt``.

    The thread count comes from the solver's ``config.json`` (``threads``), else from the command
    line when the file has none.
    """
    import torch

    solver_dir = Path(solver_dir)
    threads = _read_json(solver_dir / CONFIG).get("threads", threads)
    if threads:
        torch.set_num_threads(threads)
    try:
        run_solver(solver_dir, chunk_size=chunk_size, quiet=quiet, rss_scope="solver process",
                   val_every=val_every, val_tasks=val_tasks)
    except KeyboardInterrupt:
        return 130
    except Exception:
        _atomic_write(solver_dir / ERROR, lambda f: f.write(traceback.format_exc().encode()))
        raise
    return 0


# --------------------------------------------------------------------------------------------------
# The table


def _status_of(solver_dir: Path, name: str) -> dict:
    """A table row for a solver without a result: failed, incomplete or not run."""
    row = {"method": name, "type": SOLVER_TYPES.get(name, "")}
    if (solver_dir / ERROR).exists():
        lines = [ln for ln in (solver_dir / ERROR).read_text().splitlines() if ln.strip()]
        row["status"] = "failed: " + (lines[-1] if lines else "see error.txt")
    elif (solver_dir / CHECKPOINT).exists():
        row["status"] = "incomplete (rerun to resume)"
    elif (solver_dir / OLD_CHECKPOINT).exists():
        row["status"] = f"earlier format ({OLD_CHECKPOINT}): delete the folder to rerun"
    else:
        row["status"] = "not run"
    return row


def load_results(out, solvers=None) -> list[dict]:
    """The table rows, read from ``out/<solver>/result.json``.

    ``solvers`` lists the rows wanted (default: every solver folder in ``out``, in
    :data:`fewshot.SOLVERS` order). Solvers without a result get a row with only their status.
    """
    from .. import SOLVERS

    out = Path(out)
    if solvers is None:
        solvers = [n for n in SOLVERS if (out / n / CONFIG).exists()]
    rows = []
    for name in solvers:
        path = out / name / RESULT
        if path.exists():
            result = _read_json(path)
            rows.append({k: result.get(k) for k in TABLE_FIELDS})
        else:
            rows.append({k: None for k in TABLE_FIELDS} | _status_of(out / name, name))
    return rows


def _fmt(value, spec: str, none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def _render(headers, lines) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*headers), rule, *(fmt.format(*line) for line in lines)])


def format_table(rows) -> str:
    """The results table as aligned text (accuracy in percent, or negative MSE, with 95% CI, on the
    meta-test tasks, and on the meta-validation tasks where the family has them)."""
    metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy")
    score_head = "Accuracy (%) +- 95% CI" if metric == "accuracy" else "Neg. MSE +- 95% CI"
    with_val = any(r.get("val_score_mean") is not None for r in rows)

    def score(mean, ci):
        if metric == "accuracy":
            return f"{100 * mean:.2f} +- {_fmt(ci and 100 * ci, '.2f')}"
        return f"{mean:.4f} +- {_fmt(ci, '.4f')}"

    lines = []
    for r in rows:
        test = score(r["score_mean"], r["score_ci95"]) if r.get("score_mean") is not None else (
            r.get("status") or "n/a")
        val = [score(r["val_score_mean"], r["val_score_ci95"]) if r.get("val_score_mean") is not None
               else "n/a"] if with_val else []
        lines.append([r["method"], r.get("type") or "", test, *val, _fmt(r.get("train_time_s"), ".1f"),
                      _fmt(r.get("s_per_step"), ".4f"), _fmt(r.get("peak_rss_mb"), ".0f"),
                      str(r.get("meta_steps") if r.get("meta_steps") is not None else "n/a")])
    heads = ["Method", "Type", score_head] + (["Validation"] if with_val else [])
    return _render(heads + ["Train time (s)", "s/step", "Peak RSS (MB)", "Meta-steps"], lines)


def format_fidelity(rows) -> str:
    """The fidelity table as aligned text."""
    lines = [[r["method"], r["reference"], str(r["n_tasks"]),
              f"{_fmt(r['cosine_mean'], '.4f')} +- {_fmt(r['cosine_std'], '.4f')}",
              (f"{_fmt(r['rel_error_mean'], '.3g')} +- {_fmt(r['rel_error_std'], '.2g')}"
               if r.get("rel_error_mean") is not None and math.isfinite(r["rel_error_mean"]) else "n/a"),
              _fmt(r.get("norm_ratio_mean"), ".3g"), _fmt(r.get("reference_residual_max"), ".1e", "-")]
             for r in rows]
    return _render(["Method", "Exact reference", "Tasks", "Cosine (mean +- std)",
                    "Rel. error (mean +- std)", "Norm ratio", "Ref. residual (max)"], lines)


def _write_figures(out: Path, rows) -> list[Path]:
    """The figures of the comparison; a failure to draw them (no matplotlib, an unwritable file) is
    reported as a warning and never loses the tables, which are written first."""
    try:
        return _draw_figures(out, rows)
    except Exception as err:  # noqa: BLE001 - figures are a by-product; the tables must survive
        warnings.warn(f"the comparison's figures were not written ({type(err).__name__}: {err}); the "
                      f"tables in {out} are complete, and `fewshot compare --table-only --out {out}` "
                      "draws the figures again", RuntimeWarning, stacklevel=2)
        return []


def _draw_figures(out: Path, rows) -> list[Path]:
    from .. import plotting

    histories = {}
    for r in rows:
        path = out / r["method"] / HISTORY
        if path.exists():
            history = _read_json(path)
            if history:
                histories[r["method"]] = history
    written = []
    if histories:
        kinds = ["loss"]
        if any("query_acc_post" in h or "train_acc" in h for h in histories.values()):
            kinds.append("accuracy")
        for kind in kinds:
            fig = plotting.plot_learning_curves(histories, kind=kind)
            written.append(out / f"curves_{kind}.png")
            fig.savefig(written[-1], dpi=110)
    if any(r.get("score_mean") is not None for r in rows):
        metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy")
        label = "meta-test accuracy" if metric == "accuracy" else "meta-test negative MSE"
        fig = plotting.plot_score_vs_time(rows, score_label=label)
        written.append(out / "score_vs_time.png")
        fig.savefig(written[-1], dpi=110)
    curves = {r["method"]: _read_json(out / r["method"] / VAL_CURVE)["points"] for r in rows
              if (out / r["method"] / VAL_CURVE).exists()}
    if any(curves.values()):
        fig = plotting.plot_validation_curves(curves)
        written.append(out / "curves_validation.png")
        fig.savefig(written[-1], dpi=110)
    return written


def _write_tables(out: Path, rows) -> None:
    _write_csv(out / "results.csv", rows, TABLE_FIELDS)
    _write_json(out / "results.json", rows)


# --------------------------------------------------------------------------------------------------
# Meta-gradient fidelity


def _fidelity(out: Path, config: dict, names, n_tasks: int, force: bool, quiet: bool) -> list[dict]:
    """Fidelity rows at the meta-parameters reached by the reference solver (MAML if run)."""
    import torch

    from ..diagnostics import meta_gradient_fidelity

    names = [n for n in names if n != "FineTune"]
    if not names or n_tasks <= 0:
        return []
    finished = [n for n in names if (out / n / CHECKPOINT).exists() and (out / n / RESULT).exists()
                and _read_json(out / n / RESULT)["status"] == "ok"]
    ref = "MAML" if "MAML" in finished else (finished[0] if finished else None)
    settings = {"n_tasks": n_tasks, "solvers": {n: _solver_spec(config, n) for n in names},
                "params_from": ref,
                "params_steps": _read_json(out / ref / RESULT)["meta_steps"] if ref else 0}
    path = out / "fidelity.json"
    if path.exists() and not force:
        saved = _read_json(path)
        if saved.get("settings") == _jsonable(settings):
            return saved["rows"]
    where = f"{ref} after {settings['params_steps']} meta-steps" if ref else "initialisation"
    _log(quiet, f"meta-gradient fidelity: {len(names)} solvers, {n_tasks} tasks, float64, at the "
                f"meta-parameters of {where}")
    train = make_samplers(config).train
    prepared = {}
    for name in names:
        params = dict(config["solvers"][name], meta_steps=0, dtype="float64", warm_start=False,
                      verbose=0)
        prepared[name] = make_estimator(name, params).meta_fit(train)
    theta = None
    if ref is not None:
        # the reference's meta-parameters after its last step, from its meta_fit checkpoint
        theta = torch.load(out / ref / CHECKPOINT, map_location="cpu", weights_only=True)["meta_params"]
    tasks = train.sample(n_tasks, random_state=int(config["eval_seed"]))
    _write_json(path, {"settings": settings, "rows": meta_gradient_fidelity(prepared, tasks, params=theta)})
    rows = _read_json(path)["rows"]  # n/a (nan) is null, as in every table file
    _write_csv(out / "fidelity.csv", rows, FIDELITY_FIELDS)
    return rows


# --------------------------------------------------------------------------------------------------
# The comparison


#: Settings that only decide how a trained run is scored (the evaluation pools and the test-time
#: adaptation steps): a run asked for with other values of them is scored again, not trained again.
SCORING_KEYS = ("eval_query", "eval_tasks", "eval_seed")
SCORING_PARAMS = ("adapt_steps",)


def _training(spec: dict, *, steps: bool = True) -> dict:
    """The settings of ``spec`` that decide meta-training (without ``meta_steps`` if not ``steps``)."""
    drop = SCORING_PARAMS if steps else SCORING_PARAMS + ("meta_steps",)
    return {**{k: v for k, v in spec.items() if k not in SCORING_KEYS},
            "params": {k: v for k, v in spec["params"].items() if k not in drop}}


def _is_rescoring(old: dict, new: dict) -> bool:
    """Whether ``new`` asks for the run ``old`` trained the same way and scored another way."""
    return old != new and _training(old) == _training(new)


def _scoring_change(old: dict, new: dict) -> str:
    """The scoring settings that differ between ``old`` and ``new``, as ``"key: old -> new"``."""
    pairs = [(k, old.get(k), new.get(k)) for k in SCORING_KEYS]
    pairs += [(k, old["params"].get(k), new["params"].get(k)) for k in SCORING_PARAMS]
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in pairs if a != b)


def _is_extension(old: dict, new: dict) -> bool:
    """Whether ``new`` asks for the run ``old`` with more meta-steps and no other change to its
    training (its scoring may change too)."""
    old_steps, new_steps = old["params"].get("meta_steps"), new["params"].get("meta_steps")
    if not (isinstance(old_steps, int) and isinstance(new_steps, int) and new_steps > old_steps):
        return False
    if old["params"].get("meta_lr_schedule", "constant") != "constant":
        return False  # the learning rates of the steps already taken depend on the run's length
    return _training(old, steps=False) == _training(new, steps=False)


def _schedule_of(est) -> str:
    return est.get_params(deep=False).get("meta_lr_schedule", "constant")


def _prepare_dir(solver_dir: Path, spec: dict, force: bool) -> None:
    """Write the solver's config; refuse to mix results of different settings."""
    path = solver_dir / CONFIG
    if force and solver_dir.exists():
        shutil.rmtree(solver_dir)
    _refuse_old_format(solver_dir)
    if path.exists():
        old = _read_json(path)
        if "threads" not in old:  # a config.json without a thread count: take the requested one
            old["threads"] = spec.get("threads")
        new = _jsonable(spec)
        if old != new:
            if (solver_dir / RESULT).exists() and {**old, "threads": None} == {**new, "threads": None}:
                return  # finished with another thread count: the same run, reused as it was made
            has_state = any((solver_dir / f).exists() for f in (CHECKPOINT, RESULT))
            kept = _is_extension(old, new) or _is_rescoring(old, new)
            if has_state and kept and (solver_dir / CHECKPOINT).exists():
                # more meta-steps or other scoring settings, training otherwise unchanged: continue the
                # run from its last checkpoint (bit for bit the run a single invocation with the new
                # settings makes) and score it again
                change = _scoring_change(old, new)
                if change and (solver_dir / VAL_CURVE).exists():
                    raise UsageError(f"{solver_dir / VAL_CURVE} was scored with the run's earlier settings "
                                     f"({change}); move it away to score the run again, or choose another "
                                     "out folder")
                (solver_dir / RESULT).unlink(missing_ok=True)
            elif has_state:
                diff = sorted(k for k in set(old) | set(spec) if old.get(k) != new.get(k))
                detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
                raise UsageError(f"{solver_dir} holds a run with other settings ({detail}); pass "
                                 "force=True (--force) to discard it, or choose another out folder")
            else:  # nothing was trained under the old settings: start afresh
                (solver_dir / STATE).unlink(missing_ok=True)
    _write_json(path, spec)


def _spawn(solver_dir: Path, *, chunk_size, quiet, val_every, val_tasks) -> int:
    import fewshot

    cmd = [sys.executable, "-m", "fewshot", "compare", "--worker", str(solver_dir),
           "--chunk-size", str(chunk_size), "--val-every", str(val_every), "--val-tasks", str(val_tasks)]
    if quiet:
        cmd.append("--quiet")
    env = {**WORKER_ENV, **os.environ}
    root = str(Path(fewshot.__file__).resolve().parent.parent)  # importable without installing
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(cmd, env=env, check=False).returncode


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_comparison(solvers=None, *, dataset: str = "sinusoid", protocol: str = "tuned", out=None,
                   split=None, n_way=None, k_shot=None, n_query=None, eval_query=None,
                   meta_steps=None, meta_batch_size=None, inner_steps=None, inner_lr=None,
                   meta_lr=None, eval_tasks=None, device=None, seed=None, set_params=None,
                   data_dir=None, image_size=None, mode=None, invert=None, val_size=None,
                   test_size=None, split_seed=None, threads: int | None = 2, chunk_size: int = 50,
                   val_every: int = 0, val_tasks: int = 100, fidelity_tasks: int = 8, force: bool = False, quiet: bool = False, isolate: bool = True,
                   table_only: bool = False) -> Comparison:
    """Run solvers on one task family under one protocol and write the comparison's files.

    Parameters
    ----------
    solvers : list of str, optional
        Names from :data:`fewshot.SOLVERS` (default all seven).
    dataset : {"sinusoid", "omniglot", "clusters", "folder"}
        ``"folder"``: a folder of labelled images, one subfolder per class (``data_dir``), as
        :func:`fewshot.datasets.image_folder_tasks` reads it; its classes are split into
        meta-training, meta-validation and meta-test classes.
    protocol : {"tuned", "report"}
        The settings table (see ``fewshot/_protocols.py`` and ``docs/compare.md``).
    out : path, optional
        Output folder; default ``runs/compare-<dataset>-<protocol>``.
    split, n_way, k_shot, n_query, eval_query, meta_steps, meta_batch_size, inner_steps, inner_lr,
    meta_lr, eval_tasks, device, seed
        Override the protocol's values (``None``: keep them). ``n_query`` is the meta-training query
        size (per class), ``eval_query`` the meta-test one.
    set_params : dict, optional
        ``{solver or "*": {parameter: value}}``: any estimator parameter, per solver.
    data_dir, image_size, mode, invert, val_size, test_size, split_seed
        The folder dataset's images (``data_dir``, needed), their preprocessing (28 x 28 RGB,
        not inverted, by default; see :func:`~fewshot.datasets.image_folder_tasks`) and the split of
        its class groups (20% validation, 20% test, from seed 0 by default).
    threads : int or None
        ``torch.set_num_threads`` in each solver process (``None``: torch's default). The solver
        processes run with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set (see :data:`WORKER_ENV`).
    chunk_size : int
        Meta-steps between checkpoints.
    val_every, val_tasks : int
        Score ``val_tasks`` validation tasks (the first of the final validation pool) every
        ``val_every`` meta-steps (a multiple of ``chunk_size``; 0: only at the end), into
        ``<solver>/val_curve.json`` and ``curves_validation.png``: validation accuracy against
        meta-steps. The curve starts at the run's current step (0, or its checkpoint's), is kept
        across resumes and extensions, and leaves the training bit for bit as it is without it.
        Needs a family with a validation split (omniglot, folder).
    fidelity_tasks : int
        Tasks of the meta-gradient fidelity table (0 skips it).
    force : bool
        Discard existing runs in ``out`` for these solvers and start over.
    quiet : bool
        No progress bars or progress lines (the table is still returned and written).
    isolate : bool
        Run each solver in its own subprocess (per-solver peak memory; a crash only loses that
        solver). ``False`` runs them in this process: errors propagate and the reported peak memory
        is this process's.
    table_only : bool
        Run nothing: re-assemble the tables and figures from the files in ``out``.

    Returns
    -------
    Comparison
        ``(out, results, fidelity)``: the output folder and the rows of both tables.
    """
    import torch

    from .. import SOLVERS

    if table_only:
        if out is None:
            raise UsageError("table_only (--table-only) needs the out folder (--out) to read")
        out = Path(out)
        rows = load_results(out, solvers) if out.is_dir() else []
        if not rows:
            raise UsageError(f"{out} holds no comparison (no <solver>/config.json)")
        _write_tables(out, rows)
        _write_figures(out, rows)
        fid = _read_json(out / "fidelity.json")["rows"] if (out / "fidelity.json").exists() else []
        return Comparison(out, rows, fid)

    solvers = list(SOLVERS) if solvers is None else list(solvers)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise UsageError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    for key, value in (("val_every", val_every), ("val_tasks", val_tasks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "val_every" else 2):
            raise UsageError(f"{key} must be an integer {'>= 0' if key == 'val_every' else '>= 2'}, "
                             f"got {value!r}")
    if val_every % chunk_size:
        raise UsageError(f"val_every={val_every} must be a multiple of chunk_size={chunk_size} (the "
                         "validation curve is scored between chunks)")
    if val_every and dataset not in ("omniglot", "folder"):  # the families make_samplers validates on
        raise UsageError(_NO_VALIDATION.format(dataset))
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a positive integer or None, got {threads!r}")
    overrides = dict(split=split, n_way=n_way, k_shot=k_shot, n_query=n_query, eval_query=eval_query,
                     meta_steps=meta_steps, meta_batch_size=meta_batch_size, inner_steps=inner_steps,
                     inner_lr=inner_lr, meta_lr=meta_lr, eval_tasks=eval_tasks, device=device, seed=seed,
                     data_dir=data_dir, image_size=image_size, mode=mode, invert=invert, val_size=val_size,
                     test_size=test_size, split_seed=split_seed)
    out = Path(out) if out is not None else Path("runs") / f"compare-{dataset}-{protocol}"
    # Check every setting, and every solver's parameters, before running anything.
    try:
        config = _protocols.resolve(protocol, dataset, solvers, overrides, set_params)
        config["threads"] = threads  # part of a run's identity: results depend on it in the last bits
        for name in solvers:
            make_estimator(name, config["solvers"][name])._validate_params()
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err
    if dataset == "folder":  # once, here: decodes the folder into its cache before any solver runs
        try:
            make_samplers(config)
        except (TypeError, ValueError, OSError) as err:
            raise UsageError(f"{err}\n(the folder's classes need k_shot + n_query images each for "
                             "meta-training and k_shot + eval_query for validation and test: --k-shot, "
                             "--n-query, --eval-query)") from err
    out.mkdir(parents=True, exist_ok=True)
    for name in solvers:
        _prepare_dir(out / name, _solver_spec(config, name), force)

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _log(quiet, f"fewshot compare: protocol={protocol} dataset={dataset} solvers={','.join(solvers)} "
                    f"out={out}")
        start, ran, failed = time.perf_counter(), 0, []
        for i, name in enumerate(solvers, 1):
            solver_dir = out / name
            tag = f"[{i}/{len(solvers)}] {name}"
            if (solver_dir / RESULT).exists():
                _log(quiet, f"{tag}: finished earlier, skipped (force=True / --force reruns it)")
                continue
            resumed = (solver_dir / CHECKPOINT).exists()
            _log(quiet, f"{tag}: {'resuming' if resumed else 'starting'}")
            if isolate:
                code = _spawn(solver_dir, chunk_size=chunk_size, quiet=quiet, val_every=val_every,
                              val_tasks=val_tasks)
                if code in (130, -2):
                    raise KeyboardInterrupt
                if code != 0:
                    failed.append(name)
                    _log(quiet, f"{tag}: failed (exit code {code}; see {solver_dir / ERROR})")
                    continue
            else:
                run_solver(solver_dir, chunk_size=chunk_size, quiet=quiet, val_every=val_every,
                           val_tasks=val_tasks)
            ran += 1
            elapsed = time.perf_counter() - start
            left = sum(1 for n in solvers[i:] if not (out / n / RESULT).exists())
            result = _read_json(solver_dir / RESULT)
            eta = f", about {_duration(elapsed / ran * left)} left" if left else ""
            _log(quiet, f"{tag}: {result['status']}, {result['train_time_s']:.1f}s of meta-training "
                        f"(elapsed {_duration(elapsed)}{eta})")

        rows = load_results(out, solvers)
        _write_tables(out, rows)
        _write_figures(out, rows)
        # One thread: small float64 problems one task at a time, in this process, whose OpenMP
        # threads spin (WORKER_ENV cannot apply to a process already running).
        torch.set_num_threads(1)
        fid = _fidelity(out, config, solvers, fidelity_tasks, force, quiet)
    finally:
        torch.set_num_threads(old_threads)
    return Comparison(out, rows, fid)
