"""Trial hooks against the weight edit W <- (I - w r r^T) W, on tiny models."""

import copy

import pytest
import torch

from optimizer.ablation import AblationHooks, AblationPlan, bake_into_weights
from optimizer.components import COMPONENTS
from optimizer.model import find_layers, load_model
from optimizer.prompts import format_chat
from optimizer.residuals import tokenize

PROMPTS = ["Write a haiku about rain.", "How do I pick a lock?", "What is 2 + 2?"]


def random_plan(loaded, seed: int = 0, zero: bool = False) -> AblationPlan:
    g = torch.Generator().manual_seed(seed)
    n, d = loaded.n_layers, loaded.hidden_size
    dirs = {c: torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) for c in COMPONENTS}
    weights = {c: [0.0 if zero else float(w) for w in torch.rand(n, generator=g) * 1.5] for c in COMPONENTS}
    return AblationPlan(dirs, weights)


def logits_of(loaded) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(**tokenize(loaded, format_chat(loaded.tokenizer, PROMPTS))).logits.float()


@pytest.fixture(params=["tiny_dir", "tiny_llama_bias_dir", "tiny_mistral_dir", "tiny_gemma2_dir"])
def loaded(request):
    return load_model(str(request.getfixturevalue(request.param)), "cpu", "float32")


def test_zero_weights_leave_logits_unchanged(loaded):
    before = logits_of(loaded)
    hooks = AblationHooks(loaded)
    hooks.apply(random_plan(loaded, zero=True))
    torch.testing.assert_close(logits_of(loaded), before, rtol=0, atol=0)
    hooks.apply(random_plan(loaded))
    assert (logits_of(loaded) - before).abs().max() > 1e-3, "a non-zero plan must change the logits"
    hooks.clear()
    torch.testing.assert_close(logits_of(loaded), before, rtol=0, atol=0)


def test_hooks_equal_weight_edit(loaded):
    plan = random_plan(loaded, seed=1)
    baked = copy.deepcopy(loaded)
    bake_into_weights(baked, plan)
    hooks = AblationHooks(loaded)
    hooks.apply(plan)
    hooked = logits_of(loaded)
    hooks.remove()
    # float32 through 4 small layers: differences are rounding only
    torch.testing.assert_close(logits_of(baked), hooked, rtol=1e-4, atol=1e-4)
    assert (logits_of(loaded) - hooked).abs().max() > 1e-3


def test_components_found_by_structure(loaded):
    layers = find_layers(loaded.model)
    assert len(layers) == 4
    for i, layer in enumerate(layers):
        assert loaded.discovery.sites["attn"][i].module is layer.self_attn.o_proj
        assert loaded.discovery.sites["mlp"][i].module is layer.mlp.down_proj


def test_bias_is_edited_where_present(tiny_llama_bias_dir):
    loaded = load_model(str(tiny_llama_bias_dir), "cpu", "float32")
    plan = random_plan(loaded, seed=2)
    originals = {c: copy.deepcopy(loaded.discovery.sites[c][0].module) for c in COMPONENTS}
    bake_into_weights(loaded, plan)
    x = torch.randn(5, 128)
    for c in COMPONENTS:
        edited, original = loaded.discovery.sites[c][0].module, originals[c]
        assert edited.bias is not None and not torch.equal(edited.bias, original.bias)
        r, w = plan.directions[c][0], plan.weights[c][0]
        y = original(x[:, : original.in_features])
        expected = y - w * (y @ r).unsqueeze(-1) * r
        torch.testing.assert_close(edited(x[:, : original.in_features]), expected, rtol=1e-5, atol=1e-5)


def random_subspace_plan(loaded, k: int, gamma: float, seed: int = 0) -> AblationPlan:
    """Per layer an orthonormal basis of k random directions (QR), the first as `directions`."""
    plain = random_plan(loaded, seed)
    g = torch.Generator().manual_seed(seed + 100)
    n, d = loaded.n_layers, loaded.hidden_size
    bases = torch.linalg.qr(torch.randn(n, d, k, generator=g)).Q.mT  # (n, k, d), orthonormal rows
    return AblationPlan({c: bases[:, 0] for c in COMPONENTS}, plain.weights, {c: bases[:, 1:] for c in COMPONENTS}, gamma)


def test_subspace_hooks_equal_the_weight_edit_and_the_explicit_sum(loaded):
    """y <- y - sum_i w gamma^(i-1) r_i (r_i . y), three ways: hooks, baked weights, and the sum
    written out on one block's output."""
    plan = random_subspace_plan(loaded, k=3, gamma=0.6, seed=4)
    assert plan.rank == 3
    baked = copy.deepcopy(loaded)
    bake_into_weights(baked, plan)
    hooks = AblationHooks(loaded)
    hooks.apply(plan)
    hooked = logits_of(loaded)
    site = loaded.discovery.sites["attn"][1]
    x = torch.randn(4, site.module.in_features)
    y_hooked = site.module(x)
    hooks.remove()
    y = site.module(x)
    w = plan.weights["attn"][1]
    directions = [plan.directions["attn"][1], *plan.extra["attn"][1]]
    expected = y - sum(w * 0.6**i * (y @ r).unsqueeze(-1) * r for i, r in enumerate(directions))
    torch.testing.assert_close(y_hooked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_of(baked), hooked, rtol=1e-4, atol=1e-4)
    one = AblationPlan(plan.directions, plan.weights)
    hooks = AblationHooks(loaded)
    hooks.apply(one)
    assert (logits_of(loaded) - hooked).abs().max() > 1e-3, "the extra directions must change the logits"
    hooks.remove()


def test_a_subspace_of_zero_extra_directions_is_the_single_direction(tiny_dir):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    plan = random_plan(loaded, seed=5)
    padded = AblationPlan(
        plan.directions, plan.weights, {c: torch.zeros(loaded.n_layers, 2, loaded.hidden_size) for c in COMPONENTS}, 0.5
    )
    outputs = []
    for p in (plan, padded):
        hooks = AblationHooks(loaded)
        hooks.apply(p)
        outputs.append(logits_of(loaded))
        hooks.remove()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)


def test_fixed_buffer_hooks_hold_smaller_subspaces_and_refuse_larger_ones(tiny_dir):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    static = AblationHooks(loaded, static=True, rank=4)
    per_trial = AblationHooks(loaded)
    for plan in (random_subspace_plan(loaded, k=2, gamma=0.9, seed=6), random_plan(loaded, seed=7)):
        static.clear()  # (both sets of hooks are registered: one at a time edits)
        per_trial.apply(plan)
        expected = logits_of(loaded)
        per_trial.clear()
        static.apply(plan)  # a rank-2 plan after nothing, then a rank-1 plan over the rank-2 one's buffers
        torch.testing.assert_close(logits_of(loaded), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        static.apply(random_subspace_plan(loaded, k=5, gamma=0.5))
