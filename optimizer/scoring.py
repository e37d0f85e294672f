"""Scoring a (possibly ablated) model: first-token KL divergence and refusal rate by greedy generation."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from optimizer.model import LoadedModel
from optimizer.residuals import batches, tokenize


@torch.inference_mode()
def first_token_logprobs(loaded: LoadedModel, texts: list[str], batch_size: int) -> torch.Tensor:
    """Log-probabilities (n, vocab) of the first answer token; only the last position is computed."""
    parts = []
    for chunk in batches(texts, batch_size):
        logits = loaded.model(**tokenize(loaded, chunk), logits_to_keep=1, use_cache=False).logits
        parts.append(logits[:, -1, :].float().log_softmax(dim=-1))
    return torch.cat(parts)


def kl_divergence(baseline_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(original || edited), averaged over prompts (the form heretic reports); rounding can make
    the sum slightly negative for near-identical distributions, so it is clamped at 0."""
    kl = F.kl_div(logprobs, baseline_logprobs.to(logprobs.device), reduction="batchmean", log_target=True)
    return max(0.0, float(kl))


def normalise(text: str) -> str:
    return text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")


def is_refusal(response: str, markers: list[str]) -> bool:
    """A response is a refusal when it contains a marker; an empty answer counts as one too."""
    text = normalise(response)
    return not text.strip() or any(marker in text for marker in markers)


@dataclass
class RefusalResult:
    refused: list[bool]
    responses: list[str]  # each up to the point where it was decided
    tokens_generated: int

    @property
    def count(self) -> int:
        return sum(self.refused)


def _decided(text: str, markers: list[str]) -> bool:
    lowered = normalise(text)
    return any(marker in lowered for marker in markers)


@torch.inference_mode()
def generate_and_classify(
    loaded: LoadedModel,
    texts: list[str],
    max_new_tokens: int,
    markers: list[str],
    batch_size: int,
    stop_early: bool = True,
) -> RefusalResult:
    """Greedy generation that drops a sequence from the batch as soon as it is decided.

    A sequence is decided when its text so far contains a refusal marker, when it emits an end
    token, or at `max_new_tokens`. The outcome equals generating every sequence to the cap and
    then looking for markers, because a marker found in a prefix is also in the full text.
    """
    tokenizer, model = loaded.tokenizer, loaded.model
    markers = [normalise(m) for m in markers]
    eos_ids = set(_eos_ids(loaded))
    cache_keyword = _cache_keyword(model)
    responses: list[str] = []
    total_tokens = 0
    for chunk in batches(texts, batch_size):
        encoded = tokenize(loaded, chunk)
        mask = encoded["attention_mask"]
        cache = DynamicCache(config=model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions,
            use_cache=True, logits_to_keep=1, **{cache_keyword: cache},
        ).logits
        tokens: list[list[int]] = [[] for _ in chunk]
        active = list(range(len(chunk)))  # rows of `chunk` still in the batch, in batch order
        for step in range(max_new_tokens):
            next_ids = logits[:, -1, :].argmax(dim=-1)
            keep = []
            for row, token in zip(active, next_ids.tolist()):
                if token in eos_ids:
                    continue
                tokens[row].append(token)
                total_tokens += 1
                if stop_early and _decided(tokenizer.decode(tokens[row], skip_special_tokens=True), markers):
                    continue
                keep.append(row)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                index = torch.as_tensor([active.index(row) for row in keep], device=mask.device)
                cache.batch_select_indices(index)
                mask, next_ids = mask[index], next_ids[index]
            active = keep
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = model(
                input_ids=next_ids.unsqueeze(-1), attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                use_cache=True, **{cache_keyword: cache},
            ).logits
        responses.extend(tokenizer.decode(t, skip_special_tokens=True) for t in tokens)
    return RefusalResult([is_refusal(r, markers) for r in responses], responses, total_tokens)


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids = {loaded.tokenizer.eos_token_id}
    generation_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    return [i for i in ids if i is not None]


def _cache_keyword(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.24; accept both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
