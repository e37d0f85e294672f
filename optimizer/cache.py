"""The study's one-time computations on disk: tensors in safetensors, written atomically, verified on load.

A cache entry is two files: `<name>.safetensors` and `<name>.json`. The JSON holds the
fingerprint of what the tensors were computed from, a sha256 of the tensor file, and any small
values (such as baseline refusals). Both files are written in full under temporary names and then
renamed into place, the JSON last: a write that fails (full disk, file-size limit) leaves the previous
entry as it was, and a crash between the two renames leaves new tensors under the old JSON, whose
checksum rejects them (the entry is recomputed).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from optimizer.errors import UserError
from optimizer.fetch import sha256_of


class CacheMiss(Exception):
    """The entry is absent, stale or damaged; the message says which, for the log."""


# what a failed write raises: the OS's error, or safetensors' own type wrapping it
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, SafetensorError)
# the OS's reasons that a write cannot go on: full disk, file-size limit, quota, read-only or forbidden folder
NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def is_write_failure(error: BaseException) -> bool:
    """A write refused by the system (not a bug, not a missing input): the user's to fix."""
    if isinstance(error, OSError):
        return error.errno in NO_ROOM
    return isinstance(error, SafetensorError) and "I/O error" in str(error)


@contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` (same file system, so that renaming it over `path` is atomic),
    removed on the way out unless it was renamed."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def write_error(error: BaseException) -> str:
    """The OS's words for a failed write ("No space left on device", "File too large", ...)."""
    return getattr(error, "strerror", None) or str(error).strip().splitlines()[-1]


def save_entry(directory: Path, name: str, fingerprint: str, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    """Write an entry: both files in full under temporary names first, then renamed into place, so a
    write that fails (a full disk, a file-size limit, a folder that is not writable) leaves the
    previous entry as it was and stops the run with an error naming the folder."""
    tensor_path, meta_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _temporary(tensor_path) as tmp_tensors, _temporary(meta_path) as tmp_meta:
            save_file(cpu, str(tmp_tensors))
            meta = {"fingerprint": fingerprint, "sha256": sha256_of(tmp_tensors), "values": values}
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_tensors, tensor_path)
            os.replace(tmp_meta, meta_path)  # last: until then the old metadata reject the new tensors
    except WRITE_ERRORS as e:
        if not is_write_failure(e):
            raise
        raise UserError(
            f"cannot write the cache in {directory} ({write_error(e)}); the previous cache there is unchanged: "
            "free space in that folder, or give --cache-dir a writable folder with room"
        ) from None


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
