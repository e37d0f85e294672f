"""Contrastive PCA in exact low-rank form, and per-trial refusal directions from its statistics.

For one layer with harmful residuals B (n_b x d) and harmless residuals G (n_g x d), centred on
the harmless mean (B~ = B - mu_g, G~ = G - mu_g, so that r = mu_b - mu_g stays inside the
objective), the contrastive matrix is

    S(alpha) = B~^T B~ / n_b - alpha * G~^T G~ / n_g.

One thin QR of the stacked [B~; G~]^T = Q R gives B~^T = Q R_b and G~^T = Q R_g, hence
S(alpha) = Q (K_b - alpha K_g) Q^T with K_b = R_b R_b^T / n_b and K_g = R_g R_g^T / n_g, small
m x m matrices (m <= n_b + n_g). Since Q has orthonormal columns, the eigenpairs of S(alpha)
with non-zero eigenvalue are exactly (lambda, Q v) for the eigenpairs (lambda, v) of the small
matrix: any alpha then costs one m x m eigh instead of a d x d one. Q is never formed: we keep
the Householder reflectors of the QR (LAPACK's geqrf, half the work of an explicit Q) and apply
them to the few small vectors that need lifting (ormqr).

A refusal subspace (issue 15) adds to a trial's direction r_1 the next components r_2..r_k: the
top eigenvectors of P S(alpha) P with P = I - r_1 r_1^T, i.e. of the contrast once r_1 is projected
out of every residual. Those with a non-zero eigenvalue lie in the span of P Q, so the problem stays
small: in the basis [Q, e], with e the unit direction of r_1's part outside span(Q) (none when r_1
is a direction of this layer; some for a global direction taken from other layers), S(alpha) is
the m x m matrix with a zero row and column added, r_1 has coordinates u = (Q^T r_1, |r_1 - Q Q^T
r_1|), and the components are the top eigenvectors of (I - u u^T) diag(M, 0) (I - u u^T), lifted
back (one (m+1) x (m+1) eigh per layer, no pass over the model). They are orthonormal and
orthogonal to r_1 by construction.

The discriminant (Fisher's linear discriminant, shrunk) is a third way to find the first
direction. Ablating a unit v moves every harmless activation x by w v (v^T x): the KL an edit costs
grows with how much text varies along v, the refusals it removes with how far the harmful mean
sits from the harmless one along v. The mean difference r ignores the first; the discriminant
v ~ Sigma_rho^-1 r, with Sigma_w = Sigma_b + Sigma_g the within-set covariance (each set about its
own mean) shrunk towards a multiple of the identity, Sigma_rho = (1 - rho) Sigma_w + rho (tr Sigma_w
/ d) I, is the direction along which the two sets lie furthest apart in units of that variation
(with 64 prompts a set Sigma_w is singular, hence the shrinkage; rho = 1 is r itself). It too is
small: r = Q c and Sigma_w = Q (K_b - c c^T + K_g) Q^T (K_b is the harmful second moment about the
harmless mean), and Sigma_rho^-1 keeps span(Q), so a direction costs one m x m solve. At fixed
kernels, on both benchmark models, it removes as many refusals as r for about half the KL
(benchmarks/lda_sweep.py). In whole studies it stands in for r by default, beside contrastive PCA
and with each trial's projection off the harmless mean searched (`params.plan_for`): alone it helped
one benchmark model and not the other, with the searched projection both (benchmarks/RESULTS.md).

Trials need only the top eigenvector, so `directions` gets it by Lanczos iteration on the small
matrix (started from r's coordinates in Q, which the answer is usually close to), with full
reorthogonalisation, and checks every layer's result by its residual; a layer that has not
converged to within RESIDUAL_TOLERANCE of its spectral gap gets the full m x m eigh instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the methods whose directions are statistics of the residuals (the fourth, `fitted`, is fitted to
# the model's answers once per study: optimizer.fitting)
METHODS = ("contrastive", "mean_diff", "discriminant")
# an eigenvalue counts as positive above this fraction of the harmful second moment's trace
RELATIVE_EIGEN_TOLERANCE = 1e-5
# sin(angle to the true eigenvector) <= residual / gap; 1e-3 keeps |cos| >= 0.999999
RESIDUAL_TOLERANCE = 1e-3
LANCZOS_MAX_STEPS = 64
LANCZOS_CHECK_EVERY = 8


@dataclass
class ContrastiveStats:
    """Per-layer statistics, stacked over layers; everything a trial needs to get a direction."""

    mean_harmless: torch.Tensor  # (L, d)
    mean_diff: torch.Tensor  # (L, d): r = mu_b - mu_g
    reflectors: torch.Tensor  # (L, m, d): geqrf's Householder vectors (and R), stored transposed
    tau: torch.Tensor  # (L, k): geqrf's reflector scales, k = min(m, d)
    gram_harmful: torch.Tensor  # (L, m, m): K_b
    gram_harmless: torch.Tensor  # (L, m, m): K_g
    mean_diff_coords: torch.Tensor  # (L, k): Q^T r, the Lanczos start

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

    @property
    def device(self) -> torch.device:
        return self.mean_diff.device

    def lift(self, index, coords: torch.Tensor) -> torch.Tensor:
        """Q @ coords for the layers in `index`: (L', k, j) small-space vectors -> (L', d, j)."""
        n_layers, k, j = coords.shape
        padded = coords.new_zeros(n_layers, self.mean_diff.shape[1], j)
        padded[:, :k] = coords
        return torch.ormqr(self.reflectors[index].mT, self.tau[index], padded)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def small_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh` of a batch of small symmetric matrices; on a CPU in one thread. LAPACK's
    threads cost far more than they save on m x m blocks, worst when other work shares the cores:
    24 matrices of 129 x 129 took 3.0-7.6 s with 2 threads on a busy 2-core machine, 0.05-0.07 s
    with 1 (16 x 16: the same either way)."""
    if matrices.device.type != "cpu":
        return torch.linalg.eigh(matrices)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrices)
    finally:
        torch.set_num_threads(threads)


def compute_stats(harmful: torch.Tensor, harmless: torch.Tensor) -> ContrastiveStats:
    """Statistics for every layer from (L, n_b, d) and (L, n_g, d) residuals, on their device.

    The centred data is written straight into the reflector buffer and factorised in place, so
    the largest tensor (L x m x d) is allocated once and never copied.
    """
    harmful, harmless = harmful.float(), harmless.float()
    n_layers, n_b, d = harmful.shape
    n_g = harmless.shape[1]
    m = n_b + n_g
    k = min(m, d)
    mu_g = harmless.mean(dim=1)
    r = harmful.mean(dim=1) - mu_g
    reflectors = harmful.new_empty(n_layers, m, d)
    tau = harmful.new_empty(n_layers, k)
    gram_b, gram_g = harmful.new_empty(n_layers, k, k), harmful.new_empty(n_layers, k, k)
    coords = harmful.new_empty(n_layers, k)
    for layer in range(n_layers):
        stacked = reflectors[layer]  # (m, d) row-major, so stacked.mT is column-major as LAPACK wants
        torch.sub(harmful[layer], mu_g[layer], out=stacked[:n_b])
        torch.sub(harmless[layer], mu_g[layer], out=stacked[n_b:])
        torch.geqrf(stacked.mT, out=(stacked.mT, tau[layer]))
        rr = stacked.mT[:k].triu()  # R: (k, m)
        r_b, r_g = rr[:, :n_b], rr[:, n_b:]
        gram_b[layer] = r_b @ r_b.T / n_b
        gram_g[layer] = r_g @ r_g.T / n_g
        coords[layer] = r_b.mean(dim=1)  # r = Q R_b 1 / n_b, so r's coordinates come for free
    return ContrastiveStats(mu_g, r, reflectors, tau, gram_b, gram_g, coords)


def contrastive_eigen(
    stats: ContrastiveStats, alpha: float, k: int = 1, layers: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenvalues (L', k) and unit eigenvectors (L', d, k) of S(alpha), oriented along r."""
    index = slice(None) if layers is None else torch.as_tensor(layers, device=stats.device)
    small = stats.gram_harmful[index] - alpha * stats.gram_harmless[index]
    values, vectors = small_eigh(small)  # ascending
    values, vectors = values.flip(-1)[..., :k], vectors.flip(-1)[..., :k]
    lifted = stats.lift(index, vectors)  # (L', d, k), unit norm since Q is orthonormal
    sign = torch.sign(torch.einsum("ldk,ld->lk", lifted, stats.mean_diff[index]))
    sign[sign == 0] = 1
    return values, lifted * sign.unsqueeze(1)


def _lanczos_top(matrices: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top eigenpair of each symmetric matrix (L, m, m) by batched Lanczos with full
    reorthogonalisation; returns values (L,), unit vectors (L, m) and a converged mask (L,)."""
    n_layers, m, _ = matrices.shape
    max_steps = min(LANCZOS_MAX_STEPS, m)
    basis = matrices.new_zeros(n_layers, max_steps, m)
    diag = matrices.new_zeros(n_layers, max_steps)
    off = matrices.new_zeros(n_layers, max_steps)
    scale = matrices.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(matrices.dtype).tiny)
    v = torch.nn.functional.normalize(start, dim=-1)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for step in range(max_steps):
        basis[:, step] = v
        w = torch.bmm(matrices, v.unsqueeze(-1)).squeeze(-1)
        diag[:, step] = (w * v).sum(-1)
        done = basis[:, : step + 1]
        for _ in range(2):  # twice is enough to keep float32 Lanczos vectors orthonormal
            w = w - torch.einsum("ljm,lj->lm", done, torch.einsum("ljm,lm->lj", done, w))
        beta = w.norm(dim=-1)
        # an invariant subspace was found: continue from a fresh direction, uncoupled (beta = 0)
        exhausted = beta <= 1e-6 * scale
        if exhausted.any():
            fresh = torch.randn(n_layers, m, generator=generator).to(w)
            fresh = fresh - torch.einsum("ljm,lj->lm", done, torch.einsum("ljm,lm->lj", done, fresh))
            w = torch.where(exhausted.unsqueeze(-1), fresh, w)
            beta = torch.where(exhausted, torch.zeros_like(beta), beta)
        off[:, step] = beta
        v = torch.nn.functional.normalize(w, dim=-1)
        steps = step + 1
        if steps % LANCZOS_CHECK_EVERY and steps != max_steps:
            continue
        tridiagonal = (
            torch.diag_embed(diag[:, :steps])
            + torch.diag_embed(off[:, : steps - 1], 1)
            + torch.diag_embed(off[:, : steps - 1], -1)
        )
        ritz_values, ritz_vectors = small_eigh(tridiagonal)
        values = ritz_values[:, -1]
        vectors = torch.nn.functional.normalize(torch.einsum("ljm,lj->lm", basis[:, :steps], ritz_vectors[:, :, -1]), dim=-1)
        residual = (torch.bmm(matrices, vectors.unsqueeze(-1)).squeeze(-1) - values.unsqueeze(-1) * vectors).norm(dim=-1)
        gap = (values - ritz_values[:, -2]) if steps > 1 else scale
        converged = residual <= RESIDUAL_TOLERANCE * gap
        if converged.all():
            break
    return values, vectors, converged


def top_direction(stats: ContrastiveStats, alpha: float, layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenvalue (L',) and unit eigenvector (L', d) of S(alpha), oriented along r; the same
    pair as `contrastive_eigen(..., k=1)`, but by Lanczos with an exact fallback per layer."""
    index = slice(None) if layers is None else torch.as_tensor(layers, device=stats.device)
    small = stats.gram_harmful[index] - alpha * stats.gram_harmless[index]
    values, vectors, converged = _lanczos_top(small, stats.mean_diff_coords[index])
    if not converged.all():
        exact_values, exact_vectors = small_eigh(small[~converged])
        values[~converged], vectors[~converged] = exact_values[:, -1], exact_vectors[:, :, -1]
    # orient in the small space: Q is orthonormal, so u . r = v . (Q^T r)
    sign = torch.sign((vectors * stats.mean_diff_coords[index]).sum(-1))
    sign[sign == 0] = 1
    lifted = stats.lift(index, (vectors * sign.unsqueeze(-1)).unsqueeze(-1)).squeeze(-1)
    return values, lifted


def discriminant_directions(stats: ContrastiveStats, shrinkage: float, layers: list[int] | None = None) -> torch.Tensor:
    """Unit shrinkage-discriminant directions (L', d), oriented along r (see the module docstring):
    Q ((1 - rho) K_w + rho tau I)^-1 c, K_w = K_b - c c^T + K_g, tau = tr(K_w) / d, rho = `shrinkage`
    in (0, 1]. A layer whose sets do not vary (tau = 0) gets r."""
    index = slice(None) if layers is None else torch.as_tensor(layers, device=stats.device)
    c = stats.mean_diff_coords[index]
    within = stats.gram_harmful[index] - c.unsqueeze(-1) * c.unsqueeze(-2) + stats.gram_harmless[index]
    tau = within.diagonal(dim1=-2, dim2=-1).sum(-1) / stats.mean_diff.shape[1]
    tau = torch.where(tau > 0, tau, torch.ones_like(tau))  # no variation: the identity, i.e. r
    eye = torch.eye(within.shape[-1], dtype=within.dtype, device=within.device)
    shrunk = (1 - shrinkage) * within + shrinkage * tau[:, None, None] * eye  # positive definite for rho > 0
    threads = torch.get_num_threads()
    if shrunk.device.type == "cpu":  # as small_eigh: LAPACK's threads cost more than they save here
        torch.set_num_threads(1)
    try:
        small = torch.cholesky_solve(c.unsqueeze(-1), torch.linalg.cholesky(shrunk))
    finally:
        torch.set_num_threads(threads)
    lifted = torch.nn.functional.normalize(stats.lift(index, small).squeeze(-1), dim=-1)
    sign = torch.sign((lifted * stats.mean_diff[index]).sum(-1, keepdim=True))
    return lifted * torch.where(sign == 0, torch.ones_like(sign), sign)


def directions(
    stats: ContrastiveStats, method: str, alpha: float, layers: list[int] | None = None, shrinkage: float = 1.0
) -> tuple[torch.Tensor, list[int]]:
    """Unit refusal direction per layer (L', d) and the layers that fell back to the mean difference.

    With `contrastive`, a layer whose top eigenvalue is not positive (alpha too large for it)
    falls back to r, as does every layer with `mean_diff`; `discriminant` uses `shrinkage`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown direction method {method!r}; use one of {METHODS}")
    index = slice(None) if layers is None else torch.as_tensor(layers, device=stats.device)
    mean_diff = torch.nn.functional.normalize(stats.mean_diff[index], dim=-1)
    if method == "mean_diff":
        return mean_diff, []
    if method == "discriminant":
        return discriminant_directions(stats, shrinkage, layers), []
    values, vectors = top_direction(stats, alpha, layers)
    scale = stats.gram_harmful[index].diagonal(dim1=-2, dim2=-1).sum(-1)  # trace >= top eigenvalue
    fallback = values <= RELATIVE_EIGEN_TOLERANCE * scale
    chosen = torch.where(fallback.unsqueeze(-1), mean_diff, vectors)
    layer_ids = list(range(stats.n_layers)) if layers is None else list(layers)
    return chosen, [layer_ids[i] for i in fallback.nonzero().flatten().tolist()]


def subspace_components(
    stats: ContrastiveStats, alpha: float, first: torch.Tensor, layers: list[int], count: int
) -> torch.Tensor:
    """The next `count` unit components (L', count, d) after each layer's unit direction `first`
    (L', d): the top eigenvectors of S(alpha) with `first` projected out (see the module docstring),
    orthonormal to each other and to `first`. A component whose eigenvalue is not positive (the
    contrast holds nothing more) is zero, which ablates nothing."""
    index = torch.as_tensor(layers, device=stats.device)
    small = stats.gram_harmful[index] - alpha * stats.gram_harmless[index]  # (L', k, k)
    n_layers, k, d = len(layers), small.shape[-1], stats.mean_diff.shape[1]
    reflectors, tau = stats.reflectors[index].mT, stats.tau[index]
    coords = torch.ormqr(reflectors, tau, first.unsqueeze(-1), transpose=True).squeeze(-1)  # Q_full^T r_1: (L', d)
    outside = coords[:, k:]  # r_1's part outside span(Q), in the full orthogonal basis
    u = torch.cat([coords[:, :k], outside.norm(dim=-1, keepdim=True)], dim=-1)
    u = torch.nn.functional.normalize(u, dim=-1)
    extended = small.new_zeros(n_layers, k + 1, k + 1)
    extended[:, :k, :k] = small
    deflate = torch.eye(k + 1, dtype=small.dtype, device=small.device) - u.unsqueeze(-1) * u.unsqueeze(-2)
    values, vectors = small_eigh(deflate @ extended @ deflate)  # ascending
    values, vectors = values.flip(-1)[..., :count], vectors.flip(-1)[..., :count]
    scale = stats.gram_harmful[index].diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    vectors = vectors * (values > RELATIVE_EIGEN_TOLERANCE * scale).unsqueeze(1)
    full = small.new_zeros(n_layers, d, count)  # the components in the full orthogonal basis
    full[:, :k, : vectors.shape[-1]] = vectors[:, :k]
    full[:, k:, : vectors.shape[-1]] = torch.nn.functional.normalize(outside, dim=-1).unsqueeze(-1) * vectors[:, k:]
    return torch.ormqr(reflectors, tau, full).mT  # (L', count, d)


def project_out_harmless_mean(
    stats: ContrastiveStats, vectors: torch.Tensor, layers: list[int], strength: float = 1.0
) -> torch.Tensor:
    """Remove from each layer's direction `strength` (0..1) of its component along that layer's
    harmless mean and renormalise ("projected" abliteration at 1: the edit then leaves the harmless
    mean untouched; at 0 the direction is unchanged)."""
    mean = torch.nn.functional.normalize(stats.mean_harmless[torch.as_tensor(layers, device=stats.device)], dim=-1)
    projected = vectors - strength * (vectors * mean).sum(-1, keepdim=True) * mean
    return torch.nn.functional.normalize(projected, dim=-1)


def winsorize(harmful: torch.Tensor, harmless: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip both sets' residuals (L, n, d) per layer at the `quantile` of |value| over both sets,
    so that a few massive activations do not dominate means and second moments."""
    values = torch.cat([harmful, harmless], dim=1).abs().flatten(1)  # (L, 2n*d)
    k = max(1, min(values.shape[1], round(quantile * values.shape[1])))
    limit = values.kthvalue(k, dim=1).values.view(-1, 1, 1)
    return harmful.clamp(-limit, limit), harmless.clamp(-limit, limit)
