"""Capture every block's residual-stream output at the position that predicts the first answer token."""

from __future__ import annotations

from collections.abc import Callable

import torch

from optimizer.errors import UserError
from optimizer.model import LoadedModel


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
) -> torch.Tensor:
    """Residuals of shape (n_layers, n_prompts, hidden), float32, on the model's (input) device: the
    statistics are computed on one device wherever the blocks are."""
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[:, -1, :].float().to(loaded.device))

    handles = [layer.register_forward_hook(capture) for layer in loaded.layers]
    per_batch: list[torch.Tensor] = []
    try:
        for chunk in batches(texts, batch_size):
            captured.clear()
            loaded.model(**tokenize(loaded, chunk), logits_to_keep=1, use_cache=False)
            per_batch.append(torch.stack(captured))  # (layers, batch, hidden)
            if on_batch:
                on_batch(len(chunk))
    finally:
        for h in handles:
            h.remove()
    residuals = torch.cat(per_batch, dim=1)
    bad = (~torch.isfinite(residuals)).flatten(1).any(dim=1)
    if bad.any():
        layer = int(bad.nonzero()[0])
        raise UserError(
            f"residuals contain NaN or inf at layer {layer}: the checkpoint or {str(loaded.dtype).removeprefix('torch.')} "
            "overflows there; try --dtype float32, or check the model file"
        )
    return residuals
