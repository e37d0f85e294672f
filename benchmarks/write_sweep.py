"""Directions fitted to what each component writes, not to the residual stream, at fixed kernels.

Ablation acts on a component's output y (the attention's or the MLP's write into the residual
stream at one layer), y <- y - w v (v^T y). What it costs on harmless text is therefore set by that
component's outputs, not by the residual's: the mean shift -w v (v^T g_c), g_c the component's mean
harmless write, and the spread w^2 v^T S_c v, S_c the covariance of its writes. The defaults (the
shrinkage discriminant, rho 0.9, projected) measure both on the residual after the layer: the
discriminant divides by the residual's within-set covariance and the projection removes the
residual's harmless mean, which is the sum of every earlier write and the embeddings, not the
write being edited. Two rows per kernel and weight measure the component-side version of each:

- `write-projected`: the defaults' direction, with its part along the component's own harmless
  mean write removed instead of the residual's (the edit then leaves the component's harmless mean
  write untouched, which is what heretic's projection intends);
- `write-discriminant`: v_c ~ S_rho^-1 r per component, r the residual's mean difference (the
  refusal the edit should remove), S_rho the component's within-set write covariance shrunk towards
  its mean eigenvalue by rho as the discriminant shrinks its own, then write-projected.

Writes are taken at the last prompt position (the one that predicts the first answer token, where
the first-token KL is measured) of the direction prompts `--refused-directions` keeps. Same model,
kernels and held-out prompts as the other sweeps (`fixed_kernels.py`).

    python benchmarks/write_sweep.py [--rho R] [--write-rhos R ...] [--weights W ...] [--kernels NAME ...]
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, forward_with_hooks, kept_direction_texts, open_sweep
from optimizer.ablation import AblationPlan
from optimizer.params import build_plan
from optimizer.residuals import tokenize


@dataclass(frozen=True)
class Writes:
    """Per site (module -> tensor): the components' last-position writes on the kept direction prompts."""

    harmless_mean: dict
    within: dict  # harmful about their mean plus harmless about theirs, over both counts


@torch.inference_mode()
def component_writes(loaded, sites, harmful: list[str], harmless: list[str], batch_size: int) -> Writes:
    rows: dict[str, dict] = {name: {s.module: [] for s in sites} for name in ("harmful", "harmless")}
    for name, texts in (("harmful", harmful), ("harmless", harmless)):
        for start in range(0, len(texts), batch_size):
            batch = tokenize(loaded, texts[start : start + batch_size])  # left-padded: -1 is each prompt's last token

            def keep(module, _inputs, output, name=name):
                rows[name][module].append(output[:, -1].float())

            forward_with_hooks(loaded, sites, keep, batch)
    mean, within = {}, {}
    for s in sites:
        b, g = torch.cat(rows["harmful"][s.module]), torch.cat(rows["harmless"][s.module])
        mean[s.module] = g.mean(0)
        b, g = b - b.mean(0), g - mean[s.module]
        within[s.module] = (b.T @ b + g.T @ g) / (len(b) + len(g))
    return Writes(mean, within)


def write_projected(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(g, dim=0)
    return torch.nn.functional.normalize(v - (v @ unit) * unit, dim=0)


def write_plan(plan: AblationPlan, sites, writes: Writes, r: torch.Tensor, rho: float | None) -> AblationPlan:
    """`plan` with each edited site's direction write-projected; with `rho`, first replaced by the
    write discriminant S_rho^-1 r (oriented along r)."""
    directions = {c: d.clone() for c, d in plan.directions.items()}
    for s in sites:
        if not plan.weight_at(s):
            continue
        v = directions[s.component][s.layer].float()
        if rho is not None:
            cov = writes.within[s.module]
            tau = cov.diagonal().mean()
            shrunk = (1 - rho) * cov + rho * tau * torch.eye(cov.shape[0])
            v = torch.linalg.solve(shrunk, r[s.layer].float())
            v = torch.nn.functional.normalize(v, dim=0) * torch.sign(v @ r[s.layer].float())
        directions[s.component][s.layer] = write_projected(v, writes.harmless_mean[s.module])
    return AblationPlan(directions, plan.weights)


def main() -> None:
    p = arguments([0.5, 0.7, 1.0], kernels=["p.75 f.25"])
    p.add_argument("--rho", type=float, default=0.9, help="the defaults' discriminant")
    p.add_argument("--write-rhos", type=float, nargs="*", default=[0.9, 0.5])
    a = p.parse_args()
    sweep = open_sweep(a, "write")
    bench, loaded, bs = sweep.bench, sweep.bench.loaded, sweep.bench.batch_size
    sites = list(loaded.discovery.present())
    writes = component_writes(loaded, sites, *kept_direction_texts(sweep), bs)
    r = bench.stats.mean_diff.float().cpu()
    print(sweep.header)
    print("| kernel | w | direction | refusals | KL |")
    print("|---|---|---|---|---|")
    for kname, w in itertools.product(a.kernels, a.weights):
        plan, _ = build_plan(sweep.params(kname, w, "discriminant", shrinkage=a.rho), bench.stats, projected=1.0)
        plain, _ = build_plan(sweep.params(kname, w, "discriminant", shrinkage=a.rho), bench.stats)
        rows = [("defaults (residual-projected)", plan), ("write-projected", write_plan(plain, sites, writes, r, None))]
        rows += [(f"write-discriminant rho {x:g}", write_plan(plain, sites, writes, r, x)) for x in a.write_rhos]
        for label, edit in rows:
            ref, kl = sweep.score_plan(edit)
            print(f"| {kname} | {w} | {label} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
