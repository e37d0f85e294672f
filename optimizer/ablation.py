"""Directional ablation: per-trial forward hooks during the study, and the same edit baked into weights.

Editing a tensor whose rows x live in the residual stream as x <- x - w r (r . x) (weights and
biases alike) equals editing the module's output as y <- y - w r (r . y). Trials use the second
form: one hook per site (see components.py), registered once, whose direction and weight are
swapped per trial. No weight is copied and nothing needs restoring.

A refusal subspace generalises this to orthonormal directions r_1..r_k with weights w_1..w_k
(w_i = w gamma^(i-1)): with R = [r_1 .. r_k] (d x k) and W = diag(w_i), y <- y - R W R^T y, one
(d x k) product; k = 1 is the single direction. Every rule below is written for R, so hooks, bake,
GGUF and LoRA export share it.

Norm-preserving ablation rescales every edited row back to its original norm. For a dense
projection y = W x, row j of W^T (what input feature j writes) becomes s_j (I - w r r^T) W[:, j],
so y' = (I - w r r^T) W (s * x): a pre-hook scales the input by s, the hook projects the output,
which is exact. s needs only c = W^T r per trial: |(I - w r r^T) v|^2 = |v|^2 - (2w - w^2)(r . v)^2,
and for a subspace, r_i orthonormal, |(I - R W R^T) v|^2 = |v|^2 - sum_i (2 w_i - w_i^2)(r_i . v)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optimizer.components import Site, WeightEdit
from optimizer.errors import UserError
from optimizer.model import LoadedModel


@dataclass(frozen=True)
class SiteEdit:
    """One site's edit: orthonormal directions (k, d) as rows, and their weights (k,); a zero row
    or weight edits nothing."""

    basis: torch.Tensor
    weights: torch.Tensor

    @property
    def rank(self) -> int:
        return self.basis.shape[0]


@dataclass(frozen=True)
class AblationPlan:
    """For each component, per layer: a unit direction (d,) and a weight; weight 0 = untouched.
    A refusal subspace adds, per layer, `extra` directions orthonormal to the first, weighted
    w * decay, w * decay^2, ..."""

    directions: dict[str, torch.Tensor]  # component -> (L, d): each layer's first direction
    weights: dict[str, list[float]]  # component -> L weights
    extra: dict[str, torch.Tensor] | None = None  # component -> (L, k - 1, d)
    decay: float = 1.0  # gamma

    @property
    def rank(self) -> int:
        return 1 if self.extra is None else 1 + next(iter(self.extra.values())).shape[1]

    def is_identity(self) -> bool:
        return all(w == 0 for ws in self.weights.values() for w in ws)

    def weight_at(self, site: Site) -> float:
        return float(self.weights[site.component][site.layer])

    def at(self, site: Site) -> SiteEdit:
        first = self.directions[site.component][site.layer].float().unsqueeze(0)
        basis = first if self.extra is None else torch.cat([first, self.extra[site.component][site.layer].float()])
        ratios = torch.tensor([self.decay**i for i in range(basis.shape[0])], device=basis.device)
        return SiteEdit(basis, self.weight_at(site) * ratios)


def check_norm_preserving(loaded: LoadedModel) -> None:
    """Norm preservation is exact only where the hooked module is the edited projection itself."""
    for site in loaded.discovery.present():
        if not site.is_single_projection:
            raise UserError(
                f"--norm-preserving needs dense output projections, but block {site.layer}'s {site.component} is "
                f"{type(site.module).__name__} ({site.how}); run without --norm-preserving for this model"
            )


def _project(y: torch.Tensor, scaled: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """y - (y R) (R W)^T, with `basis` R^T (k, d) and `scaled` (R W)^T (k, d)."""
    return y - (y @ basis.mT) @ scaled


def project_output(output, scaled: torch.Tensor, basis: torch.Tensor):
    """A hooked module's output with the edit applied (`_project`): to the hidden states, which MoE
    blocks return first in a tuple beside their router logits. The one edit rule of every hook (the
    trials' here, the fit's in `optimizer.fitting`)."""
    if isinstance(output, tuple):
        return (_project(output[0], scaled, basis), *output[1:])
    return _project(output, scaled, basis)


def _row_scale(norms: torch.Tensor, c: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per row of norm |row| and components c = R^T row (rows, k): |row| / |row - R W c|, the
    factor that restores each edited row's norm."""
    edited = (norms.square() - (c.square() * (2 * weights - weights * weights)).sum(-1)).clamp(min=0).sqrt()
    return norms / edited.clamp(min=1e-12)


class AblationHooks:
    """One forward hook per site; `apply` sets the tensors for a trial, `clear` disables them."""

    def __init__(self, loaded: LoadedModel, norm_preserving: bool = False, static: bool = False, rank: int = 1):
        """`static`: every hook always projects, reading fixed per-site buffers of `rank` directions
        that `apply` and `clear` overwrite in place (zero weights leave the output unchanged), so
        that a captured CUDA graph that ran through the hooks stays valid from one trial to the
        next. Each site's tensors live on the device of the module it hooks."""
        self._loaded = loaded
        self._norm_preserving = norm_preserving
        self._static = static
        self._rank = rank
        if norm_preserving:
            check_norm_preserving(loaded)
        self._sites = list(loaded.discovery.present())
        # slot per hooked module: ((R W)^T, R^T, input scale or None) in the module's dtype; None = untouched
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
        zeros = lambda *shape: torch.zeros(*shape, dtype=self._loaded.dtype, device=edit.tensor.device)
        return zeros(self._rank, d), zeros(self._rank, d), zeros(n_rows).fill_(1) if self._norm_preserving else None

    def _pre_hook(self, module: nn.Module, args):
        slot = self._slots[module]
        if slot is None or slot[2] is None:
            return None
        return (args[0] * slot[2], *args[1:])

    def _hook(self, module: nn.Module, _inputs, output):
        slot = self._slots[module]
        if slot is None:
            return None
        scaled, basis, _ = slot
        return project_output(output, scaled, basis)

    @torch.no_grad()
    def apply(self, plan: AblationPlan) -> None:
        if self._static and plan.rank > self._rank:
            raise ValueError(f"a plan of {plan.rank} directions does not fit hooks made for {self._rank}")
        dtype = self._loaded.dtype
        for site in self._sites:
            if plan.weight_at(site) == 0:
                self._clear_slot(site.module)
                continue
            device = site.edits[0].tensor.device
            edit = plan.at(site)
            basis, weights = edit.basis.to(device), edit.weights.to(device)
            scaled = weights.unsqueeze(-1) * basis
            scale = self._input_scale(site, basis, weights).to(dtype) if self._norm_preserving else None
            if self._static:
                slot = self._slots[site.module]
                assert slot is not None  # fixed buffers are made once, in __init__
                fixed_scaled, fixed_basis, fixed_scale = slot
                fixed_scaled.zero_()
                fixed_basis.zero_()
                fixed_scaled[: edit.rank].copy_(scaled)
                fixed_basis[: edit.rank].copy_(basis)
                if fixed_scale is not None and scale is not None:
                    fixed_scale.copy_(scale)
            else:
                self._slots[site.module] = (scaled.to(dtype), basis.to(dtype), scale)

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

    def _input_scale(self, site: Site, basis: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        weight = site.edits[0]
        if site.module not in self._row_norms:  # the norms never change: computed once per module
            self._row_norms[site.module] = weight.rows().norm(dim=-1)
        # per trial only c = R^T row, read from the weight in its own dtype (no float32 copy)
        rows = weight.tensor.detach().movedim(weight.residual_axis, -1)  # (in, d): what each input writes
        c = (rows @ basis.mT.to(rows.dtype)).float()
        return _row_scale(self._row_norms[site.module], c, weights)

    def clear(self) -> None:
        for module in self._slots:
            self._clear_slot(module)

    def remove(self) -> None:
        self.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()


def bake_edit(edit: WeightEdit, site_edit: SiteEdit, norm_preserving: bool = False) -> None:
    """x <- x - R W R^T x for every residual-stream row x of the tensor (weights: optionally
    rescaled to the row's original norm; biases are projected only)."""
    rows = edit.rows()
    basis, weights = site_edit.basis.to(rows.device, torch.float32), site_edit.weights.to(rows.device, torch.float32)
    c = rows @ basis.mT  # (rows, k)
    edited = rows - (c * weights) @ basis
    if norm_preserving and edit.name != "bias":
        edited = edited * _row_scale(rows.norm(dim=-1), c, weights).unsqueeze(-1)
    edit.store(edited)


@torch.no_grad()
def bake_into_weights(loaded: LoadedModel, plan: AblationPlan, norm_preserving: bool = False) -> None:
    """Apply the plan to every site's tensors in place (every expert of a MoE block included)."""
    for site in loaded.discovery.present():
        if plan.weight_at(site) == 0:
            continue
        for edit in site.edits:
            bake_edit(edit, plan.at(site), norm_preserving)
