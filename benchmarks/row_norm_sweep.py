"""Heretic's row-normalised edit against our exact projection, at fixed kernels and a sweep of weights.

Heretic 1.4 edits each output projection W (d_out x d_in) with `row_normalization = "full"`: it
normalises W's rows (one per output dimension) to unit length, removes w v (v^T W_n) from the
normalised matrix, normalises the rows again and restores their original norms (then stores a
rank-3 SVD of the change as a LoRA adapter; this script applies the exact matrix instead). As an
edit of the output y = W x that is y <- s * (y - w (D v)(v^T D^-1 y)), D the row norms, s each
row's renormalising factor: an oblique projection and a per-dimension rescale, where ours is
y <- y - w v (v^T y). The question: is heretic's edit a better refusal/KL trade-off on the models
where its fronts lead ours? Both edits share the directions (mean difference per layer, or one
layer's with --global-index) and the kernels; refusals on held-out prompts by the default markers,
KL of the first token on held-out harmless prompts.

    python benchmarks/row_norm_sweep.py [--model DIR] [--prompts 64] [--weights W ...] [--kernels NAME ...] [--global-index L]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.config import Settings
from optimizer.judges import MarkerJudge
from optimizer.params import Kernel, TrialParams, build_plan
from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.scoring import first_token_logprobs, generate_and_classify, kl_divergence
from optimizer.workbench import prepare, resolve

KERNELS = {"p.6 f.45": (0.6, 0.45), "p.75 f.25": (0.75, 0.25), "p.5 f1": (0.5, 1.0)}  # peak, falloff (x last layer)


def rownorm(W: torch.Tensor, v: torch.Tensor, w: float) -> torch.Tensor:
    """Heretic's "full" row normalisation, exactly (its own code keeps a rank-3 SVD of the change)."""
    norms = W.norm(dim=1, keepdim=True)
    Wn = W / norms
    u = v @ Wn
    Wn2 = Wn - w * torch.outer(v, u)
    return Wn2 / Wn2.norm(dim=1, keepdim=True) * norms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(Path.home() / ".cache/optimizer/models/smollm2-135m-refusing"))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--cap", type=int, default=12)
    p.add_argument("--weights", type=float, nargs="+", default=[0.2, 0.35, 0.5, 0.7, 0.9, 1.2, 1.5])
    p.add_argument("--global-index", type=float, default=None, help="one direction, this (fractional) layer's")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    a = p.parse_args()
    console = Console(stderr=True)
    s = Settings(
        model=a.model,
        study="rn",
        studies_dir="/tmp/row-norm-sweep",
        direction_prompts=64,
        scoring_prompts=8,
        max_new_tokens=a.cap,
        device="cpu",
        dtype="float32",
        batch_size=32,
    )
    bench = prepare(resolve(s, console), s.cache_path())
    L = bench.loaded
    heldout = {k: split_prompts(load_prompts(None, k)).heldout[: a.prompts] for k in ("harmful", "harmless")}
    texts = {k: format_chat(L.tokenizer, prompts) for k, prompts in heldout.items()}
    bs, judge = bench.batch_size, MarkerJudge(s.refusal_markers, echo_aware=False)
    base_lp = first_token_logprobs(L, texts["harmless"], bs)
    base = generate_and_classify(L, texts["harmful"], a.cap, judge, bs).count
    last = L.n_layers - 1
    print(
        f"# {Path(a.model).name}: {a.prompts} held-out prompts per set, cap {a.cap}; unedited {base}/{a.prompts}; "
        f"global index {a.global_index}"
    )
    print("| kernel | w | edit | refusals | KL |")
    print("|---|---|---|---|---|")
    sites = list(L.discovery.present())
    for kname in a.kernels:
        pk, fo = KERNELS[kname]
        for w in a.weights:
            kern = Kernel(peak_weight=w, peak_layer=pk * last, min_ratio=0.3, falloff=fo * last)
            params = TrialParams("mean_diff", None, a.global_index, {"attn": kern, "mlp": kern})
            plan, _ = build_plan(params, bench.stats)
            for edit in ("exact", "rownorm"):
                saved = {}
                if edit == "exact":
                    bench.hooks.apply(plan)
                else:
                    with torch.no_grad():
                        for site in sites:
                            ww = plan.weight_at(site)
                            if ww == 0:
                                continue
                            v = plan.directions[site.component][site.layer].float()
                            v = v / v.norm()
                            W = site.module.weight
                            saved[site.module] = W.detach().clone()
                            W.copy_(rownorm(W.float(), v, ww).to(W.dtype))
                kl = kl_divergence(base_lp, first_token_logprobs(L, texts["harmless"], bs))
                ref = generate_and_classify(L, texts["harmful"], a.cap, judge, bs).count
                if edit == "exact":
                    bench.hooks.clear()
                else:
                    with torch.no_grad():
                        for m, W in saved.items():
                            m.weight.copy_(W)
                print(f"| {kname} | {w} | {edit} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
