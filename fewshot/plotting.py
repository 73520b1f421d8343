"""Figures of meta-training runs: learning curves, validation curves and score against training time.

Functions return a :class:`matplotlib.figure.Figure` built without :mod:`matplotlib.pyplot`, so they
touch no global state and work on a headless machine (save with ``fig.savefig("name.png")``).
Uses matplotlib, a dependency of fewshot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["moving_average", "plot_learning_curves", "plot_score_vs_time", "plot_validation_curves", "CURVES"]

#: History keys drawn by :func:`plot_learning_curves`, with the report's labels (Figures 1-6):
#: "Train" is the support set and "Test" the query set, "pre"/"post" before/after adaptation.
CURVES = {
    "loss": {"support_loss_pre": "Train pre", "query_loss_pre": "Test pre",
             "support_loss_post": "Train post", "query_loss_post": "Test post",
             "train_loss": "Pre-training loss"},
    "accuracy": {"support_acc_pre": "Train pre", "query_acc_pre": "Test pre",
                 "support_acc_post": "Train post", "query_acc_post": "Test post",
                 "train_acc": "Pre-training accuracy"},
}
_COLORS = {"Train pre": "tab:blue", "Test pre": "tab:orange", "Train post": "tab:green",
           "Test post": "tab:red"}


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"fewshot.plotting needs matplotlib ({err}); matplotlib is a "
                          "dependency of fewshot: reinstall fewshot or `pip install matplotlib`") from err
    return Figure(**kwargs)


def moving_average(values, window: int) -> np.ndarray:
    """Trailing moving average of ``values`` over ``window`` points (fewer at the start).

    The result has the length of ``values``; point ``i`` averages ``values[max(0, i-window+1):i+1]``.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    v = np.asarray(values, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _auto_window(n: int) -> int:
    return max(1, n // 25)


def plot_learning_curves(histories: Mapping[str, Mapping[str, Sequence[float]]], *, kind: str = "loss",
                         window: int | None = None, ncols: int = 3, title: str | None = None):
    """Learning curves over meta-steps, one panel per run, like the report's Figures 1 to 6.

    Parameters
    ----------
    histories : dict of str to dict
        ``{name: estimator.history_}``. Each panel draws ``support_*_pre`` ("Train pre"),
        ``query_*_pre`` ("Test pre"), ``support_*_post`` ("Train post") and ``query_*_post``
        ("Test post"); a :class:`~fewshot.FineTune` history draws its pre-training curve.
    kind : {"loss", "accuracy"}
    window : int, optional
        Moving-average window in meta-steps; default ``max(1, n_steps // 25)``. The raw curves are
        drawn faintly behind the smoothed ones.
    ncols : int
        Panels per row.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if kind not in CURVES:
        raise ValueError(f"kind must be one of {sorted(CURVES)}, got {kind!r}")
    if not histories:
        raise ValueError("histories is empty: pass {name: estimator.history_} for at least one run")
    names = list(histories)
    ncols = max(1, min(ncols, len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig = _figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        history = histories[name]
        drawn = False
        for key, label in CURVES[kind].items():
            values = history.get(key)
            if not values:
                continue
            steps = np.arange(1, len(values) + 1)
            w = window or _auto_window(len(values))
            color = _COLORS.get(label, "tab:purple")
            if w > 1:
                ax.plot(steps, values, color=color, alpha=0.15, linewidth=0.8)
            ax.plot(steps, moving_average(values, w), color=color, label=label, linewidth=1.5)
            drawn = True
        ax.set_title(name)
        ax.set_xlabel("meta-step")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {kind} curves", ha="center", va="center", transform=ax.transAxes)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title or f"{kind.capitalize()} before (pre) and after (post) adaptation; "
                 "Train = support set, Test = query set")
    return fig


def _mean_pm(mean: float, ci: float) -> str:
    """``mean ± ci`` with the interval to two significant digits and the mean to the same decimal
    place (0.98 with an interval of 0.0024 is ``0.9800 ± 0.0024``, not ``0.98 ± 0.0024``)."""
    if not np.isfinite(ci):
        return f"{mean:.3g}"
    if ci <= 0:
        return f"{mean:.4g} ± 0"
    decimals = max(0, 1 - math.floor(math.log10(ci)))
    return f"{mean:.{decimals}f} ± {ci:.{decimals}f}"


def plot_score_vs_time(results: Sequence[Mapping], *, score_label: str = "meta-test accuracy",
                       title: str | None = None):
    """Final score (with its 95% confidence interval) and meta-training time, per method.

    Parameters
    ----------
    results : list of dict
        Rows with ``method``, ``score_mean``, ``score_ci95`` and ``train_time_s`` (the rows of
        ``fewshot compare``'s table); rows without a score are drawn empty and labelled.
    score_label : str
        Axis label of the score (e.g. "negative MSE" for regression).

    Returns
    -------
    matplotlib.figure.Figure
        Two panels sharing the method axis: score bars with error bars, and training-time bars.
    """
    if not results:
        raise ValueError("results is empty: pass at least one row")
    names = [r["method"] for r in results]
    y = np.arange(len(names))

    def num(r, key):
        v = r.get(key)
        return float("nan") if v is None else float(v)

    score = np.array([num(r, "score_mean") for r in results])
    ci = np.array([num(r, "score_ci95") for r in results])
    time_s = np.array([num(r, "train_time_s") for r in results])
    fig = _figure(figsize=(10, 0.55 * len(names) + 1.8), layout="constrained")
    ax_s, ax_t = fig.subplots(1, 2, sharey=True)
    ok = np.isfinite(score)
    ax_s.barh(y[ok], score[ok], xerr=np.where(np.isfinite(ci), ci, 0)[ok], color="tab:blue", alpha=0.8,
              capsize=3)
    for i in np.flatnonzero(~ok):
        ax_s.text(0, y[i], " " + str(results[i].get("status") or "no score"), va="center",
                  fontsize="small")
    labels = [f"{n}\n{_mean_pm(s, c)}" if np.isfinite(s) else n for n, s, c in zip(names, score, ci)]
    ax_s.set_yticks(y, labels)
    ax_s.invert_yaxis()
    ax_s.set_xlabel(f"{score_label} (95% CI)")
    ax_s.grid(axis="x", alpha=0.3)
    okt = np.isfinite(time_s)
    ax_t.barh(y[okt], time_s[okt], color="tab:gray", alpha=0.8)
    for i in np.flatnonzero(okt):
        ax_t.text(time_s[i], y[i], f" {time_s[i]:.0f}s", va="center", fontsize="small")
    ax_t.margins(x=0.15)
    ax_t.set_xlabel("meta-training time (s)")
    ax_t.grid(axis="x", alpha=0.3)
    fig.suptitle(title or "Final score against meta-training time")
    return fig


def plot_validation_curves(curves: Mapping[str, Sequence[Mapping]], *, score_label: str = "validation accuracy",
                           reference: Mapping[str, float] | None = None, title: str | None = None):
    """Validation score against meta-steps, one line per run, with its 95% confidence band.

    Parameters
    ----------
    curves : dict
        ``{name: points}``, each point a dict with ``meta_step``, ``score_mean`` and ``score_ci95``
        (the ``points`` of ``fewshot compare``'s ``val_curve.json``).
    reference : dict, optional
        ``{label: score}``: horizontal lines to compare with (e.g. a published accuracy).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not curves or not any(curves.values()):
        raise ValueError("curves is empty: pass at least one run with a point")
    fig = _figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for name, points in curves.items():
        if not points:
            continue
        pts = sorted(points, key=lambda p: p["meta_step"])
        step = np.array([p["meta_step"] for p in pts], dtype=float)
        mean = np.array([p["score_mean"] for p in pts], dtype=float)
        ci = np.array([np.nan if p.get("score_ci95") is None else p["score_ci95"] for p in pts], dtype=float)
        (line,) = ax.plot(step, mean, marker="o", markersize=3, label=name)
        band = np.isfinite(ci)
        ax.fill_between(step[band], (mean - ci)[band], (mean + ci)[band], color=line.get_color(), alpha=0.2)
    for label, value in (reference or {}).items():
        ax.axhline(value, color="tab:gray", linestyle="--", linewidth=1)
        ax.annotate(f" {label}", (1, value), xycoords=("axes fraction", "data"), va="bottom", ha="right",
                    fontsize="small", color="tab:gray")
    ax.set_xlabel("meta-step")
    ax.set_ylabel(f"{score_label} (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(title or "Validation score against meta-steps")
    return fig
