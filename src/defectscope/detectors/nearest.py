"""Exact nearest-neighbour distances between patch features and a memory bank."""

from __future__ import annotations

import faiss
import torch

from defectscope.search import ClusterIndex

KMEANS_SAMPLE = 32768  # rows k-means trains on at most


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


class ClusteredBank:
    """A memory bank grouped by k-means cluster, searched exactly by `search.ClusterIndex` (the same code as the runtime).

    `order` maps each row back to the row of the bank given to `build` (fit-time bookkeeping).
    """

    def __init__(self, bank: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor | None = None) -> None:
        self.index = ClusterIndex(bank.float().numpy(), offsets.numpy())
        self.bank = torch.from_numpy(self.index.bank)
        self.offsets = torch.from_numpy(self.index.offsets)
        self.order = torch.arange(len(bank)) if order is None else order

    @property
    def centroids(self) -> torch.Tensor:
        return torch.from_numpy(self.index.centroids)

    @classmethod
    def build(cls, bank: torch.Tensor, seed: int, cluster_size: int = 64) -> ClusteredBank:
        """Cluster the bank with k-means (faiss) and order it by cluster.

        k-means trains on at most KMEANS_SAMPLE rows (a seeded sample chosen by faiss), so building
        stays linear in the bank size; every row is then assigned to its nearest centroid.
        """
        bank = bank.float().contiguous()
        clusters = max(1, len(bank) // cluster_size)
        if clusters > 1:
            per_centroid = max(1, min(256, KMEANS_SAMPLE // clusters))
            kmeans = faiss.Kmeans(bank.shape[1], clusters, niter=20, seed=seed, max_points_per_centroid=per_centroid,
                                  min_points_per_centroid=1)
            kmeans.train(bank.numpy())
            _, assignment = nearest(bank, torch.from_numpy(kmeans.centroids))
            assignment = assignment[:, 0]
        else:
            assignment = torch.zeros(len(bank), dtype=torch.long)
        order = torch.argsort(assignment, stable=True)
        sizes = torch.bincount(assignment, minlength=clusters)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
        return cls(bank[order].contiguous(), offsets, order)

    def subset(self, keep: torch.Tensor, extra: torch.Tensor | None = None) -> ClusteredBank:
        """The rows where `keep` is True, in the same clusters (no new k-means), and `extra` rows as one more cluster:
        still an exact index."""
        owner = torch.repeat_interleave(torch.arange(len(self.offsets) - 1), self.offsets[1:] - self.offsets[:-1])
        sizes = torch.bincount(owner[keep], minlength=len(self.offsets) - 1)
        if extra is not None:
            sizes = torch.cat([sizes, torch.tensor([len(extra)])])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
        rows = self.bank[keep] if extra is None else torch.cat([self.bank[keep], extra.float()])
        return ClusteredBank(rows, offsets, None if extra is not None else self.order[keep])

    def search(self, queries: torch.Tensor, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact distance and bank index of each query's nearest neighbour (on `workers` threads; default: torch's)."""
        distances, indices = self.index.search(queries.float().numpy(), workers or torch.get_num_threads())
        return torch.from_numpy(distances), torch.from_numpy(indices)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.bank, "cluster_offsets": self.offsets}
