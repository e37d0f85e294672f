"""Capture every block's residual-stream output at the position that predicts the first answer token.

The capture also keeps the decoder's output there: the last block's output after the model's final
norm, what the LM head reads, which is what transformers' `output_hidden_states` gives for the last
layer and so what heretic's last direction is made from. With --normed-last-direction the statistics
take the last layer's direction from it (`layer_residuals`). Measured (benchmarks/position_sweep.py,
benchmarks/quality.py; RESULTS.md): on the second benchmark model it is another direction (cosine
0.90 with the raw one; the norm's weight makes the difference, its RMS scaling does not) and, at a
fixed late kernel, a better trade-off (19/64 held-out refusals at KL 0.149 where the raw directions
need 0.191; 2/64 at 0.346 against about 8); on the default model the same within a prompt. Whole
studies did not gain from it (held-out hypervolume within the seed spread on both sides), so it is
off by default; applying the norm at every layer does not help.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from optimizer.errors import UserError
from optimizer.model import LoadedModel
from optimizer.scoring import greedy_generate


def tokenize(loaded: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded batch on the model's (input) device; the chat template already holds special tokens."""
    encoded = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    max_length = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if max_length and encoded["input_ids"].shape[1] > max_length:
        raise UserError(
            f"a prompt is {encoded['input_ids'].shape[1]} tokens long, over the model's context of {max_length}; shorten it"
        )
    return {k: v.to(loaded.device) for k, v in encoded.items()}


@torch.inference_mode()
def collect_residuals(
    loaded: LoadedModel,
    texts: list[str],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """Residuals of shape (n_layers + 1, n_prompts, hidden), float32, on the model's (input) device:
    every block's output, then the decoder's (`forward.add_readout`); `layer_residuals` makes the
    (n_layers, ...) the statistics use. The statistics are computed on one device wherever the blocks are.

    The prompts are prefilled as the scoring paths prefill them (`scoring.greedy_generate` with no
    new token, its `residuals` taken in `prefill`): their shared prefix (system prompt and template)
    once, prompts of similar length together, and with `packed` (a fast path checked at the start of
    a study) without padding. Each prompt's last position sees exactly its own tokens either way, so
    the residuals are those of the prompt alone.
    """
    captured: list[torch.Tensor] = []
    greedy_generate(loaded, texts, 0, batch_size, packed=packed, residuals=captured, on_batch=on_batch)
    return captured[0]


def layer_residuals(captured: torch.Tensor, normed_last: bool) -> torch.Tensor:
    """(n_layers + 1, n, hidden) as captured -> the (n_layers, n, hidden) the statistics use: every
    block's output, with `normed_last` (--normed-last-direction) the last block's taken after the
    decoder's final norm instead (see the module docstring)."""
    if normed_last:
        return torch.cat([captured[:-2], captured[-1:]])
    return captured[:-1]


def check_finite(loaded: LoadedModel, residuals: torch.Tensor) -> None:
    """Statistics from residuals with NaN or inf would be NaN: say where, and what to try."""
    bad = (~torch.isfinite(residuals)).flatten(1).any(dim=1)
    if bad.any():
        layer = int(bad.nonzero()[0])
        raise UserError(
            f"residuals contain NaN or inf at layer {layer}: the checkpoint or {str(loaded.dtype).removeprefix('torch.')} "
            "overflows there; try --dtype float32, or check the model file"
        )
