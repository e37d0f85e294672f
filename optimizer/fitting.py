"""A refusal direction fitted to what the edit should do (`--direction-methods ...,fitted`).

Every other direction rule here is a statistic of the residuals (a mean difference, a
discriminant, a contrastive component): it says where the two prompt sets differ, not what
removing that difference does to the answers. Wollschlaeger et al. (2025, "The geometry of refusal
in large language models: concept cones and representational independence") fit the direction to
the outcome instead (refusal direction optimisation): with the edit in place, make the answers an
already abliterated model gives to harmful prompts likely, and keep the harmless prompts' next-token
distribution where it was.

Here one unit direction u = v / |v| is shared by every layer. With a fixed kernel of weights w_l
over all layers (`fit_kernel`: FIT_WEIGHT at mid-depth, falling linearly towards EDGE_RATIO of it a
whole depth away, so 0.65 of it at the first and last layer), every edited site's output y
becomes y - w_l u (u . y), the edit rule of `ablation.py` with one direction, and v is fitted by
Adam (model frozen) to

    loss = CE(target answers | harmful prompts, edited) + KL_WEIGHT * KL(unedited || edited)

- targets: the first TARGET_TOKENS tokens of the greedy answers, to the harmful direction prompts,
  of the model edited by the start direction (below) at TARGET_WEIGHT over the same kernel, those
  of them the study's judge does not find refusals (the answers the edit should lead to);
- KL: of the first answer token on the harmless direction prompts (the study's KL objective);
- start: the discriminant's directions (shrinkage START_SHRINKAGE, the harmless-mean part removed),
  the one of the kernel's peak layer.

It is trained on the direction prompts only, the split the statistics come from, once per study
(cached beside the statistics), and a trial of this method ablates it at every layer its kernels
edit, with the kernels' own weights: the direction is fitted over the whole depth that trials can
reach. Why one direction over every layer: fitted per layer, directions did well at the layers
they were fitted on and worse elsewhere, and a shared direction fitted over a late kernel was
behind used over a wider one (benchmarks/RESULTS.md, "Directions fitted to the edit's outcome by
gradient descent").

Cost: FIT_STEPS forward and backward passes over the first FIT_PROMPTS direction prompts per set,
the LM head only where the loss reads it. After 15 steps the direction scores on held-out prompts as
it does after 30, on 64 prompts per set; on 32 it spends more KL for the same refusals
(benchmarks/fit_cost.py). Measured on the project's 2-core CPU, one thread beside another study: 15
minutes for the 135M second model and 41 for the 0.5B default one, answers and fit (30 steps on
every prompt took 28 and 80); not yet measured on a GPU. A run at the default 128 direction
prompts per set pays a quarter of what 30 steps over all of them cost. A study pays it when its
first trial of the method asks for the direction (`workbench.FittedDirection`), after the
statistics' seeded starts, not before its first trial. On a CPU the passes are bound by
arithmetic, and padded batches of chat prompts spend much of it on padding and on every row's own
copy of the system prompt and template (24 of 42-60 tokens a row on both models); there the
rows are forwarded end to end behind one copy of their shared prefix (`choose_layout`, checked
against the padded loss first): the default model's whole fit alone on the 2-core CPU took 736 s
against 1192 s padded, the fitted direction the same to 2e-5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optimizer.ablation import AblationHooks, AblationPlan, project_output
from optimizer.components import COMPONENTS
from optimizer.directions import ContrastiveStats
from optimizer.forward import output_logits
from optimizer.judges import Judge
from optimizer.model import LoadedModel
from optimizer.packing import block_mask, full_attention_only, groups, shared_prefix_length
from optimizer.params import Kernel, TrialParams, build_plan
from optimizer.scoring import generate_and_classify

FIT_STEPS = 15
FIT_LR = 0.01
KL_WEIGHT = 3.0
FIT_WEIGHT = 1.0
TARGET_WEIGHT = 1.5
TARGET_TOKENS = 16
START_SHRINKAGE = 0.9
FIT_PROMPTS = 64  # the first this many direction prompts per set (harmful and harmless)
EDGE_RATIO = 0.3  # the kernel's weight at the first and last layer, as a share of its peak's
# most prompts per forward and backward pass of the fit: a backward pass keeps every layer's activations
# of its batch, many times what the study's (inference) batch size was measured for; the gradient is
# accumulated over batches, so this changes the memory, not the result
FIT_BATCH_SIZE = 16
# CPU: rows forwarded end to end behind their shared prefix, this many of their own tokens per forward
# (on the 2-core CPU 512 and 1024 were alike for the 0.5B default model, 256 best for the 135M one)
FIT_TOKENS_PER_FORWARD = 512
TOLERANCE = 1e-4  # relative difference of the loss, packed vs padded, that the packed layout may have


def fit_constants() -> str:
    """A fingerprint of the constants above: a cached fitted direction is reused only under the same."""
    values = [FIT_STEPS, FIT_LR, KL_WEIGHT, FIT_WEIGHT, TARGET_WEIGHT, TARGET_TOKENS, START_SHRINKAGE, EDGE_RATIO, FIT_PROMPTS]
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def fit_kernel(n_layers: int, weight: float) -> Kernel:
    """The fit's kernel: `weight` at mid-depth, falling linearly towards EDGE_RATIO of it a whole
    depth away (every layer edited)."""
    last = max(n_layers - 1, 1)
    return Kernel(peak_weight=weight, peak_layer=0.5 * last, min_ratio=EDGE_RATIO, falloff=last)


def start_plan(stats: ContrastiveStats, weight: float) -> AblationPlan:
    """The discriminant's directions (START_SHRINKAGE, projected) over `fit_kernel` at `weight`."""
    kernels = {c: fit_kernel(stats.n_layers, weight) for c in COMPONENTS}
    return build_plan(TrialParams("discriminant", None, None, kernels, shrinkage=START_SHRINKAGE), stats, projected=1.0)[0]


@dataclass(frozen=True)
class FitData:
    """Harmful prompts + target answers (labels only on the answers' tokens), harmless prompts and
    their unedited first-token log-probabilities; all left-padded."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    harmless_ids: torch.Tensor
    harmless_mask: torch.Tensor
    base: torch.Tensor  # (n_harmless, vocab) log-probabilities


def padded(tokenizer, texts: list[str], targets: list[str], n_target: int, pad: int, device: torch.device | str = "cpu"):
    """Left-padded ids of text + target, the mask, and labels (-100 but on the target's tokens)."""
    rows, labels = [], []
    for text, target in zip(texts, targets, strict=True):
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"][:n_target] if target else []
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    lab = torch.tensor([[-100] * (width - len(r)) + r for r in labels], device=device)
    return ids, mask, lab


def _logits(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits of the last `keep` positions of left-padded rows (the LM head only where read)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model = loaded.model
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep).logits


def fit_data(
    loaded: LoadedModel,
    hooks: AblationHooks,
    target_plan: AblationPlan,
    harmful: tuple[list[str], list[str]],
    harmless: list[str],
    judge: Judge,
    batch_size: int,
    answer_prefix: str = "",
) -> FitData | None:
    """The fit's data: targets are the answers of the model edited by `target_plan` (through `hooks`)
    to the `harmful` texts (chat-formatted, raw) that `judge` does not find refusals; None when it
    finds every one a refusal (no answer to fit towards)."""
    texts, prompts = harmful
    hooks.apply(target_plan)
    try:
        answers = generate_and_classify(
            loaded, texts, TARGET_TOKENS, judge, batch_size, prompts, stop_early=False, answer_prefix=answer_prefix
        )
    finally:
        hooks.clear()
    keep = [i for i, refused in enumerate(answers.refused) if not refused]
    if not keep:
        return None
    tok, device = loaded.tokenizer, loaded.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    targets = [answers.responses[i] for i in keep]
    ids, mask, labels = padded(tok, [texts[i] for i in keep], targets, TARGET_TOKENS, pad, device)
    hids, hmask, _ = padded(tok, harmless, [""] * len(harmless), 0, pad, device)
    with torch.inference_mode():
        base = torch.cat(
            [
                _logits(loaded, hids[i : i + batch_size], hmask[i : i + batch_size], 1)[:, -1]
                for i in range(0, len(hids), batch_size)
            ]
        )
    return FitData(ids, mask, labels, hids, hmask, base.float().log_softmax(-1))


class SharedDirectionHooks:
    """Forward hooks that ablate one trainable direction `v` at every site with the weight `weights`
    gives its component and layer: y <- y - w u (u . y), u = v / |v|, differentiable in v."""

    def __init__(self, loaded: LoadedModel, v: torch.Tensor, weights: dict[str, list[float]]):
        self.v = v
        self._handles = [
            site.module.register_forward_hook(self._hook(weights[site.component][site.layer]))
            for site in loaded.discovery.present()
            if weights[site.component][site.layer]
        ]

    def _hook(self, weight: float):
        def edit(_module, _inputs, output):
            y = output[0] if isinstance(output, tuple) else output
            basis = F.normalize(self.v, dim=0).to(y.dtype).unsqueeze(0)  # (1, d): u^T
            return project_output(output, weight * basis, basis)

        return edit

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Left-padded rows as lists of their own ids."""
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask, strict=True)]


def _packed_logits(loaded: LoadedModel, rows: list[list[int]], reads: list[list[int]]) -> Iterator[tuple[range, torch.Tensor]]:
    """The logits at positions `reads[i]` of each row i (positions within the row), for groups of rows
    forwarded end to end behind their shared prefix (`packing.block_mask`: each row sees the prefix
    and its own earlier tokens, its positions continue after the prefix), FIT_TOKENS_PER_FORWARD of
    their own tokens per forward: (group, logits of its rows' reads, row after row)."""
    p = shared_prefix_length(rows)
    suffixes = [row[p:] for row in rows]
    lengths = [len(suffix) for suffix in suffixes]
    model, device = loaded.model, loaded.device
    for group in groups(lengths, FIT_TOKENS_PER_FORWARD):
        group_lengths = [lengths[i] for i in group]
        ids = rows[0][:p] + [token for i in group for token in suffixes[i]]
        positions = list(range(p)) + [p + j for n in group_lengths for j in range(n)]
        hidden = model.get_decoder()(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=block_mask(p, group_lengths, loaded),
            position_ids=torch.tensor([positions], device=device),
            use_cache=False,
        ).last_hidden_state[0]
        starts = torch.tensor([0] + group_lengths[:-1]).cumsum(0).tolist()
        # a read inside the prefix is the prefix's own position (shared by every row)
        at = [r if r < p else p + start + r - p for i, start in zip(group, starts, strict=True) for r in reads[i]]
        yield group, output_logits(model, hidden[at])


def _target_batches(
    loaded: LoadedModel, data: FitData, batch_size: int, packed: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) of the target tokens, batch by batch; labels -100 where there is no target."""
    if packed:
        rows, n_target = _rows(data.ids, data.mask), (data.labels != -100).sum(-1).tolist()
        reads = [list(range(len(row) - n - 1, len(row) - 1)) for row, n in zip(rows, n_target, strict=True)]
        for group, logits in _packed_logits(loaded, rows, reads):
            yield logits, torch.cat([data.labels[i, data.labels.shape[1] - n_target[i] :] for i in group])
        return
    keep = TARGET_TOKENS + 1  # the targets end every row: the logits of the position before each of their tokens
    for i in range(0, len(data.ids), batch_size):
        logits = _logits(loaded, data.ids[i : i + batch_size], data.mask[i : i + batch_size], keep)
        yield logits[:, :-1].flatten(0, 1), data.labels[i : i + batch_size, -keep + 1 :].flatten()


def _first_token_batches(
    loaded: LoadedModel, data: FitData, batch_size: int, packed: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits of each harmless prompt's next token, its unedited log-probabilities), batch by batch."""
    if packed:
        rows = _rows(data.harmless_ids, data.harmless_mask)
        for group, logits in _packed_logits(loaded, rows, [[len(row) - 1] for row in rows]):
            yield logits, data.base[group.start : group.stop]
        return
    for i in range(0, len(data.harmless_ids), batch_size):
        batch = slice(i, i + batch_size)
        yield _logits(loaded, data.harmless_ids[batch], data.harmless_mask[batch], 1)[:, -1], data.base[batch]


def fit_loss(loaded: LoadedModel, data: FitData, batch_size: int, backward: bool, packed: bool = False) -> tuple[float, float]:
    """Mean target cross-entropy per token and mean first-token KL per harmless prompt of the model
    as hooked now; with `backward`, the gradient of CE + KL_WEIGHT * KL accumulated, batch by batch.
    `packed`: the rows forwarded end to end without padding (`_packed_logits`), else in padded
    batches of `batch_size`; the same loss either way."""
    n_tok, n_harmless = int((data.labels != -100).sum()), len(data.harmless_ids)
    ce_sum = kl_sum = 0.0
    with torch.set_grad_enabled(backward):
        for logits, labels in _target_batches(loaded, data, batch_size, packed):
            ce = F.cross_entropy(logits.float(), labels, reduction="sum")
            if backward:
                (ce / n_tok).backward()
            ce_sum += float(ce.detach())
        for logits, base in _first_token_batches(loaded, data, batch_size, packed):
            kl = F.kl_div(logits.float().log_softmax(-1), base, reduction="sum", log_target=True)
            if backward:
                (KL_WEIGHT * kl / n_harmless).backward()
            kl_sum += float(kl.detach())
    return ce_sum / n_tok, kl_sum / n_harmless


def choose_layout(loaded: LoadedModel, data: FitData, plan: AblationPlan, batch_size: int) -> tuple[bool, str]:
    """Whether the fit forwards its rows packed (`fit_loss`), and what to say of it: on a CPU, where
    the fit is bound by arithmetic and the packed rows spare it the padding and every row's copy of
    the shared prefix (the default model's whole fit 1.6x faster), if the loss of the start edit on
    the first `batch_size` rows of each set agrees with the padded path's (a model whose logits are
    more than `forward.output_logits` of its last hidden states, or whose attention takes the mask
    otherwise, is caught here)."""
    if loaded.device.type != "cpu":
        return False, "padded batches (packed rows are for CPUs, where the fit is bound by arithmetic)"
    if loaded.split or not full_attention_only(loaded):
        return False, "padded batches (packed rows need every layer's full attention through sdpa or eager, on one device)"
    first = dataclasses.replace(
        data,
        ids=data.ids[:batch_size],
        mask=data.mask[:batch_size],
        labels=data.labels[:batch_size],
        harmless_ids=data.harmless_ids[:batch_size],
        harmless_mask=data.harmless_mask[:batch_size],
        base=data.base[:batch_size],
    )
    hooks = SharedDirectionHooks(loaded, peak_direction(plan).float(), plan.weights)
    losses = []
    try:
        with torch.inference_mode():
            for packed in (False, True):
                ce, kl = fit_loss(loaded, first, batch_size, backward=False, packed=packed)
                losses.append(ce + KL_WEIGHT * kl)
    finally:
        hooks.remove()
    padded_loss, packed_loss = losses
    error = abs(packed_loss - padded_loss) / max(abs(padded_loss), 1e-12)
    if error > TOLERANCE:
        return False, f"padded batches (packed rows gave another loss: relative difference {error:.1e})"
    return True, f"rows packed without padding (vs padded batches: relative difference of the loss {error:.1e})"


def peak_direction(plan: AblationPlan) -> torch.Tensor:
    """The first component's direction at the layer its kernel weighs most (the first such layer)."""
    component = next(iter(plan.weights))
    weights = plan.weights[component]
    return plan.directions[component][max(range(len(weights)), key=weights.__getitem__)]


def fit_direction(
    loaded: LoadedModel,
    data: FitData,
    plan: AblationPlan,
    batch_size: int,
    steps: int = FIT_STEPS,
    lr: float = FIT_LR,
    on_step: Callable[[int, float, float, torch.Tensor], None] | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """The unit direction (d,) fitted by `steps` Adam steps (learning rate `lr`) on the fit's loss
    with `plan`'s weights, from `plan`'s direction at its peak layer (`peak_direction`);
    `on_step(step, CE, KL, direction)` after each step (CE and KL before it, the unit direction
    after it); `packed`: `fit_loss`'s layout (`choose_layout`). The model is left as it was: its
    parameters are frozen during the fit and their `requires_grad` restored after."""
    v = peak_direction(plan).detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    hooks = SharedDirectionHooks(loaded, v, plan.weights)
    try:
        for step in range(steps):
            optimizer.zero_grad()
            ce, kl = fit_loss(loaded, data, batch_size, backward=True, packed=packed)
            optimizer.step()
            if on_step:
                on_step(step, ce, kl, F.normalize(v.detach(), dim=0))
    finally:
        hooks.remove()
        for p in trainable:
            p.requires_grad_(True)
    return F.normalize(v.detach(), dim=0)


@dataclass(frozen=True)
class Fit:
    """The method's direction and what it was fitted on: `targets` of `prompts` harmful direction
    prompts answered by the start edit (none: the start direction as it was, unfitted), and how its
    passes were laid out (`choose_layout`; empty when unfitted)."""

    direction: torch.Tensor  # (d,), unit
    targets: int
    prompts: int
    layout: str = ""


def fitted_direction(
    loaded: LoadedModel,
    hooks: AblationHooks,
    stats: ContrastiveStats,
    harmful: tuple[list[str], list[str]],
    harmless: list[str],
    judge: Judge,
    batch_size: int,
    answer_prefix: str = "",
    on_step: Callable[[int, float, float, torch.Tensor], None] | None = None,
    steps: int = FIT_STEPS,
    lr: float = FIT_LR,
) -> Fit:
    """The method's direction: targets from `start_plan` at TARGET_WEIGHT (`fit_data`), then
    `fit_direction` from `start_plan` at FIT_WEIGHT (`steps` at rate `lr`: the constants but for
    benchmarks/fit_cost.py), both on the first FIT_PROMPTS direction prompts of each set. When the
    start edit leaves every harmful direction prompt refused there is nothing to fit towards, and
    the direction is the start's (`peak_direction`), unfitted: the method then costs the study
    nothing but its share of trials, where failing would stop a run that asked for the default
    methods."""
    start = start_plan(stats, FIT_WEIGHT)
    harmful, harmless = (harmful[0][:FIT_PROMPTS], harmful[1][:FIT_PROMPTS]), harmless[:FIT_PROMPTS]
    data = fit_data(loaded, hooks, start_plan(stats, TARGET_WEIGHT), harmful, harmless, judge, batch_size, answer_prefix)
    if data is None:
        return Fit(F.normalize(peak_direction(start).float(), dim=0), 0, len(harmful[0]))
    batch_size = min(batch_size, FIT_BATCH_SIZE)
    packed, layout = choose_layout(loaded, data, start, batch_size)
    direction = fit_direction(loaded, data, start, batch_size, steps, lr, on_step, packed)
    return Fit(direction, len(data.ids), len(harmful[0]), layout)
