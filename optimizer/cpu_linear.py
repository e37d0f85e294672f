"""Faster matrix products for trials on a CPU: every linear layer's weight pre-packed for oneDNN.

A trial on a CPU is nearly all matrix products, and decoding multiplies a few dozen rows by each
weight, a shape where the plain `F.linear` runs at half the speed of oneDNN with a weight laid out
for it once (`benchmarks/RESULTS.md`). Trials never change the weights (they edit through hooks),
so the layout is made once per study. It costs a second copy of the linear weights, so it is made
only when the memory is there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from optimizer.model import LoadedModel, available_memory_bytes

# the share of the available memory that packing must leave free, for activations and everything else
HEADROOM = 0.25
TOLERANCE = 1e-4  # relative; different accumulation orders in float32 differ by ~1e-6


class PackedLinear(nn.Linear):
    """An nn.Linear whose product uses a oneDNN copy of its weight; made by `pack_linear_layers`
    (which swaps the class of existing modules: parameters, hooks and names stay as they are).
    The weight must not change afterwards: `unpack_linear_layers` first."""

    packed_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad:  # oneDNN's op has no backward
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def can_pack(loaded: LoadedModel) -> bool:
    """A float32 model on the CPU, not placed by a device map: accelerate's hooks replace every
    module's forward, so that a packed class would never run."""
    return (
        loaded.device.type == "cpu"
        and not loaded.split
        and loaded.dtype == torch.float32
        and loaded.quantization is None
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _agrees(module: nn.Linear) -> bool:
    """The packed product of a random input against F.linear: a torch build whose private oneDNN
    ops behave differently is caught here, and the study goes on without packing."""
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))  # the global RNG untouched
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, _pack(module.weight), module.bias, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    want = F.linear(x, module.weight, module.bias)
    return got.shape == want.shape and bool(((got - want).abs().max() <= TOLERANCE * want.abs().max().clamp(min=1)).item())


@torch.no_grad()
def pack_linear_layers(loaded: LoadedModel, console: Console) -> int:
    """Pack every plain nn.Linear of a float32 CPU model; returns how many (0: not done, and why is
    said on the console when it is not obvious)."""
    if not can_pack(loaded):
        return 0
    linears = [
        m
        for m in loaded.model.modules()
        if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    ]
    if not linears:
        return 0
    need = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    have = available_memory_bytes()
    if have is not None and need > (1 - HEADROOM) * have:
        console.print(
            f"[yellow]Not packing the weights for faster CPU products: needs {need / 2**30:.1f} GiB, "
            f"{have / 2**30:.1f} GiB available; trials run at the plain speed[/]"
        )
        return 0
    if not _agrees(linears[0]):
        console.print("[yellow]oneDNN's packed products disagree with torch's on this build; trials run at the plain speed[/]")
        return 0
    for module in linears:
        module.packed_weight = _pack(module.weight)
        module.__class__ = PackedLinear
    console.print(f"Packed {len(linears)} linear weights for oneDNN ({need / 2**30:.1f} GiB) for faster CPU products")
    return len(linears)


def unpack_linear_layers(model: nn.Module) -> None:
    """Back to plain nn.Linear modules (before weights are edited in place)."""
    for module in model.modules():
        if type(module) is PackedLinear:
            del module.packed_weight
            module.__class__ = nn.Linear  # type: ignore[assignment]  # (the swap back: see PackedLinear)
