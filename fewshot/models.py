"""Reference networks and the name -> network table.

Every network here normalises with *batch statistics* (``BatchNorm2d(track_running_stats=False)``),
as MAML's Omniglot network does, so a model has parameters and no buffers. With batch statistics,
predictions for a query batch depend on the whole batch (transductive evaluation); see
``transductive`` in the estimators.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Conv4", "MLP", "build_model", "init_parameters", "MODELS"]


def _conv_block(in_channels, out_channels, pool=True):
    layers = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four blocks of [3x3 conv (``hidden`` filters), batch norm, ReLU, 2x2 max-pool], then a linear
    layer: the Omniglot network of MAML (Finn et al., 2017) and of the report.

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
