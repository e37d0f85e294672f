"""Contrastive PCA against difference of means at equal layer weights, on held-out prompts.

The quality benchmark compares whole studies, where the sampler's luck mixes with the method.
This holds the ablation kernel fixed and changes only the direction: difference of means, and
contrastive PCA at several alphas (with and without projecting out the harmless mean), each
scored on the bundled held-out prompts (refusals k/N and first-token KL). It shows whether, and
at which alpha, contrastive directions buy a better refusal/KL trade-off on this model.

    python benchmarks/cpca_vs_meandiff.py [--model DIR] [--heldout-prompts 32] [--max-new-tokens 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.config import Settings
from optimizer.judges import MarkerJudge
from optimizer.params import Kernel, TrialParams, build_plan
from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.scoring import first_token_logprobs, generate_and_classify, kl_divergence
from optimizer.workbench import prepare, resolve

ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--direction-prompts", type=int, default=64)
    parser.add_argument("--heldout-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.8, 1.2], help="peak weights of the fixed kernels")
    args = parser.parse_args()
    console = Console(stderr=True)
    workdir = Path("/tmp/cpca-vs-meandiff")
    settings = Settings(
        model=args.model,
        study="cpca",
        studies_dir=str(workdir),
        direction_prompts=args.direction_prompts,
        scoring_prompts=8,
        max_new_tokens=args.max_new_tokens,
        device="cpu",
        dtype="float32",
    )
    bench = prepare(resolve(settings, console), settings.cache_path())
    texts = {
        k: format_chat(bench.loaded.tokenizer, split_prompts(load_prompts(None, k)).heldout[: args.heldout_prompts])
        for k in ("harmful", "harmless")
    }
    markers, bs, cap = settings.refusal_markers, bench.batch_size, args.max_new_tokens
    base_logprobs = first_token_logprobs(bench.loaded, texts["harmless"], bs)
    base = generate_and_classify(bench.loaded, texts["harmful"], cap, MarkerJudge(markers, echo_aware=False), bs).count
    n = len(texts["harmful"])
    last = bench.loaded.n_layers - 1
    print(f"# {Path(bench.loaded.source).name}: held-out {n} prompts per set, cap {cap} tokens; unedited refusals {base}/{n}")
    print("| kernel peak weight | direction | projected | held-out refusals | KL | s |")
    print("|---|---|---|---|---|---|")
    for weight in args.weights:
        kernel = Kernel(peak_weight=weight, peak_layer=0.6 * last, min_ratio=0.3, falloff=0.45 * last)
        options = [("mean_diff", None, False), ("mean_diff", None, True)]
        options += [("contrastive", a, p) for a in ALPHAS for p in (False, True)]
        for method, alpha, projected in options:
            start = time.perf_counter()
            params = TrialParams(method, alpha, None, {"attn": kernel, "mlp": kernel})
            plan, info = build_plan(params, bench.stats, projected)
            bench.hooks.apply(plan)
            kl = kl_divergence(base_logprobs, first_token_logprobs(bench.loaded, texts["harmless"], bs))
            refused = generate_and_classify(bench.loaded, texts["harmful"], cap, MarkerJudge(markers, echo_aware=False), bs).count
            bench.hooks.clear()
            label = (
                "mean-diff"
                if method == "mean_diff"
                else f"cPCA a={alpha}" + (f" ({len(info.fallback_layers)} fallback)" if info.fallback_layers else "")
            )
            print(
                f"| {weight} | {label} | {'yes' if projected else 'no'} | {refused}/{n} | {kl:.4f} | "
                f"{time.perf_counter() - start:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
