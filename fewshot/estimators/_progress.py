"""Progress of a fit: a tqdm bar over the meta-steps when a person is watching."""

from __future__ import annotations

__all__ = ["progress_bar", "interactive"]

#: With ``verbose="auto"``, the progress bar appears once a fit has run this many seconds.
DELAY = 2.0


def interactive() -> bool:
    """Whether a person is watching this process's output: standard error is a terminal, or the
    process is a Jupyter kernel. False under pytest's capture, in pipes, files and batch jobs."""
    import sys

    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress_bar(verbose, total: int, desc: str):
    """A tqdm bar over ``total`` meta-steps, or ``None``: ``verbose="auto"`` shows it when
    :func:`interactive`, after :data:`DELAY` seconds; an integer above 0 always, at once."""
    auto = isinstance(verbose, str)
    if total == 0 or (auto and not interactive()) or (not auto and not verbose):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=True, delay=DELAY if auto else 0)
