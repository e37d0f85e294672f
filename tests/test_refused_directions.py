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
from tests.test_study import STATS_METHODS, run_args

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
    block's output at the last prompt token, then transformers' last hidden state there (the last
    block's output after the final norm), (L + 1, n, d)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers, states, last = [], [], []  # last: the last block's own output (a hook)
    keep = lambda _m, _i, out: last.append(out[0] if isinstance(out, tuple) else out)
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
            # each block's output: hidden_states[l + 1], except the last entry, which has the final norm applied:
            # the last block's own output comes from a hook
            last.clear()
            hook = model.model.layers[-1].register_forward_hook(keep)
            hidden = model.model(ids, output_hidden_states=True).hidden_states  # the blocks only: no vocabulary logits
            hook.remove()
            states.append(torch.stack([*(h[0, -1] for h in hidden[1:-1]), last[0][0, -1], hidden[-1][0, -1]]))
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
    argv += STATS_METHODS  # as the study was run
    spec = resolve(settings_of([*argv, *markers(tmp_path, "a"), "--refused-directions"], None, tmp_path), Console(stderr=True))
    cached = prepare(spec, spec.settings.cache_path())
    assert cached.cache_computations == 0, "the study's statistics, reused from its cache"
    refused_b, residuals_b = reference(tiny_varied_dir, spec.texts.direction_harmful, spec.texts.direction_prompts[0], 4)
    refused_g, residuals_g = reference(tiny_varied_dir, spec.texts.direction_harmless, spec.texts.direction_prompts[1], 4)
    assert (sum(refused_b), sum(refused_g)) == (13, 15)
    keep_b, keep_g = torch.tensor(refused_b), ~torch.tensor(refused_g)
    expected = residuals_b[:, keep_b].mean(1) - residuals_g[:, keep_g].mean(1)  # (L + 1, d)
    torch.testing.assert_close(cached.stats.mean_diff, expected[:-1], rtol=1e-4, atol=1e-4)  # every block's own output
    unfiltered = residuals_b.mean(1) - residuals_g.mean(1)
    assert not torch.allclose(cached.stats.mean_diff, unfiltered[:-1], rtol=1e-2, atol=1e-2), "the filter changed them"

    # --normed-last-direction: the last layer's after the final norm (transformers' last hidden state); other statistics
    normed_argv = [*argv, *markers(tmp_path, "a"), "--refused-directions", "--normed-last-direction"]
    normed_spec = resolve(settings_of(normed_argv, None, tmp_path), Console(stderr=True))
    normed = prepare(normed_spec, normed_spec.settings.cache_path())
    assert normed.cache_computations == 1, "other directions: not the cached ones"
    torch.testing.assert_close(normed.stats.mean_diff, torch.cat([expected[:-2], expected[-1:]]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected[-1], expected[-2], rtol=1e-2, atol=1e-2), "the final norm changed the last layer's"
    assert main(run_args(tiny_varied_dir, studies, "--trials", "3", *filtered, "--normed-last-direction")) == 2
    err = capsys.readouterr().err
    assert "(normed_last_direction differ)" in err and "resume it without --normed-last-direction" in err

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
