"""Bake a trial's ablation into the weights and write a normal Hugging Face model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import torch
from rich.console import Console
from safetensors.torch import save_file

from optimizer.ablation import bake_into_weights
from optimizer.config import Settings
from optimizer.errors import UserError
from optimizer.model import COMPONENTS
from optimizer.study import annotate_trial
from optimizer.trials import EditedModel, finished_trial, load_edited_model

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out folder or empty it first")


def model_card(edited: EditedModel, study_name: str) -> str:
    trial, params = edited.trial, edited.params
    lines = [
        "---",
        "tags: [abliterated, optimizer]",
        "---",
        f"# {Path(edited.bench.loaded.source).name} (abliterated, trial {trial.number})",
        "",
        f"Made with `optimizer` from study `{study_name}`, trial {trial.number}: the refusal direction was",
        "projected out of every block's attention output projection and MLP down projection,",
        "W <- (I - w r r^T) W, with the per-layer weights below.",
        "",
        "| score | value |",
        "|---|---|",
        f"| refusals (scoring prompts) | {trial.user_attrs.get('refusals')} |",
        f"| KL divergence from the original | {trial.values[1]:.4f} |",
        f"| direction | {params.describe_direction()} |",
        "",
        "| component | peak weight | peak layer | min ratio | falloff |",
        "|---|---|---|---|---|",
    ]
    for c, k in params.kernels.items():
        lines.append(f"| {c} | {k.peak_weight:.3f} | {k.peak_layer:.2f} | {k.min_ratio:.3f} | {k.falloff:.2f} |")
    lines += ["", "`optimizer.json` and `ablation.safetensors` hold everything needed to reproduce the edit.", ""]
    return "\n".join(lines)


def export_trial(
    study: optuna.Study, settings: Settings, number: int, out: Path, console: Console,
    model: str | None = None, device: str | None = None, save_dtype: str | None = None,
) -> Path:
    """Write trial `number` of the study as a model folder at `out`; refuses a non-empty `out`."""
    _check_target(out)
    finished_trial(study, number)  # refuse before loading anything
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    # bake in float32 for precision, then save in the requested (or the checkpoint's) dtype
    edited = load_edited_model(study, settings, number, console, model=model, device=device or "cpu", dtype="float32")
    loaded = edited.bench.loaded
    edited.bench.hooks.remove()
    bake_into_weights(loaded, edited.plan)
    target = SAVE_DTYPES[save_dtype] if save_dtype else loaded.checkpoint_dtype or torch.float32
    loaded.model.to(target)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with console.status(f"Writing {out} ({str(target).removeprefix('torch.')})..."):
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        save_file(
            {f"{c}.directions": edited.plan.directions[c].detach().cpu().float().clone() for c in COMPONENTS},
            str(tmp / "ablation.safetensors"),
        )
        record = {
            "study": study.study_name,
            "trial": number,
            "model": study.user_attrs.get("model"),
            "model_fingerprint": study.user_attrs.get("model_fingerprint"),
            "params": edited.trial.params,
            "trial_params": edited.params.to_json(),
            "weights": {c: edited.plan.weights[c] for c in COMPONENTS},
            "fallback_layers": edited.info.fallback_layers,
            "scores": {"refusals": edited.trial.user_attrs.get("refusals"), "kl_divergence": edited.trial.values[1]},
            "edit": "W <- (I - w r r^T) W and b <- (I - w r r^T) b on each block's attention output and MLP down projection; "
            "directions per layer in ablation.safetensors",
        }
        (tmp / "optimizer.json").write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(model_card(edited, study.study_name))
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.replace(out)
    annotate_trial(study, edited.trial, "exported_to", str(out.resolve()))
    console.print(f"Exported trial {number} to {out}")
    return out
