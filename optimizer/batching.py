"""Choose the batch size by measurement: the fastest per prompt on this device, model and prompts."""

from __future__ import annotations

import time

import torch

from optimizer.judges import MarkerJudge
from optimizer.model import LoadedModel
from optimizer.scoring import generate_and_classify

CPU_CANDIDATES = (8, 16, 32, 64)
CUDA_CANDIDATES = (16, 32, 64, 128, 256)
PROBE_TOKENS = 4


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _synchronize(loaded: LoadedModel) -> None:
    """Wait for every GPU that holds some of the model (all of them where a device map spreads it)."""
    for device in loaded.devices():
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def measure_batch_sizes(loaded: LoadedModel, texts: list[str]) -> dict[int, float]:
    """Seconds per prompt of a short greedy generation (prefill + a few decode steps, the shape of
    a trial's work) at each candidate batch size; stops at the first size that runs out of memory."""
    candidates = CUDA_CANDIDATES if loaded.device.type == "cuda" else CPU_CANDIDATES
    usable = [c for c in candidates if c <= max(len(texts), candidates[0])]
    sample = texts[: max(usable)]
    generate_and_classify(loaded, sample[: usable[0]], 1, MarkerJudge([]), usable[0])  # warm-up
    timings: dict[int, float] = {}
    for size in usable:
        try:
            _synchronize(loaded)
            start = time.perf_counter()
            generate_and_classify(loaded, sample, PROBE_TOKENS, MarkerJudge([]), size, stop_early=False)
            _synchronize(loaded)
            timings[size] = (time.perf_counter() - start) / len(sample)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not _out_of_memory(e):
                raise
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            break
    return timings


def best_batch_size(timings: dict[int, float]) -> int:
    return min(timings, key=timings.__getitem__)
