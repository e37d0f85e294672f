"""Scoring a (possibly ablated) model: first-token KL divergence and refusal rate by greedy generation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from optimizer.forward import add_readout, block_outputs, cache_keyword, output_logits
from optimizer.graph_decode import GraphDecoder
from optimizer.judges import REFUSED, Judge
from optimizer.model import LoadedModel
from optimizer.packing import packed_forward, shared_prefix_length


def split_shared_prefix(loaded: LoadedModel, texts: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prefix every text shares (`packing.shared_prefix_length`) and each text's
    remaining ids (at least one token each)."""
    ids = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    length = shared_prefix_length(ids)
    return ids[0][:length], [i[length:] for i in ids]


def prefill(
    loaded: LoadedModel,
    prefix: list[int],
    suffixes: list[list[int]],
    packed: bool = False,
    residuals: list[torch.Tensor] | None = None,
):
    """Forward the shared prefix once, then the batch's suffixes on top of its cache.

    Rows are laid out as [prefix][padding][suffix] so that every row's last position is its
    next-token position; the mask hides the padding and positions continue after the prefix.
    The decoder runs without its LM head, which is applied to the last position only (as one
    matrix product: a sliced 3-D input would take a much slower batched path on CPUs).
    With `packed`, the suffixes are forwarded end to end without padding instead
    (`optimizer.packing`), which gives the same three results.
    Returns the last position's logits (B, vocab), the cache and the attention mask.
    `residuals`: a list that gets every block's output at each row's last position, then the decoder's
    output there (`forward.add_readout`), in row order, as (layers + 1, rows, hidden) tensors to
    concatenate on dim 1 (one per forward: a packed batch makes several).
    """
    model, device = loaded.model, loaded.device
    decoder = model.get_decoder()
    keyword = cache_keyword(decoder)
    if packed:
        hidden, cache, mask = packed_forward(loaded, prefix, suffixes, keyword, residuals)
        return output_logits(model, hidden.contiguous()), cache, mask
    rows, width = len(suffixes), max(len(s) for s in suffixes)
    pad = loaded.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=device)
    suffix_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=device)
    cache = DynamicCache(config=model.config)
    if prefix:
        decoder(input_ids=torch.tensor([prefix], device=device), use_cache=True, **{keyword: cache})
        cache.batch_repeat_interleave(rows)
    mask = torch.cat([suffix_mask.new_ones(rows, len(prefix)), suffix_mask], dim=1)
    positions = len(prefix) + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    with block_outputs(loaded.layers, lambda h: h[:, -1], residuals, device):
        hidden = decoder(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{keyword: cache}
        ).last_hidden_state
    add_readout(residuals, hidden[:, -1], device)
    return output_logits(model, hidden[:, -1, :].contiguous()), cache, mask


def by_length(
    suffixes: list[list[int]], batch_size: int, first: frozenset[int] = frozenset()
) -> tuple[list[list[list[int]]], list[int]]:
    """Batches of similar lengths (less padding) and the order that restores the input's; the
    inputs numbered in `first` go into the first batches."""
    order = sorted(range(len(suffixes)), key=lambda i: (i not in first, len(suffixes[i])))
    chunks = [[suffixes[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]
    restore = sorted(range(len(order)), key=order.__getitem__)
    return chunks, restore


@torch.inference_mode()
def first_token_logprobs(loaded: LoadedModel, texts: list[str], batch_size: int, packed: bool = False) -> torch.Tensor:
    """Log-probabilities (n, vocab) of the first answer token; only the last position is computed,
    and the prompts' shared prefix once per batch."""
    prefix, suffixes = split_shared_prefix(loaded, texts)
    chunks, restore = by_length(suffixes, batch_size)
    logprobs = torch.cat([prefill(loaded, prefix, chunk, packed)[0].float().log_softmax(dim=-1) for chunk in chunks])
    return logprobs[restore]


def kl_divergence(baseline_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(original || edited), averaged over prompts (the form heretic reports); rounding can make
    the sum slightly negative for near-identical distributions, so it is clamped at 0."""
    kl = F.kl_div(logprobs, baseline_logprobs.to(logprobs.device), reduction="batchmean", log_target=True)
    return max(0.0, float(kl))


@dataclass
class RefusalResult:
    refused: list[bool]
    responses: list[str]  # each up to the point where it was decided
    tokens_generated: int
    # False when generation was given up once the count so far settled the question (`give_up`):
    # then `refused` holds the refusals found by then, a lower bound on the full count
    complete: bool = True

    @property
    def count(self) -> int:
        return sum(self.refused)


def eager_step(loaded: LoadedModel, next_ids: torch.Tensor, mask: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step on a transformers cache: feeds `next_ids` (B,), extends the (B, T) mask by
    their column; returns the next-token logits (B, vocab) and the extended mask."""
    decoder = loaded.model.get_decoder()
    mask = torch.cat([mask, mask.new_ones(len(next_ids), 1)], dim=1)
    hidden = decoder(
        input_ids=next_ids.unsqueeze(-1),
        attention_mask=mask,
        position_ids=mask.sum(-1, keepdim=True) - 1,
        use_cache=True,
        **{cache_keyword(decoder): cache},
    ).last_hidden_state
    return output_logits(loaded.model, hidden[:, -1, :]), mask


@torch.inference_mode()
def greedy_generate(
    loaded: LoadedModel,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop: Callable[[int, list[int]], bool] | None = None,
    graph: GraphDecoder | None = None,
    packed: bool = False,
    first: frozenset[int] = frozenset(),
    until: Callable[[], bool] | None = None,
    residuals: list[torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], int]:
    """Greedy continuations of `texts` as token ids (end tokens left out), in the input's order, and
    the number of tokens generated.

    A sequence is finished when it emits an end token, at `max_new_tokens`, or as soon as
    `stop(its index in texts, its ids so far)` is true. Eager decoding drops finished rows from the batch, so that they
    cost nothing in later steps; with `graph` (CUDA), every step is one graph replay over fixed rows
    and decoding ends when all rows are finished. `packed`: prefill without padding (`prefill`).
    The texts numbered in `first` are answered in the first batches. `until()` is asked after each
    step: when it is true, decoding ends there, every sequence left as far as it got (those of later
    batches empty). `residuals`: a list that gets every block's output at each text's last prompt
    position, then the decoder's output there (`forward.add_readout`), taken in the prefill, as one
    (layers + 1, texts, hidden) tensor in the input's order
    (what `residuals.collect_residuals` computes, without a second pass over the prompts).
    `on_batch(n)`: after each batch of n texts is answered (a progress bar).
    """
    eos_ids = set(_eos_ids(loaded))
    outputs: list[list[int]] = []
    total_tokens = 0
    prefix, suffixes = split_shared_prefix(loaded, texts)
    chunks, restore = by_length(suffixes, graph.batch if graph is not None else batch_size, first)
    order = sorted(range(len(restore)), key=restore.__getitem__)  # input index of each position in the chunks
    given_up = False
    per_batch: list[torch.Tensor] | None = None if residuals is None else []
    for chunk in chunks:
        offset = len(outputs)
        if given_up:
            outputs.extend([] for _ in chunk)
            continue
        logits, cache, mask = prefill(loaded, prefix, chunk, packed, per_batch)
        next_ids = logits.argmax(dim=-1)
        if graph is not None:
            graph.load(cache, mask, next_ids, max_new_tokens)
            del cache
        tokens: list[list[int]] = [[] for _ in chunk]
        active = list(range(len(chunk)))  # rows of `chunk` still undecided, in batch order
        for step in range(max_new_tokens):
            values = next_ids.tolist()
            by_row = values if graph is not None else dict(zip(active, values))
            keep = []
            for row in active:
                token = by_row[row]
                if token in eos_ids:
                    continue
                tokens[row].append(token)
                total_tokens += 1
                if stop is not None and stop(order[offset + row], tokens[row]):
                    continue
                keep.append(row)
            given_up = until is not None and until()
            if given_up or not keep or step == max_new_tokens - 1:
                break
            if graph is not None:
                active, next_ids = keep, graph.step()
                continue
            if len(keep) < len(active):
                # a CPU index selects rows on any device (a model split over GPUs keeps each block's cache on its own)
                where = "cpu" if loaded.split else mask.device
                index = torch.as_tensor([active.index(row) for row in keep], device=where)
                cache.batch_select_indices(index)
                mask, next_ids = mask[index], next_ids[index]
            active = keep
            logits, mask = eager_step(loaded, next_ids, mask, cache)
            next_ids = logits.argmax(dim=-1)
        outputs.extend(tokens)
        if on_batch is not None:
            on_batch(len(chunk))
    if residuals is not None and per_batch is not None:
        assert not given_up, "residuals are taken from every batch's prefill: none may be left unanswered"
        residuals.append(torch.cat(per_batch, dim=1)[:, torch.tensor(restore, device=per_batch[0].device)])
    return [outputs[i] for i in restore], total_tokens


def graph_length(loaded: LoadedModel, texts: list[str], max_new_tokens: int) -> int:
    """Positions a GraphDecoder needs for `texts` and their answers: shared prefix, longest rest, answer."""
    prefix, suffixes = split_shared_prefix(loaded, texts)
    return len(prefix) + max(len(s) for s in suffixes) + max_new_tokens


@torch.inference_mode()
def graph_error(loaded: LoadedModel, graph: GraphDecoder, texts: list[str]) -> float:
    """Relative difference between the logits of the graph's first decode step and the eager
    path's, on the first batch of `texts`: near rounding when the fixed cache, mask and positions
    reproduce what the model computes eagerly."""
    prefix, suffixes = split_shared_prefix(loaded, texts)
    chunk = by_length(suffixes, graph.batch)[0][0]
    logits, cache, mask = prefill(loaded, prefix, chunk)
    next_ids = logits.argmax(dim=-1)
    graph.load(cache, mask, next_ids, 1)
    graph.step()
    assert graph.logits is not None  # written by the step
    fast = graph.logits[: len(chunk)].float()
    slow = eager_step(loaded, next_ids, mask, cache)[0].float()
    return float((fast - slow).norm() / slow.norm())


@torch.inference_mode()
def packed_prefill_error(loaded: LoadedModel, texts: list[str], batch_size: int) -> float:
    """Relative difference of the packed prefill's next-token logits, and of one decode step on
    its cache, from the padded path's, on the first batch of `texts`: rounding only when the block
    mask, positions and the cache laid out per row reproduce the padded batch."""
    prefix, suffixes = split_shared_prefix(loaded, texts)
    chunk = by_length(suffixes, batch_size)[0][0]
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for packed in (False, True):
        logits, cache, mask = prefill(loaded, prefix, chunk, packed)
        next_ids = outputs[0][0].argmax(dim=-1) if outputs else logits.argmax(dim=-1)
        outputs.append((logits.float(), eager_step(loaded, next_ids, mask, cache)[0].float()))
    return max(float((fast - slow).norm() / slow.norm()) for fast, slow in zip(outputs[1], outputs[0]))


def generate_and_classify(
    loaded: LoadedModel,
    texts: list[str],
    max_new_tokens: int,
    judge: Judge,
    batch_size: int,
    prompts: list[str] | None = None,
    stop_early: bool = True,
    answer_prefix: str = "",
    graph: GraphDecoder | None = None,
    packed: bool = False,
    first: frozenset[int] = frozenset(),
    give_up: Callable[[int], bool] | None = None,
    residuals: list[torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RefusalResult:
    """Greedy answers to `texts` (chat-formatted `prompts`), judged by `judge` (optimizer.judges).

    With a judge that can tell a refusal from a prefix (markers), a sequence is dropped from the
    batch as soon as it is decided: when the judge finds it refused, when it emits an end token, or
    at `max_new_tokens`. The outcome equals generating every sequence to the cap and then judging,
    because a marker found in a prefix is also in the full text. Other judges read whole answers.
    `answer_prefix` is the start of the answer that the texts already end with (a shared opening
    such as "I"): it is part of every response, so markers such as "i can't" are found across it.

    `give_up(refusals found so far)` (streaming judges only) is asked after each decode step; when
    it is true, generation stops there and the result is marked incomplete: its refusals are those
    found by then, a lower bound on the full count, since a refusal once found stays one. `first`:
    texts to answer first (those likeliest to be refused, so that the count settles early).
    `residuals`, `on_batch`: see `greedy_generate`.
    """
    prompts = texts if prompts is None else prompts
    decode = lambda ids: answer_prefix + str(loaded.tokenizer.decode(ids, skip_special_tokens=True))
    streaming = judge.streaming and stop_early
    found = 0

    def stop(index: int, ids: list[int]) -> bool:
        nonlocal found
        decided = judge.refused_so_far(prompts[index], decode(ids))
        found += decided
        return decided

    gave_up = False

    def until() -> bool:
        nonlocal gave_up
        gave_up = give_up is not None and give_up(found)
        return gave_up

    assert streaming or give_up is None, "refusals are counted as they are found, which needs a streaming judge"
    tokens, total_tokens = greedy_generate(
        loaded, texts, max_new_tokens, batch_size, stop if streaming else None, graph, packed, first, until, residuals, on_batch
    )
    responses = [decode(t) for t in tokens]
    if gave_up:  # unfinished answers are not judged: an empty one was never given
        refused = [judge.refused_so_far(p, r) for p, r in zip(prompts, responses)]
        return RefusalResult(refused, responses, total_tokens, complete=False)
    return RefusalResult([v == REFUSED for v in judge.verdicts(prompts, responses)], responses, total_tokens)


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids = {loaded.tokenizer.eos_token_id}
    generation_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    return [i for i in ids if i is not None]
