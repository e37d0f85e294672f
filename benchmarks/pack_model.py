"""Carry a small checkpoint to a lent GPU machine: int8 weights, in parts that fit a device call.

    python benchmarks/pack_model.py pack MODEL_DIR PREFIX [--parts-mib 56] [--first-mib 38] [--check 64]
    python benchmarks/pack_model.py unpack OUT_DIR PART_DIR [PART_DIR ...]

Why: a lent GPU machine reaches no model hub and a device call carries at most 64 MiB, so no real
checkpoint was ever on the card and the GPU time-to-front runs had to use random weights, which
refuse nothing (benchmarks/RESULTS.md). A warm machine keeps its /tmp between calls (not its working
copy, which each call replaces), so a checkpoint can travel in parts, one call each, kept in /tmp,
and be put together by the call that uses it (benchmarks/gpu.sh, step ttf-real, says how). The
synthetic refusing SmolLM2-135M (benchmarks/make_refusing_model.py) is 538 MB in float32, 269 MB
in bfloat16: too many parts. In int8 it is 135 MB, three parts.

Quantisation: every matrix is stored as int8 with one float32 scale per output row (symmetric,
scale = max |w| of the row / 127); vectors (norms, biases) stay as they are. Unpacking multiplies
back and saves a plain Hugging Face folder in bfloat16, the dtype the GPU runs use. The rounding
error per weight is at most half a step, 1/254 of the row's largest weight, well under bfloat16's
own relative error for most weights (2^-9 of the weight). So the card holds a model that behaves as
the refusing model does, not the very same weights: `--check N` measures that on this CPU, the
refusals of the original and of the round trip on the first N bundled harmful scoring prompts (the
tool's own chat formatting, marker judge and response cap) and the largest next-token probability
difference on the same prompts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import itertools

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
PACKED = "weights.int8.pt"


def quantise(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each float matrix as (int8 values, float32 row scales); everything else unchanged."""
    packed: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if w.ndim == 2 and w.is_floating_point():
            w32 = w.float()
            scale = (w32.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
            packed[name + ".q"] = torch.round(w32 / scale).to(torch.int8)
            packed[name + ".scale"] = scale
        else:
            packed[name] = w
    return packed


def dequantise(packed: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in packed.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".q"):
            base = name.removesuffix(".q")
            out[base] = (value.float() * packed[base + ".scale"]).to(dtype)
        else:
            out[name] = value.to(dtype) if value.is_floating_point() else value
    return out


def pack(model_dir: Path, prefix: Path, parts_mib: int, first_mib: int) -> list[Path]:
    """Writes PREFIX1, PREFIX2, ...: the first holds the folder's other files (config, tokenizer) and
    the first `first_mib` MiB of the packed weights (the first call also carries the wheels), each
    further one the next `parts_mib` MiB."""
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / PACKED
        torch.save(quantise(load_file(model_dir / WEIGHTS)), blob)
        data = blob.read_bytes()
    starts = [0, *range(first_mib << 20, len(data), parts_mib << 20), len(data)]
    folders = []
    for i, (start, end) in enumerate(itertools.pairwise(starts), 1):
        folder = prefix.with_name(f"{prefix.name}{i}")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / f"{PACKED}.{i:02d}").write_bytes(data[start:end])
        folders.append(folder)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != WEIGHTS and not f.name.endswith(".partial"):
            shutil.copy2(f, folders[0] / f.name)
    return folders


def unpack(out_dir: Path, parts: list[Path], dtype: torch.dtype = torch.bfloat16) -> Path:
    pieces = sorted((p for part in parts for p in part.glob(f"{PACKED}.*")), key=lambda p: p.name)
    if not pieces:
        raise SystemExit(f"no {PACKED}.NN pieces in {', '.join(map(str, parts))}; pack first, carry every part")
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = out_dir / PACKED
    with open(blob, "wb") as f:
        f.writelines(piece.read_bytes() for piece in pieces)
    packed = torch.load(blob, weights_only=True)
    blob.unlink()
    save_file(dequantise(packed, dtype), out_dir / WEIGHTS, metadata={"format": "pt"})
    for part in parts:
        for f in part.iterdir():
            if f.is_file() and not f.name.startswith(PACKED):
                shutil.copy2(f, out_dir / f.name)
    return out_dir


def check(original: Path, round_trip: Path, n: int) -> None:
    """Refusals of both models on the first n harmful scoring prompts, and their largest
    next-token probability difference, on this CPU in float32."""
    from benchmarks.make_refusing_model import answer, load
    from optimizer.config import FIELDS
    from optimizer.prompts import format_chat, load_prompts, split_prompts

    prompts = split_prompts(load_prompts(None, "harmful")).scoring[:n]
    cap = FIELDS["max_new_tokens"].default
    probs = []
    for name, folder in (("original", original), ("int8 round trip", round_trip)):
        loaded = load(folder)
        result = answer(loaded, prompts, cap)
        print(f"{name:16s} refused {sum(result.refused):2d}/{len(prompts)}", flush=True)
        tokenizer = loaded.tokenizer
        tokenizer.padding_side = "left"
        batch = tokenizer(format_chat(tokenizer, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits = loaded.model(**batch).logits[:, -1].float()
        probs.append(logits.softmax(-1))
    print(f"largest next-token probability difference: {(probs[0] - probs[1]).abs().max().item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("model_dir", type=Path)
    p.add_argument("prefix", type=Path, help="parts are written to PREFIX1, PREFIX2, ...")
    p.add_argument("--parts-mib", type=int, default=56, help="size of each part after the first")
    p.add_argument("--first-mib", type=int, default=38, help="size of the first part's weights")
    p.add_argument("--check", type=int, default=0, help="compare refusals on this many prompts (0: no check)")
    u = sub.add_parser("unpack")
    u.add_argument("out_dir", type=Path)
    u.add_argument("parts", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "pack":
        folders = pack(args.model_dir, args.prefix, args.parts_mib, args.first_mib)
        for folder in folders:
            size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            print(f"{folder}: {size:.1f} MiB")
        if args.check:
            with tempfile.TemporaryDirectory() as tmp:
                check(args.model_dir, unpack(Path(tmp) / "model", folders, torch.float32), args.check)
    else:
        print(unpack(args.out_dir, args.parts))


if __name__ == "__main__":
    main()
