"""Sparsifiers for task vectors: which entries of a delta survive, and how survivors are
rescaled. Defaults follow mergekit: a rescaled delta keeps its L1 norm. The papers' variant
(kept entries divided by their keep probability) is `by_probability=True`."""

from __future__ import annotations

import torch

from merging.methods import fixed_sum


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    masked = delta * mask
    if not rescale:
        return masked
    before = fixed_sum(delta.abs(), scratch=True)
    after = fixed_sum(masked.abs(), scratch=True)
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked.mul_(before / after)


SAMPLE = 1 << 16


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest of a 1-D tensor. A full top-k over a large tensor is
    slow on a CPU; a seeded sample brackets the threshold instead, and the exact top-k runs
    only within the bracket (falling back to the full one if the bracket misses)."""
    n = values.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k <= 0:
        return mask
    if k >= n:
        return mask.fill_(True)
    if n <= 16 * SAMPLE:
        mask[torch.topk(values, k, sorted=False).indices] = True
        return mask
    gen = torch.Generator(values.device).manual_seed(0)
    sample = values[torch.randint(n, (SAMPLE,), generator=gen, device=values.device)]
    q = 1.0 - k / n
    bounds = torch.tensor([max(q - 0.01, 0.0), min(q + 0.01, 1.0)], device=values.device)
    low, high = torch.quantile(sample, bounds).tolist()
    above = values > high
    need = k - int(above.sum())  # a count: integers add alike in any order
    band = torch.nonzero((values >= low) & ~above).flatten()
    if need < 0 or need > band.numel():
        mask[torch.topk(values, k, sorted=False).indices] = True
        return mask
    mask |= above
    mask[band[torch.topk(values[band], need, sorted=False).indices]] = True
    return mask


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES: keep the max(1, ⌊density·n⌋) largest |entries|."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = top_k_mask(delta.abs().reshape(-1), k).reshape_as(delta)
    return _rescaled(delta, mask.to(delta.dtype), rescale)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool = False
) -> torch.Tensor:
    """Breadcrumbs: drop the ⌊gamma·n⌋ largest |entries| (fewer if density needs them),
    then the smallest, keeping ⌊density·n⌋."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    top = n - keep - max(0, n - keep - int(gamma * n))  # outliers dropped: ⌊gamma·n⌋ or fewer
    magnitudes = delta.abs().reshape(-1)
    mask = top_k_mask(magnitudes, keep + top) & ~top_k_mask(magnitudes, top)
    return _rescaled(delta, mask.reshape_as(delta).to(delta.dtype), rescale)


def random(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: bool = True,
    by_probability: bool = False,
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    if by_probability:
        return (delta * mask).div_(density)
    return _rescaled(delta, mask, rescale)


def check_della(density: float, epsilon: float) -> None:
    """Keep probabilities density ± epsilon must be probabilities (where DELLA prunes)."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(
            f"epsilon = {epsilon} with density = {density}: density ± epsilon must lie in (0, 1)"
        )


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: bool = True,
    by_probability: bool = False,
) -> torch.Tensor:
    """DELLA: keep each entry with probability density - ε + 2ε·(rank of |entry| in its row,
    scaled to [0, 1])."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della(density, epsilon)
    shape = delta.shape
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(delta.dtype) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator)
    if by_probability:
        return (rows * mask).div_(probs).reshape(shape)
    return _rescaled(rows, mask, rescale).reshape(shape)
