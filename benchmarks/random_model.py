"""Models with a real architecture and random weights, for timing on machines that hold no checkpoint.

The GPU machines lent to this project reach no model hub and take at most 64 MiB of files per call,
so a timing there uses the shapes of a real model (its config.json) and its tokenizer, with weights
drawn at random on the device. Random weights never emit EOS or a refusal marker, so every
sequence runs to the length cap: timings are those of the slowest possible trial.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "generation_config.json",
)


def random_causal_lm(config_file: Path, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """A causal LM of `config_file`'s architecture, allocated and initialised on `device` directly
    (a 32B model never exists on the host)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_file)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def model_folder(config_file: Path, tokenizer_dir: Path, out_dir: Path) -> Path:
    """A folder with `config_file` as config.json and the tokenizer of `tokenizer_dir`, no weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(Path(config_file).read_text())
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir


def save_random_model(config_file: Path, tokenizer_dir: Path, out_dir: Path, dtype: torch.dtype, device: str) -> Path:
    """A complete model folder (random weights saved as safetensors) that any tool can load."""
    model_folder(config_file, tokenizer_dir, out_dir)
    model = random_causal_lm(out_dir / "config.json", dtype, device)
    model.save_pretrained(out_dir)
    del model
    return out_dir


@contextlib.contextmanager
def random_weights_in_optimizer(dtype_override: torch.dtype | None = None):
    """Within this block, `optimizer` builds every model it loads from the folder's config.json with
    random weights on the target device, instead of reading a checkpoint. Yields a dict that gets
    the seconds spent building."""
    import optimizer.model as optimizer_model

    original = optimizer_model._from_pretrained
    record: dict[str, float] = {}

    def build(location, dtype, device, kwargs, model_kwargs):
        start = time.perf_counter()
        model = random_causal_lm(Path(location) / "config.json", dtype_override or dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        record["build_s"] = time.perf_counter() - start
        return model

    optimizer_model._from_pretrained = build
    try:
        yield record
    finally:
        optimizer_model._from_pretrained = original
