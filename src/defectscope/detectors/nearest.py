"""Exact nearest-neighbour distances between patch features and a memory bank."""

from __future__ import annotations

from collections.abc import Iterable

import faiss
import torch

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
    """A memory bank grouped by k-means cluster, searched exactly with triangle-inequality pruning.

    A query's distance to any member of cluster c is at least |q - centroid_c| - radius_c. After an
    exact search of the query's closest cluster gives an upper bound, only clusters whose lower
    bound is below it can hold the nearest neighbour; on patch features that is a few percent.
    """

    def __init__(self, bank: torch.Tensor, offsets: torch.Tensor, centroids: torch.Tensor, radius: torch.Tensor,
                 order: torch.Tensor | None = None) -> None:
        self.bank, self.offsets, self.centroids, self.radius = bank, offsets, centroids, radius
        # order[i]: row of the bank given to build() that now sits at row i (identity when loaded)
        self.order = torch.arange(len(bank)) if order is None else order
        self.bank_sq = (bank * bank).sum(1)
        self.centroid_sq = (centroids * centroids).sum(1)
        self.slack = 1e-3 * float(self.bank_sq.max().sqrt()) if len(bank) else 0.0

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
        return cls.from_sorted(bank[order].contiguous(), offsets, order)

    @classmethod
    def from_sorted(cls, bank: torch.Tensor, offsets: torch.Tensor, order: torch.Tensor | None = None) -> ClusteredBank:
        """Rebuild centroids and radii from a bank already ordered by cluster (empty clusters are dropped)."""
        offsets = torch.unique_consecutive(offsets)
        sizes = offsets[1:] - offsets[:-1]
        owner = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        centroids = torch.zeros(len(sizes), bank.shape[1]).index_add_(0, owner, bank) / sizes[:, None]
        spread = (bank - centroids[owner]).norm(dim=1)
        radius = torch.zeros(len(sizes)).scatter_reduce(0, owner, spread, "amax")
        return cls(bank, offsets, centroids, radius, order)

    def subset(self, keep: torch.Tensor) -> ClusteredBank:
        """The rows where `keep` is True, in the same clusters (no new k-means): still an exact index."""
        owner = torch.repeat_interleave(torch.arange(len(self.offsets) - 1), self.offsets[1:] - self.offsets[:-1])
        sizes = torch.bincount(owner[keep], minlength=len(self.offsets) - 1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
        return ClusteredBank.from_sorted(self.bank[keep].contiguous(), offsets, self.order[keep])

    def _scan(self, groups: Iterable[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each (cluster, queries) group, per query: the min over the cluster's rows of |x|^2 - 2 q.x
        (add |q|^2 for the squared distance) and the row giving it; all groups concatenated."""
        values, indices = [], []
        for cluster, queries in groups:
            start, stop = int(self.offsets[cluster]), int(self.offsets[cluster + 1])
            value, index = torch.addmm(self.bank_sq[start:stop], queries, self.bank[start:stop].T, alpha=-2).min(1)
            values.append(value)
            indices.append(index + start)
        return torch.cat(values), torch.cat(indices)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact distance and bank index of each query's nearest neighbour."""
        if len(self.centroids) == 1:
            distances, indices = nearest(queries, self.bank)
            return distances[:, 0], indices[:, 0]
        queries = queries.float().contiguous()
        q_sq = (queries * queries).sum(1)
        centre_sq = torch.addmm(self.centroid_sq, queries, self.centroids.T, alpha=-2)
        centre_distance = centre_sq.add_(q_sq[:, None]).clamp_min_(0).sqrt_()  # a GEMM: several times faster than cdist
        closest = centre_distance.argmin(1)
        # Pass 1: every query against its closest cluster; sorted by that cluster, each group is one slice.
        order = torch.argsort(closest)
        used, counts = torch.unique_consecutive(closest[order], return_counts=True)
        values, indices = self._scan(zip(used.tolist(), queries[order].split(counts.tolist())))
        best = torch.empty(len(queries))
        best_index = torch.empty(len(queries), dtype=torch.long)
        best[order] = values + q_sq[order]
        best_index[order] = indices
        # Pass 2: every other cluster whose lower bound |q - c| - radius beats the pass-1 distance.
        upper = best.clamp_min(0).sqrt() + self.slack
        lower = centre_distance.sub_(self.radius)
        lower[torch.arange(len(queries)), closest] = float("inf")  # already searched
        clusters, rows = torch.nonzero((lower < upper[:, None]).T, as_tuple=True)  # grouped by cluster
        if not len(rows):
            return best.clamp_min(0).sqrt(), best_index
        used, counts = torch.unique_consecutive(clusters, return_counts=True)
        values, indices = self._scan((c, queries[group]) for c, group in zip(used.tolist(), rows.split(counts.tolist())))
        values += q_sq[rows]
        improved = best.scatter_reduce(0, rows, values, "amin")
        winner = (values == improved[rows]) & (values < best[rows])
        best_index.scatter_reduce_(0, rows[winner], indices[winner], "amin", include_self=False)  # ties: lowest row
        return improved.clamp_min(0).sqrt(), best_index

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.bank, "cluster_offsets": self.offsets}
