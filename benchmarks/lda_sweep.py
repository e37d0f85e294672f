"""Shrinkage-LDA directions against the mean difference, at fixed kernels and a sweep of weights.

Ablating a unit direction v moves every harmless activation x by w v (v^T x): the KL an edit costs
grows with how much harmless text varies along v, the refusals it removes with how far the harmful
mean sits from the harmless one along v. The mean difference r ignores the first. Fisher's linear
discriminant v ~ Sigma_w^-1 r (Sigma_w the within-set covariance, harmful about its own mean plus
harmless about its own) is the direction along which the sets are furthest apart in units of that
variation. With 64 prompts per set Sigma_w is rank-deficient, so it is shrunk towards a multiple of
the identity: Sigma_rho = (1 - rho) Sigma_w + rho (tr Sigma_w / d) I; rho = 1 is the mean difference.
Everything lives in the cached low-rank basis Q (r = Q c, Sigma_w = Q (K_b - c c^T + K_g) Q^T), so a
direction costs one m x m solve. Per-layer directions; refusals on held-out prompts by the default
markers, KL of the first token on held-out harmless prompts.

    python benchmarks/lda_sweep.py [--model DIR] [--prompts 64] [--weights W ...] [--rhos R ...] [--kernels NAME ...]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.config import Settings
from optimizer.directions import ContrastiveStats
from optimizer.judges import MarkerJudge
from optimizer.params import Kernel, TrialParams, build_plan
from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.scoring import first_token_logprobs, generate_and_classify, kl_divergence
from optimizer.workbench import prepare, resolve

KERNELS = {"p.6 f.45": (0.6, 0.45), "p.75 f.25": (0.75, 0.25), "p.5 f1": (0.5, 1.0)}  # peak, falloff (x last layer)


def lda_directions(stats: ContrastiveStats, rho: float) -> torch.Tensor:
    """(L, d) unit shrinkage-LDA directions, oriented along r."""
    c = stats.mean_diff_coords  # (L, k)
    within = stats.gram_harmful - torch.einsum("li,lj->lij", c, c) + stats.gram_harmless
    d = stats.mean_diff.shape[1]
    tau = torch.diagonal(within, dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(within.shape[-1], dtype=within.dtype)
    shrunk = (1 - rho) * within + rho * tau[:, None, None] * eye
    small = torch.linalg.solve(shrunk, c.unsqueeze(-1))  # (L, k, 1)
    lifted = stats.lift(slice(None), small).squeeze(-1)
    v = torch.nn.functional.normalize(lifted, dim=-1)
    return v * torch.sign((v * stats.mean_diff).sum(-1, keepdim=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(Path.home() / ".cache/optimizer/models/smollm2-135m-refusing"))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--cap", type=int, default=12)
    p.add_argument("--weights", type=float, nargs="+", default=[0.35, 0.5, 0.7, 0.9, 1.2])
    p.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.1, 0.01])
    p.add_argument("--kernels", nargs="+", default=["p.75 f.25"], choices=list(KERNELS))
    a = p.parse_args()
    console = Console(stderr=True)
    s = Settings(
        model=a.model,
        study="lda",
        studies_dir="/tmp/lda-sweep",
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
    stats = bench.stats.to("cpu")
    lda = {rho: lda_directions(stats, rho) for rho in a.rhos}
    unit_r = torch.nn.functional.normalize(stats.mean_diff, dim=-1)
    print(f"# {Path(a.model).name}: {a.prompts} held-out prompts per set, cap {a.cap}; unedited {base}/{a.prompts}")
    for rho, v in lda.items():
        print(f"# rho {rho}: cos with r per layer " + " ".join(f"{x:.2f}" for x in (v * unit_r).sum(-1).tolist()))
    print("| kernel | w | direction | refusals | KL |")
    print("|---|---|---|---|---|")
    for kname in a.kernels:
        pk, fo = KERNELS[kname]
        for w in a.weights:
            kern = Kernel(peak_weight=w, peak_layer=pk * last, min_ratio=0.3, falloff=fo * last)
            plan, _ = build_plan(TrialParams("mean_diff", None, None, {"attn": kern, "mlp": kern}), bench.stats)
            for name in ["mean-diff"] + [f"lda rho {rho}" for rho in a.rhos]:
                if name != "mean-diff":
                    v = lda[float(name.split()[-1])].to(plan.directions["attn"])
                    plan = replace(plan, directions={comp: v for comp in plan.directions})
                bench.hooks.apply(plan)
                kl = kl_divergence(base_lp, first_token_logprobs(L, texts["harmless"], bs))
                ref = generate_and_classify(L, texts["harmful"], a.cap, judge, bs).count
                bench.hooks.clear()
                print(f"| {kname} | {w} | {name} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
