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
from optimizer.directions import ContrastiveStats, directions, project_out_harmless_mean, subspace_components


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
    method: str  # "contrastive", "mean_diff", "discriminant" or "fitted": how the first direction is found
    alpha: float | None  # contrastive strength (of the first direction, and of the subspace's other ones); None if unused
    direction_index: float | None  # fractional layer of one global direction; None = per-layer (or the fitted) directions
    kernels: dict[str, Kernel]
    k: int = 1  # directions per layer: the first, and k - 1 contrastive components orthogonal to it
    gamma: float | None = None  # weight decay of the extra directions (w * gamma^(i-1)); None when k = 1
    shrinkage: float | None = None  # the discriminant's rho (directions.discriminant_directions); None if unused
    projection: float | None = None  # share of the harmless-mean part removed (--searched-projection); None if unused
    clipped: bool | None = None  # directions from the clipped residuals (--searched-winsorize); None if unused

    @property
    def per_layer(self) -> bool:
        """Each layer its own direction (neither one layer's for every layer, nor the fitted one)."""
        return self.direction_index is None and self.method != "fitted"

    def describe_direction(self) -> str:
        where = "per-layer" if self.direction_index is None else f"layer {self.direction_index:.2f}"
        if self.method == "fitted":
            where = "every layer"
        how = {
            "mean_diff": "mean-diff",
            "contrastive": f"cPCA a={self.alpha or 0:.2f}",
            "discriminant": f"LDA s={self.shrinkage or 1:.2f}",
            "fitted": "fitted",
        }[self.method]
        if self.k > 1:
            how += f" + {self.k - 1} (a={self.alpha:.2f}, g={self.gamma:.2f})"
        if self.projection is not None:
            how += f", projected {self.projection:.2f}"
        if self.clipped:
            how += ", clipped"
        return f"{how}, {where}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PlanInfo:
    """What building the plan found out, recorded with the trial."""

    fallback_layers: list[int]


def directions_for(params: TrialParams, stats: ContrastiveStats, layers: list[int]) -> tuple[torch.Tensor, list[int]]:
    """`directions` for these layers by the trial's method and its parameter (alpha or shrinkage)."""
    return directions(stats, params.method, params.alpha or 0.0, layers, params.shrinkage or 1.0)


def build_plan(
    params: TrialParams,
    stats: ContrastiveStats,
    projected: float = 0.0,
    separation_weighted: bool = False,
    blended: bool = False,
    fitted: torch.Tensor | None = None,
) -> tuple[AblationPlan, PlanInfo]:
    """Turn parameters into per-layer directions and weights, computing only the directions needed.

    `fitted`: the study's fitted direction (d,) (`optimizer.fitting`), which a trial of the method
    `fitted` ablates at every layer its kernels edit (neither projected nor blended: it was fitted
    as it is).

    `projected` removes from the direction used at each layer that share (0..1; 1: all, heretic's
    projected abliteration) of its component along that layer's harmless mean (for a global direction
    too: each layer gets its own projection). With k > 1,
    each edited layer also gets k - 1 contrastive components of its own statistics orthogonal to
    its (final) first direction (`subspace_components`).

    `separation_weighted` scales, for per-layer directions only, each layer's kernel weight by its
    separation over the best layer's (`separation`): a layer whose own mean difference hardly
    separates the sets (early layers) is edited little, because its direction is not a refusal
    direction, and a wide per-layer kernel would otherwise remove one unrelated direction per layer.

    `blended` keeps, for per-layer directions only, the kernel's weights and changes the directions
    instead: layer l's unit direction u_l becomes normalize(s_l u_l + (1 - s_l) u_best), where
    u_best is the direction of the best-separated layer (`best_separated_layer`) and s_l the ratio of
    layer l's separation to that layer's, at most 1 (u_l's sign turned towards u_best first: an
    ablation does not depend on the sign). A layer whose own mean difference does not separate the
    sets is edited as strongly, along the refusal direction the residual stream carries, rather than
    along its own noise (Arditi et al. use the best layer's direction at every layer; heretic each
    layer's own)."""
    n_layers = stats.n_layers
    weights = {c: params.kernels[c].weights(n_layers) for c in COMPONENTS}
    if separation_weighted and params.per_layer:
        scores = separation(stats)
        ratio = (scores / scores.max().clamp_min(1e-12)).tolist()
        weights = {c: [w * r for w, r in zip(ws, ratio, strict=True)] for c, ws in weights.items()}
    d = stats.mean_diff.shape[1]
    needed = sorted({layer for ws in weights.values() for layer, w in enumerate(ws) if w != 0})
    fallback: list[int] = []
    if params.method == "fitted":
        if fitted is None:
            raise ValueError("a trial of the fitted method, but no fitted direction in this run")
        per_layer = fitted.to(stats.device, stats.mean_diff.dtype).expand(n_layers, d).clone()
    elif params.direction_index is None:
        per_layer = torch.zeros(n_layers, d, device=stats.device)
        if needed:
            chosen, fallback = directions_for(params, stats, needed)
            if blended:
                chosen = blend_with_best(stats, chosen, needed, params)
            per_layer[needed] = chosen
    else:
        low = min(math.floor(params.direction_index), n_layers - 1)
        high = min(low + 1, n_layers - 1)
        pair, fallback = directions_for(params, stats, sorted({low, high}))
        frac = params.direction_index - low
        mixed = torch.lerp(pair[0], pair[-1], frac)
        per_layer = torch.nn.functional.normalize(mixed, dim=0).expand(n_layers, d).clone()
    if projected and needed and params.method != "fitted":
        per_layer[needed] = project_out_harmless_mean(stats, per_layer[needed], needed, projected)
    if params.k == 1:
        return AblationPlan({c: per_layer for c in COMPONENTS}, weights), PlanInfo(fallback)
    extra = torch.zeros(n_layers, params.k - 1, d, device=stats.device)
    if needed:
        extra[needed] = subspace_components(stats, params.alpha or 0.0, per_layer[needed], needed, params.k - 1)
    assert params.gamma is not None  # sampled whenever k > 1
    plan = AblationPlan({c: per_layer for c in COMPONENTS}, weights, {c: extra for c in COMPONENTS}, params.gamma)
    return plan, PlanInfo(fallback)


def plan_for(
    params: TrialParams, stats: ContrastiveStats, settings: Settings, fitted: torch.Tensor | None = None
) -> tuple[AblationPlan, PlanInfo]:
    """A trial's plan as its study builds it: `build_plan` with the study's settings that shape an
    edit and its fitted direction (the one place trials, export, eval and verification take them from)."""
    return build_plan(params, stats, params.projection or 0.0, settings.separation_weighted, settings.blended_directions, fitted)


# The discriminant's shrinkage rho is searched in [SHRINKAGE_LOW, 1] (1: the mean difference). On the
# second model at fixed kernels rho 0.9-0.97 traded best, 0.7-0.8 reached the low-KL end, and at 0.5
# or below the directions removed few refusals at any weight up to 2 (benchmarks/lda_sweep.py); a
# first search with [0.5, 1] spent many trials below 0.7.
SHRINKAGE_LOW = 0.7
# The seeded starts' shrinkage where the discriminant finds their directions: at fixed kernels 0.97
# removed the mean difference's refusals for about half its KL on both models, and 0.9 more of them
# at equal KL on the second model.
SEED_SHRINKAGE = 0.95


def searches_projection(settings: Settings) -> bool:
    """Whether trials search their projection (`--searched-projection`); `--projected-directions` instead
    fixes every trial's at 1 (`suggest_params`), which is all a plan reads."""
    return settings.searched_projection and not settings.projected_directions


def searched_winsorize(settings: Settings) -> float:
    """The quantile that trials may clip the residuals at (`--searched-winsorize`), or 0 when they
    cannot choose: off, or the clipping fixed by `--winsorize`."""
    return 0.0 if settings.winsorize else settings.searched_winsorize


def statistics_sets(settings: Settings) -> dict[str, float]:
    """The statistics a study caches, by cache entry, each with the quantile of |value| its residuals
    were clipped at (0: not clipped): `directions`, clipped only by --winsorize, and with
    --searched-winsorize `clipped_directions` (the one place that says which is which)."""
    searched = searched_winsorize(settings)
    return {"directions": settings.winsorize, **({"clipped_directions": searched} if searched else {})}


def statistics_set(params: TrialParams) -> str:
    """The cache entry of the statistics a trial's directions come from."""
    return "clipped_directions" if params.clipped else "directions"


def suggest_params(trial: optuna.trial.BaseTrial, n_layers: int, settings: Settings, flat: bool = False) -> TrialParams:
    """A trial's parameters, sampled (or replayed, with a FixedTrial) from the search space.

    `flat` also samples the parameters this trial does not use (gamma when k = 1, alpha without a
    contrastive direction, the shrinkage without the discriminant, the index of a per-layer trial):
    Optuna's GP sampler models only parameters that every trial has and draws the others at random.
    They change nothing: the trial's TrialParams are the same either way, and a replay reads only
    the parameters that are used, whichever sampler chose them."""
    last = n_layers - 1

    def used_or_flat(used: bool, anywhere: bool, name: str, low: float, high: float) -> float | None:
        """The parameter if this trial uses it; sampled but None when flat and some trial could use it."""
        value = trial.suggest_float(name, low, high) if used or (flat and anywhere) else None
        return value if used else None

    methods, subspaces = settings.direction_methods, settings.subspace_max > 1
    method = methods[0] if len(methods) == 1 else trial.suggest_categorical("direction_method", methods)
    k = trial.suggest_int("subspace_k", 1, settings.subspace_max) if subspaces else 1
    gamma = used_or_flat(k > 1, subspaces, "subspace_gamma", 0.0, 1.0)
    contrastive = "contrastive" in methods or subspaces
    alpha = used_or_flat(method == "contrastive" or k > 1, contrastive, "alpha", 0.0, settings.alpha_max)
    discriminant = "discriminant" in methods
    shrinkage = used_or_flat(method == "discriminant", discriminant, "shrinkage", SHRINKAGE_LOW, 1.0)
    # the fitted direction is one for every layer, used as it was fitted: no projection, statistics or scope
    of_stats, any_of_stats = method != "fitted", any(m != "fitted" for m in methods)
    if searches_projection(settings):
        projection = used_or_flat(of_stats, any_of_stats, "projection", 0.0, 1.0)
    else:  # --projected-directions: every direction projected in full, nothing searched
        projection = 1.0 if settings.projected_directions and of_stats else None
    clipped = None
    if searched_winsorize(settings) and (of_stats or (flat and any_of_stats)):
        chosen = trial.suggest_categorical("clipped", [False, True])
        clipped = chosen if of_stats else None
    scopes, scope = settings.direction_scopes, None
    if of_stats or (flat and any_of_stats):
        scope = scopes[0] if len(scopes) == 1 else trial.suggest_categorical("direction_scope", scopes)
    index = used_or_flat(
        of_stats and scope == "global", any_of_stats and "global" in scopes, "direction_index", 0.2 * last, 0.9 * last
    )
    kernels = {
        c: Kernel(
            peak_weight=trial.suggest_float(f"{c}_peak_weight", settings.min_weight, settings.max_weight),
            peak_layer=trial.suggest_float(f"{c}_peak_layer", 0.3 * last, last),
            min_ratio=trial.suggest_float(f"{c}_min_ratio", 0.0, 1.0),
            falloff=trial.suggest_float(f"{c}_falloff", 1.0, max(1.0, 0.6 * last)),
        )
        for c in COMPONENTS
    }
    return TrialParams(method, alpha, index, kernels, k, gamma, shrinkage, projection, clipped)


# Bounds of the space that a setting moves, by parameter name (suffix) and end: where front trials
# crowd against one, the end of a run says which flag widens it (`report.bound_warnings`). The other
# bounds are the ends of what a parameter can mean (the last layer, a ratio of 1), and so is a lower
# bound of 0 (a weight of 0 is no edit).
WIDENED_BY = {
    ("peak_weight", "upper"): "--max-weight",
    ("peak_weight", "lower"): "--min-weight",
    ("alpha", "upper"): "--alpha-max",
    ("subspace_k", "upper"): "--subspace-max",
}


def separation(stats: ContrastiveStats) -> torch.Tensor:
    """Per layer, how well the mean difference r separates the two sets: |r|^2 over the summed
    variance of both sets along r (a Fisher ratio), from the cached statistics. Along the unit r^
    with coordinates c = Q^T r / |r|, the harmless variance is c^T K_g c and the harmful second moment
    about the harmless mean is c^T K_b c = var_b + |r|^2."""
    norm = stats.mean_diff.norm(dim=-1)
    c = stats.mean_diff_coords / norm.clamp_min(1e-12).unsqueeze(-1)
    along = lambda gram: torch.einsum("lk,lkj,lj->l", c, gram, c)
    variance = (along(stats.gram_harmful) - norm.square()).clamp_min(0) + along(stats.gram_harmless)
    return norm.square() / variance.clamp_min(1e-12)


def best_separated_layer(scores: torch.Tensor) -> int:
    """The layer whose mean difference separates the two sets best by `scores` (`separation`, one per
    layer), inside the global direction's range (0.2 to 0.9 of the depth)."""
    last = len(scores) - 1
    inside = [layer for layer in range(len(scores)) if 0.2 * last <= layer <= 0.9 * last] or [round(0.6 * last)]
    return max(inside, key=lambda layer: float(scores[layer]))


def blend_with_best(stats: ContrastiveStats, chosen: torch.Tensor, layers: list[int], params: TrialParams) -> torch.Tensor:
    """`build_plan`'s `blended` rule: each layer's unit direction moved towards the best-separated
    layer's by how much less its own mean difference separates the sets."""
    scores = separation(stats)
    best = best_separated_layer(scores)
    (best_direction,), _ = directions_for(params, stats, [best])
    trust = (scores[layers] / scores[best].clamp_min(1e-12)).clamp(max=1.0).unsqueeze(-1)
    signs = torch.where(chosen @ best_direction < 0, -1.0, 1.0).unsqueeze(-1)
    return torch.nn.functional.normalize(trust * signs * chosen + (1 - trust) * best_direction, dim=-1)


def seeded_starts(stats: ContrastiveStats, settings: Settings) -> dict[str, dict]:
    """Known-good edits tried before the random start-up trials (`--seeded-starts`), by name: those
    of the statistics' directions (`statistics_starts`) and, with `fitted` among --direction-methods,
    `fitted`: the fitted direction at weight 1 over the kernel closest to the one it was fitted over
    (peak at mid-depth, 0.3 of it at the edge, as wide as the space allows)."""
    starts = statistics_starts(stats, settings)
    if "fitted" in settings.direction_methods:
        last = stats.n_layers - 1
        values = {"peak_weight": 1.0, "peak_layer": 0.5 * last, "min_ratio": 0.3, "falloff": max(1.0, 0.6 * last)}
        chosen = {"direction_method": "fitted"} if len(settings.direction_methods) > 1 else {}
        one = {"subspace_k": 1} if settings.subspace_max > 1 else {}
        kernel = {f"{c}_{name}": value for c in COMPONENTS for name, value in values.items()}
        starts["fitted"] = {**chosen, **one, **kernel}
    return starts


def statistics_starts(stats: ContrastiveStats, settings: Settings) -> dict[str, dict]:
    """The seeded starts of the directions from the statistics.

    `uniform`: Arditi et al.'s edit, every layer's output projections ablated with weight 1 along
    the mean difference of the single layer that separates the two sets best (`separation`, inside
    the global direction's range). `tapered` and `tapered-per-layer`: a kernel like the middle of
    heretic's ranges (weight 1 at 3/4 depth, half of it at the edge, 0.4 of the layers wide) with
    that global direction, and with per-layer directions. All are edits of one direction, the mean
    difference, or where the discriminant stands in for it, the discriminant at SEED_SHRINKAGE (at 1,
    the mean difference itself, for Arditi et al.'s); none
    is offered with neither among --direction-methods, and only those of the scopes among
    --direction-scopes. With the discriminant among the methods, a fourth, `late-per-layer`: a late,
    narrow kernel (weight 1 at 3/4 depth, 0.3 of it at the edge, a quarter of the layers to either
    side) with per-layer directions, where both tools' fronts sit on the second model
    (benchmarks/RESULTS.md, twentieth session); it was measured only with the discriminant, so a
    space without the discriminant keeps the three starts it was measured with. With
    --searched-projection, Arditi et al.'s edit is tried as published (projection 0) and the others
    as heretic projects its directions (projection 1); with --searched-winsorize, all from the
    residuals as they are (`clipped` False: the others from the clipped ones, as the projection
    splits them, was measured and did worse, benchmarks/RESULTS.md, twenty-seventh session)."""
    methods = settings.direction_methods
    if "mean_diff" in methods:
        common: dict = {"direction_method": "mean_diff"} if len(methods) > 1 else {}
    elif "discriminant" in methods:
        common = {"direction_method": "discriminant"} if len(methods) > 1 else {}
        common["shrinkage"] = SEED_SHRINKAGE
    else:
        return {}
    last = stats.n_layers - 1
    best = float(best_separated_layer(separation(stats)))
    if settings.subspace_max > 1:
        common["subspace_k"] = 1

    def scoped(scope: str, params: dict) -> dict:
        chosen = {"direction_scope": scope} if len(settings.direction_scopes) > 1 else {}
        return {**common, **chosen, **params}

    def kernel(weight: float, peak: float, ratio: float, falloff: float) -> dict:
        values = {"peak_weight": weight, "peak_layer": peak, "min_ratio": ratio, "falloff": max(1.0, falloff)}
        return {f"{c}_{name}": value for c in COMPONENTS for name, value in values.items()}

    uniform = kernel(1.0, 0.5 * last, 1.0, 0.6 * last)  # within the falloff of every layer: weight 1 everywhere
    tapered = kernel(1.0, 0.75 * last, 0.5, 0.4 * last)
    # Arditi et al.'s edit as published: the mean difference itself (where the discriminant stands in
    # for it, at shrinkage 1); on the default model it is the start that reaches 0 refusals
    arditi = {"shrinkage": 1.0} if "shrinkage" in common else {}
    starts = {
        "uniform": ("global", {"direction_index": best, **uniform, **arditi}),
        "tapered": ("global", {"direction_index": best, **tapered}),
        "tapered-per-layer": ("per_layer", tapered),
    }
    if "discriminant" in methods:
        starts["late-per-layer"] = ("per_layer", kernel(1.0, 0.75 * last, 0.3, 0.25 * last))
    if searches_projection(settings):  # Arditi et al.'s edit as published, plain; the others as heretic's, projected
        starts = {
            name: (scope, {**params, "projection": 0.0 if name == "uniform" else 1.0}) for name, (scope, params) in starts.items()
        }
    if searched_winsorize(settings):  # from the residuals as they are, as the starts were measured
        starts = {name: (scope, {**params, "clipped": False}) for name, (scope, params) in starts.items()}
    return {name: scoped(scope, params) for name, (scope, params) in starts.items() if scope in settings.direction_scopes}


def scaled_params(params: dict, scale: float, settings: Settings) -> dict:
    """A trial's parameters with the edit's strength times `scale`: every component's peak weight
    scaled, within [--min-weight, --max-weight]. The rest of a kernel (its edge as a ratio of the
    peak, its width) and the extra directions' decay are relative to the peak, so each layer's weight,
    and each extra direction's, is scaled the same way (`optimizer.fill`)."""
    out = dict(params)
    for c in COMPONENTS:
        key = f"{c}_peak_weight"
        if key in out:
            out[key] = min(settings.max_weight, max(settings.min_weight, out[key] * scale))
    return out


def replay_params(params: dict, n_layers: int, settings: Settings) -> TrialParams:
    """A finished trial's parameters, read back through the same code that sampled them."""
    return suggest_params(optuna.trial.FixedTrial(params), n_layers, settings)


def baseline_params(n_layers: int, settings: Settings) -> dict:
    """Parameters of the unedited model inside the search space: every peak weight 0 (with a method
    of the statistics where there is one)."""
    last = n_layers - 1
    methods = settings.direction_methods
    of_stats = [m for m in methods if m != "fitted"]
    method = "mean_diff" if "mean_diff" in methods else (of_stats or methods)[0]
    params: dict = {"direction_method": method} if len(methods) > 1 else {}
    if settings.subspace_max > 1:
        params["subspace_k"] = 1
    if method == "contrastive":
        params["alpha"] = 0.0
    if method == "discriminant":
        params["shrinkage"] = 1.0
    if method != "fitted":
        scope = "global" if "global" in settings.direction_scopes else "per_layer"
        if scope == "global":
            params["direction_index"] = 0.5 * last
        if len(settings.direction_scopes) > 1:
            params["direction_scope"] = scope
        if searches_projection(settings):
            params["projection"] = 0.0
        if searched_winsorize(settings):
            params["clipped"] = False
    for c in COMPONENTS:
        params.update({f"{c}_peak_weight": 0.0, f"{c}_peak_layer": last, f"{c}_min_ratio": 0.0, f"{c}_falloff": 1.0})
    return params
