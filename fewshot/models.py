"""Reference networks and the name -> network table.

Every network here normalises with *batch statistics* (``BatchNorm2d(track_running_stats=False)``),
as MAML's Omniglot network does, so a model has parameters and no buffers. With batch statistics,
predictions for a query batch depend on the whole batch (transductive evaluation); see
``transductive`` in the estimators.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv4", "MLP", "MaxPool2x2", "build_model", "init_parameters", "MODELS"]


class MaxPool2x2(nn.Module):
    """2x2 max-pooling with stride 2: the function and gradients of ``nn.MaxPool2d(2)``, faster.

    PyTorch's CPU ``max_pool2d`` kernel for contiguous (NCHW) tensors is slow for these shapes,
    while its channels-last kernel is vectorised (measured: ``docs/benchmarks.md``, "Implementation
    choices"). The position of each window's maximum is found with the channels-last kernel outside
    autograd, and the maxima are gathered. Autograd, and ``torch.func``'s ``grad``, ``jvp`` and
    ``vmap``, only see a ``gather`` with constant indices: the same derivative, a cheap backward (a
    scatter) and exact higher-order derivatives (pooling is piecewise linear).
    """

    def forward(self, x):
        with torch.no_grad():
            index = _argmax_2x2(x.detach())
        return x.flatten(-2).gather(-1, index.flatten(-2)).unflatten(-1, index.shape[-2:])


def _argmax_2x2(x):
    """Flat index (into each H*W plane) of the maximum of every 2x2 window; ties go to the first
    in row-major order, as in ``max_pool2d``."""
    try:
        return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2, return_indices=True)[1]
    except RuntimeError as exc:  # under vmap, memory formats are not implemented
        if "NYI" not in str(exc):
            raise
    height, width = x.shape[-2:]
    h, w = height // 2, width // 2
    a, b = x[..., 0:2 * h:2, 0:2 * w:2], x[..., 0:2 * h:2, 1:2 * w:2]
    c, d = x[..., 1:2 * h:2, 0:2 * w:2], x[..., 1:2 * h:2, 1:2 * w:2]
    right_top, right_bottom = b > a, d > c
    down = torch.where(right_bottom, d, c) > torch.where(right_top, b, a)
    col = torch.where(down, right_bottom, right_top).to(torch.int64)
    rows = torch.arange(0, 2 * h, 2, device=x.device).view(h, 1) * width
    cols = torch.arange(0, 2 * w, 2, device=x.device).view(1, w)
    return rows + cols + down.to(torch.int64) * width + col


def _conv_block(in_channels, out_channels):
    # Pooling before the ReLU gives the same function as after (ReLU is monotone) on a quarter of
    # the elements. Parameter names stay features.<i>.0 (conv) and features.<i>.1 (batch norm).
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        MaxPool2x2(),
        nn.ReLU(),
    )


class Conv4(nn.Module):
    """Four blocks of [3x3 conv (``hidden`` filters), batch norm, ReLU, 2x2 max-pool], then a linear
    layer: the Omniglot network of MAML (Finn et al., 2017) and of the report. (Each block pools
    before its ReLU, which computes the same function; see :class:`MaxPool2x2`.)

    For 28x28 inputs the feature map after four pools is 1x1, so the head sees ``hidden`` features.
    """

    def __init__(self, in_channels=1, n_outputs=5, hidden=64, image_size=28):
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, hidden),
            _conv_block(hidden, hidden),
            _conv_block(hidden, hidden),
            _conv_block(hidden, hidden),
            nn.Flatten(),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for four 2x2 max-pools (need >= 16)")
        self.head = nn.Linear(hidden * side * side, n_outputs)

    def forward(self, x):
        return self.head(self.features(x))


class MLP(nn.Module):
    """Fully connected ReLU network; ``MLP(1, 1, (40, 40))`` is MAML's sinusoid network."""

    def __init__(self, in_features=1, n_outputs=1, hidden=(40, 40)):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x):
        return self.head(self.features(x))


def _build_conv4(input_shape, n_outputs):
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise ValueError(f"model='conv4' needs square image inputs [C, H, H], got input shape {tuple(input_shape)}")
    return Conv4(in_channels=input_shape[0], n_outputs=n_outputs, image_size=input_shape[1])


def _build_mlp(input_shape, n_outputs):
    return MLP(in_features=math.prod(input_shape), n_outputs=n_outputs)


MODELS = {"conv4": _build_conv4, "mlp": _build_mlp}


def init_parameters(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise ``module`` in place with PyTorch's default rules, drawing from ``generator``
    (so global random state is never used)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return module


def build_model(name: str, input_shape, n_outputs: int, generator: torch.Generator) -> nn.Module:
    """Build the named reference network for inputs of ``input_shape`` with ``n_outputs`` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(MODELS)} or an nn.Module")
    # Build on the meta device (no memory, no draws from the global generator), then initialise.
    with torch.device("meta"):
        module = MODELS[name](tuple(input_shape), int(n_outputs))
    return init_parameters(module.to_empty(device="cpu"), generator)
