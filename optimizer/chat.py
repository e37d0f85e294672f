"""`python -m optimizer chat`: talk to a trial's edited model, tokens streamed as they come."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO, cast

import torch
from transformers import TextStreamer

from optimizer.prompts import render_chat
from optimizer.response_prefix import answer_part
from optimizer.trials import EditedModel

if TYPE_CHECKING:
    from transformers import GenerationMixin

HELP = "Type a message; /reset clears the conversation, /quit exits."


@torch.inference_mode()
def chat(edited: EditedModel, max_new_tokens: int = 512, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """A read-reply loop over `stdin` (a terminal or a pipe) with the trial's hooks applied."""
    loaded = edited.prepared.loaded
    settings = edited.prepared.settings
    # answers start after the study's response prefix (a closed reasoning block, say), as in its trials
    prefix = settings.response_prefix or ""
    answer = answer_part(prefix)
    edited.prepared.hooks.apply(edited.plan)
    interactive = stdin.isatty()
    history: list[dict] = []
    print(
        f"Chatting with trial {edited.trial.number} ({edited.trial.user_attrs.get('refusals')} refusals, "
        f"KL {edited.trial.values[1]:.3f}). {HELP}",
        file=stdout,
        flush=True,
    )
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            history.clear()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []) + history
        rendered = render_chat(loaded.tokenizer, messages, settings.template_kwargs()) + prefix
        encoded = loaded.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")
        inputs = {k: encoded[k].to(loaded.device) for k in ("input_ids", "attention_mask")}
        print("model> " + answer, end="", file=stdout, flush=True)
        streamer = _Streamer(loaded.tokenizer, stdout)
        output = cast("GenerationMixin", loaded.model).generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        reply = answer + str(loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        history.append({"role": "assistant", "content": reply})
    edited.prepared.hooks.clear()


class _Streamer(TextStreamer):
    """TextStreamer that writes to a chosen stream instead of print()'s default."""

    def __init__(self, tokenizer, stream: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, end="\n" if stream_end else "", file=self.stream, flush=True)
