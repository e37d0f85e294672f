"""Choose the batch size by measurement: the fastest per prompt on this device, model and prompts.

The probe is a short greedy generation (prefill + `PROBE_TOKENS` decode steps, the shape of a
trial's work) over the same prompts at each size measured. The search starts at the largest usable
candidate and descends: small batches are the most expensive per prompt (on a GPU, several times
the largest's), so measuring every candidate from the smallest up spent most of the search on sizes
that are never chosen. A size that runs out of memory passes on to the next smaller one. After a
measurement, the next smaller size is measured only while the sizes keep getting faster per prompt:
time per prompt falls with the batch size up to where the device is saturated, so the first smaller
size that is not faster marks the top of that curve, and those below it would be slower still.

Before the first measurement, a warm-up runs the same work (the same tokens, at the size measured
first): a device's first use of a shape pays one-off costs (kernel selection, allocator growth, the
decode step's kernels that a prefill alone never runs), which would otherwise count against it.
Where the prompts allow only one size there is nothing to compare, and no warm-up: that size is
measured once (its time is reported, and running out of memory there is still caught).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from optimizer.errors import UserError
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


def _probe(loaded: LoadedModel, texts: list[str], size: int, packed: bool, on_prompts: Callable[[int], None] | None) -> float:
    """Seconds per prompt of the probe's generation over `texts` in batches of `size` (`packed`: the
    prefill without padding, `optimizer.packing`; `on_prompts(n)` after each batch of n)."""
    _synchronize(loaded)
    start = time.perf_counter()
    generate_and_classify(
        loaded, texts, PROBE_TOKENS, MarkerJudge([]), size, stop_early=False, packed=packed, on_batch=on_prompts
    )
    _synchronize(loaded)
    return (time.perf_counter() - start) / len(texts)


def _plan(loaded: LoadedModel, texts: list[str]) -> tuple[list[int], list[str]]:
    """The candidate sizes these prompts allow, smallest first, and the prompts each size is timed on."""
    candidates = CUDA_CANDIDATES if loaded.device.type == "cuda" else CPU_CANDIDATES
    usable = [c for c in candidates if c <= max(len(texts), candidates[0])]
    return usable, texts[: max(usable)]


def most_prompts_probed(loaded: LoadedModel, texts: list[str]) -> int:
    """Prompts that `measure_batch_sizes` answers at most (the warm-up and every usable size): a
    progress bar's total; the descent usually stops sooner."""
    usable, sample = _plan(loaded, texts)
    return len(sample) * len(usable) + (max(usable) if len(usable) > 1 else 0)


def measure_batch_sizes(
    loaded: LoadedModel, texts: list[str], packed: bool = False, on_prompts: Callable[[int], None] | None = None
) -> dict[int, float]:
    """Seconds per prompt of the probe at each batch size measured, from the largest usable
    candidate down while smaller sizes keep being faster (see the module's docstring); `packed`:
    prefilled as the trials will be, without padding; `on_prompts(n)`: after each batch of n
    prompts answered (a progress bar)."""
    usable, sample = _plan(loaded, texts)
    timings: dict[int, float] = {}
    for size in reversed(usable):
        try:
            if not timings and len(usable) > 1:  # one size has nothing to be compared with
                _probe(loaded, sample[:size], size, packed, on_prompts)  # warm-up: one batch of the measurement's work
            timings[size] = _probe(loaded, sample, size, packed, on_prompts)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not _out_of_memory(e):
                raise
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        larger = [s for s in timings if s > size]
        if larger and timings[size] >= timings[min(larger)]:
            break
    if not timings:
        raise UserError(
            f"every batch size from {usable[-1]} down to {usable[0]} ran out of memory on {loaded.device}; "
            f"pass a smaller one with --batch-size N (e.g. --batch-size {max(1, usable[0] // 2)})"
        )
    return timings


def best_batch_size(timings: dict[int, float]) -> int:
    return min(timings, key=timings.__getitem__)
