"""--refused-directions: directions from the harmful prompts the unedited model refuses and the
harmless ones it answers, checked against answers and residuals computed here with plain
transformers calls (one prompt at a time, no padding, `generate` and `output_hidden_states`)."""

from __future__ import annotations

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from optimizer.cli import main
from optimizer.judges import MarkerJudge
from optimizer.workbench import prepare, resolve
from tests.test_settings import settings_of
from tests.test_study import run_args

# on the tiny varied model, the plain marker "a" is in 13 of the 24 harmful answers and 15 of the 24
# harmless ones (4 new tokens): both filtered sets keep at least 8 prompts
FILTER = ["--direction-prompts", "24", "--judge", "markers:plain", "--response-prefix", "", "--batch-size", "8"]


def markers(tmp_path, *words: str) -> list[str]:
    """The flag that sets the refusal markers (a config file's `refusal_markers`)."""
    path = tmp_path / "markers.toml"
    path.write_text(f"refusal_markers = {list(words)!r}\n".replace("'", '"'))
    return ["--config", str(path)]


def reference(model_dir, texts: list[str], raw: list[str], max_new_tokens: int) -> tuple[list[bool], torch.Tensor]:
    """Whether each answer is refused (the plain marker judge on a full greedy answer) and each
    block's output at the last prompt token but the last block's, (L - 1, n, d)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers, states = [], []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
            # each block's output: hidden_states[l + 1], except the last entry, which has the final norm applied
            hidden = model.model(ids, output_hidden_states=True).hidden_states  # the blocks only: no vocabulary logits
            states.append(torch.stack([h[0, -1] for h in hidden[1:-1]]))
    refused = [v == "refused" for v in MarkerJudge(["a"], echo_aware=False).verdicts(raw, answers)]
    return refused, torch.stack(states, dim=1)


def test_refused_directions_use_exactly_the_prompts_the_unedited_model_refuses(tiny_varied_dir, tmp_path, capsys):
    studies = tmp_path / "studies"
    filtered = [*FILTER, *markers(tmp_path, "a"), "--refused-directions"]
    assert main(run_args(tiny_varied_dir, studies, "--trials", "2", *filtered)) == 0
    err = capsys.readouterr().err
    assert "Directions from the 13 of 24 harmful direction prompts the unedited model refuses and the 9 of 24" in err
    assert "Answering the direction prompts (--refused-directions)" in err and "48/48" in err  # the progress bar, done

    argv = ["--model", str(tiny_varied_dir), "--studies-dir", str(studies), "--study", "t", "--max-new-tokens", "4", *FILTER]
    spec = resolve(settings_of([*argv, *markers(tmp_path, "a"), "--refused-directions"], None, tmp_path), Console(stderr=True))
    cached = prepare(spec, spec.settings.cache_path())
    assert cached.cache_computations == 0, "the study's statistics, reused from its cache"
    refused_b, residuals_b = reference(tiny_varied_dir, spec.texts.direction_harmful, spec.texts.direction_prompts[0], 4)
    refused_g, residuals_g = reference(tiny_varied_dir, spec.texts.direction_harmless, spec.texts.direction_prompts[1], 4)
    assert (sum(refused_b), sum(refused_g)) == (13, 15)
    keep_b, keep_g = torch.tensor(refused_b), ~torch.tensor(refused_g)
    expected = residuals_b[:, keep_b].mean(1) - residuals_g[:, keep_g].mean(1)
    torch.testing.assert_close(cached.stats.mean_diff[:-1], expected, rtol=1e-4, atol=1e-4)
    unfiltered = residuals_b.mean(1) - residuals_g.mean(1)
    assert not torch.allclose(cached.stats.mean_diff[:-1], unfiltered, rtol=1e-2, atol=1e-2), "the filter changed the directions"

    # the same parameters mean other directions without the filter: the study refuses to mix them
    unfiltered_run = [*FILTER, *markers(tmp_path, "a"), "--no-refused-directions"]
    assert main(run_args(tiny_varied_dir, studies, "--trials", "3", *unfiltered_run)) == 2
    assert "(refused_directions differ)" in (err := capsys.readouterr().err) and "resume it with --refused-directions" in err


def test_refused_directions_use_a_set_whole_when_too_few_prompts_pass(tiny_varied_dir, tmp_path, capsys):
    # a marker no answer contains: no harmful prompt is refused, so that set is used whole
    flags = [*FILTER, *markers(tmp_path, "zzzz"), "--refused-directions"]
    assert main(run_args(tiny_varied_dir, tmp_path / "studies", "--trials", "2", *flags)) == 0
    err = capsys.readouterr().err
    assert "Directions from the 0 of 24 harmful direction prompts" in err and "the 24 of 24 harmless ones" in err
    assert "only 0 harmful direction prompts pass the filter (fewer than 8): using all 24 of that set" in err
