"""Where answers start: the decision rule, detection on tiny models that really generate, and one
prefix per study (stored by the first run, reused by resumed runs, export/eval/chat)."""

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from optimizer.cli import main
from optimizer.config import DEFAULT_REFUSAL_MARKERS, build_settings
from optimizer.judges import MarkerJudge
from optimizer.model import load_model
from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.response_prefix import (
    GPT_OSS_ANALYSIS,
    GPT_OSS_FINAL,
    answer_part,
    close_open_block,
    common_token_prefix,
    decide,
    detect,
    template_tail,
)
from optimizer.scoring import greedy_generate
from optimizer.stored import open_study
from optimizer.trials import load_edited_model
from optimizer.workbench import FastPaths, RunSpec, refusals_of, resolve
from tests.conftest import build_tiny_model
from tests.test_study import load, run_args

MARKERS = list(DEFAULT_REFUSAL_MARKERS)


# -- the decision rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "common, append",
    [
        ("<think>", "<think></think>"),
        ("<think>\nOkay, the user asks", "<think></think>"),
        ("<thought>\n", "<thought></thought>"),
        ("[THINK]Hmm", "[THINK][/THINK]"),
        (GPT_OSS_ANALYSIS + "We need to answer", GPT_OSS_ANALYSIS + GPT_OSS_FINAL),
        ("\n<think>\n", "\n<think></think>"),  # whitespace the model writes before the tag is kept
    ],
)
def test_an_opened_reasoning_block_is_closed(common, append):
    choice = decide(common, diverged=False, markers=MARKERS)  # a block needs no divergence: it opens at the first token
    assert choice.append == append and choice.closes_block
    assert choice.why.startswith("Responses start with ") and repr(append) in choice.why


def test_shared_opening_words_are_appended_only_when_they_show_where_answers_start():
    assert decide("Sure", diverged=True, markers=MARKERS).append == "Sure"
    assert decide("**Answer:**\n\n", diverged=True).append == "**Answer:**\n\n"  # exactly as generated, whitespace included
    # identical responses (a model repeating itself) do not show where answers start
    assert decide("\n\n\n\n", diverged=False).append == ""
    assert decide("", diverged=True).why == "No common response prefix"
    # forcing a refusal onto every edited model would make refusals impossible to remove
    refusal = decide("I cannot", diverged=True, markers=MARKERS)
    assert refusal.append == "" and "'i cannot'" in refusal.why
    # a block the model closes itself is kept as the model writes it
    assert decide("<think>\n\n</think>\n\n", diverged=True, markers=MARKERS).append == "<think>\n\n</think>\n\n"
    # after a block was closed once, a second opening is not appended
    assert decide("<think>x", diverged=True, close_blocks=False).append == ""
    assert not decide("Sure", diverged=True).closes_block


def test_a_generation_prompt_that_opens_a_block_gets_its_closing_tag():
    r1 = close_open_block("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert r1 is not None and r1.append == "</think>" and r1.closes_block
    assert close_open_block("<｜Assistant｜><think>\n").append == "</think>"  # DeepSeek-R1
    assert close_open_block("<|im_start|>assistant\n<think>\n\n</think>\n\n") is None  # already closed (enable_thinking=False)
    assert close_open_block("<|im_start|>assistant\n") is None
    assert close_open_block("<|start|>assistant" + GPT_OSS_ANALYSIS).append == GPT_OSS_FINAL
    # only the template's own text counts: a prompt that mentions <think> does not open a block
    text = "<|im_start|>user\nWhat does <think> do?<|im_end|>\n<|im_start|>assistant\n"
    assert template_tail(text, "What does <think> do?") == "<|im_end|>\n<|im_start|>assistant\n"


def test_answer_part_leaves_out_the_reasoning_block():
    assert answer_part("<think></think>") == ""
    assert answer_part("</think>\n\nSure") == "Sure"
    assert answer_part(GPT_OSS_ANALYSIS + GPT_OSS_FINAL) == ""
    assert answer_part("I") == "I"


def test_common_token_prefix_and_divergence():
    assert common_token_prefix([[1, 2, 3], [1, 2, 4]]) == ([1, 2], True)
    assert common_token_prefix([[1, 2], [1, 2, 5]]) == ([1, 2], True)  # one ended (end token) where another went on
    assert common_token_prefix([[7, 7, 7], [7, 7, 7]]) == ([7, 7, 7], False)
    assert common_token_prefix([[], [3]]) == ([], True)
    assert common_token_prefix([]) == ([], False)


# -- detection on tiny models that really generate -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_think_emitter_dir(tmp_path_factory, qwen_dir) -> Path:
    """A tiny model that opens every answer with "<think>": a token of its vocabulary (as in Qwen3)
    whose embedding is twice that of "\\n". The random model's tied LM head mostly repeats the last
    input token, so after "<|im_start|>assistant\\n" it prefers "<think>" (and then keeps to it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path_factory.mktemp("think-emitter")
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(base / "tokenizer")
    folder = build_tiny_model(base / "model", base / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(folder)
    think, newline = tokenizer.convert_tokens_to_ids(["<think>", "\u010a"])
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[think] = 2 * embeddings[newline]
    model.save_pretrained(folder)
    return folder


def sample(loaded, n: int = 4) -> tuple[list[str], list[str]]:
    prompts = (
        split_prompts(load_prompts(None, "harmful")).direction[:n] + split_prompts(load_prompts(None, "harmless")).direction[:n]
    )
    return prompts, format_chat(loaded.tokenizer, prompts)


def test_detects_a_model_that_opens_every_answer_with_think(tiny_think_emitter_dir):
    loaded = load_model(str(tiny_think_emitter_dir), "cpu", "float32")
    prompts, texts = sample(loaded)
    think = loaded.tokenizer.convert_tokens_to_ids("<think>")
    generated, _ = greedy_generate(loaded, texts, 4, 8)
    assert all(ids[0] == think for ids in generated), "the fixture's premise: every answer opens with <think>"
    found = detect(loaded, prompts, texts, MARKERS, 8)
    assert found.append == "<think></think>"
    assert found.lines == ["Responses start with '<think>': appending '<think></think>' to every prompt"]


def test_identical_responses_are_no_prefix(tiny_dir):
    # the random model answers every prompt with the same newlines: a plain common prefix would append them
    loaded = load_model(str(tiny_dir), "cpu", "float32")
    prompts, texts = sample(loaded)
    generated, _ = greedy_generate(loaded, texts, 8, 8)
    assert len({tuple(ids) for ids in generated}) == 1 and len(generated[0]) == 8
    found = detect(loaded, prompts, texts, MARKERS, 8)
    assert found.append == "" and found.lines[0].startswith("No common response prefix (the sampled responses are all")


# -- settings, CLI and one prefix per study -------------------------------------------------------


def open_bench(model: Path, **values) -> tuple[RunSpec, str]:
    console = Console(file=io.StringIO(), width=200)
    settings = build_settings({"model": str(model), "direction_prompts": 8, "scoring_prompts": 4, "max_new_tokens": 4, **values})
    spec = resolve(settings, console)
    return spec, console.file.getvalue()


def all_texts(spec: RunSpec) -> list[str]:
    t = spec.texts
    return [*t.direction_harmful, *t.direction_harmless, *t.harmful, *t.harmless]


def no_detection(*args, **kwargs):
    raise AssertionError("the response prefix was detected again")


def test_run_on_a_thinking_template_stores_the_prefix_and_every_later_process_reuses_it(
    tiny_thinking_dir,
    tmp_path,
    capsys,
    monkeypatch,
):
    studies = tmp_path / "studies"
    assert main(run_args(tiny_thinking_dir, studies, "--trials", "2")) == 0
    first = capsys.readouterr().err
    assert "The chat template opens '<think>' before the answer: appending '</think>' to every prompt" in first
    study = load(studies)
    assert study.user_attrs["run_settings"]["response_prefix"] == "</think>"
    assert study.trials[1].state.name == "COMPLETE"

    # resumed runs, export, eval and chat use the stored prefix; detecting again is an error here
    monkeypatch.setattr("optimizer.workbench.detect", no_detection)
    assert main(run_args(tiny_thinking_dir, studies, "--trials", "3")) == 0
    second = capsys.readouterr().err
    assert "Appending the response prefix '</think>' to every prompt" in second and "chat template opens" not in second
    assert "Reusing cached direction statistics" in second and len(load(studies).trials) == 3

    stored = open_study("t", None, str(studies))
    number = next(t.number for t in stored.study.trials if not t.user_attrs.get("baseline"))
    edited = load_edited_model(stored, number, Console(file=io.StringIO()))
    assert edited.prepared.settings.response_prefix == "</think>"
    assert all(t.endswith("<|im_start|>assistant\n<think>\n</think>") for t in all_texts(edited.prepared.spec))

    # chat starts its answers after the same prefix
    from optimizer.chat import chat

    seen = []
    generate = edited.prepared.loaded.model.generate
    monkeypatch.setattr(edited.prepared.loaded.model, "generate", lambda **kw: seen.append(kw["input_ids"]) or generate(**kw))
    chat(edited, max_new_tokens=3, stdin=io.StringIO("Hello there\n/quit\n"), stdout=io.StringIO())
    assert edited.prepared.loaded.tokenizer.decode(seen[0][0]).endswith(
        "Hello there<|im_end|>\n<|im_start|>assistant\n<think>\n</think>"
    )

    # eval --refusals too
    from optimizer import evaluate

    texts = []
    logprobs = evaluate.first_token_logprobs
    monkeypatch.setattr(evaluate, "first_token_logprobs", lambda loaded, t, *rest: texts.extend(t) or logprobs(loaded, t, *rest))
    assert (
        main(["eval", "--study", "t", "--studies-dir", str(studies), "--trial", str(number), "--refusals", "--limit", "2"]) == 0
    )
    assert texts and all(t.endswith("<think>\n</think>") for t in texts)

    # a different prefix is another study: refused, naming the setting
    assert main(run_args(tiny_thinking_dir, studies, "--trials", "4", "--response-prefix", "")) == 2
    assert "response_prefix differ" in capsys.readouterr().err


def test_no_thinking_reaches_the_chat_template(tiny_thinking_dir, tmp_path, capsys):
    bench, _ = open_bench(tiny_thinking_dir, no_thinking=True)
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert all(t.endswith(closed) for t in all_texts(bench))
    assert bench.settings.response_prefix == ""  # the template closed the block; the answers share no start
    same, _ = open_bench(tiny_thinking_dir, chat_template_kwargs='{"enable_thinking": false}')
    assert all_texts(same) == all_texts(bench)

    studies = tmp_path / "studies"
    assert main(run_args(tiny_thinking_dir, studies, "--trials", "1", "--no-thinking")) == 0
    assert "No common response prefix" in capsys.readouterr().err
    run_settings = load(studies).user_attrs["run_settings"]
    assert run_settings["no_thinking"] is True and run_settings["response_prefix"] == ""


def test_explicit_response_prefix(tiny_thinking_dir, tiny_dir, monkeypatch):
    monkeypatch.setattr("optimizer.workbench.detect", no_detection)
    bench, _ = open_bench(tiny_thinking_dir, response_prefix="")  # '' turns it off: the block stays open
    assert all(t.endswith("assistant\n<think>\n") for t in all_texts(bench))

    bench, log = open_bench(tiny_dir, response_prefix="Sure")
    assert "Appending the response prefix 'Sure' to every prompt" in log
    assert all(t.endswith("assistant\nSure") for t in all_texts(bench))
    # refusal markers are looked for in the whole answer, the appended start included
    assert all(
        r.startswith("Sure") for r in refusals_of(bench, MarkerJudge(["sure"]), bench.default_batch_size, FastPaths()).responses
    )


def test_bad_chat_template_kwargs(tiny_dir, tmp_path, capsys):
    studies = tmp_path / "s"
    for value, fragment in (("{bad", "is not valid JSON"), ('["a"]', "must be a JSON object")):
        assert main(run_args(tiny_dir, studies, "--chat-template-kwargs", value)) == 2
        err = capsys.readouterr().err
        assert "error: --chat-template-kwargs" in err and fragment in err and '{"enable_thinking": false}' in err
    assert not studies.exists()


def test_template_kwargs_from_toml(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('chat-template-kwargs = { reasoning_effort = "low" }\nno-thinking = true\nresponse-prefix = ""\n')
    settings = build_settings({}, str(config))
    assert settings.template_kwargs() == {"reasoning_effort": "low", "enable_thinking": False}
    assert settings.response_prefix == ""
