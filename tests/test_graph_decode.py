"""Fixed-buffer decoding (captured as a CUDA graph on GPUs) against the eager decoding path.

On this CPU the decode step runs eagerly from the same fixed buffers the graph would replay, which
tests everything except the capture itself: cache copy, mask, positions, padded rows, static hooks.
"""

import dataclasses
import io
import re

import pytest
import torch
from rich.console import Console

import optimizer.workbench as workbench_module
from optimizer.ablation import AblationHooks, AblationPlan
from optimizer.graph_decode import GraphDecoder, supports_graph_decoding
from optimizer.judges import MarkerJudge
from optimizer.model import load_model
from optimizer.prompts import format_chat
from optimizer.scoring import generate_and_classify, graph_error, graph_length
from optimizer.workbench import FAST_PATH_TOLERANCE, MIN_REFUSED_DIRECTION_PROMPTS, prepare_scoring, resolve
from tests.test_study import short_settings

PROMPTS = [
    "Write a haiku about rain.",
    "How do I pick a lock?",
    "What is the capital of France?",
    "Tell me a joke.",
    "Explain, in two sentences, why the sky looks blue at noon and red at dusk.",
]


def random_plan(loaded, seed: int = 0) -> AblationPlan:
    g = torch.Generator().manual_seed(seed)
    directions = {
        c: torch.nn.functional.normalize(torch.randn(loaded.n_layers, loaded.hidden_size, generator=g), dim=-1)
        for c in ("attn", "mlp")
    }
    weights = {c: [0.0 if layer == 1 else 0.5 + layer * 0.3 for layer in range(loaded.n_layers)] for c in ("attn", "mlp")}
    return AblationPlan(directions, weights)


@pytest.mark.parametrize("fixture", ["tiny_varied_dir", "tiny_varied_llama_dir"])
def test_fixed_buffer_decoding_gives_the_eager_tokens(request, fixture):
    loaded = load_model(str(request.getfixturevalue(fixture)), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    # 5 prompts in batches of 2: the last batch has one row, the graph's second row repeats it
    graph = GraphDecoder(loaded, 2, graph_length(loaded, texts, 7), capture=False)
    eager = generate_and_classify(loaded, texts, 7, MarkerJudge([]), batch_size=2, stop_early=False)
    fixed = generate_and_classify(loaded, texts, 7, MarkerJudge([]), batch_size=2, stop_early=False, graph=graph)
    assert fixed.responses == eager.responses
    assert fixed.tokens_generated == eager.tokens_generated == 5 * 7
    assert all(len(set(loaded.tokenizer(r, add_special_tokens=False)["input_ids"])) > 2 for r in eager.responses)
    assert graph_error(loaded, graph, texts) < 1e-5


def test_early_decisions_end_fixed_buffer_decoding_with_the_same_verdicts(tiny_varied_dir):
    loaded = load_model(str(tiny_varied_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    full = generate_and_classify(loaded, texts, 8, MarkerJudge([]), batch_size=5, stop_early=False)
    markers = [full.responses[0][:3].lower(), full.responses[2][:2].lower()]
    graph = GraphDecoder(loaded, 5, graph_length(loaded, texts, 8), capture=False)
    eager = generate_and_classify(loaded, texts, 8, MarkerJudge(markers, echo_aware=False), batch_size=5)
    fixed = generate_and_classify(loaded, texts, 8, MarkerJudge(markers, echo_aware=False), batch_size=5, graph=graph)
    assert fixed.refused == eager.refused and fixed.refused[0] and fixed.refused[2]
    assert fixed.responses == eager.responses
    assert fixed.tokens_generated == eager.tokens_generated < full.tokens_generated


def test_the_check_catches_a_decoder_that_gets_positions_wrong(tiny_dir, monkeypatch):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    graph = GraphDecoder(loaded, 4, graph_length(loaded, texts, 4), capture=False)
    load = GraphDecoder.load

    def off_by_one(self, *args):
        load(self, *args)
        self.positions.add_(1)

    monkeypatch.setattr(GraphDecoder, "load", off_by_one)
    assert graph_error(loaded, graph, texts) > FAST_PATH_TOLERANCE[1]


def test_too_long_a_prefill_is_refused(tiny_dir):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    graph = GraphDecoder(loaded, 5, graph_length(loaded, texts, 4) - 1, capture=False)
    with pytest.raises(ValueError, match="do not fit"):
        generate_and_classify(loaded, texts, 4, MarkerJudge([]), batch_size=5, graph=graph)


def test_static_hooks_equal_the_per_trial_hooks_and_clear_exactly(tiny_dir):
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS)
    encoded = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        plain = loaded.model(**encoded).logits
    plan = random_plan(loaded)
    outputs = {}
    for static in (False, True):
        hooks = AblationHooks(loaded, static=static)
        hooks.apply(plan)
        with torch.inference_mode():
            outputs[static] = loaded.model(**encoded).logits
        hooks.clear()
        with torch.inference_mode():
            cleared = loaded.model(**encoded).logits
        hooks.remove()
        assert torch.equal(cleared, plain)
    assert (outputs[False] - plain).abs().max() > 1e-3
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)


def test_graph_decoding_is_only_offered_where_it_fits(tiny_dir, tiny_gemma2_dir):
    assert not supports_graph_decoding(load_model(str(tiny_dir), "cpu", "float32"))  # no CUDA here
    gemma2 = load_model(str(tiny_gemma2_dir), "cpu", "float32")
    gemma2 = dataclasses.replace(
        gemma2, device=torch.device("cuda")
    )  # only the device is pretended: sliding layers still rule it out
    assert not supports_graph_decoding(gemma2)


def scorers_eager_and_fixed(model_dir, tmp_path, monkeypatch, **overrides):
    """The same study prepared twice, decoding eagerly (False) and through fixed buffers (True, a
    CUDA graph on GPUs): each way's scorer and console output."""
    prepared = {}
    for graph in (False, True):
        monkeypatch.setattr(workbench_module, "supports_graph_decoding", lambda loaded, graph=graph: graph)
        console = Console(file=io.StringIO(), width=200)
        studies = str(tmp_path / str(graph))
        chosen = {"direction_prompts": 8, "scoring_prompts": 6, "max_new_tokens": 5, "studies_dir": studies}
        settings = short_settings(model_dir, **{**chosen, **overrides})
        prepared[graph] = (prepare_scoring(resolve(settings, console), tmp_path / str(graph)), console.file.getvalue())
    return prepared


def test_trials_score_the_same_through_fixed_buffers(tiny_varied_dir, tmp_path, monkeypatch):
    scores = {}
    for graph, (scorer, log) in scorers_eager_and_fixed(tiny_varied_dir, tmp_path, monkeypatch).items():
        plan = random_plan(scorer.spec.loaded, seed=3)
        first, second = scorer.score(plan), scorer.score(random_plan(scorer.spec.loaded, seed=4))
        scores[graph] = (first, second, log)
    (eager_1, eager_2, _), (fixed_1, fixed_2, log) = scores[False], scores[True]
    assert "Decode steps replayed from a CUDA graph" in log
    for eager, fixed in ((eager_1, fixed_1), (eager_2, fixed_2)):
        assert (fixed.refusals, fixed.responses) == (eager.refusals, eager.responses)
        assert abs(fixed.kl - eager.kl) < 1e-6


def test_the_baseline_and_the_direction_answers_are_the_same_through_fixed_buffers(tiny_varied_dir, tmp_path, monkeypatch):
    """A study with a decode graph answers the baseline through it, and --refused-directions' direction
    prompts through one of their own (sized for them): the same answers, verdicts and statistics as
    eager decoding. The markers split both sets, so that the filter keeps part of each (a verdict
    changed by the decoder would change the statistics)."""
    built = []

    def decoder(loaded, batch, length, capture=True):
        built.append(length)
        return GraphDecoder(loaded, batch, length, capture)

    monkeypatch.setattr(workbench_module, "GraphDecoder", decoder)
    prepared = scorers_eager_and_fixed(
        tiny_varied_dir, tmp_path, monkeypatch, direction_prompts=24, refusal_markers=["b", "c", "d", "f", "g", "h"]
    )
    found = {}
    for graph, (scorer, log) in prepared.items():
        assert (scorer.paths.graph is not None) == graph
        kept = [line for line in log.splitlines() if line.startswith("Directions from the")]
        found[graph] = (scorer.baseline_refusals, scorer.prepared.stats, kept)
    # only the fixed-buffer study builds decoders: its own, then the direction prompts'
    spec, cap = prepared[True][0].spec, prepared[True][0].spec.settings.max_new_tokens
    direction_texts = spec.texts.direction_harmful + spec.texts.direction_harmless
    assert built == [graph_length(spec.loaded, spec.texts.harmful, cap), graph_length(spec.loaded, direction_texts, cap)]
    (eager_base, eager_stats, eager_kept), (fixed_base, fixed_stats, fixed_kept) = found[False], found[True]
    assert (fixed_base.refused, fixed_base.responses) == (eager_base.refused, eager_base.responses)
    assert 0 < sum(eager_base.refused) < len(eager_base.refused)
    assert fixed_kept == eager_kept and len(eager_kept) == 1  # the same verdict counts
    if eager_stats.mean_diff.device.type == "cpu":  # float32 here; bfloat16 on a GPU answers otherwise
        kept_b, kept_g = map(int, re.findall(r"the (\d+) of 24", eager_kept[0]))
        assert MIN_REFUSED_DIRECTION_PROMPTS <= min(kept_b, kept_g) and max(kept_b, kept_g) < 24  # both sets filtered
    for name, tensor in eager_stats.tensors().items():
        torch.testing.assert_close(fixed_stats.tensors()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_a_graph_that_cannot_be_built_leaves_eager_decoding_and_per_trial_hooks(tiny_dir, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(workbench_module, "supports_graph_decoding", lambda loaded: True)
    monkeypatch.setattr(workbench_module, "graph_error", broken)
    console = Console(file=io.StringIO(), width=200)
    settings = short_settings(tiny_dir, direction_prompts=8, max_new_tokens=3)
    scorer = prepare_scoring(resolve(settings, console), tmp_path)
    assert (
        "Decoding eagerly: capturing the decode step failed (RuntimeError: operation not permitted when stream is capturing)"
        in console.file.getvalue()
    )
    assert scorer.paths.graph is None and not scorer.hooks._static
    # only the per-trial hooks are registered: the fixed-buffer ones were removed
    present = list(scorer.spec.loaded.discovery.present())
    assert sum(len(site.module._forward_hooks) for site in present) == len(present)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_a_trial_given_up_leaves_fixed_buffer_decoding_as_it_leaves_eager_decoding(tiny_varied_dir, device):
    """Rows decided by domination (`give_up`) end the replayed loop where they end the eager one: the
    same lower-bound count, answers and tokens. On CUDA the decode step is a captured graph; on this
    CPU the same fixed buffers run eagerly."""
    loaded = load_model(str(tiny_varied_dir), device, "float32")
    texts = format_chat(loaded.tokenizer, PROMPTS * 3)
    markers = ["q", "z", "x"]
    full = generate_and_classify(loaded, texts, 8, MarkerJudge(markers, echo_aware=False), batch_size=5)
    assert 2 <= full.count < len(texts)  # the markers decide some answers, not all
    first = frozenset(i for i, refused in enumerate(full.refused) if refused)
    graph = GraphDecoder(loaded, 5, graph_length(loaded, texts, 8), capture=device == "cuda")
    for threshold in (1, full.count):
        results = [
            generate_and_classify(
                loaded, texts, 8, MarkerJudge(markers, echo_aware=False), batch_size=5, first=first,
                give_up=lambda found, threshold=threshold: found >= threshold, graph=fixed,
            )
            for fixed in (None, graph)
        ]  # fmt: skip
        eager, replayed = results
        assert not replayed.complete and not eager.complete
        assert (replayed.refused, replayed.responses) == (eager.refused, eager.responses)
        assert replayed.tokens_generated == eager.tokens_generated < full.tokens_generated
        assert threshold <= replayed.count <= full.count
