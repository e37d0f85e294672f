"""The search space, a trial's parameters, and how they become an ablation plan (per-layer
directions and weights).

The space is defined once, in `suggest_params`: a study samples it through an Optuna trial, and
export, eval and chat replay a finished trial's stored parameters through the same function with
`optuna.trial.FixedTrial`, so a parameter can never mean two things.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import optuna
import torch

from optimizer.ablation import AblationPlan
from optimizer.components import COMPONENTS
from optimizer.config import Settings
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
        low = min(math.floor(params.direction_index), n_layers - 1)
        high = min(low + 1, n_layers - 1)
        pair, fallback = directions(stats, params.method, params.alpha or 0.0, sorted({low, high}))
        frac = params.direction_index - low
        mixed = torch.lerp(pair[0], pair[-1], frac)
        per_layer = torch.nn.functional.normalize(mixed, dim=0).expand(n_layers, d).clone()
    if projected and needed:
        per_layer[needed] = project_out_harmless_mean(stats, per_layer[needed], needed)
    return AblationPlan({c: per_layer for c in COMPONENTS}, weights), PlanInfo(fallback)


def suggest_params(trial: optuna.trial.BaseTrial, n_layers: int, settings: Settings) -> TrialParams:
    """A trial's parameters, sampled (or replayed, with a FixedTrial) from the search space."""
    last = n_layers - 1
    methods = settings.direction_methods
    method = methods[0] if len(methods) == 1 else trial.suggest_categorical("direction_method", methods)
    alpha = trial.suggest_float("alpha", 0.0, settings.alpha_max) if method == "contrastive" else None
    scope = trial.suggest_categorical("direction_scope", ["global", "per_layer"])
    index = trial.suggest_float("direction_index", 0.2 * last, 0.9 * last) if scope == "global" else None
    kernels = {
        c: Kernel(
            peak_weight=trial.suggest_float(f"{c}_peak_weight", 0.0, settings.max_weight),
            peak_layer=trial.suggest_float(f"{c}_peak_layer", 0.3 * last, last),
            min_ratio=trial.suggest_float(f"{c}_min_ratio", 0.0, 1.0),
            falloff=trial.suggest_float(f"{c}_falloff", 1.0, max(1.0, 0.6 * last)),
        )
        for c in COMPONENTS
    }
    return TrialParams(method, alpha, index, kernels)


# Upper bounds of the space that a setting moves, by parameter name (suffix): where front trials crowd
# against one, the end of a run says which flag widens it (`report.bound_warnings`). The other
# bounds are the ends of what a parameter can mean (a weight of 0, the last layer, a ratio of 1).
WIDENED_BY = {"peak_weight": "--max-weight", "alpha": "--alpha-max"}  # upper bounds


def replay_params(params: dict, n_layers: int, settings: Settings) -> TrialParams:
    """A finished trial's parameters, read back through the same code that sampled them."""
    return suggest_params(optuna.trial.FixedTrial(params), n_layers, settings)


def baseline_params(n_layers: int, settings: Settings) -> dict:
    """Parameters of the unedited model inside the search space: every peak weight 0."""
    last = n_layers - 1
    params: dict = {"direction_scope": "global", "direction_index": 0.5 * last}
    if len(settings.direction_methods) > 1:
        params["direction_method"] = "mean_diff" if "mean_diff" in settings.direction_methods else settings.direction_methods[0]
    if params.get("direction_method", settings.direction_methods[0]) == "contrastive":
        params["alpha"] = 0.0
    for c in COMPONENTS:
        params.update({f"{c}_peak_weight": 0.0, f"{c}_peak_layer": last, f"{c}_min_ratio": 0.0, f"{c}_falloff": 1.0})
    return params
