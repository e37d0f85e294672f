"""Low-rank contrastive PCA against a full d x d eigh, on random data."""

import dataclasses

import pytest
import torch

from optimizer import directions as directions_module
from optimizer.config import Settings
from optimizer.directions import compute_stats, contrastive_eigen, directions, subspace_components, top_direction


def synthetic(layers: int, n_b: int, n_g: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(layers, 1, d, generator=g)
    harmful = torch.randn(layers, n_b, d, generator=g) * 0.7 + shift + 1.0
    harmless = torch.randn(layers, n_g, d, generator=g) + 1.0
    return harmful, harmless


def full_matrix(harmful: torch.Tensor, harmless: torch.Tensor, alpha: float) -> torch.Tensor:
    b, g = harmful.double(), harmless.double()
    mu_g = g.mean(0)
    return (b - mu_g).T @ (b - mu_g) / len(b) - alpha * (g - mu_g).T @ (g - mu_g) / len(g)


@pytest.mark.parametrize("shape", [(20, 30, 64), (50, 40, 48)])  # m < d and m > d
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_low_rank_matches_full_eigh(shape, alpha):
    n_b, n_g, d = shape
    harmful, harmless = synthetic(3, n_b, n_g, d)
    stats = compute_stats(harmful, harmless)
    values, vectors = contrastive_eigen(stats, alpha, k=3)
    for layer in range(3):
        ref_values, ref_vectors = torch.linalg.eigh(full_matrix(harmful[layer], harmless[layer], alpha))
        ref_values, ref_vectors = ref_values.flip(0)[:3], ref_vectors.flip(1)[:, :3]
        assert ref_values[0] > 0, "the test data should give a positive top eigenvalue"
        torch.testing.assert_close(values[layer].double(), ref_values, rtol=1e-4, atol=1e-4)
        cos = (vectors[layer, :, 0].double() @ ref_vectors[:, 0]).abs()
        assert cos >= 0.9999
        # oriented along the mean difference
        r = harmful[layer].mean(0) - harmless[layer].mean(0)
        assert float(vectors[layer, :, 0] @ r) > 0
    # the trial path (Lanczos, exact fallback) gives the same top pair, with the same orientation
    top_values, top_vectors = top_direction(stats, alpha)
    torch.testing.assert_close(top_values, values[:, 0], rtol=1e-4, atol=1e-4)
    assert ((top_vectors * vectors[..., 0]).sum(-1) >= 0.9999).all()


def test_no_positive_eigenvalue_falls_back_to_mean_difference():
    # n > d: the span is everything, so a large alpha leaves no positive eigenvalue
    harmful, harmless = synthetic(2, 40, 40, 16, seed=1)
    harmful = harmless[:, :40] * 0.5 + 0.3  # small harmful spread, so alpha = 10 turns S negative definite
    stats = compute_stats(harmful, harmless)
    alpha = 10.0
    for layer in range(2):
        full_top = torch.linalg.eigvalsh(full_matrix(harmful[layer], harmless[layer], alpha))[-1]
        assert full_top < 0
    values, _ = contrastive_eigen(stats, alpha)
    ref = torch.stack([torch.linalg.eigvalsh(full_matrix(harmful[i], harmless[i], alpha))[-1] for i in range(2)])
    torch.testing.assert_close(values[:, 0].double(), ref, rtol=1e-4, atol=1e-4)
    chosen, fallback = directions(stats, "contrastive", alpha)
    assert fallback == [0, 1]
    r = harmful.mean(1) - harmless.mean(1)
    torch.testing.assert_close(chosen, torch.nn.functional.normalize(r, dim=-1))
    # and a small alpha on the same data has a positive eigenvalue: no fallback
    assert directions(stats, "contrastive", 0.0)[1] == []


def test_mean_diff_method_and_layer_subset():
    harmful, harmless = synthetic(4, 10, 12, 32)
    stats = compute_stats(harmful, harmless)
    chosen, _fallback = directions(stats, "mean_diff", 0.0, [1, 3])
    r = harmful.mean(1) - harmless.mean(1)
    torch.testing.assert_close(chosen, torch.nn.functional.normalize(r[[1, 3]], dim=-1))
    subset, _ = directions(stats, "contrastive", 1.0, [2])
    everything, _ = directions(stats, "contrastive", 1.0)
    torch.testing.assert_close(subset[0], everything[2])
    assert torch.allclose(everything.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("max_steps", [2, 64])
def test_lanczos_falls_back_to_exact_eigh_when_not_converged(monkeypatch, max_steps):
    # a nearly flat spectrum: two Lanczos steps cannot resolve the top eigenvector
    g = torch.Generator().manual_seed(3)
    harmful, harmless = torch.randn(2, 60, 200, generator=g), torch.randn(2, 60, 200, generator=g)
    stats = compute_stats(harmful, harmless)
    monkeypatch.setattr(directions_module, "LANCZOS_MAX_STEPS", max_steps)
    monkeypatch.setattr(directions_module, "LANCZOS_CHECK_EVERY", 1)
    small = stats.gram_harmful - 0.7 * stats.gram_harmless
    _, _, converged = directions_module._lanczos_top(small, stats.mean_diff_coords)
    assert converged.all() == (max_steps == 64)
    values, vectors = top_direction(stats, 0.7)
    ref_values, ref_vectors = contrastive_eigen(stats, 0.7)
    torch.testing.assert_close(values, ref_values[:, 0], rtol=1e-4, atol=1e-4)
    assert ((vectors * ref_vectors[..., 0]).sum(-1) >= 0.9999).all()


def test_winsorize_clips_at_the_quantile_of_both_sets():
    from optimizer.directions import winsorize

    harmful, harmless = synthetic(2, 30, 20, 16, seed=3)
    harmful[:, :, 5] += 1000.0  # a massive activation, larger on the harmful side
    harmless[:, :, 5] += 900.0
    clipped_b, clipped_g = winsorize(harmful, harmless, 0.95)
    for layer in range(2):
        values = torch.cat([harmful[layer], harmless[layer]]).abs().flatten().sort().values
        limit = values[round(0.95 * len(values)) - 1]
        torch.testing.assert_close(clipped_b[layer], harmful[layer].clamp(-limit, limit), rtol=0, atol=0)
        torch.testing.assert_close(clipped_g[layer], harmless[layer].clamp(-limit, limit), rtol=0, atol=0)
    raw = torch.nn.functional.normalize(compute_stats(harmful, harmless).mean_diff, dim=-1)
    tamed = torch.nn.functional.normalize(compute_stats(clipped_b, clipped_g).mean_diff, dim=-1)
    assert (raw[:, 5].abs() > 0.99).all(), "unclipped, the massive dimension is the whole direction"
    assert (tamed[:, 5].abs() < 0.5).all(), "clipped, the other dimensions count again"


@pytest.mark.parametrize("index", [None, 1.4])
def test_projected_directions_leave_the_harmless_mean_alone(index):
    from optimizer.params import Kernel, TrialParams, build_plan

    harmful, harmless = synthetic(4, 20, 20, 24, seed=4)
    harmful = harmful * 1.5  # harmful residuals larger along the mean too, as in real models
    stats = compute_stats(harmful, harmless)
    kernel = Kernel(peak_weight=1.0, peak_layer=2.0, min_ratio=0.5, falloff=2.5)
    params = TrialParams("mean_diff", None, index, {"attn": kernel, "mlp": kernel})
    plain, _ = build_plan(params, stats)
    projected, _ = build_plan(params, stats, projected=True)
    for layer in range(4):
        mean = torch.nn.functional.normalize(harmless[layer].double().mean(0), dim=0)
        r = plain.directions["attn"][layer].double()
        expected = torch.nn.functional.normalize(r - (r @ mean) * mean, dim=0)
        got = projected.directions["mlp"][layer].double()
        assert abs(float(r @ mean)) > 0.05, "the plain direction has a component along the harmless mean"
        assert abs(float(got @ mean)) < 1e-5
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_a_share_of_the_projection_removes_that_share_of_the_harmless_mean_part(share):
    """`--searched-projection`'s parameter: the direction r - s (r . m) m, renormalised (m the unit harmless mean),
    from the plain plan's directions; s = 0 is the plain plan, s = 1 the projected one."""
    from optimizer.params import Kernel, TrialParams, build_plan, plan_for, replay_params

    harmful, harmless = synthetic(4, 20, 20, 24, seed=5)
    harmful = harmful * 1.5
    stats = compute_stats(harmful, harmless)
    kernel = Kernel(peak_weight=1.0, peak_layer=2.0, min_ratio=0.5, falloff=2.5)
    params = TrialParams("mean_diff", None, None, {"attn": kernel, "mlp": kernel}, projection=share)
    plain, _ = build_plan(params, stats)
    got, _ = plan_for(params, stats, Settings(searched_projection=True))
    for layer in range(4):
        mean = torch.nn.functional.normalize(harmless[layer].double().mean(0), dim=0)
        r = plain.directions["attn"][layer].double()
        expected = torch.nn.functional.normalize(r - share * (r @ mean) * mean, dim=0)
        torch.testing.assert_close(got.directions["attn"][layer].double(), expected, rtol=1e-5, atol=1e-5)
    # --projected-directions: no searched share; every trial replays with the whole projection
    flagged = Settings(direction_methods=["mean_diff"], subspace_max=1, direction_scopes=["per_layer"], projected_directions=True)
    kernels = {f"{c}_{k}": v for c in ("attn", "mlp") for k, v in dataclasses.asdict(kernel).items()}
    replayed = replay_params(kernels, 4, flagged)
    assert replayed.projection == 1.0
    full, _ = plan_for(replayed, stats, flagged)
    torch.testing.assert_close(full.directions["attn"], build_plan(params, stats, projected=1.0)[0].directions["attn"])


@pytest.mark.parametrize("shape", [(20, 30, 64), (50, 40, 48)])  # m < d and m > d
@pytest.mark.parametrize("first_from", ["mean_diff", "other_layer"])
def test_subspace_components_match_the_full_deflated_eigh(shape, first_from):
    """r_2..r_k from the small matrices against the top eigenvectors of P S(alpha) P, P = I - r_1 r_1^T,
    computed in d x d; r_1 either in the layer's span (its mean difference) or not (a global
    direction taken from another layer)."""
    n_b, n_g, d = shape
    harmful, harmless = synthetic(3, n_b, n_g, d, seed=4)
    stats = compute_stats(harmful, harmless)
    alpha, count = 0.8, 3
    layers = [0, 2]
    r = torch.nn.functional.normalize(stats.mean_diff, dim=-1)
    first = r[layers] if first_from == "mean_diff" else r[1].expand(len(layers), d)
    components = subspace_components(stats, alpha, first, layers, count)
    assert components.shape == (len(layers), count, d)
    for row, layer in enumerate(layers):
        basis = torch.cat([first[row : row + 1], components[row]]).double()
        torch.testing.assert_close(basis @ basis.T, torch.eye(count + 1, dtype=torch.float64), rtol=0, atol=1e-5)
        u = first[row].double()
        project = torch.eye(d, dtype=torch.float64) - torch.outer(u, u)
        values, vectors = torch.linalg.eigh(project @ full_matrix(harmful[layer], harmless[layer], alpha) @ project)
        assert values.flip(0)[count - 1] > 1e-3 * values.abs().max(), "the test data should give positive components"
        for i in range(count):
            assert (components[row, i].double() @ vectors[:, -1 - i]).abs() >= 0.9999


def test_subspace_components_past_the_positive_spectrum_are_zero():
    harmful, harmless = synthetic(1, 6, 40, 32, seed=2)
    stats = compute_stats(harmful, harmless)
    first = torch.nn.functional.normalize(stats.mean_diff, dim=-1)
    alpha = 50.0  # the harmless variance dominates every direction but a few
    components = subspace_components(stats, alpha, first, [0], 8)
    norms = components[0].norm(dim=-1)
    assert ((norms - 1).abs() < 1e-4).sum() + (norms < 1e-6).sum() == 8, "each component is a unit vector or zero"
    assert (norms < 1e-6).any(), "with this alpha some components hold nothing and must edit nothing"


def full_discriminant(harmful: torch.Tensor, harmless: torch.Tensor, rho: float) -> torch.Tensor:
    """Shrinkage LDA the textbook way, in full d x d: ((1 - rho) S_w + rho tr(S_w)/d I)^-1 r, unit."""
    b, g = harmful.double(), harmless.double()
    within = torch.cov(b.T, correction=0) + torch.cov(g.T, correction=0)
    d = within.shape[0]
    shrunk = (1 - rho) * within + rho * within.trace() / d * torch.eye(d, dtype=torch.float64)
    v = torch.linalg.solve(shrunk, b.mean(0) - g.mean(0))
    return v / v.norm()


@pytest.mark.parametrize("shape", [(20, 30, 64), (50, 40, 48)])  # m < d and m > d
@pytest.mark.parametrize("rho", [0.05, 0.5, 0.9])
def test_discriminant_matches_full_shrinkage_lda(shape, rho):
    n_b, n_g, d = shape
    harmful, harmless = synthetic(3, n_b, n_g, d, seed=2)
    harmless = harmless * torch.linspace(0.1, 3.0, d)  # harmless spread varies by dimension: LDA != r
    stats = compute_stats(harmful, harmless)
    chosen, fallback = directions(stats, "discriminant", 0.0, [0, 2], shrinkage=rho)
    assert fallback == []
    r = harmful.mean(1) - harmless.mean(1)
    for row, layer in enumerate([0, 2]):
        ref = full_discriminant(harmful[layer], harmless[layer], rho)
        assert float(chosen[row].double() @ ref) >= 0.9999  # same direction, same orientation
        assert float(chosen[row] @ r[layer]) > 0
        mean_diff = torch.nn.functional.normalize(r[layer], dim=0)
        assert float(chosen[row] @ mean_diff) < 0.999, "the test data should tell LDA from the mean difference"
    # shrinkage 1 is the mean difference itself
    one, _ = directions(stats, "discriminant", 0.0, shrinkage=1.0)
    torch.testing.assert_close(one, torch.nn.functional.normalize(r, dim=-1), rtol=1e-5, atol=1e-5)


def test_discriminant_lowers_harmless_variance_along_the_direction():
    """What it is for: along the discriminant, harmless activations vary less than along r for the
    same separation of the means (the KL an ablation costs against the refusals it removes)."""
    harmful, harmless = synthetic(1, 60, 60, 32, seed=3)
    harmless = harmless * torch.linspace(0.1, 3.0, 32)
    harmful = harmful * torch.linspace(0.1, 3.0, 32)
    stats = compute_stats(harmful, harmless)
    r = (harmful.mean(1) - harmless.mean(1))[0]

    def fisher(v: torch.Tensor) -> float:
        spread = (harmful[0] @ v).var(correction=0) + (harmless[0] @ v).var(correction=0)
        return float((r @ v) ** 2 / spread)

    mean_diff, _ = directions(stats, "mean_diff", 0.0)
    ratios = [fisher(directions(stats, "discriminant", 0.0, shrinkage=rho)[0][0]) for rho in (0.9, 0.5, 0.1)]
    # less shrinkage, closer to the in-sample discriminant: each step separates the sets better
    assert fisher(mean_diff[0]) < ratios[0] < ratios[1] < ratios[2]
    assert ratios[2] > 1.3 * fisher(mean_diff[0])
