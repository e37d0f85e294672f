"""Two variants of the shrinkage discriminant, measured at fixed kernels by `lda_sweep.py` (issue 15,
twenty-fifth session; neither kept: benchmarks/RESULTS.md, "The low-KL end of the second model's front").

`--within harmless`: the discriminant with the harmless covariance alone, Q ((1 - rho) K_g + rho tau I)^-1 c,
in place of both sets' within-set covariance. An edit's KL depends on how harmless text varies
along the direction, not on how harmful text does.

`--cosine C`: each layer its own shrinkage, the one whose direction has cosine C with the layer's
mean difference (found by bisection on rho), in place of one rho for every layer: at one rho the
cosine runs from about 0.5 at early layers to about 0.9 at the last ones on the second model, so a
broad kernel edits its early layers along directions much further from r than its late ones.

Everything else is `lda_sweep.py` (its options follow these; `--rhos` labels the rows but, with
`--cosine`, does not set the shrinkage): the variant replaces
`optimizer.directions.discriminant_directions`, which every plan of the sweep is built through.

    python benchmarks/lda_variants.py (--within harmless | --cosine C) [lda_sweep.py options]
"""

from __future__ import annotations

import argparse
import dataclasses
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import optimizer.directions as directions_module

plain = directions_module.discriminant_directions


def harmless_within(stats, shrinkage: float, layers: list[int] | None = None) -> torch.Tensor:
    """The plain discriminant with K_b = c c^T, so that its within-set matrix K_b - c c^T + K_g is K_g."""
    c = stats.mean_diff_coords
    return plain(dataclasses.replace(stats, gram_harmful=c.unsqueeze(-1) * c.unsqueeze(-2)), shrinkage, layers)


def at_cosine(target: float):
    def directions(stats, shrinkage: float, layers: list[int] | None = None) -> torch.Tensor:
        chosen = []
        for layer in range(stats.n_layers) if layers is None else layers:
            r = torch.nn.functional.normalize(stats.mean_diff[layer], dim=-1)
            low, high = 1e-4, 1.0  # the cosine grows with rho, to 1 at rho = 1
            for _ in range(30):
                mid = (low + high) / 2
                low, high = (mid, high) if float(plain(stats, mid, [layer])[0] @ r) < target else (low, mid)
            chosen.append(plain(stats, high, [layer])[0])
        return torch.stack(chosen)

    return directions


def main() -> None:
    p = argparse.ArgumentParser(add_help=False)
    variant = p.add_mutually_exclusive_group(required=True)
    variant.add_argument("--within", choices=["harmless"])
    variant.add_argument("--cosine", type=float)
    a, rest = p.parse_known_args()
    directions_module.discriminant_directions = harmless_within if a.within else at_cosine(a.cosine)
    sys.argv = ["lda_sweep.py", *rest]
    runpy.run_path(str(ROOT / "benchmarks" / "lda_sweep.py"), run_name="__main__")


if __name__ == "__main__":
    main()
