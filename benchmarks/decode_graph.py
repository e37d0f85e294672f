"""Refusal generation of one trial: eager decoding against decode steps replayed from a CUDA graph.

    python benchmarks/decode_graph.py [--model DIR] [--random-weights] [--prompts 64] [--max-new-tokens 16]

Same model, hooks, plan and prompts for both paths; the graph path's first step is compared with the
eager one (relative difference of the logits) and the generated tokens are compared row by row.
Without CUDA the fixed-buffer step runs eagerly (no capture), which checks correctness only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.random_model import random_weights_in_optimizer
from optimizer.ablation import AblationHooks, AblationPlan
from optimizer.graph_decode import GraphDecoder
from optimizer.judges import MarkerJudge
from optimizer.model import load_model
from optimizer.prompts import format_chat, load_prompts
from optimizer.scoring import generate_and_classify, graph_error, graph_length


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--random-weights", action="store_true", help="the folder's config and tokenizer, random weights")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.model is None:
        from optimizer.fetch import ensure_model_folder

        args.model = ensure_model_folder()
    building = random_weights_in_optimizer() if args.random_weights else contextlib.nullcontext()
    with building:
        loaded = load_model(str(args.model), args.device, "auto")
    texts = format_chat(loaded.tokenizer, load_prompts(None, "harmful")[: args.prompts])
    g = torch.Generator().manual_seed(0)
    plan = AblationPlan(
        {
            c: torch.nn.functional.normalize(torch.randn(loaded.n_layers, loaded.hidden_size, generator=g), dim=-1)
            for c in ("attn", "mlp")
        },
        {c: [0.8] * loaded.n_layers for c in ("attn", "mlp")},
    )
    hooks = AblationHooks(loaded, static=True)
    hooks.apply(plan)
    batch = min(args.batch_size, len(texts))
    graph = GraphDecoder(loaded, batch, graph_length(loaded, texts, args.max_new_tokens), capture=loaded.device.type == "cuda")
    start = time.perf_counter()
    error = graph_error(loaded, graph, texts)
    setup = time.perf_counter() - start
    run = lambda graph: generate_and_classify(
        loaded, texts, args.max_new_tokens, MarkerJudge([]), batch, stop_early=False, graph=graph
    )
    eager_s, eager = timed(lambda: run(None))
    graph_s, fixed = timed(lambda: run(graph))
    same = sum(a == b for a, b in zip(eager.responses, fixed.responses))
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu"
    print(
        f"# {args.model.name}{' (random weights)' if args.random_weights else ''}, "
        f"{device} {str(loaded.dtype).removeprefix('torch.')}, "
        f"{len(texts)} prompts, batch {batch}, {args.max_new_tokens} new tokens, every row to the cap, hooks on every layer"
    )
    print("| decoding | s (median of 3) | tokens |")
    print("|---|---|---|")
    print(f"| eager (transformers forward per step, dynamic cache) | {eager_s:.3f} | {eager.tokens_generated} |")
    print(
        f"| fixed buffers, {'CUDA graph replay' if graph._graph is not None else 'eager step (no CUDA)'} | "
        f"{graph_s:.3f} | {fixed.tokens_generated} |"
    )
    print(
        f"# first step vs eager: relative difference {error:.2e}; identical responses {same}/{len(texts)}; "
        f"capture and check {setup:.2f} s"
    )
    print(
        f"decode_graph_speedup={eager_s / graph_s:.2f} eager_s={eager_s:.3f} graph_s={graph_s:.3f} error={error:.2e} "
        f"device={device.replace(' ', '_')}"
    )


if __name__ == "__main__":
    main()
