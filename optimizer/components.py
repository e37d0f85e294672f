"""Find, by structure, where each decoder block writes to the residual stream, and how to edit it.

Every block adds an attention-like output (self-attention, linear attention, a convolution or
state-space mixer in hybrid models) and an MLP output to the residual stream. A `Site` is one
such output: the module whose output a trial's hook projects, and the weight tensors that the
same edit is baked into on export.

For MoE blocks the MLP output is a weighted sum of the chosen experts' outputs (plus a gated
shared expert), all linear in each expert's down projection. Projecting r out of the block's
output therefore equals projecting it out of every expert's down projection and bias with the
same weight: trials hook the block output once, export edits every expert (fused 3-D expert
tensors included).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from optimizer.errors import UserError

COMPONENTS = ("attn", "mlp")

PARENTS = {
    "attn": ("self_attn", "attn", "attention", "linear_attn", "conv", "mixer", "mamba", "temporal_block"),
    "mlp": ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"),
}
OUTPUT_NAMES = {
    "attn": ("o_proj", "out_proj", "dense", "c_proj", "wo"),
    "mlp": ("down_proj", "c_proj", "w2", "fc2", "dense_4h_to_h", "output_linear"),
}
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass
class WeightEdit:
    """One tensor the ablation is baked into; `residual_axis` is its axis in the residual stream."""

    module: nn.Module
    name: str  # parameter attribute of `module`
    residual_axis: int  # -2 for (..., out, in) weights, -1 for (..., in, out) weights and biases
    path: str

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def rows(self) -> torch.Tensor:
        """The tensor as float32 rows that live in the residual stream: (..., n, d)."""
        return self.tensor.detach().float().movedim(self.residual_axis, -1)

    def store(self, rows: torch.Tensor) -> None:
        with torch.no_grad():
            self.tensor.copy_(rows.movedim(-1, self.residual_axis))


@dataclass
class Site:
    """Where one component of one block is ablated."""

    component: str
    layer: int
    module: nn.Module  # a trial hook projects this module's output
    path: str
    how: str  # a few words for the discovery table
    edits: list[WeightEdit]

    @property
    def is_single_projection(self) -> bool:
        """The hooked module is itself the one edited linear map (dense attention/MLP outputs)."""
        return len(self.edits) <= 2 and all(e.module is self.module for e in self.edits)


class Discovery:
    """Per component, one Site per layer (None where a layer was allowed to be skipped)."""

    def __init__(self, sites: dict[str, list[Site | None]]):
        self.sites = sites

    def present(self, component: str | None = None):
        for c in (component,) if component else COMPONENTS:
            yield from (s for s in self.sites[c] if s is not None)

    def missing(self, component: str) -> list[int]:
        return [i for i, s in enumerate(self.sites[component]) if s is None]

    def table_rows(self) -> list[tuple[str, str, str, str]]:
        """(component, layers, modules per layer, how ablated), one row per distinct kind of site."""
        rows = []
        for c in COMPONENTS:
            kinds: dict[tuple[str, str, str], list[int]] = {}
            for site in self.present(c):
                labels = Counter(_generic(_edit_label(site, e)) for e in site.edits)
                edits = ", ".join(f"{label} x{n}" if n > 1 else label for label, n in labels.items())
                key = (_generic(site.path), edits, site.how)
                kinds.setdefault(key, []).append(site.layer)
            for (path, edits, how), layers in kinds.items():
                rows.append((c, _ranges(layers), f"{path}: {edits}", how))
            if self.missing(c):
                rows.append((c, _ranges(self.missing(c)), "not found", "skipped (--allow-missing-components)"))
        return rows


def discover(model: nn.Module, layers: list[nn.Module], hidden_size: int, allow_missing: bool = False) -> Discovery:
    """Find every block's attention and MLP output; stop with a message naming the block class
    where one cannot be found, unless `allow_missing`."""
    names = {id(m): n for n, m in model.named_modules()}
    sites: dict[str, list[Site | None]] = {c: [] for c in COMPONENTS}
    for index, layer in enumerate(layers):
        for component in COMPONENTS:
            site = _find_site(layer, component, index, hidden_size, names)
            if site is None and not allow_missing:
                children = ", ".join(f"{n} ({type(m).__name__})" for n, m in layer.named_children())
                raise UserError(
                    f"could not find the {component} output in block {index} ({type(layer).__name__}: {children}); "
                    "this architecture is not supported yet, or pass --allow-missing-components to leave it unablated"
                )
            sites[component].append(site)
    if not any(True for _ in Discovery(sites).present()):
        raise UserError(
            f"no attention or MLP output found in any block of {type(model).__name__}; this architecture is not supported"
        )
    return Discovery(sites)


def _find_site(layer: nn.Module, component: str, index: int, d: int, names: dict[int, str]) -> Site | None:
    for parent_name in PARENTS[component]:
        parent = getattr(layer, parent_name, None)
        if not isinstance(parent, nn.Module):
            continue
        if component == "mlp":
            site = _moe_site(parent, index, d, names)
            if site is not None:
                return site
        leaf = _output_leaf(parent, component, d)
        if leaf is not None:
            return Site(component, index, leaf, names[id(leaf)], "output projected", _linear_edits(leaf, d, names))
    return None


def _output_leaf(parent: nn.Module, component: str, d: int) -> nn.Module | None:
    for leaf_name in OUTPUT_NAMES[component]:
        leaf = getattr(parent, leaf_name, None)
        weight = getattr(leaf, "weight", None)
        if isinstance(leaf, nn.Module) and isinstance(weight, torch.Tensor) and d in weight.shape:
            return leaf
    return None


def _linear_edits(module: nn.Module, d: int, names: dict[int, str]) -> list[WeightEdit]:
    """A linear map's weight ((out, in) for nn.Linear, (in, out) for GPT-2's Conv1D) and bias."""
    path = names.get(id(module), type(module).__name__)
    weight = module.weight
    assert isinstance(weight, torch.Tensor), path  # a leaf is chosen for having a weight tensor
    if isinstance(module, nn.Linear) or weight.shape[0] == d and weight.shape[-1] != d:
        axis = -2
    else:
        axis = -1
    edits = [WeightEdit(module, "weight", axis, f"{path}.weight")]
    if isinstance(getattr(module, "bias", None), torch.Tensor):
        edits.append(WeightEdit(module, "bias", -1, f"{path}.bias"))
    return edits


def _moe_site(parent: nn.Module, index: int, d: int, names: dict[int, str]) -> Site | None:
    """A MoE block: experts as a ModuleList of MLPs or as fused 3-D tensors, plus shared experts."""
    experts = getattr(parent, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    edits: list[WeightEdit] = []
    if isinstance(experts, nn.ModuleList):
        for expert in experts:
            leaf = _output_leaf(expert, "mlp", d)
            if leaf is None:
                return None
            edits += _linear_edits(leaf, d, names)
        how = f"block output projected; baked into {len(experts)} expert modules"
    else:
        fused = _fused_expert_edits(experts, d, names)
        if not fused:
            return None
        edits += fused
        how = (
            f"block output projected; baked into fused experts ({fused[0].tensor.shape[0]} x {tuple(fused[0].tensor.shape[1:])})"
        )
    for shared_name in SHARED_EXPERT_NAMES:
        shared = getattr(parent, shared_name, None)
        leaf = _output_leaf(shared, "mlp", d) if isinstance(shared, nn.Module) else None
        if leaf is not None:
            edits += _linear_edits(leaf, d, names)
            how += " and the shared expert"
    return Site("mlp", index, parent, names[id(parent)], how, edits)


def _fused_expert_edits(experts: nn.Module, d: int, names: dict[int, str]) -> list[WeightEdit]:
    """The down projection of fused experts, (E, d, inter) or (E, inter, d), and its (E, d) bias."""
    path = names[id(experts)]
    params = dict(experts.named_parameters(recurse=False))
    down = next((n for n in OUTPUT_NAMES["mlp"] if n in params and params[n].dim() == 3), None)
    if down is None:
        return []
    shape = params[down].shape
    if shape[1] == d and shape[2] != d:
        axis = -2
    elif shape[2] == d and shape[1] != d:
        axis = -1
    else:  # square experts: read the orientation from the input projection, whose input axis is d
        gate_up = next((p for n, p in params.items() if p.dim() == 3 and n != down), None)
        axis = -2 if gate_up is None or gate_up.shape[2] == d else -1
    edits = [WeightEdit(experts, down, axis, f"{path}.{down}")]
    bias = params.get(f"{down}_bias")
    if bias is not None and bias.shape[-1] == d:
        edits.append(WeightEdit(experts, f"{down}_bias", -1, f"{path}.{down}_bias"))
    return edits


def _edit_label(site: Site, edit: WeightEdit) -> str:
    relative = edit.path.removeprefix(site.path + ".")
    return f"{relative} {tuple(edit.tensor.shape)}"


def _generic(text: str) -> str:
    """A path with its layer and expert numbers replaced, so that equal sites group together."""
    return re.sub(r"\.\d+\.", ".N.", text)


def _ranges(numbers: list[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)
