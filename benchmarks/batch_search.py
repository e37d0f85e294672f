"""Cost of choosing the batch size: every candidate smallest first (the rule before 8f5b403) against
the descent from the largest (optimizer/batching.py), on one model and device, in one run.

    python benchmarks/batch_search.py [--model DIR] [--device cpu|cuda] [--prompts 64]

Both rules time the same probe (prefill + PROBE_TOKENS decode steps over the scoring prompts). The
model first answers a few prompts, as it has by the time a study measures (it has loaded and found
its sites), so that neither rule is charged for the process's very first forward pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.batching import CPU_CANDIDATES, CUDA_CANDIDATES, PROBE_TOKENS, _probe, best_batch_size, measure_batch_sizes
from optimizer.judges import MarkerJudge
from optimizer.model import load_model
from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.scoring import generate_and_classify

DEFAULT_MODEL = Path.home() / ".cache/optimizer/models/qwen2.5-coder-0.5b-instruct"


def every_size_ascending(loaded, texts: list[str]) -> dict[int, float]:
    """The rule before the descent: a 1-token warm-up at the smallest size, then every usable size."""
    candidates = CUDA_CANDIDATES if loaded.device.type == "cuda" else CPU_CANDIDATES
    usable = [c for c in candidates if c <= max(len(texts), candidates[0])]
    sample = texts[: max(usable)]
    generate_and_classify(loaded, sample[: usable[0]], 1, MarkerJudge([]), usable[0])
    return {size: _probe(loaded, sample, size) for size in usable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompts", type=int, default=64, help="scoring prompts (the probe's texts)")
    args = parser.parse_args()
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    loaded = load_model(str(args.model), args.device, dtype)
    texts = format_chat(loaded.tokenizer, split_prompts(load_prompts(None, "harmful")).scoring[: args.prompts])
    generate_and_classify(loaded, texts[:4], 2, MarkerJudge([]), 4)
    print(f"# {args.model.name}, {args.device} {dtype}, {len(texts)} prompts, probe {PROBE_TOKENS} tokens")
    print("| rule | s | chosen | ms per prompt by size |")
    print("|---|---|---|---|")
    seconds = {}
    for name, rule in (("every size, smallest first", every_size_ascending), ("descent from the largest", measure_batch_sizes)):
        start = time.perf_counter()
        timings = rule(loaded, texts)
        seconds[name] = time.perf_counter() - start
        table = ", ".join(f"{size}: {1000 * timings[size]:.0f}" for size in sorted(timings))
        print(f"| {name} | {seconds[name]:.1f} | {best_batch_size(timings)} | {table} |", flush=True)
    before, after = seconds.values()
    print(
        f"batch_search_before_s={before:.1f} batch_search_after_s={after:.1f} speedup={before / after:.2f} device={args.device}"
    )


if __name__ == "__main__":
    main()
