"""Prefill without padding: a batch's prompts laid end to end in one row behind their shared prefix.

Chat prompts of one batch differ in length by a third or more, so a padded batch spends about a
quarter of its prefill on padding; where the prefill is bound by arithmetic (CPUs), that is a
quarter of its time. Here every prompt's tokens see the shared prefix and their own earlier tokens
only (a block mask), positions continue after the prefix for each prompt, and the K/V of each
prompt are then laid out per row as the padded path does ([prefix][padding][prompt]), so that
decoding goes on exactly as after a padded prefill.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from optimizer.forward import add_readout, block_outputs
from optimizer.model import LoadedModel

ATTENTION = ("sdpa", "eager")  # the implementations that take a 4-D mask as it is given
TOKENS_PER_FORWARD = 1024  # prompt tokens per packed row: the (tokens x tokens) mask stays small


def attention_implementation(loaded: LoadedModel) -> str:
    return getattr(loaded.model.config, "_attn_implementation", None) or "sdpa"


def full_attention_only(loaded: LoadedModel) -> bool:
    """Every layer attends to every earlier position through sdpa or eager attention: no sliding
    windows, linear attention or convolution states (which would carry one prompt into the next
    in a packed row, and which a fixed K/V buffer cannot hold)."""
    config = loaded.model.config.get_text_config()
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return types == {"full_attention"} and attention_implementation(loaded) in ATTENTION and not sliding


def mask_values(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """What a prepared 4-D mask holds where attention is allowed and where it is blocked: booleans
    for sdpa, 0 and the dtype's minimum (added to the scores) for eager attention."""
    if attention_implementation(loaded) == "eager":
        allowed, blocked = (
            torch.tensor(v, dtype=loaded.dtype, device=loaded.device) for v in (0.0, torch.finfo(loaded.dtype).min)
        )
        return allowed, blocked
    return torch.tensor(True, device=loaded.device), torch.tensor(False, device=loaded.device)


def layer_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers DynamicCache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading ids every row shares (system prompt and template, typically more than half of
    a chat prompt), leaving each row at least one of its own."""
    shortest = min(len(row) for row in rows)
    length = 0
    while length < shortest - 1 and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


def groups(lengths: list[int], budget: int) -> list[range]:
    """Consecutive rows whose prompt tokens fit in `budget` (a longer prompt gets a group alone)."""
    out, start, used = [], 0, 0
    for row, length in enumerate(lengths):
        if row > start and used + length > budget:
            out.append(range(start, row))
            start, used = row, 0
        used += length
    out.append(range(start, len(lengths)))
    return out


def block_mask(prefix_len: int, lengths: list[int], loaded: LoadedModel) -> torch.Tensor:
    """(1, 1, T, T) mask of [prefix][prompt 1][prompt 2]...: causal within the prefix and within
    each prompt, every prompt seeing the whole prefix; bool for sdpa, additive for eager."""
    owner = torch.cat([torch.full((prefix_len,), -1)] + [torch.full((n,), i) for i, n in enumerate(lengths)])
    total = len(owner)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    allowed = causal & ((owner.unsqueeze(0) == -1) | (owner.unsqueeze(0) == owner.unsqueeze(1)))
    return torch.where(allowed.to(loaded.device)[None, None], *mask_values(loaded))


def packed_forward(
    loaded: LoadedModel,
    prefix: list[int],
    suffixes: list[list[int]],
    cache_keyword: str,
    residuals: list[torch.Tensor] | None = None,
):
    """Forward `prefix` + `suffixes` packed (in groups of TOKENS_PER_FORWARD prompt tokens).

    Returns each suffix's last hidden state (B, hidden), a DynamicCache of B rows laid out
    [prefix][padding][suffix] and its (B, T) attention mask, as the padded prefill gives them.
    `residuals`: a list that gets every block's output at each suffix's last position, then the
    decoder's output there, one (layers + 1, rows, hidden) tensor per group (`forward.block_outputs`,
    `forward.add_readout`).
    """
    decoder, device = loaded.model.get_decoder(), loaded.device
    p, lengths = len(prefix), [len(s) for s in suffixes]
    width = max(lengths)
    last_hidden: list[torch.Tensor] = []
    keys: dict[int, list[torch.Tensor]] = {}  # per layer, each group's rows
    values: dict[int, list[torch.Tensor]] = {}
    for group in groups(lengths, TOKENS_PER_FORWARD):
        group_lengths = [lengths[i] for i in group]
        ids = prefix + [token for i in group for token in suffixes[i]]
        positions = list(range(p)) + [p + j for n in group_lengths for j in range(n)]
        cache = DynamicCache(config=loaded.model.config)
        ends = torch.tensor(group_lengths).cumsum(0) + p
        last = ends - 1  # each suffix's last position in the packed row

        def at_last(hidden: torch.Tensor, last: torch.Tensor = last) -> torch.Tensor:
            return hidden[0, last.to(hidden.device)]

        with block_outputs(loaded.layers, at_last, residuals, device):
            hidden = decoder(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=block_mask(p, group_lengths, loaded),
                position_ids=torch.tensor([positions], device=device),
                use_cache=True,
                **{cache_keyword: cache},
            ).last_hidden_state[0]
        last_hidden.append(hidden[last])
        add_readout(residuals, hidden[last], device)
        # where each row's slots come from in the packed row: prefix, padding (any position: masked), suffix
        source = torch.zeros(len(group), p + width, dtype=torch.long)
        source[:, :p] = torch.arange(p)
        for row, (n, end) in enumerate(zip(group_lengths, ends.tolist())):
            source[row, p + width - n :] = torch.arange(end - n, end)
        source = source.to(device)
        for index, (layer_keys, layer_values) in enumerate(layer_tensors(cache)):
            # (1, heads, T, dim) -> (rows, heads, prefix + width, dim), on the layer's device
            at = source.to(layer_keys.device)
            keys.setdefault(index, []).append(layer_keys[0][:, at].transpose(0, 1))
            values.setdefault(index, []).append(layer_values[0][:, at].transpose(0, 1))
    cache = DynamicCache(config=loaded.model.config)
    for index, layer_keys_by_row in keys.items():
        cache.update(torch.cat(layer_keys_by_row), torch.cat(values[index]), index)
    mask = torch.tensor([[1] * p + [0] * (width - n) + [1] * n for n in lengths], device=device)
    return torch.cat(last_hidden), cache, mask
