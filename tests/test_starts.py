"""Seeded starts (issue 15, part 2): known-good edits enqueued before the random start-up trials."""

import dataclasses

import optuna
import pytest
import torch

from optimizer.cli import main
from optimizer.components import COMPONENTS
from optimizer.config import Settings
from optimizer.directions import compute_stats, directions
from optimizer.params import (
    SEED_SHRINKAGE,
    SHRINKAGE_LOW,
    baseline_params,
    build_plan,
    plan_for,
    replay_params,
    seeded_starts,
    separation,
    suggest_params,
)
from tests.test_directions import synthetic
from tests.test_study import load, run_args


def test_separation_is_the_fisher_ratio_along_the_mean_difference():
    harmful, harmless = synthetic(4, 30, 40, 24, seed=3)
    harmful[2] = harmful[2] * 0.2 + 3.0  # one layer whose sets are far apart and tight
    stats = compute_stats(harmful, harmless)
    scores = separation(stats)
    for layer in range(4):
        b, g = harmful[layer].double(), harmless[layer].double()
        r = b.mean(0) - g.mean(0)
        unit = r / r.norm()
        expected = r.norm() ** 2 / ((b @ unit).var(unbiased=False) + (g @ unit).var(unbiased=False))
        torch.testing.assert_close(scores[layer].double(), expected, rtol=1e-3, atol=0)
    assert int(scores.argmax()) == 2


@pytest.mark.parametrize(
    "methods,subspace_max",
    [
        (["contrastive", "mean_diff"], 4),
        (["mean_diff"], 1),
        (["mean_diff", "contrastive"], 1),
        (["contrastive", "discriminant"], 4),
        (["discriminant"], 1),
        (["contrastive", "mean_diff", "discriminant"], 4),
    ],
)
def test_every_start_replays_inside_the_search_space(methods, subspace_max):
    harmful, harmless = synthetic(10, 20, 20, 16, seed=1)
    harmful[6] = harmful[6] * 0.1 + 2.0  # layer 6 separates best
    stats = compute_stats(harmful, harmless)
    settings = Settings(direction_methods=methods, subspace_max=subspace_max)
    starts = seeded_starts(stats, settings)
    late = {"late-per-layer"} if "discriminant" in methods else set()  # measured only with the discriminant
    assert set(starts) == {"uniform", "tapered", "tapered-per-layer"} | late
    for name, params in starts.items():
        replayed = replay_params(params, stats.n_layers, settings)  # FixedTrial: every parameter present and used
        assert replayed.k == 1
        # the mean difference, or the discriminant standing in for it
        # (Arditi et al.'s as published: the mean difference itself, the discriminant at shrinkage 1)
        seed_shrinkage = 1.0 if name == "uniform" else SEED_SHRINKAGE
        assert (
            replayed.method == "mean_diff"
            if "mean_diff" in methods
            else (replayed.method, replayed.shrinkage) == ("discriminant", seed_shrinkage)
        )
        plan, _ = build_plan(replayed, stats)
        if name == "uniform":  # Arditi et al.: every layer, weight 1, the best layer's direction
            assert all(w == pytest.approx(1.0) for c in COMPONENTS for w in plan.weights[c])
            (best,), _ = directions(stats, replayed.method, 0.0, [6], replayed.shrinkage or 1.0)
            # independently: the unit mean difference itself, whichever method stands for it
            torch.testing.assert_close(best, torch.nn.functional.normalize(harmful[6].mean(0) - harmless[6].mean(0), dim=0))
            for c in COMPONENTS:
                torch.testing.assert_close(plan.directions[c], best.expand(stats.n_layers, -1), rtol=1e-5, atol=1e-6)
        else:
            weights = plan.weights["attn"]
            assert 0.9 < max(weights) <= 1.0 and min(weights) == 0.0  # a taper: near 1 at its peak, 0 far from it
    assert seeded_starts(stats, dataclasses.replace(settings, direction_methods=["contrastive"])) == {}


@pytest.mark.parametrize("scopes", [["per_layer"], ["global"]])
def test_one_direction_scope_leaves_the_other_out_of_the_space_and_the_starts(scopes):
    harmful, harmless = synthetic(10, 20, 20, 16, seed=1)
    stats = compute_stats(harmful, harmless)
    settings = Settings(direction_methods=["contrastive", "discriminant"], direction_scopes=scopes)  # the scoped methods
    per_layer = scopes == ["per_layer"]
    starts = seeded_starts(stats, settings)
    assert set(starts) == ({"tapered-per-layer", "late-per-layer"} if per_layer else {"uniform", "tapered"})
    baseline = baseline_params(stats.n_layers, settings)
    for params in [*starts.values(), baseline]:
        assert "direction_scope" not in params  # one scope: no choice to record
        assert (replay_params(params, stats.n_layers, settings).direction_index is None) == per_layer
    assert all(
        w == 0 for ws in build_plan(replay_params(baseline, stats.n_layers, settings), stats)[0].weights.values() for w in ws
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        assert (suggest_params(trial, stats.n_layers, settings).direction_index is None) == per_layer
        assert "direction_scope" not in trial.params and ("direction_index" in trial.params) != per_layer
        study.tell(trial, 0.0)


def test_a_new_study_runs_the_seeded_starts_first_and_only_once(tiny_dir, tmp_path):
    studies = tmp_path / "studies"
    assert main(run_args(tiny_dir, studies, "--trials", "5", seeded=True)) == 0
    study = load(studies)
    assert [t.user_attrs.get("seeded") for t in study.trials[:5]] == [
        None,
        "uniform",
        "tapered",
        "tapered-per-layer",
        "late-per-layer",
    ]
    assert study.trials[0].user_attrs["baseline"]
    uniform = study.trials[1]
    assert uniform.params["attn_peak_weight"] == 1.0 and uniform.params["direction_scope"] == "global"
    assert (uniform.params["shrinkage"], uniform.params["projection"]) == (1.0, 0.0)  # Arditi et al.'s, as published
    assert main(run_args(tiny_dir, studies, "--trials", "8", seeded=True)) == 0  # resumed: no second set of starts
    assert sum("seeded" in t.user_attrs for t in load(studies).trials) == 4
    plain = tmp_path / "plain"
    assert main(run_args(tiny_dir, plain, "--trials", "3")) == 0
    assert not any("seeded" in t.user_attrs for t in load(plain).trials)


def fisher_ratios(harmful, harmless) -> list[float]:
    """The reference: each layer's Fisher ratio along its mean difference, from the residuals themselves."""
    ratios = []
    for b, g in zip(harmful, harmless, strict=True):
        b, g = b.double(), g.double()
        r = b.mean(0) - g.mean(0)
        unit = r / r.norm()
        ratios.append(float(r.norm() ** 2 / ((b @ unit).var(unbiased=False) + (g @ unit).var(unbiased=False))))
    return ratios


def test_blended_directions_lean_on_the_best_layer_where_a_layer_separates_less():
    harmful, harmless = synthetic(6, 30, 40, 24, seed=5)
    harmful[4] = harmful[4] * 0.2 + 3.0  # layer 4 separates best; the others barely
    stats = compute_stats(harmful, harmless)
    settings = Settings(direction_methods=["mean_diff"], subspace_max=1, blended_directions=True, searched_projection=False)
    kernel = {
        f"{c}_{k}": v
        for c in COMPONENTS
        for k, v in {"peak_weight": 1.2, "peak_layer": 3.0, "min_ratio": 0.5, "falloff": 3.0}.items()
    }
    per_layer = replay_params({"direction_scope": "per_layer", **kernel}, stats.n_layers, settings)
    plain, _ = build_plan(per_layer, stats)
    blended, _ = plan_for(per_layer, stats, settings)
    fisher = fisher_ratios(harmful, harmless)
    means = [torch.nn.functional.normalize(b.double().mean(0) - g.double().mean(0), dim=0) for b, g in zip(harmful, harmless)]
    for layer in range(stats.n_layers):
        trust = min(1.0, fisher[layer] / fisher[4])
        own = means[layer] if means[layer] @ means[4] >= 0 else -means[layer]
        expected = torch.nn.functional.normalize(trust * own + (1 - trust) * means[4], dim=0)
        for c in COMPONENTS:
            torch.testing.assert_close(blended.directions[c][layer].double(), expected, rtol=1e-4, atol=1e-4)
    assert blended.weights == plain.weights  # the weights are the kernel's
    assert (
        float(blended.directions["attn"][0] @ means[4].float()) > 0.9
    )  # a noise layer is edited along the best layer's direction
    global_params = replay_params({"direction_scope": "global", "direction_index": 2.0, **kernel}, stats.n_layers, settings)
    torch.testing.assert_close(
        plan_for(global_params, stats, settings)[0].directions["attn"], build_plan(global_params, stats)[0].directions["attn"]
    )


def test_separation_weighting_scales_per_layer_edits_by_each_layers_fisher_ratio():
    harmful, harmless = synthetic(6, 30, 40, 24, seed=5)
    harmful[4] = harmful[4] * 0.2 + 3.0  # layer 4 separates best; the others barely
    stats = compute_stats(harmful, harmless)
    settings = Settings(direction_methods=["mean_diff"], subspace_max=1, searched_projection=False)
    kernel = {
        f"{c}_{k}": v
        for c in COMPONENTS
        for k, v in {"peak_weight": 1.2, "peak_layer": 3.0, "min_ratio": 0.5, "falloff": 3.0}.items()
    }
    per_layer = replay_params({"direction_scope": "per_layer", **kernel}, stats.n_layers, settings)
    plain, _ = build_plan(per_layer, stats)
    weighted, _ = build_plan(per_layer, stats, separation_weighted=True)
    fisher = fisher_ratios(harmful, harmless)
    for layer in range(stats.n_layers):
        for c in COMPONENTS:
            assert weighted.weights[c][layer] == pytest.approx(plain.weights[c][layer] * fisher[layer] / max(fisher), rel=1e-3)
    assert weighted.weights["attn"][4] == pytest.approx(plain.weights["attn"][4])  # the best layer keeps its weight
    assert weighted.weights["attn"][0] < 0.5 * plain.weights["attn"][0]  # a layer that hardly separates is edited little
    for c in COMPONENTS:  # the directions themselves are unchanged
        torch.testing.assert_close(weighted.directions[c], plain.directions[c])
    global_params = replay_params({"direction_scope": "global", "direction_index": 2.0, **kernel}, stats.n_layers, settings)
    assert build_plan(global_params, stats, separation_weighted=True)[0].weights == build_plan(global_params, stats)[0].weights


def test_the_discriminant_samples_its_shrinkage_and_no_other_method_does():
    harmful, harmless = synthetic(6, 20, 20, 16, seed=4)
    stats = compute_stats(harmful, harmless)
    settings = Settings(direction_methods=["contrastive", "mean_diff", "discriminant"], subspace_max=1)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = suggest_params(trial, stats.n_layers, settings)
        seen.add(params.method)
        assert ("shrinkage" in trial.params) == (params.method == "discriminant")
        if params.method == "discriminant":
            assert SHRINKAGE_LOW <= params.shrinkage <= 1.0 and params.alpha is None
            replayed = replay_params(trial.params, stats.n_layers, settings)
            assert replayed == params
            plan, _ = build_plan(replayed, stats)
            mean_diff_plan, _ = build_plan(dataclasses.replace(replayed, method="mean_diff", shrinkage=None), stats)
            used = [layer for layer, w in enumerate(plan.weights["attn"]) if w != 0]
            if used and params.shrinkage < 0.99:  # the shrinkage changes the directions
                assert not torch.allclose(plan.directions["attn"][used], mean_diff_plan.directions["attn"][used], atol=1e-3)
        study.tell(trial, 0.0)
    assert seen == {"contrastive", "mean_diff", "discriminant"}


def test_the_searched_projection_is_sampled_replayed_and_seeded():
    """--searched-projection: every trial samples `projection` in [0, 1] and replays it; Arditi et al.'s
    start is tried plain, the others projected; the unedited baseline stays inside the space."""
    harmful, harmless = synthetic(6, 20, 20, 16, seed=4)
    stats = compute_stats(harmful, harmless)
    settings = Settings(direction_methods=["contrastive", "discriminant"], searched_projection=True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        params = suggest_params(trial, stats.n_layers, settings)
        assert 0.0 <= params.projection <= 1.0 and replay_params(trial.params, stats.n_layers, settings) == params
        study.tell(trial, 0.0)
    starts = seeded_starts(stats, settings)
    assert {name: p["projection"] for name, p in starts.items()} == {
        "uniform": 0.0,
        "tapered": 1.0,
        "tapered-per-layer": 1.0,
        "late-per-layer": 1.0,
    }
    assert replay_params(baseline_params(stats.n_layers, settings), stats.n_layers, settings).projection == 0.0
    # without the search (--no-searched-projection, or --projected-directions fixing it at 1): no such parameter
    unsearched = dataclasses.replace(settings, searched_projection=False)
    for plain, fixed in ((unsearched, None), (dataclasses.replace(settings, projected_directions=True), 1.0)):
        assert "projection" not in seeded_starts(stats, plain)["tapered"]
        assert suggest_params(optuna.trial.FixedTrial(starts["tapered"]), stats.n_layers, plain).projection == fixed
        assert "projection" not in baseline_params(stats.n_layers, plain)


def test_the_searched_clipping_is_sampled_replayed_and_seeded_plain():
    """--searched-winsorize: trials sample `clipped` (both values over a few trials) and replay it; the
    seeded starts and the unedited baseline use the residuals as they are; --winsorize fixes the
    clipping instead, and then no trial chooses."""
    harmful, harmless = synthetic(6, 20, 20, 16, seed=4)
    stats = compute_stats(harmful, harmless)
    settings = Settings(direction_methods=["contrastive", "discriminant"], searched_winsorize=0.99)  # statistics' methods
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(10):
        trial = study.ask()
        params = suggest_params(trial, stats.n_layers, settings)
        assert replay_params(trial.params, stats.n_layers, settings) == params
        seen.add(params.clipped)
        study.tell(trial, 0.0)
    assert seen == {False, True}
    starts = seeded_starts(stats, settings)
    assert starts and all(p["clipped"] is False for p in starts.values())
    assert replay_params(baseline_params(stats.n_layers, settings), stats.n_layers, settings).clipped is False
    for unsearched in (Settings(), dataclasses.replace(settings, winsorize=0.995)):
        assert "clipped" not in seeded_starts(stats, unsearched)["tapered"]
        assert "clipped" not in baseline_params(stats.n_layers, unsearched)
        assert suggest_params(optuna.trial.FixedTrial(starts["tapered"]), stats.n_layers, unsearched).clipped is None
