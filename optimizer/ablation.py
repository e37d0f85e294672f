"""Directional ablation: per-trial forward hooks during the study, and the same edit baked into weights.

Editing a module's weight as W <- (I - w r r^T) W (and its bias b <- (I - w r r^T) b) equals
editing its output as y <- y - w r (r^T y). Trials use the second form: one hook per module,
registered once, whose direction and weight are swapped per trial. No weight is copied and
nothing needs restoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optimizer.model import LoadedModel


@dataclass
class AblationPlan:
    """For each component, per layer: a unit direction (d,) and a weight; weight 0 = untouched."""

    directions: dict[str, torch.Tensor]  # component -> (L, d)
    weights: dict[str, list[float]]  # component -> L weights

    def is_identity(self) -> bool:
        return all(w == 0 for ws in self.weights.values() for w in ws)


class AblationHooks:
    """One forward hook per output module; `apply` sets the tensors for a trial, `clear` disables them."""

    def __init__(self, loaded: LoadedModel):
        self._loaded = loaded
        # slot per module: (w * r, r) in the module's dtype, or None when the module is untouched
        self._slots: dict[nn.Module, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._handles = []
        for modules in loaded.components.values():
            for module in modules:
                self._slots[module] = None
                self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        slot = self._slots[module]
        if slot is None:
            return None
        scaled, direction = slot
        return output - (output @ direction).unsqueeze(-1) * scaled

    def apply(self, plan: AblationPlan) -> None:
        dtype, device = self._loaded.dtype, self._loaded.device
        for component, modules in self._loaded.components.items():
            for layer, module in enumerate(modules):
                w = float(plan.weights[component][layer])
                if w == 0:
                    self._slots[module] = None
                    continue
                r = plan.directions[component][layer].to(device, torch.float32)
                self._slots[module] = ((w * r).to(dtype), r.to(dtype))

    def clear(self) -> None:
        for module in self._slots:
            self._slots[module] = None

    def remove(self) -> None:
        self.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def bake_into_weights(loaded: LoadedModel, plan: AblationPlan) -> None:
    """Apply the plan to the weights in place: W <- (I - w r r^T) W, b <- (I - w r r^T) b."""
    for component, modules in loaded.components.items():
        for layer, module in enumerate(modules):
            w = float(plan.weights[component][layer])
            if w == 0:
                continue
            r = plan.directions[component][layer].to(module.weight.device, torch.float32)
            weight = module.weight.float()  # (out=d, in)
            module.weight.copy_(weight - w * torch.outer(r, r @ weight))
            if getattr(module, "bias", None) is not None:
                bias = module.bias.float()
                module.bias.copy_(bias - w * r * (r @ bias))
