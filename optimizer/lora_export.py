"""Write a trial's ablation as a PEFT LoRA adapter: the plain edit is a rank-1 update of each edited matrix
(a refusal subspace of k directions, a rank-k one).

The edit of a linear map y = W x + b that writes to the residual stream (see ablation.py) is

    W' = (I - w r r^T) W = W + B A,  with B = -w r (d_out x 1) and A = r^T W (1 x d_in),
    b' = (I - w r r^T) b = b - w r (r . b),

so every edited matrix takes one rank-1 LoRA pair, exactly: PEFT computes W x + b' + s B (A x) with
s = lora_alpha / r = 1 (rank 1, lora_alpha 1; b' replaces b on loading, below), which is W' x + b'.
A subspace R = [r_1 .. r_k] with weights W_r = diag(w_i) (ablation.py) gives B = -R W_r (d_out x k)
and A = R^T W (k x d_in), rank k, lora_alpha k.
A depends on W: the adapter is exact for the model the study ran on (the full-precision weights, for
a 4-bit study), as any extracted LoRA is. Layers and components whose weight is 0 are left out of
`target_modules`.

Biases. LoRA's own bias term (`lora_bias=True`: a bias on B, added to the output) would carry the
change b' - b, but PEFT refuses to merge it into a targeted layer that has no bias, which mixed
models have (llama with `attention_bias` only: a biased o_proj, a bias-free down_proj). So the
adapter uses `bias="lora_only"`: the edited bias b' of every targeted module that has one is
stored as `<module>.base_layer.bias`; `PeftModel.from_pretrained` loads it over the base layer's b,
and `merge_and_unload()` keeps it. The biases therefore stay edited under `disable_adapter()` and
after `unload()` (PEFT warns about this for any bias other than "none"). vLLM reads only the LoRA
pairs of an adapter and rejects other tensors, so an adapter that carries biases is for PEFT; the
README written beside it says so.

Refused, with `--format hf` (the full export) named as the alternative: norm-preserving studies
(each edited row is rescaled to its old norm: W' = (I - w r r^T) W diag(s), a full-rank change),
fused 3-D expert tensors of MoE blocks ((E, d, inter) `experts.down_proj`: LoRA targets 2-D
nn.Linear weights), and any edited tensor that is not the weight or bias of an nn.Linear (GPT-2's
Conv1D, say). MoE blocks whose experts are an nn.ModuleList of MLPs are supported: the block output
is a gated sum of the experts' outputs (plus a shared expert's), linear in each, so projecting r out
of it equals giving every expert's (and the shared expert's) down projection its own rank-1 pair.

Before anything is reported the adapter is checked as a user would load it: `PeftModel.from_pretrained`
on the study's model, logits on real prompts against the hooked model's. The check loads the
adapter onto the model in place (no second copy of the weights) and leaves it as it found it:
`unload()` puts the original modules back, the biases that loading replaced and the parameters'
`requires_grad` flags are restored.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from optimizer.components import Site
from optimizer.config import Settings
from optimizer.errors import UserError
from optimizer.trials import EditedModel

# logits of base + adapter may differ from the hooked model's by this much, relative to the logit
# scale (float32: only the order of summation differs)
TOLERANCE = 1e-4
ALTERNATIVE = "export the full model with --format hf (the default) instead"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraReport:
    """What `write_lora` wrote and how well the adapter reproduces the hooked model."""

    out: Path
    size_bytes: int  # every file in `out`
    modules: int  # targeted nn.Linear modules, one rank-k pair each
    biases: int  # of which carry an edited bias (bias="lora_only")
    max_abs_diff: float  # logits of base + adapter vs the hooked model, on the check prompts
    logit_scale: float  # max |logit| of the hooked model there
    top1_agreement: float  # share of positions whose most likely next token agrees


@dataclass(frozen=True)
class _Target:
    name: str  # the module's name in the model, as PEFT's target_modules matches it
    module: nn.Linear
    basis: torch.Tensor  # (k, d_out): the directions as rows
    weights: torch.Tensor  # (k,)


def write_lora(edited: EditedModel, out: Path, console: Console) -> LoraReport:
    """Write trial `edited.trial`'s edit as a PEFT LoRA adapter folder `out` (refuses a non-empty one).

    Expects the model unbaked, hooks registered but not applied (float32 on the CPU for an exact
    check). Refuses edits that LoRA cannot express before writing anything; writes into
    `<out>.partial`, checks that the base model plus the adapter as loaded by PEFT gives the hooked
    model's logits, and only then renames it to `out`.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out folder or empty it first")
    targets = lora_targets(edited)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with console.status(f"Writing the LoRA adapter ({len(targets)} modules, rank {edited.plan.rank})..."):
            biases = _write_adapter(edited, targets, tmp)
        with console.status("Checking base model + adapter against the hooked model..."):
            difference, scale, agreement = _verify(edited, targets, tmp)
        (tmp / "README.md").write_text(_readme(edited, out, len(targets), biases))
        (tmp / "optimizer.json").write_text(json.dumps(_record(edited, targets, biases), indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    console.print(
        f"Wrote a rank-{edited.plan.rank} LoRA adapter for {len(targets)} modules to {out} ({size / 2**20:.2f} MiB); "
        f"logits of base + adapter vs the hooked model: max |diff| {difference:.2e} (logit scale {scale:.3g}), "
        f"top-1 agreement {agreement:.1%}"
    )
    return LoraReport(out, size, len(targets), biases, difference, scale, agreement)


def check_settings(settings: Settings) -> None:
    """Refuse, before any model is loaded, a study whose edit no LoRA adapter can express."""
    if settings.norm_preserving:
        raise UserError(
            f"study {settings.study!r} was run with --norm-preserving, whose edit rescales every row of each edited matrix "
            f"to its old norm: not a low-rank update, so a LoRA adapter cannot express it; {ALTERNATIVE}"
        )


def lora_targets(edited: EditedModel) -> list[_Target]:
    """The nn.Linear modules the trial edits, with their direction and weight; a UserError naming
    `--format hf` where a LoRA adapter cannot express the edit."""
    settings, number = edited.prepared.settings, edited.trial.number
    check_settings(settings)
    model = edited.prepared.loaded.model
    names = {id(m): n for n, m in model.named_modules()}
    targets: list[_Target] = []
    for site in edited.prepared.loaded.discovery.present():
        if edited.plan.weight_at(site) == 0:
            continue
        edit = edited.plan.at(site)
        for module in _linear_modules(site, number):
            targets.append(_Target(names[id(module)], module, edit.basis.detach().float().cpu(), edit.weights.float().cpu()))
    if not targets:
        raise UserError(
            f"trial {number} changes no weight (every ablation weight is 0: trial 0 is the unedited model), so there is no "
            "adapter to write; pick an edited trial (see `show`)"
        )
    return targets


def _linear_modules(site: Site, number: int) -> list[nn.Linear]:
    """The modules a site's edit goes into, each an nn.Linear whose weight (and bias) is edited."""
    modules: list[nn.Linear] = []
    for edit in site.edits:
        tensor = edit.tensor
        if tensor.dim() == 3:
            raise UserError(
                f"trial {number} edits fused expert tensors ({edit.path}, shape {tuple(tensor.shape)}) in block {site.layer}: "
                f"a PEFT LoRA adapter targets 2-D nn.Linear weights only and cannot express this edit; {ALTERNATIVE}"
            )
        module = edit.module
        if (
            not isinstance(module, nn.Linear)
            or edit.name not in ("weight", "bias")
            or (edit.name == "weight" and edit.residual_axis != -2)
        ):
            raise UserError(
                f"trial {number} edits {edit.path} ({type(module).__name__}, shape {tuple(tensor.shape)}), which is not the "
                f"weight or bias of an nn.Linear: a PEFT LoRA adapter cannot express this edit; {ALTERNATIVE}"
            )
        if edit.name == "weight":
            modules.append(module)
    return modules


@torch.no_grad()
def _write_adapter(edited: EditedModel, targets: list[_Target], folder: Path) -> int:
    """adapter_config.json and adapter_model.safetensors (float32); returns how many biases it carries."""
    from peft import LoraConfig

    tensors: dict[str, torch.Tensor] = {}
    biases = 0
    for t in targets:
        key = f"base_model.model.{t.name}"
        weight = t.module.weight.detach().float().cpu()
        tensors[f"{key}.lora_A.weight"] = (t.basis @ weight).contiguous()  # A = R^T W: (k, d_in)
        tensors[f"{key}.lora_B.weight"] = (-t.weights.unsqueeze(-1) * t.basis).mT.contiguous()  # B = -R W_r: (d_out, k)
        if t.module.bias is not None:
            bias = t.module.bias.detach().float().cpu()
            tensors[f"{key}.base_layer.bias"] = (bias - ((t.basis @ bias) * t.weights) @ t.basis).contiguous()
            biases += 1
    rank = edited.plan.rank
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=[t.name for t in targets],
        bias="lora_only" if biases else "none",
        base_model_name_or_path=_base_name(edited.prepared.loaded.source),
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copymode(folder / "adapter_config.json", folder / ADAPTER_WEIGHTS)  # safetensors writes it owner-only
    return biases


def _base_name(source: str) -> str:
    """The base model as adapter_config.json names it: a hub id as given, a local path made absolute."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _probe_ids(edited: EditedModel) -> list[torch.Tensor]:
    """One harmful and one harmless prompt of the study, chat-formatted, tokenized one by one (no padding)."""
    texts = edited.prepared.spec.texts
    loaded = edited.prepared.loaded
    probes = [*texts.harmful[:1], *texts.harmless[:1]]
    encode = lambda text: loaded.tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
    return [encode(text).to(loaded.device) for text in probes]


def _logits(model: nn.Module, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(input_ids=ids).logits.float() for ids in probes]


def _verify(edited: EditedModel, targets: list[_Target], folder: Path) -> tuple[float, float, float]:
    """Max |diff|, logit scale and top-1 agreement of base + adapter (loaded by PEFT) against the hooked model;
    a UserError where they differ by more than TOLERANCE of the logit scale."""
    from peft import PeftModel

    prepared = edited.prepared
    model = prepared.loaded.model
    probes = _probe_ids(edited)
    prepared.hooks.apply(edited.plan)
    try:
        hooked = _logits(model, probes)
    finally:
        prepared.hooks.clear()
    # PEFT loads the adapter into this model: new LoRA modules around the targeted ones, the edited biases
    # copied over the originals, base parameters frozen; all of it is undone below
    originals = {t.name: t.module.bias.detach().clone() for t in targets if t.module.bias is not None}
    trainable = {p: p.requires_grad for p in model.parameters()}
    peft_model = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, reached through PEFT
            peft_model = PeftModel.from_pretrained(model, str(folder))
        adapted = _logits(peft_model, probes)
    finally:
        if peft_model is not None:
            peft_model.unload()  # the original modules, not merged
        with torch.no_grad():
            for t in targets:
                if t.name in originals:
                    t.module.bias.copy_(originals[t.name])
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    difference = max(float((a - h).abs().max()) for a, h in zip(adapted, hooked))
    scale = max(float(h.abs().max()) for h in hooked)
    agree = sum(int((a.argmax(-1) == h.argmax(-1)).sum()) for a, h in zip(adapted, hooked))
    agreement = agree / sum(h.shape[0] * h.shape[1] for h in hooked)
    if not difference <= TOLERANCE * max(1.0, scale):
        raise UserError(
            f"the LoRA adapter does not reproduce the hooked model (max logit difference {difference:.3g} at a logit scale of "
            f"{scale:.3g}), so nothing was written; {ALTERNATIVE}, and please report this with the discovery table printed above"
        )
    return difference, scale, agreement


def _record(edited: EditedModel, targets: list[_Target], biases: int) -> dict:
    return {
        **edited.record(),
        "format": "peft-lora",
        "edit": f"W <- (I - R W_r R^T) W as the rank-{edited.plan.rank} LoRA pair B = -R W_r, A = R^T W (lora_alpha = rank) "
        "on every nn.Linear each block writes to the residual stream with, where w != 0 (R: the layer's directions, "
        "W_r: their weights); biases b <- (I - R W_r R^T) b stored whole (bias='lora_only')",
        "modules": len(targets),
        "biases": biases,
    }


def _readme(edited: EditedModel, out: Path, modules: int, biases: int) -> str:
    base = _base_name(edited.prepared.loaded.source)
    trial = edited.trial
    refusals = trial.user_attrs.get("refusals")
    gguf = base.endswith(".gguf")
    load = (
        f'AutoModelForCausalLM.from_pretrained("{Path(base).parent}", gguf_file="{Path(base).name}", dtype="auto")'
        if gguf
        else f'AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")'
    )
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [abliterated, optimizer, lora]",
        "---",
        f"# LoRA adapter: {Path(base).name} abliterated (study `{edited.prepared.settings.study}`, trial {trial.number})",
        "",
        "Made with `optimizer`: the refusal directions R (k per layer) are projected out of every matrix each block",
        "writes to the residual stream with, W <- (I - R W_r R^T) W, which is exactly a rank-k LoRA pair per matrix:",
        f"B = -R W_r, A = R^T W, rank k = {edited.plan.rank}, lora_alpha {edited.plan.rank} ({modules} modules;",
        "layers with weight 0 are left out).",
        f"Refusals (scoring prompts): {refusals}; KL divergence from the original: {trial.values[1]:.4f}.",
        "",
        "The adapter is exact only on its base model (A is computed from the base weights).",
        "",
        "## PEFT",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = {load}",
        f'tokenizer = AutoTokenizer.from_pretrained("{Path(base).parent if gguf else base}")',
        f'model = PeftModel.from_pretrained(base, "{out}")',
        "model = model.merge_and_unload()  # optional: plain weights with the edit baked in",
        "```",
        "",
    ]
    if biases:
        lines += [
            f'{biases} of the edited modules have a bias: the adapter stores their edited biases whole (`bias="lora_only"`),',
            "so loading it replaces those biases, and they stay edited under `disable_adapter()` or `unload()`.",
            "",
        ]
    lines += [
        "## vLLM",
        "",
        "```",
        f"vllm serve {base} --enable-lora --lora-modules abliterated={out}",
        "```",
        "",
        "and ask for the model `abliterated`. vLLM's LoRA loader reads only the A and B matrices of an adapter "
        + (
            "and current releases reject an adapter holding any other tensor, such as the biases this one carries: "
            "serve the full model from `optimizer export --format hf` with vLLM instead."
            if biases
            else "(current releases reject any other tensor): that is all this adapter holds."
        ),
        "",
        "`optimizer.json` records the study, the trial, its parameters and scores, and the per-layer weights.",
        "",
    ]
    return "\n".join(lines)
