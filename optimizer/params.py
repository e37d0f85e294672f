"""A trial's parameters and how they become an ablation plan (per-layer directions and weights)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from optimizer.ablation import AblationPlan
from optimizer.components import COMPONENTS
from optimizer.directions import ContrastiveStats, directions, project_out_harmless_mean


@dataclass(frozen=True)
class Kernel:
    """Layer weights of one component: `peak_weight` at `peak_layer`, falling linearly to
    `peak_weight * min_ratio` at `falloff` layers away, and 0 beyond."""

    peak_weight: float
    peak_layer: float
    min_ratio: float
    falloff: float

    def weights(self, n_layers: int) -> list[float]:
        out = []
        for layer in range(n_layers):
            distance = abs(layer - self.peak_layer)
            if self.peak_weight == 0 or distance > self.falloff:
                out.append(0.0)
            else:
                edge = self.peak_weight * self.min_ratio
                out.append(self.peak_weight + (distance / self.falloff) * (edge - self.peak_weight))
        return out


@dataclass(frozen=True)
class TrialParams:
    method: str  # "contrastive" or "mean_diff"
    alpha: float | None  # contrastive strength; None for mean_diff
    direction_index: float | None  # fractional layer of one global direction; None = per-layer directions
    kernels: dict[str, Kernel]

    def describe_direction(self) -> str:
        where = "per-layer" if self.direction_index is None else f"layer {self.direction_index:.2f}"
        how = "mean-diff" if self.method == "mean_diff" else f"cPCA a={self.alpha:.2f}"
        return f"{how}, {where}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PlanInfo:
    """What building the plan found out, recorded with the trial."""

    fallback_layers: list[int]


def build_plan(params: TrialParams, stats: ContrastiveStats, projected: bool = False) -> tuple[AblationPlan, PlanInfo]:
    """Turn parameters into per-layer directions and weights, computing only the directions needed.

    `projected` removes from the direction used at each layer its component along that layer's
    harmless mean (for a global direction too: each layer gets its own projection)."""
    n_layers = stats.n_layers
    weights = {c: params.kernels[c].weights(n_layers) for c in COMPONENTS}
    d = stats.mean_diff.shape[1]
    needed = sorted({layer for ws in weights.values() for layer, w in enumerate(ws) if w != 0})
    if params.direction_index is None:
        per_layer = torch.zeros(n_layers, d, device=stats.device)
        fallback: list[int] = []
        if needed:
            chosen, fallback = directions(stats, params.method, params.alpha or 0.0, needed)
            per_layer[needed] = chosen
    else:
        low = min(int(math.floor(params.direction_index)), n_layers - 1)
        high = min(low + 1, n_layers - 1)
        pair, fallback = directions(stats, params.method, params.alpha or 0.0, sorted({low, high}))
        frac = params.direction_index - low
        mixed = torch.lerp(pair[0], pair[-1], frac)
        per_layer = torch.nn.functional.normalize(mixed, dim=0).expand(n_layers, d).clone()
    if projected and needed:
        per_layer[needed] = project_out_harmless_mean(stats, per_layer[needed], needed)
    return AblationPlan({c: per_layer for c in COMPONENTS}, weights), PlanInfo(fallback)
