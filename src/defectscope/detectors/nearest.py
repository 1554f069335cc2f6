"""Exact nearest-neighbour distances between patch features and a memory bank."""

from __future__ import annotations

import torch


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances and indices of the k nearest bank rows for each query (exact, chunked GEMM)."""
    bank = bank.float()
    bank_sq = (bank * bank).sum(1)
    distances, indices = [], []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk].float()
        sq = torch.addmm(bank_sq, q, bank.T, alpha=-2)
        values, index = (sq.min(1, keepdim=True) if k == 1 else sq.topk(k, dim=1, largest=False))
        distances.append((values + (q * q).sum(1, keepdim=True)).clamp_min_(0).sqrt_())
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)
