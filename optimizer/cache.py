"""The study's one-time computations on disk: tensors in safetensors, written atomically, verified on load.

A cache entry is two files: `<name>.safetensors` and `<name>.json`. The JSON holds the
fingerprint of what the tensors were computed from, a sha256 of the tensor file, and any small
values (such as baseline refusals). It is written last, so a crash mid-write leaves no valid entry.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from optimizer.fetch import sha256_of


class CacheMiss(Exception):
    """The entry is absent, stale or damaged; the message says which, for the log."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_entry(directory: Path, name: str, fingerprint: str, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    tensor_path = directory / f"{name}.safetensors"
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(tensor_path, lambda tmp: save_file(cpu, tmp))
    meta = {"fingerprint": fingerprint, "sha256": sha256_of(tensor_path), "values": values}
    _atomic_write(directory / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))


def load_entry(
    directory: Path, name: str, fingerprint: str, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an entry or raise CacheMiss saying why it cannot be used."""
    meta_path, tensor_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not meta_path.exists() or not tensor_path.exists():
        raise CacheMiss(f"no cached {name} yet")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CacheMiss(f"cached {name} metadata is unreadable") from None
    if meta.get("fingerprint") != fingerprint:
        raise CacheMiss(
            f"cached {name} was computed for other settings or another model "
            f"(fingerprint {meta.get('fingerprint')} != {fingerprint})"
        )
    if meta.get("sha256") != sha256_of(tensor_path):
        raise CacheMiss(f"cached {name} is damaged (checksum mismatch)")
    try:
        tensors = load_file(str(tensor_path), device=str(device))
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for damaged files)
        raise CacheMiss(f"cached {name} cannot be read ({e})") from None
    return tensors, meta.get("values", {})
