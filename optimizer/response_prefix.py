"""Where answers start: the text every response begins with, found once per study on the unedited model.

A chat UI shows a thinking model's answer after its reasoning block. So that residuals, KL and
refusal detection look at the same place, a closed (empty) reasoning block, or the opening words
that every response shares, is appended to every chat-formatted prompt. The choice is made by the
first run of a study and stored with it: every later process (resumed runs, other workers, export,
eval, chat) appends the same text instead of detecting again, which could differ across devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optimizer.judges import normalise
from optimizer.model import LoadedModel
from optimizer.scoring import greedy_generate

GPT_OSS_ANALYSIS = "<|channel|>analysis<|message|>"
GPT_OSS_FINAL = "<|end|><|start|>assistant<|channel|>final<|message|>"

# (opening, closing) of the reasoning blocks we know; opening + closing is the empty, closed block.
# heretic 1.4's list: the same pairs, matched at the start of the responses' common prefix.
REASONING_BLOCKS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),  # most thinking models (Qwen3, DeepSeek-R1, ...)
    (GPT_OSS_ANALYSIS, GPT_OSS_FINAL),  # gpt-oss: skip the analysis channel, answer in the final one
    ("<thought>", "</thought>"),
    ("[THINK]", "[/THINK]"),  # Mistral's Magistral
)
DETECTION_PROMPTS = 8  # per prompt set (harmful and harmless)
DETECTION_TOKENS = 16  # a reasoning block opens at the first token; shared opening words are short


@dataclass(frozen=True)
class PrefixChoice:
    """What to append to every chat-formatted prompt, and one line for the log saying why."""

    append: str
    why: str
    closes_block: bool = False  # a reasoning block was closed: the answer after it may share its start too


def template_tail(text: str, prompt: str) -> str:
    """What the chat template puts after the user's `prompt` in its formatted `text` (end of turn,
    generation prompt); looking only there keeps a prompt that mentions "<think>" from counting."""
    at = text.rfind(prompt)
    return text[at + len(prompt) :] if at >= 0 else text


def unclosed_block(text: str) -> tuple[str, str] | None:
    """The reasoning block that `text` opens last and leaves open, as (opening, closing)."""
    found: tuple[int, str, str] | None = None
    for opening, closing in REASONING_BLOCKS:
        at = text.rfind(opening)
        if at >= 0 and closing not in text[at + len(opening) :] and (found is None or at > found[0]):
            found = (at, opening, closing)
    return found[1:] if found else None


def close_open_block(tail: str) -> PrefixChoice | None:
    """A generation prompt that opens a reasoning block itself (DeepSeek-R1-style templates end
    with "<think>\\n"): close it, so that answers start after the closed block."""
    block = unclosed_block(tail)
    if block is None:
        return None
    opening, closing = block
    return PrefixChoice(
        closing, f"The chat template opens {opening!r} before the answer: appending {closing!r} to every prompt", True
    )


def answer_part(prefix: str) -> str:
    """The part of an appended prefix that belongs to the answer: what follows its last closed
    reasoning block (which a chat UI does not show as answer text), without leading whitespace."""
    end = 0
    for _, closing in REASONING_BLOCKS:
        at = prefix.rfind(closing)
        if at >= 0:
            end = max(end, at + len(closing))
    return prefix[end:].lstrip()


def decide(common: str, diverged: bool = True, markers: Sequence[str] = (), close_blocks: bool = True) -> PrefixChoice:
    """What to append, given the text that every sampled response starts with (the pure rule).

    - An opening reasoning tag (after optional whitespace) that the prefix does not close: append
      the empty, closed block (`<think>` -> `<think></think>`), as heretic does.
    - Otherwise the shared text itself, whitespace included, as the model writes it: `common` is
      decoded from whole shared tokens, so the space that starts different next words (" Sure",
      " Certainly") is not taken, which heretic's text-level prefix has to strip. Only when the
      responses went on to differ (`diverged`): identical responses do not show where answers
      start. And only when it holds no refusal marker: forcing "I cannot" on every edited model
      would make refusals impossible to remove.
    """
    stripped = common.lstrip()
    if close_blocks:
        for opening, closing in REASONING_BLOCKS:
            if stripped.startswith(opening) and closing not in stripped:
                append = common[: len(common) - len(stripped)] + opening + closing
                return PrefixChoice(append, f"Responses start with {opening!r}: appending {append!r} to every prompt", True)
    if not common:
        return PrefixChoice("", "No common response prefix")
    if not diverged:
        return PrefixChoice(
            "", f"No common response prefix (the sampled responses are all {common!r}, so where answers start is unknown)"
        )
    if unclosed_block(common):
        return PrefixChoice("", f"No common response prefix appended: {common!r} opens a reasoning block again")
    answer = normalise(answer_part(common))
    marker = next((m for m in markers if normalise(m) in answer), None)
    if marker is not None:
        return PrefixChoice("", f"No common response prefix appended: {common!r} holds the refusal marker {marker!r}")
    return PrefixChoice(common, f"Responses start with {common!r}: appending {common!r} to every prompt")


def common_token_prefix(sequences: list[list[int]]) -> tuple[list[int], bool]:
    """The longest token prefix that all sequences share, and whether they differ after it (by a
    token, or by one ending there while another goes on)."""
    if not sequences:
        return [], False
    n = 0
    while all(len(s) > n for s in sequences) and len({s[n] for s in sequences}) == 1:
        n += 1
    return sequences[0][:n], any(len(s) > n for s in sequences)


def decode_prefix(tokenizer, ids: list[int]) -> str:
    """Decode with special tokens kept (gpt-oss' channel markers are special), dropping trailing
    tokens that end inside a multi-byte character."""
    while ids and tokenizer.decode(ids, skip_special_tokens=False).endswith("\ufffd"):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


@dataclass(frozen=True)
class Detection:
    append: str  # text to append to every chat-formatted prompt ('' for none)
    lines: list[str]  # what was found, for the log


def detect(
    loaded: LoadedModel,
    prompts: list[str],
    texts: list[str],
    markers: Sequence[str],
    batch_size: int,
    max_new_tokens: int = DETECTION_TOKENS,
) -> Detection:
    """Find the response prefix by greedy generation with the model as it is (unedited).

    `prompts` are a few raw prompts and `texts` the same prompts chat-formatted. A reasoning block
    that the template leaves open is closed first; a block that the responses open is closed and
    the responses are generated again after it, since the answer may start with shared text too
    (whitespace, typically). Generation steps: two at most.
    """
    choices = [c for c in [close_open_block(template_tail(texts[0], prompts[0]))] if c is not None]
    while True:
        suffix = "".join(c.append for c in choices)
        ids, _ = greedy_generate(loaded, [t + suffix for t in texts], max_new_tokens, batch_size)
        common, diverged = common_token_prefix(ids)
        choice = decide(decode_prefix(loaded.tokenizer, common), diverged, markers, close_blocks=not choices)
        choices.append(choice)
        if not choice.closes_block:
            break
    append = "".join(c.append for c in choices)
    lines = [c.why if i == 0 else f"After it, {c.why[0].lower()}{c.why[1:]}" for i, c in enumerate(choices) if c.append or i == 0]
    if len(lines) > 1:
        lines.append(f"Response prefix: {append!r}")
    return Detection(append, lines)
