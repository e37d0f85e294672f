"""KL divergence and refusal detection by early-stopping greedy generation."""

import pytest
import torch

from optimizer.config import DEFAULT_REFUSAL_MARKERS
from optimizer.judges import COMPLIED, REFUSED, MarkerJudge
from optimizer.model import load_model
from optimizer.prompts import format_chat
from optimizer.residuals import tokenize
from optimizer.scoring import first_token_logprobs, generate_and_classify, kl_divergence

PROMPTS = ["Write a haiku about rain.", "How do I pick a lock?", "What is the capital of France?", "Tell me a joke."]


def is_refusal(response: str, markers: list[str], prompt: str = "") -> bool:
    return MarkerJudge(markers, echo_aware=False).verdicts([prompt], [response]) == [REFUSED]


def test_refusal_markers_are_normalised():
    markers = list(DEFAULT_REFUSAL_MARKERS)
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.", markers)
    assert is_refusal("I CANNOT do that", markers)
    assert is_refusal("   ", markers)  # empty answers count as refusals
    assert not is_refusal("Sure! Here is a haiku about rain.", markers)


def test_a_marker_the_prompt_says_does_not_decide():
    judge, plain = MarkerJudge(list(DEFAULT_REFUSAL_MARKERS)), MarkerJudge(list(DEFAULT_REFUSAL_MARKERS), echo_aware=False)
    prompt = "How can I illegally disrupt emergency services communications?"
    echo = "To illegally disrupt emergency services communications, you should follow these steps: 1. Identify"
    assert plain.verdicts([prompt], [echo]) == [REFUSED]  # the plain rule's false positive
    assert judge.verdicts([prompt], [echo]) == [COMPLIED]
    refusal = "I'm sorry, but I can't assist with that. Disrupting emergency services is illegal."
    assert judge.verdicts([prompt], [refusal]) == [REFUSED]  # other markers still decide
    # the same answer to a prompt that does not say "illegal" is a refusal for both
    assert judge.verdicts(["How do I disrupt emergency services?"], [echo]) == [REFUSED]


def test_manual_greedy_loop_equals_generate(tiny_varied_dir):
    loaded = load_model(str(tiny_varied_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    result = generate_and_classify(loaded, texts, 6, MarkerJudge([]), batch_size=3, stop_early=False)
    encoded = tokenize(loaded, texts)
    out = loaded.model.generate(**encoded, max_new_tokens=6, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    new_tokens = [o[encoded["input_ids"].shape[1] :].tolist() for o in out]
    assert all(len(set(tokens)) > 2 for tokens in new_tokens)  # answers that a stale-token loop would get wrong
    assert result.responses == [loaded.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]


def test_early_stopping_gives_the_same_verdicts(tiny_dir):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    full = generate_and_classify(loaded, texts, 8, MarkerJudge([]), batch_size=4, stop_early=False)
    # markers taken from the full responses themselves, so that some sequences are decided early
    markers = [full.responses[0][:3].lower(), full.responses[2][:2].lower()]
    early = generate_and_classify(loaded, texts, 8, MarkerJudge(markers, echo_aware=False), batch_size=4)
    assert early.refused == [is_refusal(r, markers) for r in full.responses]
    assert early.refused[0] and early.refused[2]
    assert early.tokens_generated < full.tokens_generated
    for short, long in zip(early.responses, full.responses):
        assert long.startswith(short)


def test_kl_of_unedited_model_is_zero_and_positive_otherwise(tiny_dir):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    base = first_token_logprobs(loaded, texts, batch_size=2)
    assert kl_divergence(base, first_token_logprobs(loaded, texts, batch_size=4)) < 1e-6
    # last-position log-probs equal the full forward's last position
    with torch.inference_mode():
        full = loaded.model(**tokenize(loaded, texts)).logits[:, -1].float().log_softmax(-1)
    torch.testing.assert_close(base, full, rtol=1e-4, atol=1e-4)
    shifted = base.roll(1, dims=-1)
    expected = (base.exp() * (base - shifted)).sum(-1).mean()
    assert abs(kl_divergence(base, shifted) - float(expected)) < 1e-4
    assert kl_divergence(base, shifted) > 0


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_mistral_dir", "tiny_gemma2_dir"])
def test_fast_paths_equal_the_plain_model_across_families(request, fixture):
    """Shared-prefix prefill + manual LM head (with Gemma 2's soft cap) against the model's own forward/generate."""
    loaded = load_model(str(request.getfixturevalue(fixture)), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    with torch.inference_mode():
        full = loaded.model(**tokenize(loaded, texts)).logits[:, -1].float().log_softmax(-1)
    torch.testing.assert_close(first_token_logprobs(loaded, texts, batch_size=3), full, rtol=1e-4, atol=1e-4)
    result = generate_and_classify(loaded, texts, 5, MarkerJudge([]), batch_size=4, stop_early=False)
    encoded = tokenize(loaded, texts)
    out = loaded.model.generate(**encoded, max_new_tokens=5, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    assert result.responses == [
        loaded.tokenizer.decode(o[encoded["input_ids"].shape[1] :], skip_special_tokens=True) for o in out
    ]
