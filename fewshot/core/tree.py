"""Arithmetic on parameter dictionaries (``Params = dict[str, Tensor]``) or single tensors.

The linear solvers and meta-gradient rules work on either, so a closed-form test can use a plain
vector and a network uses its parameter dict.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

Params = dict[str, Tensor]
Vector = Union[Tensor, Params]

__all__ = ["Params", "Vector", "tree_map", "tree_dot", "tree_norm", "tree_axpy", "tree_zeros_like",
           "tree_stack_mean", "tree_detach"]


def tree_map(fn: Callable, tree: Vector, *rest: Vector) -> Vector:
    if isinstance(tree, Tensor):
        return fn(tree, *rest)
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def tree_dot(a: Vector, b: Vector) -> Tensor:
    if isinstance(a, Tensor):
        return torch.sum(a * b)
    return sum(torch.sum(a[k] * b[k]) for k in a)


def tree_norm(a: Vector) -> Tensor:
    return torch.sqrt(tree_dot(a, a))


def tree_axpy(alpha, x: Vector, y: Vector) -> Vector:
    """``y + alpha * x`` (alpha a number or a 0-dim tensor)."""
    return tree_map(lambda xi, yi: yi + alpha * xi, x, y)


def tree_zeros_like(a: Vector) -> Vector:
    return tree_map(torch.zeros_like, a)


def tree_detach(a: Vector) -> Vector:
    return tree_map(torch.Tensor.detach, a)


def tree_stack_mean(trees: list) -> Vector:
    """Elementwise mean of a list of trees."""
    first = trees[0]
    if isinstance(first, Tensor):
        return torch.stack(trees).mean(0)
    return {k: torch.stack([t[k] for t in trees]).mean(0) for k in first}
