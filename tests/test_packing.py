"""Prefill without padding (prompts end to end in one row) against the padded batch."""

import io

import pytest
import torch
from rich.console import Console

from optimizer import packing
from optimizer.judges import MarkerJudge
from optimizer.model import load_model
from optimizer.packing import full_attention_only, groups
from optimizer.prompts import format_chat
from optimizer.scoring import (
    eager_step,
    first_token_logprobs,
    generate_and_classify,
    packed_prefill_error,
    prefill,
    split_shared_prefix,
)
from optimizer.workbench import FAST_PATH_TOLERANCE, prepare_scoring, resolve
from tests.test_ablation import random_plan
from tests.test_graph_decode import PROMPTS
from tests.test_study import short_settings


def test_groups_fill_the_budget_in_order():
    assert groups([3, 4, 1, 9, 1], budget=8) == [range(3), range(3, 4), range(4, 5)]
    assert groups([20], budget=8) == [range(1)], "a prompt longer than the budget goes alone"
    assert groups([1, 1, 1], budget=8) == [range(3)]


def both_paths(loaded, texts, steps: int = 2):
    """Next-token logits after the prefill and after `steps` decode steps (the padded path's tokens
    fed to both), the attention mask, for the padded and the packed prefill."""
    prefix, suffixes = split_shared_prefix(loaded, texts)
    out, fed = {}, None
    for packed in (False, True):
        logits, cache, mask = prefill(loaded, prefix, suffixes, packed)
        fed = fed or [logits.argmax(-1)]
        seen = [logits]
        for step in range(steps):
            logits, mask = eager_step(loaded, fed[step], mask, cache)
            if not packed:
                fed.append(logits.argmax(-1))
            seen.append(logits)
        out[packed] = (seen, mask)
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("fixture", ["tiny_varied_dir", "tiny_varied_llama_dir"])
@torch.inference_mode()
def test_packed_prefill_gives_the_padded_logits_cache_and_answers(request, fixture, attention, monkeypatch):
    loaded = load_model(str(request.getfixturevalue(fixture)), "cpu", "float32")
    loaded.model.set_attn_implementation(attention)
    hooks = packing_hooks(loaded)
    texts = format_chat(loaded.tokenizer, PROMPTS)
    # 12 tokens per forward: several groups, and prompts longer than that alone in theirs
    monkeypatch.setattr(packing, "TOKENS_PER_FORWARD", 12)
    paths = both_paths(loaded, texts)
    (padded, padded_mask), (packed, packed_mask) = paths[False], paths[True]
    assert torch.equal(padded_mask, packed_mask)
    for slow, fast in zip(padded, packed):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)  # rounding: other matrix shapes
    assert (padded[0][0] - padded[0][1]).abs().max() > 1e-2, "the prompts must differ for the comparison to mean anything"

    plain = generate_and_classify(loaded, texts, 8, MarkerJudge([]), 2)
    plain_kl = first_token_logprobs(loaded, texts, 2)
    fast = generate_and_classify(loaded, texts, 8, MarkerJudge([]), 2, packed=True)
    assert fast.responses == plain.responses and len(set(plain.responses)) > 2
    torch.testing.assert_close(first_token_logprobs(loaded, texts, 2, packed=True), plain_kl, rtol=1e-5, atol=1e-5)
    hooks.remove()


def packing_hooks(loaded):
    from optimizer.ablation import AblationHooks

    hooks = AblationHooks(loaded)
    hooks.apply(random_plan(loaded, seed=5))  # the edit acts on every position, prefix included
    return hooks


def test_a_broken_layout_is_caught_by_the_check(tiny_varied_dir, monkeypatch):
    loaded = load_model(str(tiny_varied_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    assert packed_prefill_error(loaded, texts, 4) < FAST_PATH_TOLERANCE[1]
    # positions that restart at 0 for every prompt (forgetting the prefix): the check must see it
    real_mask = packing.block_mask
    monkeypatch.setattr(packing, "block_mask", lambda p, lengths, loaded: real_mask(0, [p + lengths[0], *lengths[1:]], loaded))
    assert packed_prefill_error(loaded, texts, 4) > FAST_PATH_TOLERANCE[1]


def test_study_prefills_packed_only_where_every_layer_attends_fully(tiny_dir, tiny_gemma2_dir, tmp_path):
    for model, expected in ((tiny_dir, True), (tiny_gemma2_dir, False)):
        out = io.StringIO()
        settings = short_settings(model, max_new_tokens=2)
        spec = resolve(settings, Console(file=out, width=200))
        assert full_attention_only(spec.loaded) == expected
        scorer = prepare_scoring(spec, tmp_path / model.parent.name)
        assert scorer.paths.packed_prefill == expected
        assert ("Prompts prefilled without padding" in out.getvalue()) == expected


def test_a_packed_prefill_that_differs_is_not_used(tiny_dir, tmp_path, monkeypatch):
    import optimizer.workbench as workbench_module

    monkeypatch.setattr(workbench_module, "packed_prefill_error", lambda *args: 0.5)
    out = io.StringIO()
    settings = short_settings(tiny_dir, max_new_tokens=2)
    scorer = prepare_scoring(resolve(settings, Console(file=out, width=200)), tmp_path)
    assert "Prefilling padded batches: the packed prefill gives logits that differ from the plain path's by 0.5" in out.getvalue()
    assert not scorer.paths.packed_prefill


def own_block_outputs(loaded, texts) -> torch.Tensor:
    """Every block's output at each prompt's last token, each prompt forwarded alone (no prefix
    split, no padding, no packing), then transformers' last hidden state there (after the final
    norm): (layers + 1, prompts, hidden)."""
    outputs: list[torch.Tensor] = []
    hook = lambda _m, _i, out: outputs.append((out[0] if isinstance(out, tuple) else out)[0, -1].float())
    handles = [layer.register_forward_hook(hook) for layer in loaded.layers]
    per_prompt = []
    with torch.inference_mode():
        for text in texts:
            outputs.clear()
            out = loaded.model(
                **loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False),
                use_cache=False,
                output_hidden_states=True,
            )
            per_prompt.append(torch.stack([*outputs, out.hidden_states[-1][0, -1].float()]))
    for handle in handles:
        handle.remove()
    return torch.stack(per_prompt, dim=1)


@pytest.mark.parametrize("fixture", ["tiny_varied_dir", "tiny_varied_llama_dir"])
def test_residuals_are_each_prompts_own_block_outputs_padded_and_packed(request, fixture, monkeypatch):
    from optimizer.residuals import collect_residuals

    loaded = load_model(str(request.getfixturevalue(fixture)), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    want = own_block_outputs(loaded, texts)
    assert want.shape == (loaded.n_layers + 1, len(texts), loaded.hidden_size)
    assert (want[:, 0] - want[:, -1]).abs().max() > 1e-2, "the prompts must differ for the order to be checked"
    assert (want[-1] - want[-2]).abs().max() > 1e-2, "the final norm must change the last block's output"
    monkeypatch.setattr(packing, "TOKENS_PER_FORWARD", 12)  # several packed groups per batch
    for batch_size in (2, len(texts)):  # batches of similar lengths, in another order than the input's
        for packed in (False, True):
            got = collect_residuals(loaded, texts, batch_size, packed=packed)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
