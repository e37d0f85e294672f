"""One-time cost of a study's direction statistics, before and after the residual pass and
`--refused-directions` were made to prefill as the scoring paths prefill (2026-11-27).

    python benchmarks/direction_cost.py [--model DIR] [--direction-prompts 64] [--max-new-tokens 16]
                                        [--batch-size 32] [--device cpu|cuda]
                                        [--random-weights [--init-range X] [--markers a,b,c]]

On one loaded model (default: the bundled Qwen2.5-Coder-0.5B-Instruct; float32 on the CPU, bfloat16
on CUDA; `--random-weights`: the folder's architecture with random weights, for a GPU machine with no
checkpoint, where `--init-range 0.3 --markers q,z,x` gives the filter varied verdicts), the
two ways a study computes the residuals its statistics come from, each the old way and the new:

- every direction prompt (`--no-refused-directions`): before, each batch forwarded whole, left-padded,
  the system prompt in every row (the pass as it was, written out here as the reference); after,
  `collect_residuals` on the study's fast paths (shared prefix once, prompts of similar length
  together, packed linears and the packed prefill where they check out);
- `--refused-directions` (the default): before, the unedited model answered the direction prompts on
  the plain path and then the kept prompts went through the reference pass; after,
  `refused_direction_residuals` on the fast paths, the residuals taken in the prefill of the answers
  (on CUDA, the answers decoded through a CUDA graph of their own where the study captures one).

Every "before" runs first, then the fast paths are chosen (their own cost is printed apart: a study
pays it for its trials anyway), then every "after". Residuals are compared with the reference (the
largest relative difference of one prompt's residual at one layer), and the filter's verdicts
before and after must agree. Last line machine-readable:
`direction_cost_before_s=<a> direction_cost_after_s=<b> speedup=<x> device=<d>` (for
`--refused-directions`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from rich.console import Console

    from optimizer.config import Settings
    from optimizer.residuals import collect_residuals, tokenize
    from optimizer.scoring import generate_and_classify
    from optimizer.workbench import choose_fast_paths, cpu_fast_paths, load_judge, refused_direction_residuals, resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the bundled Qwen2.5-Coder-0.5B-Instruct)")
    parser.add_argument("--direction-prompts", type=int, default=64, help="per set")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--random-weights", action="store_true", help="same architecture and tokenizer, random weights")
    parser.add_argument("--init-range", type=float, help="with --random-weights: the weights' standard deviation")
    parser.add_argument("--markers", type=lambda text: [m for m in text.split(",") if m], help="refusal markers (default: ours)")
    args = parser.parse_args()
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.random_weights:
        from benchmarks.random_model import save_random_model
        from optimizer.fetch import ensure_model_folder

        source = args.model or ensure_model_folder()
        workdir = Path(tempfile.mkdtemp(prefix="direction-cost-model-"))
        config = source / "config.json"
        if args.init_range is not None:
            config = workdir / "random-config.json"
            config.write_text(
                json.dumps({**json.loads((source / "config.json").read_text()), "initializer_range": args.init_range})
            )
        torch.manual_seed(0)
        args.model = save_random_model(config, source, workdir / "random-model", getattr(torch, dtype), args.device)

    settings = Settings(
        study="direction-cost", studies_dir=str(Path(tempfile.mkdtemp(prefix="direction-cost-"))),
        direction_prompts=args.direction_prompts, scoring_prompts=32, max_new_tokens=args.max_new_tokens,
        device=args.device, dtype=dtype, response_prefix="", **({"model": str(args.model)} if args.model else {}),
        **({"refusal_markers": args.markers} if args.markers else {}),
    )  # fmt: skip
    spec = resolve(settings, Console(file=io.StringIO()))
    loaded, texts, bs = spec.loaded, spec.texts, args.batch_size
    judge = load_judge(settings, loaded)
    harmful, harmless = texts.direction_harmful, texts.direction_harmless
    raw_b, raw_g = texts.direction_prompts

    synchronize = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def reference(prompts: list[str]) -> torch.Tensor:
        """The residual pass as it was: each batch forwarded whole, left-padded."""
        captured: list[torch.Tensor] = []
        keep = lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out)[:, -1].float())
        handles = [layer.register_forward_hook(keep) for layer in loaded.layers]
        per_batch = []
        for start in range(0, len(prompts), bs):
            captured.clear()
            loaded.model(**tokenize(loaded, prompts[start : start + bs]), logits_to_keep=1, use_cache=False)
            per_batch.append(torch.stack(captured))
        for handle in handles:
            handle.remove()
        return torch.cat(per_batch, dim=1)

    def timed(work):
        synchronize()
        start = time.perf_counter()
        result = work()
        synchronize()
        return time.perf_counter() - start, result

    def worst(got: torch.Tensor, want: torch.Tensor) -> float:
        return float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max())

    reference(harmful[:2])  # warm-up
    # before
    all_before_s, (ref_b, ref_g) = timed(lambda: (reference(harmful), reference(harmless)))

    def old_filter():
        verdicts = [
            generate_and_classify(loaded, t, args.max_new_tokens, judge, bs, r).refused
            for t, r in ((harmful, raw_b), (harmless, raw_g))
        ]
        kept_b = [t for t, refused in zip(harmful, verdicts[0]) if refused]
        kept_g = [t for t, refused in zip(harmless, verdicts[1]) if not refused]
        return verdicts, reference(kept_b), reference(kept_g)

    filter_before_s, (verdicts, _, _) = timed(old_filter)
    # after
    paths_s, (paths, _hooks) = timed(lambda: choose_fast_paths(spec, bs, cpu_fast_paths(spec)))
    all_after_s, (new_b, new_g) = timed(
        lambda: (collect_residuals(loaded, harmful, bs, packed=paths.packed_prefill),
                 collect_residuals(loaded, harmless, bs, packed=paths.packed_prefill))
    )  # fmt: skip
    filter_after_s, (kept_b, kept_g) = timed(lambda: refused_direction_residuals(spec, judge, bs, paths))
    keep_b, keep_g = torch.tensor(verdicts[0]), ~torch.tensor(verdicts[1])
    same_verdicts = int(keep_b.sum()) == kept_b.shape[1] and int(keep_g.sum()) == kept_g.shape[1]
    # the blocks' outputs (the capture's last entry, the decoder's output after its final norm, has no reference here)
    filtered_error = float("nan")
    if same_verdicts:
        filtered_error = max(worst(kept_b[:-1], ref_b[:, keep_b]), worst(kept_g[:-1], ref_g[:, keep_g]))

    device_name = torch.cuda.get_device_name() if loaded.device.type == "cuda" else platform.processor() or "cpu"
    weights = " (random weights)" if args.random_weights else ""
    print(
        f"# {loaded.source}{weights}: {args.direction_prompts} + {args.direction_prompts} direction prompts, batch {bs}, "
        f"{args.max_new_tokens} new tokens; {device_name}, {dtype}, {torch.get_num_threads()} threads"
    )
    print(
        f"# fast paths: {paths.packed_linears} packed linear weights, packed prefill {paths.packed_prefill}, "
        f"decode graph {paths.graph is not None} ({paths_s:.1f} s)"
    )
    print(f"# --refused-directions kept {int(keep_b.sum())} harmful and {int(keep_g.sum())} harmless prompts")
    print("| residuals for the statistics | before s | after s | speedup | largest relative difference |")
    print("|---|---|---|---|---|")
    all_error = max(worst(new_b[:-1], ref_b), worst(new_g[:-1], ref_g))
    all_ratio = all_before_s / all_after_s
    print(f"| every direction prompt | {all_before_s:.1f} | {all_after_s:.1f} | {all_ratio:.2f}x | {all_error:.1e} |")
    print(
        f"| --refused-directions (answers + residuals) | {filter_before_s:.1f} | {filter_after_s:.1f} | "
        f"{filter_before_s / filter_after_s:.2f}x | {filtered_error:.1e} (same verdicts: {same_verdicts}) |"
    )
    print(
        f"direction_cost_before_s={filter_before_s:.1f} direction_cost_after_s={filter_after_s:.1f} "
        f"speedup={filter_before_s / filter_after_s:.2f} device={device_name.replace(' ', '_')}"
    )


if __name__ == "__main__":
    main()
