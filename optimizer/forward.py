"""Two facts about a decoder's forward pass that the scoring paths (padded, packed, graph) share.

They live apart from `scoring` so that the fast paths (`graph_decode`, `packing`) and the plain
path import them from below instead of from each other.
"""

from __future__ import annotations

import inspect

import torch


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on (B, hidden) states, with the final soft-capping some families (Gemma 2) apply."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def cache_keyword(module) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.24; accept both."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
