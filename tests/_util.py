"""Helpers shared by tests."""

import os
import signal
import time

import numpy as np
import torch


class QuadraticLoss:
    """A stand-in for TaskLoss: ``x`` is the matrix, ``y`` the centre; params {"phi": vector}."""

    metric = None

    def __call__(self, params, x, y):
        d = params["phi"] - y
        return 0.5 * d @ x @ d

    def with_aux(self, params, x, y):
        value = self(params, x, y)
        return value, (value.detach(), value.detach())

    def evaluate(self, params, x, y):
        with torch.no_grad():
            return self.with_aux(params, x, y)[1]


def spd(rng, n, cond):
    """A random symmetric positive definite ``n x n`` matrix, condition number up to ``cond``,
    largest eigenvalue 1 (so step sizes below 1 are stable)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.exp(rng.uniform(0, np.log(cond), n))
    eig = eig / eig.max()
    return torch.tensor(q @ np.diag(eig) @ q.T)


def sigkill_once_written(proc, path, timeout=120):
    """Wait until ``path`` exists, then SIGKILL the subprocess ``proc`` (a crash mid-run)."""
    try:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def make_folder(root, layout, *, mode="L", size=(12, 10), seed=0, ext="png"):
    """A folder of random images: ``layout`` is ``{class path: number of images}``; returns
    ``{class path: [files]}``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = {}
    for name, n in layout.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        shape = size if mode == "L" else (*size, 3)
        files[name] = []
        for i in range(n):
            path = folder / f"{i:02d}.{ext}"
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
            files[name].append(path)
    return files
