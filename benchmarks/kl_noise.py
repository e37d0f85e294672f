"""How noisy a study's KL is: per-prompt first-token KL of fixed edits over every harmless prompt
of the scoring and held-out splits, and the relative standard error of its mean over n prompts.

The same model, kernel and directions (the defaults' discriminant, rho 0.9, projected) as the other
fixed-kernel sweeps (`fixed_kernels.py`).

    python benchmarks/kl_noise.py [--weights W ...] [--kernels NAME ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, open_sweep
from optimizer.params import build_plan
from optimizer.prompts import format_chat
from optimizer.scoring import first_token_logprobs


def main() -> None:
    a = arguments([0.5, 0.7, 1.0], kernels=["p.75 f.25"]).parse_args()
    sweep = open_sweep(a, "lda")
    bench, loaded, bs = sweep.bench, sweep.bench.loaded, sweep.bench.batch_size
    split = sweep.splits["harmless"]
    texts = format_chat(loaded.tokenizer, split.heldout + split.scoring)
    base = first_token_logprobs(loaded, texts, bs)
    print(f"# {Path(a.model).name}: {len(texts)} harmless prompts (held-out and scoring splits)")
    print("| kernel | w | mean KL | per-prompt sd / mean | rel. s.e. at 64 | at 128 | top-5 share |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for kname in a.kernels:
        for w in a.weights:
            plan, _ = build_plan(sweep.params(kname, w, "discriminant", shrinkage=0.9), bench.stats, projected=1.0)
            with sweep.hooked(plan):
                logprobs = first_token_logprobs(loaded, texts, bs)
            per = (base.exp() * (base - logprobs)).sum(-1)
            ratio = float(per.std() / per.mean())
            ratios.append(ratio)
            top = float(per.topk(5).values.sum() / per.sum())
            print(f"| {kname} | {w} | {per.mean():.4f} | {ratio:.2f} | {ratio / 8:.3f} | {ratio / 128**0.5:.3f} | {top:.2f} |")
    print(f"kl_noise_rel_se64={max(ratios) / 8:.3f} prompts={len(texts)} model={Path(a.model).name}")


if __name__ == "__main__":
    main()
