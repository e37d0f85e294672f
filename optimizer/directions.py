"""Contrastive PCA in exact low-rank form, and per-trial refusal directions from its statistics.

For one layer with harmful residuals B (n_b x d) and harmless residuals G (n_g x d), centred on
the harmless mean (B~ = B - mu_g, G~ = G - mu_g, so that r = mu_b - mu_g stays inside the
objective), the contrastive matrix is

    S(alpha) = B~^T B~ / n_b - alpha * G~^T G~ / n_g.

One thin QR of the stacked [B~; G~]^T = Q R gives B~^T = Q R_b and G~^T = Q R_g, hence
S(alpha) = Q (K_b - alpha K_g) Q^T with K_b = R_b R_b^T / n_b and K_g = R_g R_g^T / n_g, small
m x m matrices (m <= n_b + n_g). Since Q has orthonormal columns, the eigenpairs of S(alpha)
with non-zero eigenvalue are exactly (lambda, Q v) for the eigenpairs (lambda, v) of the small
matrix: any alpha then costs one m x m eigh instead of a d x d one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("contrastive", "mean_diff")
# an eigenvalue counts as positive above this fraction of the harmful second moment's trace
RELATIVE_EIGEN_TOLERANCE = 1e-5


@dataclass
class ContrastiveStats:
    """Per-layer statistics, stacked over layers; everything a trial needs to get a direction."""

    mean_harmless: torch.Tensor  # (L, d)
    mean_diff: torch.Tensor  # (L, d): r = mu_b - mu_g
    basis: torch.Tensor  # (L, d, m): Q
    gram_harmful: torch.Tensor  # (L, m, m): K_b
    gram_harmless: torch.Tensor  # (L, m, m): K_g

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ContrastiveStats:
        return cls(**{name: tensors[name] for name in cls.__dataclass_fields__})

    def to(self, device: torch.device | str) -> ContrastiveStats:
        return ContrastiveStats(**{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def n_layers(self) -> int:
        return self.mean_diff.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def layer_stats(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Statistics of one layer from (n_b, d) and (n_g, d) residuals: mu_g, r, Q, K_b, K_g."""
    harmful, harmless = harmful.float(), harmless.float()
    mu_g = harmless.mean(dim=0)
    r = harmful.mean(dim=0) - mu_g
    n_b, n_g = harmful.shape[0], harmless.shape[0]
    stacked_t = torch.cat([harmful - mu_g, harmless - mu_g]).T  # (d, n_b + n_g)
    q, rr = torch.linalg.qr(stacked_t, mode="reduced")
    r_b, r_g = rr[:, :n_b], rr[:, n_b:]
    return mu_g, r, q, r_b @ r_b.T / n_b, r_g @ r_g.T / n_g


def compute_stats(harmful: torch.Tensor, harmless: torch.Tensor) -> ContrastiveStats:
    """Statistics for every layer from (L, n_b, d) and (L, n_g, d) residuals, on their device."""
    per_layer = [layer_stats(harmful[i], harmless[i]) for i in range(harmful.shape[0])]
    return ContrastiveStats(*(torch.stack(parts) for parts in zip(*per_layer)))


def contrastive_eigen(
    stats: ContrastiveStats, alpha: float, k: int = 1, layers: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenvalues (L', k) and unit eigenvectors (L', d, k) of S(alpha), oriented along r."""
    index = slice(None) if layers is None else torch.as_tensor(layers, device=stats.basis.device)
    small = stats.gram_harmful[index] - alpha * stats.gram_harmless[index]
    values, vectors = torch.linalg.eigh(small)  # ascending
    values, vectors = values.flip(-1)[..., :k], vectors.flip(-1)[..., :k]
    lifted = stats.basis[index] @ vectors  # (L', d, k), unit norm since Q is orthonormal
    sign = torch.sign(torch.einsum("ldk,ld->lk", lifted, stats.mean_diff[index]))
    sign[sign == 0] = 1
    return values, lifted * sign.unsqueeze(1)


def directions(
    stats: ContrastiveStats, method: str, alpha: float, layers: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Unit refusal direction per layer (L', d) and the layers that fell back to the mean difference.

    With `contrastive`, a layer whose top eigenvalue is not positive (alpha too large for it)
    falls back to r, as does every layer with `mean_diff`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown direction method {method!r}; use one of {METHODS}")
    index = slice(None) if layers is None else torch.as_tensor(layers, device=stats.basis.device)
    mean_diff = torch.nn.functional.normalize(stats.mean_diff[index], dim=-1)
    if method == "mean_diff":
        return mean_diff, []
    values, vectors = contrastive_eigen(stats, alpha, 1, layers)
    scale = stats.gram_harmful[index].diagonal(dim1=-2, dim2=-1).sum(-1)  # trace >= top eigenvalue
    fallback = values[:, 0] <= RELATIVE_EIGEN_TOLERANCE * scale
    chosen = torch.where(fallback.unsqueeze(-1), mean_diff, vectors[..., 0])
    layer_ids = list(range(stats.n_layers)) if layers is None else list(layers)
    return chosen, [layer_ids[i] for i in fallback.nonzero().flatten().tolist()]
