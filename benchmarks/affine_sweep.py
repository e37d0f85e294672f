"""Affine ablation (Marshall et al. 2024, "Refusal in LLMs: an affine function") against our projection,
at fixed kernels and a sweep of weights.

Ours moves each edited output's component along the refusal direction v to zero: y <- y - w v (v^T y).
Harmless text has its own typical level c = E_harmless[v^T y] along v at each site, so the projection
also moves harmless activations by w v c at every position, which is KL spent without removing any
refusal. The affine edit moves the component to the harmless level instead: y <- y - w v (v^T y - c),
i.e. the projection plus a constant w c v (a bias on the output projection). c is measured per site
on the direction split of the harmless prompts (every token position but the first), never on the
held-out prompts that score the edit. Both edits share directions and kernels; refusals on held-out
prompts by the default markers, KL of the first token on held-out harmless prompts.

    python benchmarks/affine_sweep.py [--model DIR] [--prompts 64] [--weights W ...] [--kernels NAME ...] [--global-index L]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, open_sweep
from optimizer.params import build_plan
from optimizer.prompts import format_chat


def harmless_levels(L, texts: list[str], sites, plan) -> dict:
    """Per edited site, the mean over harmless token positions (but the first) of v^T y."""
    sums = {site.module: 0.0 for site in sites}
    count = 0
    handles = []
    for site in sites:
        v = plan.directions[site.component][site.layer].float()
        v = v / v.norm()

        def grab(module, inputs, output, v=v):
            out = output[0] if isinstance(output, tuple) else output
            sums[module] += float((out[0, 1:].float() @ v).sum())

        handles.append(site.module.register_forward_hook(grab))
    try:
        with torch.no_grad():
            for text in texts:
                ids = L.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
                L.model(ids)
                count += ids.shape[1] - 1
    finally:
        for h in handles:
            h.remove()
    return {m: s / count for m, s in sums.items()}


def main() -> None:
    p = arguments([0.2, 0.35, 0.5, 0.7, 0.9, 1.2, 1.5])
    p.add_argument("--global-index", type=float, default=None, help="one direction, this (fractional) layer's")
    a = p.parse_args()
    sweep = open_sweep(a, "affine")
    bench = sweep.bench
    L = bench.loaded
    level_texts = format_chat(L.tokenizer, sweep.splits["harmless"].direction[:64])
    print(f"{sweep.header}; global index {a.global_index}")
    print("| kernel | w | edit | refusals | KL |")
    print("|---|---|---|---|---|")
    sites = list(L.discovery.present())
    for kname in a.kernels:
        levels = None
        for w in a.weights:
            plan, _ = build_plan(sweep.params(kname, w, direction_index=a.global_index), bench.stats)
            if levels is None:  # directions do not depend on the weight
                levels = harmless_levels(L, level_texts, sites, plan)
                print("# harmless levels c per site: " + " ".join(f"{c:+.2f}" for c in levels.values()), flush=True)
            for edit in ("exact", "affine"):
                bench.hooks.apply(plan)
                handles = []
                if edit == "affine":  # the constant part: + w c v on each edited site's output
                    for site in sites:
                        ww = plan.weight_at(site)
                        if ww == 0:
                            continue
                        v = plan.directions[site.component][site.layer].float()
                        shift = ww * levels[site.module] * v / v.norm()

                        def add(module, inputs, output, shift=shift):
                            if isinstance(output, tuple):
                                return (output[0] + shift.to(output[0].dtype),) + output[1:]
                            return output + shift.to(output.dtype)

                        handles.append(site.module.register_forward_hook(add))
                ref, kl = sweep.score()
                bench.hooks.clear()
                for h in handles:
                    h.remove()
                print(f"| {kname} | {w} | {edit} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
