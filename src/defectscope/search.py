"""Exact nearest-neighbour search in a memory bank ordered by cluster, with triangle-inequality pruning.

NumPy only: the library (`detectors.nearest.ClusteredBank`) and the torch-free runtime search with
this one implementation, so their distances agree to the last GEMM rounding.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ClusterIndex:
    """A bank whose rows are grouped by cluster (`offsets`: cluster c holds rows offsets[c]..offsets[c+1]-1).

    A query's distance to any member of cluster c is at least |q - centroid_c| - radius_c. After an
    exact search of the query's closest cluster gives an upper bound, only clusters whose lower
    bound is below it can hold the nearest neighbour; on patch features that is a few percent.
    """

    def __init__(self, bank: np.ndarray, offsets: np.ndarray) -> None:
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        offsets = np.unique(np.asarray(offsets, dtype=np.int64))  # empty clusters dropped
        self.offsets = offsets
        sizes = np.diff(offsets)
        self.bank_sq = np.einsum("ij,ij->i", self.bank, self.bank)
        if not len(self.bank):
            self.centroids, self.radius = np.zeros((0, self.bank.shape[1]), np.float32), np.zeros(0, np.float32)
        else:
            self.centroids = (np.add.reduceat(self.bank, offsets[:-1], axis=0, dtype=np.float64) / sizes[:, None]).astype(np.float32)
            spread = np.linalg.norm(self.bank - np.repeat(self.centroids, sizes, axis=0), axis=1)
            self.radius = np.maximum.reduceat(spread, offsets[:-1]).astype(np.float32)
        self.centroid_sq = np.einsum("ij,ij->i", self.centroids, self.centroids)
        self.slack = 1e-3 * float(np.sqrt(self.bank_sq.max())) if len(self.bank) else 0.0

    def _scan(self, groups: Iterable[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """For each (cluster, queries) group, per query: the min over the cluster's rows of |x|^2 - 2 q.x
        (add |q|^2 for the squared distance) and the row giving it; all groups concatenated."""
        values, indices = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
        for cluster, queries in groups:
            start, stop = int(self.offsets[cluster]), int(self.offsets[cluster + 1])
            partial = queries @ self.bank[start:stop].T
            partial *= -2
            partial += self.bank_sq[start:stop]
            index = partial.argmin(1)
            values.append(np.take_along_axis(partial, index[:, None], 1)[:, 0])
            indices.append(index + start)
        return np.concatenate(values), np.concatenate(indices)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact distance (float32) and bank row (int64) of each query's nearest neighbour."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        q_sq = np.einsum("ij,ij->i", queries, queries)
        centre = queries @ self.centroids.T  # a GEMM: several times faster than pairwise differences
        centre *= -2
        centre += self.centroid_sq
        centre += q_sq[:, None]
        centre_distance = np.sqrt(np.maximum(centre, 0, out=centre), out=centre)
        closest = centre_distance.argmin(1)
        # Pass 1: every query against its closest cluster; sorted by that cluster, each group is one slice.
        order = np.argsort(closest, kind="stable")
        used, starts = np.unique(closest[order], return_index=True)
        values, indices = self._scan(zip(used.tolist(), np.split(queries[order], starts[1:])))
        best = np.empty(len(queries), np.float32)
        best_index = np.empty(len(queries), np.int64)
        best[order] = values + q_sq[order]
        best_index[order] = indices
        # Pass 2: every other cluster whose lower bound |q - c| - radius beats the pass-1 distance.
        upper = np.sqrt(np.maximum(best, 0)) + self.slack
        lower = centre_distance
        lower -= self.radius
        lower[np.arange(len(queries)), closest] = np.inf  # already searched
        clusters, rows = np.nonzero((lower < upper[:, None]).T)  # grouped by cluster
        if len(rows):
            used, starts = np.unique(clusters, return_index=True)
            row_groups = np.split(rows, starts[1:])
            values, indices = self._scan((c, queries[group]) for c, group in zip(used.tolist(), row_groups))
            values += q_sq[rows]
            improved = best.copy()
            np.minimum.at(improved, rows, values)
            winner = (values == improved[rows]) & (values < best[rows])
            won_rows, won_index = rows[winner], indices[winner]
            ranked = np.lexsort((won_index, won_rows))  # ties: the lowest bank row
            first = np.unique(won_rows[ranked], return_index=True)[1]
            best_index[won_rows[ranked][first]] = won_index[ranked][first]
            best = improved
        return np.sqrt(np.maximum(best, 0)), best_index
