"""Directional ablation: per-trial forward hooks during the study, and the same edit baked into weights.

Editing a tensor whose rows x live in the residual stream as x <- x - w r (r . x) (weights and
biases alike) equals editing the module's output as y <- y - w r (r . y). Trials use the second
form: one hook per site (see components.py), registered once, whose direction and weight are
swapped per trial. No weight is copied and nothing needs restoring.

Norm-preserving ablation rescales every edited row back to its original norm. For a dense
projection y = W x, row j of W^T (what input feature j writes) becomes s_j (I - w r r^T) W[:, j],
so y' = (I - w r r^T) W (s * x): a pre-hook scales the input by s, the hook projects the output,
which is exact. s needs only c = W^T r per trial: |(I - w r r^T) v|^2 = |v|^2 - (2w - w^2)(r . v)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optimizer.components import Site, WeightEdit
from optimizer.errors import UserError
from optimizer.model import LoadedModel


@dataclass
class AblationPlan:
    """For each component, per layer: a unit direction (d,) and a weight; weight 0 = untouched."""

    directions: dict[str, torch.Tensor]  # component -> (L, d)
    weights: dict[str, list[float]]  # component -> L weights

    def is_identity(self) -> bool:
        return all(w == 0 for ws in self.weights.values() for w in ws)

    def at(self, site: Site) -> tuple[torch.Tensor, float]:
        return self.directions[site.component][site.layer], float(self.weights[site.component][site.layer])


def check_norm_preserving(loaded: LoadedModel) -> None:
    """Norm preservation is exact only where the hooked module is the edited projection itself."""
    for site in loaded.discovery.present():
        if not site.is_single_projection:
            raise UserError(
                f"--norm-preserving needs dense output projections, but block {site.layer}'s {site.component} is "
                f"{type(site.module).__name__} ({site.how}); run without --norm-preserving for this model"
            )


def _project(y: torch.Tensor, scaled: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return y - (y @ direction).unsqueeze(-1) * scaled


def _row_scale(norms: torch.Tensor, c: torch.Tensor, w: float) -> torch.Tensor:
    """Per row of norm |row| and component c = r . row: |row| / |row - w r c|, the factor that
    restores each edited row's norm."""
    edited = (norms.square() - (2 * w - w * w) * c.square()).clamp(min=0).sqrt()
    return norms / edited.clamp(min=1e-12)


class AblationHooks:
    """One forward hook per site; `apply` sets the tensors for a trial, `clear` disables them."""

    def __init__(self, loaded: LoadedModel, norm_preserving: bool = False, static: bool = False):
        """`static`: every hook always projects, reading fixed per-site buffers that `apply` and
        `clear` overwrite in place (a zero weight leaves the output unchanged), so that a captured
        CUDA graph that ran through the hooks stays valid from one trial to the next."""
        self._loaded = loaded
        self._norm_preserving = norm_preserving
        self._static = static
        if norm_preserving:
            check_norm_preserving(loaded)
        self._sites = list(loaded.discovery.present())
        # slot per hooked module: (w * r, r, input scale or None) in the module's dtype; None = untouched
        self._slots: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None] = {}
        self._row_norms: dict[nn.Module, torch.Tensor] = {}
        self._handles = []
        for site in self._sites:
            self._slots[site.module] = self._fixed_slot(site) if static else None
            self._handles.append(site.module.register_forward_hook(self._hook))
            if norm_preserving:
                self._handles.append(site.module.register_forward_pre_hook(self._pre_hook))

    def _fixed_slot(self, site: Site) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        edit = site.edits[0]
        n_rows, d = edit.tensor.movedim(edit.residual_axis, -1).shape[-2:]  # a view: no copy of the weight
        zeros = lambda n: torch.zeros(n, dtype=self._loaded.dtype, device=self._loaded.device)
        return zeros(d), zeros(d), zeros(n_rows).fill_(1) if self._norm_preserving else None

    def _pre_hook(self, module: nn.Module, args):
        slot = self._slots[module]
        if slot is None or slot[2] is None:
            return None
        return (args[0] * slot[2], *args[1:])

    def _hook(self, module: nn.Module, _inputs, output):
        slot = self._slots[module]
        if slot is None:
            return None
        scaled, direction, _ = slot
        if isinstance(output, tuple):  # MoE blocks may also return router logits
            return (_project(output[0], scaled, direction), *output[1:])
        return _project(output, scaled, direction)

    @torch.no_grad()
    def apply(self, plan: AblationPlan) -> None:
        dtype, device = self._loaded.dtype, self._loaded.device
        for site in self._sites:
            r, w = plan.at(site)
            if w == 0:
                self._clear_slot(site.module)
                continue
            r = r.to(device, torch.float32)
            scale = self._input_scale(site, r, w).to(dtype) if self._norm_preserving else None
            if self._static:
                slot = self._slots[site.module]
                assert slot is not None  # fixed buffers are made once, in __init__
                scaled, direction, fixed_scale = slot
                scaled.copy_(w * r)
                direction.copy_(r)
                if fixed_scale is not None and scale is not None:
                    fixed_scale.copy_(scale)
            else:
                self._slots[site.module] = ((w * r).to(dtype), r.to(dtype), scale)

    def _clear_slot(self, module: nn.Module) -> None:
        if not self._static:
            self._slots[module] = None
            return
        slot = self._slots[module]
        assert slot is not None  # fixed buffers are made once, in __init__
        scaled, _, scale = slot
        scaled.zero_()
        if scale is not None:
            scale.fill_(1)

    def _input_scale(self, site: Site, r: torch.Tensor, w: float) -> torch.Tensor:
        weight = site.edits[0]
        if site.module not in self._row_norms:  # the norms never change: computed once per module
            self._row_norms[site.module] = weight.rows().norm(dim=-1)
        # per trial only c = r . row, read from the weight in its own dtype (no float32 copy)
        rows = weight.tensor.detach().movedim(weight.residual_axis, -1)  # (in, d): what each input writes
        c = (rows @ r.to(rows.dtype)).float()
        return _row_scale(self._row_norms[site.module], c, w)

    def clear(self) -> None:
        for module in self._slots:
            self._clear_slot(module)

    def remove(self) -> None:
        self.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()


def bake_edit(edit: WeightEdit, r: torch.Tensor, w: float, norm_preserving: bool = False) -> None:
    """x <- x - w r (r . x) for every residual-stream row x of the tensor (weights: optionally
    rescaled to the row's original norm; biases are projected only)."""
    rows = edit.rows()
    r = r.to(rows.device, torch.float32)
    edited = rows - w * (rows @ r).unsqueeze(-1) * r
    if norm_preserving and edit.name != "bias":
        edited = edited * _row_scale(rows.norm(dim=-1), rows @ r, w).unsqueeze(-1)
    edit.store(edited)


@torch.no_grad()
def bake_into_weights(loaded: LoadedModel, plan: AblationPlan, norm_preserving: bool = False) -> None:
    """Apply the plan to every site's tensors in place (every expert of a MoE block included)."""
    for site in loaded.discovery.present():
        r, w = plan.at(site)
        if w == 0:
            continue
        for edit in site.edits:
            bake_edit(edit, r, w, norm_preserving)
