"""Arditi et al.'s uniform edit (weight 1 on every layer's attention and MLP outputs, one global
mean-difference direction, not projected: the seeded start `uniform`, replayed as a study replays it),
taken from the direction of each given layer, from the residuals as they are or clipped
(`--winsorize`): held-out refusals and first-token KL per layer.

    python benchmarks/uniform_edit.py [--model DIR] [--winsorize 0.995] --layers 20 22 23

It is the seeded start `uniform` at other layers, apart from a study's search: whether a start's
result depends on its statistics or on the layer it was given (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixed_kernels import arguments, open_sweep
from optimizer.params import plan_for, replay_params, seeded_starts, separation


def main() -> None:
    p = arguments([1.0])
    p.add_argument("--layers", type=int, nargs="+", required=True)
    a = p.parse_args()
    sweep = open_sweep(a, "uniform")
    stats, settings, n_layers = sweep.bench.stats, sweep.bench.settings, sweep.bench.loaded.n_layers
    scores = separation(stats)
    print(f"{sweep.header}; winsorize {a.winsorize}; separation per layer " + " ".join(f"{float(x):.2f}" for x in scores))
    uniform = seeded_starts(stats, settings)["uniform"]
    print("| winsorize | direction layer | refusals | KL |")
    print("|---|---|---|---|")
    for layer in a.layers:
        plan, _ = plan_for(replay_params({**uniform, "direction_index": float(layer)}, n_layers, settings), stats, settings)
        refusals, kl = sweep.score_plan(plan)
        print(f"| {a.winsorize} | {layer} | {refusals}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
