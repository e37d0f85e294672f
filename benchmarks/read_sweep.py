"""Read-side ablation against the usual write-side one, at fixed kernels and a sweep of weights.

Directional ablation removes r from what each block *writes* to the residual stream (attention
output, MLP down projection): downstream, nothing reads r, and neither does the LM head. The other
place the same direction can be cut is where each block *reads* it: remove r from the normalised
input of the attention (q, k, v) and of the MLP (gate, up) of the edited layers, and leave the
stream itself as it is. With RMSNorm z = g * x / rms(x), cutting r from x before the projections
(rms unchanged, since x is unchanged) is z <- z - w (g * r) ((r / g) . z), which bakes exactly into
the reading projections as W <- W (I - w (g * r)(r / g)^T). Block l reads the stream block l - 1
wrote, so it takes block l - 1's direction. Predicted: fewer refusals per KL if much of an edit's
KL comes from the direct path (r in the stream reaching the LM head on harmless text), no better if
KL comes from what later blocks read.

    python benchmarks/read_sweep.py [--model DIR] [--weights W ...] [--kernels NAME ...] [--modes write read both]
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, open_sweep
from optimizer.params import Kernel, build_plan


def read_hooks(loaded, plan, every) -> list:
    """Hooks that cut block l - 1's direction (from `every`, a plan with every layer's) out of each
    edited block l's normalised inputs, at `plan`'s weight."""
    handles = []
    for layer, block in enumerate(loaded.layers):
        if layer == 0:
            continue
        for comp, norm in (("attn", block.input_layernorm), ("mlp", block.post_attention_layernorm)):
            w = plan.weights[comp][layer]
            if w == 0:
                continue
            r = every.directions[comp][layer - 1].float()
            g = norm.weight.detach().float()
            a, b = w * g * r, r / g

            def hook(_m, _i, z, a=a, b=b):
                return z - (z @ b).unsqueeze(-1) * a

            handles.append(norm.register_forward_hook(hook))
    return handles


def main() -> None:
    p = arguments([0.5, 0.7, 1.0, 1.4, 2.0], kernels=["p.75 f.25", "p.6 f.45"])
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--modes", nargs="+", default=["write", "read"], choices=["write", "read", "both"])
    a = p.parse_args()
    sweep = open_sweep(a, "read")
    bench = sweep.bench
    print(sweep.header)
    print("| kernel | w | edit | refusals | KL |")
    print("|---|---|---|---|---|")
    # every layer's direction, for the read side (a layer reads its predecessor's): the directions do
    # not depend on the kernel or the weight, so one plan with every layer weighted gives them all
    uniform = Kernel(peak_weight=1.0, peak_layer=0.0, min_ratio=1.0, falloff=bench.loaded.n_layers)
    base = sweep.params(a.kernels[0], 1.0, "discriminant", shrinkage=a.rho)
    every, _ = build_plan(replace(base, kernels=dict.fromkeys(base.kernels, uniform)), bench.stats, projected=1.0)
    rows = []
    for kname, w, mode in itertools.product(a.kernels, a.weights, a.modes):
        plan, _ = build_plan(sweep.params(kname, w, "discriminant", shrinkage=a.rho), bench.stats, projected=1.0)
        handles = read_hooks(bench.loaded, plan, every) if mode in ("read", "both") else []
        if mode in ("write", "both"):
            bench.hooks.apply(plan)
        with torch.inference_mode():
            ref, kl = sweep.score()
        bench.hooks.clear()
        for h in handles:
            h.remove()
        print(f"| {kname} | {w} | {mode} | {ref}/{sweep.prompts} | {kl:.4f} |", flush=True)
        rows.append((kname, w, mode, ref, kl))
    print("read_sweep " + " ".join(f"{k.replace(' ', '_')}:{w}:{m}={r}/{kl:.4f}" for k, w, m, r, kl in rows))


if __name__ == "__main__":
    main()
