"""Bake a trial's ablation into the weights and write a normal Hugging Face model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from optimizer.ablation import AblationPlan, bake_into_weights
from optimizer.cache import WRITE_ERRORS, is_write_failure, write_error
from optimizer.components import COMPONENTS
from optimizer.config import Settings
from optimizer.errors import UserError
from optimizer.model import available_memory_bytes
from optimizer.stored import StoredStudy, finished_trial
from optimizer.trials import EditedModel, load_edited_model

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out folder or empty it first")


def parameter_count(source: str | None, trust_remote_code: bool = False) -> int | None:
    """Parameters of the model, counted on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from optimizer.model import locate

    if source is None:
        return None
    try:
        location, kwargs, _ = locate(source, trust_remote_code)
        config = AutoConfig.from_pretrained(location, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except (OSError, ValueError, UserError):
        return None


def announce_memory(settings: Settings, model: str | None, console: Console) -> None:
    """Say before loading how much RAM the float32 export needs (a 4-bit study's model is dequantised)."""
    count = parameter_count(model or settings.model or _default_model(), settings.trust_remote_code)
    if count is None:
        return
    need = count * 4
    have = available_memory_bytes()
    where = " (the study ran on a 4-bit model: export loads the full checkpoint)" if settings.quantization else ""
    line = f"Export loads {count / 1e9:.2f}B parameters in float32 on the CPU{where}: about {need / 2**30:.1f} GiB of RAM"
    if have is not None:
        line += f", {have / 2**30:.1f} GiB available"
    console.print(f"[yellow]{line}; it may fail or swap[/]" if have is not None and have < need else line)


def _default_model() -> str | None:
    from optimizer.fetch import DEFAULT_MODEL, cache_home

    folder = cache_home() / "models" / DEFAULT_MODEL.name
    return str(folder) if folder.exists() else None


@torch.inference_mode()
def bake_and_verify(edited: EditedModel) -> float:
    """Bake the plan into the weights, checking on a real prompt that the edited weights give the
    hooked model's logits; stops before anything is written if they do not."""
    prepared, loaded = edited.prepared, edited.prepared.loaded
    probe = loaded.tokenizer(prepared.spec.texts.harmful[:1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    probe = probe.to(loaded.device)
    prepared.hooks.apply(edited.plan)
    hooked = loaded.model(input_ids=probe).logits.float()
    prepared.hooks.remove()
    bake_into_weights(loaded, edited.plan, prepared.settings.norm_preserving)
    baked = loaded.model(input_ids=probe).logits.float()
    difference = float((hooked - baked).abs().max())
    if not difference <= 1e-3 * max(1.0, float(hooked.abs().max())):
        raise UserError(
            f"the baked weights do not reproduce the hooked model (max logit difference {difference:.3g}); this model's "
            "structure is not handled correctly — please report it with the discovery table printed above"
        )
    return difference


def save_processor(source: str, folder: Path, trust_remote_code: bool = False) -> None:
    """Multimodal checkpoints: the processor (image preprocessing + tokenizer) goes alongside."""
    from transformers import AutoProcessor

    from optimizer.model import locate

    location, kwargs, _ = locate(source, trust_remote_code)
    local = Path(location)
    if local.is_dir() and not any((local / f).exists() for f in ("preprocessor_config.json", "processor_config.json")):
        return
    try:
        processor = AutoProcessor.from_pretrained(location, **kwargs)
    except (OSError, ValueError, TypeError):
        return
    if hasattr(processor, "image_processor") or hasattr(processor, "feature_extractor"):
        processor.save_pretrained(folder)


def model_card(edited: EditedModel, study_name: str) -> str:
    trial, params = edited.trial, edited.params
    lines = [
        "---",
        "tags: [abliterated, optimizer]",
        "---",
        f"# {Path(edited.prepared.loaded.source).name} (abliterated, trial {trial.number})",
        "",
        f"Made with `optimizer` from study `{study_name}`, trial {trial.number}: the refusal direction was",
        "projected out of every tensor each block writes to the residual stream with (attention output",
        "projection, MLP down projection, every expert's down projection): W <- (I - w r r^T) W, with the",
        "per-layer weights below.",
        "",
        "| score | value |",
        "|---|---|",
        f"| refusals (scoring prompts) | {trial.user_attrs.get('refusals')} |",
        f"| KL divergence from the original | {trial.values[1]:.4f} |",
        f"| direction | {params.describe_direction()} |",
        "",
    ]
    verified = trial.user_attrs.get("verify")
    if verified:
        from optimizer.verify import Verification

        lines += [Verification.from_record(verified).note(), ""]
    lines += [
        "| component | peak weight | peak layer | min ratio | falloff |",
        "|---|---|---|---|---|",
    ]
    for c, k in params.kernels.items():
        lines.append(f"| {c} | {k.peak_weight:.3f} | {k.peak_layer:.2f} | {k.min_ratio:.3f} | {k.falloff:.2f} |")
    lines += ["", "`optimizer.json` and `ablation.safetensors` hold everything needed to reproduce the edit.", ""]
    if edited.prepared.settings.trust_remote_code:
        lines += [
            "The architecture ships as code with the model: load it with `trust_remote_code=True`",
            "(the study ran with `--trust-remote-code`).",
            "",
        ]
    return "\n".join(lines)


FORMATS = ("hf", "gguf", "lora")


def _check_options(fmt: str, save_dtype: str | None, gguf_type: str | None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format takes {', '.join(FORMATS)}, got {fmt!r}")
    if save_dtype is not None and fmt != "hf":
        raise UserError(
            f"--dtype applies to --format hf; for {fmt} leave it out" + (" (use --gguf-type)" if fmt == "gguf" else "")
        )
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    if gguf_type is not None and fmt != "gguf":
        raise UserError(f"--gguf-type applies to --format gguf, not {fmt}; leave it out")


def export_trial(
    stored: StoredStudy,
    number: int,
    out: Path,
    console: Console,
    model: str | None = None,
    device: str | None = None,
    save_dtype: str | None = None,
    fmt: str = "hf",
    gguf_type: str | None = None,
) -> Path:
    """Write trial `number` of the study at `out`: a Hugging Face folder (`hf`), a GGUF file (`gguf`)
    or a PEFT LoRA adapter folder (`lora`); refuses an existing (non-empty) `out`."""
    _check_options(fmt, save_dtype, gguf_type)
    if fmt == "gguf":
        if out.exists():
            raise UserError(f"{out} exists; choose a new --out file name (e.g. model.gguf)")
    else:
        _check_target(out)
    finished_trial(stored.study, number)  # refuse before loading anything
    if fmt == "lora":
        from optimizer.lora_export import check_settings

        check_settings(stored.settings)
    announce_memory(stored.settings, model, console)
    # bake in float32 for precision (a 4-bit study's model is loaded in full: the edit goes into
    # the original weights), then save in the requested (or the checkpoint's) dtype
    edited = load_edited_model(stored, number, console, model=model, device=device or "cpu", dtype="float32", full_precision=True)
    try:
        _write(stored, edited, out, fmt, save_dtype, gguf_type, console)
    except WRITE_ERRORS as e:
        if not is_write_failure(e):
            raise
        raise UserError(
            f"cannot write the export to {out} ({write_error(e)}); nothing was left there: "
            f"free space in {out.parent} or choose another --out"
        ) from None
    stored.annotate(edited.trial, "exported_to", str(out.resolve()))
    console.print(f"Exported trial {number} to {out}")
    return out


def _write(
    stored: StoredStudy, edited: EditedModel, out: Path, fmt: str, save_dtype: str | None, gguf_type: str | None, console: Console
) -> None:
    """Write the trial in `fmt`; every writer leaves nothing at `out` (nor a temporary file) when it fails."""
    if fmt == "lora":
        from optimizer.lora_export import write_lora

        adapter = write_lora(edited, out, console)
        loaded = edited.prepared.loaded
        dtype = loaded.checkpoint_dtype or torch.float32
        full = sum(p.numel() for p in loaded.model.parameters()) * dtype.itemsize
        console.print(
            f"Adapter {adapter.size_bytes / 2**20:.2f} MiB against {full / 2**20:.1f} MiB of weights in a full --format hf "
            f"export ({str(dtype).removeprefix('torch.')})"
        )
    else:
        difference = bake_and_verify(edited)
        console.print(
            f"Baked the edit into the weights; logits of the exported weights vs the hooked model: max |diff| {difference:.2e}"
        )
        if fmt == "gguf":
            from optimizer.gguf_export import write_gguf

            report = write_gguf(edited, out, gguf_type, console)
            check = {
                "max_abs_logit_diff": report.max_abs_diff,
                "top1_agreement": report.top1_agreement,
                "tolerance": report.tolerance,
            }
            record = {**edited.record(), "format": "gguf", "gguf_type": report.gguf_type, "check": check}
            Path(f"{out}.optimizer.json").write_text(json.dumps(record, indent=2))  # a GGUF's metadata stay the source's
        else:
            _write_folder(stored, edited, out, save_dtype, console)


def ablation_tensors(plan: AblationPlan) -> dict[str, torch.Tensor]:
    """Every direction of the plan, as ablation.safetensors holds them (optimizer.json says how)."""
    tensors = {f"{c}.directions": plan.directions[c].detach().cpu().float().clone() for c in COMPONENTS}
    if plan.extra is not None:
        tensors.update({f"{c}.extra_directions": plan.extra[c].detach().cpu().float().clone() for c in COMPONENTS})
    return tensors


def _write_folder(stored: StoredStudy, edited: EditedModel, out: Path, save_dtype: str | None, console: Console) -> None:
    """The baked model as a Hugging Face folder, in the requested (or the checkpoint's) dtype."""
    loaded, settings = edited.prepared.loaded, stored.settings
    target = SAVE_DTYPES[save_dtype] if save_dtype else loaded.checkpoint_dtype or torch.float32
    torch.nn.Module.to(loaded.model, target)  # (transformers' decorated `to` confuses type checkers)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with console.status(f"Writing {out} ({str(target).removeprefix('torch.')})..."):
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            save_processor(loaded.source, tmp, settings.trust_remote_code)
            save_file(ablation_tensors(edited.plan), str(tmp / "ablation.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(edited.record(), indent=2))
            (tmp / "README.md").write_text(model_card(edited, stored.study.study_name))
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written model folder
        raise
