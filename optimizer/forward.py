"""What the scoring paths (padded, packed, graph) share about a decoder's forward pass: the LM head
on the last states, the cache's keyword, and each block's output at chosen positions (the residuals),
followed by the decoder's own output there (after its final norm: what the LM head reads).

They live apart from `scoring` so that the fast paths (`graph_decode`, `packing`) and the plain
path import them from below instead of from each other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on (B, hidden) states, with the final soft-capping some families (Gemma 2) apply."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def cache_keyword(module) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.24; accept both."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@contextmanager
def block_outputs(
    layers: Sequence[torch.nn.Module],
    select: Callable[[torch.Tensor], torch.Tensor],
    into: list[torch.Tensor] | None,
    device: torch.device,
) -> Iterator[None]:
    """While on, every block's output goes through `select` (to (rows, hidden): the positions
    wanted) and, once the forward is done, into `into` as one (layers, rows, hidden) float32 tensor
    on `device`. With `into` None, nothing is hooked. Selecting in the hook keeps only those rows:
    a whole batch's outputs of every block would not fit for large models."""
    if into is None:
        yield
        return
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        outputs.append(select(hidden).float().to(device))

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    into.append(torch.stack(outputs))


def add_readout(into: list[torch.Tensor] | None, rows: torch.Tensor, device: torch.device) -> None:
    """Append the decoder's output at the rows `block_outputs` selected, (rows, hidden), to the
    (layers, rows, hidden) tensor it last put in `into`, as one more layer: the last block's output
    after the decoder's final norm, what the LM head reads (transformers' last hidden state; the
    statistics may take the last layer's direction from it, `residuals.layer_residuals`)."""
    if into is not None:
        into[-1] = torch.cat([into[-1], rows.float().to(device).unsqueeze(0)])
