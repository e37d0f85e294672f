"""Contrastive PCA for a 32B-shaped model: full d x d eigh (numpy, torch) against our exact low-rank path.

    python benchmarks/pca.py [--layers 64] [--hidden 5120] [--n 50 400] [--device cpu|cuda] [--quick]

Prints a table and, last, one machine-readable line for the largest configuration that ran.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.directions import compute_stats, directions

ALPHA = 1.0


def synthetic_residuals(layers: int, n: int, d: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual-like data per layer: a shared mean, a harmful/harmless mean shift, a few strong
    directions of variance (shared by both sets, plus one harmful-only), and isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    shared_mean = torch.randn(layers, 1, d, generator=g) * 2.0
    shift = torch.randn(layers, 1, d, generator=g) * 0.3
    strong = torch.linalg.qr(torch.randn(layers, d, 6, generator=g))[0].transpose(1, 2)  # (L, 6, d)
    scales = torch.tensor([8.0, 6.0, 5.0, 4.0, 3.0, 2.5]).view(1, 1, 6)

    def sample(count: int, harmful: bool) -> torch.Tensor:
        coefficients = torch.randn(layers, count, 6, generator=g) * scales
        if not harmful:
            coefficients[..., 5] *= 0.1  # the last strong direction varies mostly among harmful prompts
        x = shared_mean + coefficients @ strong + torch.randn(layers, count, d, generator=g)
        return (x + shift if harmful else x).to(device)

    return sample(n, True), sample(n, False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warm_up=None) -> tuple[float, object]:
    """Median wall time of `repeats` runs after one warm-up (`warm_up`, or `fn` itself)."""
    result = (warm_up or fn)()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def contrastive_matrix(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    mu_g = harmless.mean(0)
    b, g = harmful - mu_g, harmless - mu_g
    return b.T @ b / len(b) - ALPHA * g.T @ g / len(g)


def oriented_top(vectors: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return vectors * torch.sign(vectors @ r)


def run(layers: int, d: int, n: int, device: str, full_layers: int, repeats: int, with_numpy: bool) -> list[dict]:
    harmful, harmless = synthetic_residuals(layers, n, d, device)
    rows = []

    # 2. full d x d torch.linalg.eigh on the device (timed on `full_layers`, extrapolated)
    def torch_full():
        return torch.stack([torch.linalg.eigh(contrastive_matrix(harmful[i], harmless[i]))[1][:, -1] for i in range(full_layers)])

    def torch_warm_up():  # a full d x d eigh is long and steady on a CPU: warm up on a small one
        return torch.linalg.eigh(contrastive_matrix(harmful[0, :, :256], harmless[0, :, :256]))

    full_repeats = 1 if device == "cpu" else repeats
    torch_s, reference = timed(torch_full, device, full_repeats, torch_warm_up)
    r = harmful[:full_layers].mean(1) - harmless[:full_layers].mean(1)
    reference = torch.stack([oriented_top(reference[i], r[i]) for i in range(full_layers)])
    torch_total = torch_s * layers / full_layers
    extrapolated = full_layers < layers

    # 1. full numpy eigh on the CPU (always timed on few layers)
    if with_numpy:
        np_layers = min(full_layers, 2)
        h_np, g_np = harmful[:np_layers].double().cpu().numpy(), harmless[:np_layers].double().cpu().numpy()

        def numpy_full():
            out = []
            for i in range(np_layers):
                mu_g = g_np[i].mean(0)
                b, g = h_np[i] - mu_g, g_np[i] - mu_g
                out.append(np.linalg.eigh(b.T @ b / len(b) - ALPHA * g.T @ g / len(g))[1][:, -1])
            return np.stack(out)

        np_s, np_vectors = timed(numpy_full, "cpu", 1, lambda: np.linalg.eigh(np.eye(256)))
        np_cos = min(abs(float(np.dot(np_vectors[i], reference[i].double().cpu().numpy()))) for i in range(np_layers))
        rows.append(
            {
                "method": "numpy.linalg.eigh (full d x d)",
                "device": "cpu",
                "n": n,
                "total_s": np_s * layers / np_layers,
                "extrapolated": np_layers < layers,
                "min_cos": np_cos,
                "per_alpha_s": np_s * layers / np_layers,
                "mem": None,
            }
        )

    rows.append(
        {
            "method": "torch.linalg.eigh (full d x d)",
            "device": device,
            "n": n,
            "total_s": torch_total,
            "extrapolated": extrapolated,
            "min_cos": 1.0,
            "per_alpha_s": torch_total,
            "mem": d * d * 4,
        }
    )

    # 3. our low-rank path: statistics once, then the per-alpha step, exactly as the study calls them
    def low_rank():
        stats = compute_stats(harmful, harmless)
        return stats, directions(stats, "contrastive", ALPHA)[0]

    low_s, (stats, ours) = timed(low_rank, device, repeats)
    per_alpha_s, _ = timed(lambda: directions(stats, "contrastive", ALPHA * 1.5), device, repeats)
    cos = (ours[:full_layers].double() * reference.double()).sum(-1).abs().min().item()
    rows.append(
        {
            "method": "optimizer low-rank (stats + 1 alpha)",
            "device": device,
            "n": n,
            "total_s": low_s,
            "extrapolated": False,
            "min_cos": cos,
            "per_alpha_s": per_alpha_s,
            "mem": stats.nbytes() / layers,
            "mem_total": stats.nbytes(),
        }
    )
    for row in rows:
        row["speedup"] = torch_total / row["total_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--n", type=int, nargs="+", default=[50, 400], help="prompts per set")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="8 layers of hidden 4096, full eigh timed on 1 layer")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.repeats = 8, 4096, 1
    on_cpu = args.device == "cpu"
    # a full 5120^2 eigh takes ~17 s on a 2-core CPU: time one or two layers there and extrapolate
    full_layers = min(args.layers, 1 if args.quick else 2) if on_cpu else args.layers
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# contrastive PCA, {args.layers} layers x hidden {args.hidden}, alpha={ALPHA}, float32, device: {name}")
    rows = []
    for i, n in enumerate(args.n):
        rows += run(args.layers, args.hidden, n, args.device, full_layers, args.repeats, with_numpy=not args.quick or i == 0)
    header = (
        f"| {'method':38} | device | n/set | total s (all layers) | speed-up vs torch eigh | min abs cos | per-alpha s | "
        "stats MiB/layer | stats MiB total |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for row in rows:
        total = f"{row['total_s']:.3f}" + (" (extrap.)" if row["extrapolated"] else "")
        mem = f"{row['mem'] / 2**20:.1f}" if row["mem"] else "-"
        mem_total = f"{row['mem_total'] / 2**20:.0f}" if row.get("mem_total") else "-"
        print(
            f"| {row['method']:38} | {row['device']:6} | {row['n']:5} | {total:20} | {row['speedup']:22.1f} | "
            f"{min(row['min_cos'], 1.0):11.6f} | {row['per_alpha_s']:11.4f} | {mem:15} | {mem_total:15} |"
        )
    if full_layers < args.layers:
        print(f"# full-eigh rows timed on {full_layers} layer(s) and scaled to {args.layers}; cos compared on those layers")
    ours = [r for r in rows if r["method"].startswith("optimizer")][-1]
    min_cos = min([1.0] + [r["min_cos"] for r in rows if r["method"].startswith("optimizer")])
    print(
        f"speedup_vs_full_eigh={ours['speedup']:.1f} min_cos={min_cos:.6f} "
        f"per_alpha_s={ours['per_alpha_s']:.4f} device={args.device}"
    )


if __name__ == "__main__":
    main()
