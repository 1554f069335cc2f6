"""Exact nearest-neighbour search in a memory bank ordered by cluster, with triangle-inequality pruning.

NumPy only: the library (`detectors.nearest.ClusteredBank`) and the torch-free runtime search with
this one implementation, so their distances agree to the last GEMM rounding.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from functools import cache

import numpy as np
from threadpoolctl import ThreadpoolController

SINGLE_THREAD_QUERIES = 8192  # up to this many queries (8 images of 32x32 patches) BLAS uses one thread
DENSE_FRACTION = 0.3  # when the candidate clusters hold more of the bank than this, scan it all in large GEMMs
DENSE_CELLS = 1 << 23  # query x bank distances computed at once by the dense scan (32 MB)
QUERY_CHUNK = 32768  # queries searched at once (about 40 images of 28 x 28 patches): the search's memory stays bounded



def distances_to(points: np.ndarray, centres: np.ndarray, owner: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Each point's distance to its own centre (`centres[owner]`), `chunk` points at a time: the differences of all at
    once were two more copies of the points (102,400 x 128: 12 ms this way, 16 ms that way on reused heap, 128 ms on
    fresh pages)."""
    out = np.empty(len(points), np.float32)
    for start in range(0, len(points), chunk):
        stop = start + chunk
        out[start:stop] = np.linalg.norm(points[start:stop] - centres[owner[start:stop]], axis=1)
    return out

def by_cluster(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, query) of every True of a queries x clusters mask, grouped by cluster, queries in order within one:
    `np.nonzero` of its transpose, which scans it against its layout (threaded-parts, 16 images' 25,600 queries x 781
    clusters: 72 -> 17 ms). The clusters are sorted as 16-bit integers, which NumPy's stable sort does by radix."""
    query, cluster = np.divmod(np.flatnonzero(candidates), candidates.shape[1])
    order = np.argsort(cluster.astype(np.int16 if candidates.shape[1] <= np.iinfo(np.int16).max else np.int64), kind="stable")
    return cluster[order], query[order]


@cache
def _blas() -> ThreadpoolController:
    """The loaded BLAS libraries, found once: finding them scans the process's libraries (4 ms a call)."""
    return ThreadpoolController().select(user_api="blas")


def one_blas_thread() -> AbstractContextManager:
    """NumPy's BLAS on one thread: its second thread makes a small product several times slower, not faster
    (a 7,400 x 128 matrix times a vector: 0.2 ms on one thread, 1.1 ms on two)."""
    return _blas().limit(limits=1)


@cache
def _scan_pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """Threads for a dense scan of a few queries, one BLAS thread each (idle, they wait on a queue: no spinning); one
    pool per process (`pid`), as a forked child has none of its parent's threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix="defectscope-search")


class ClusterIndex:
    """A bank whose rows are grouped by cluster (`offsets`: cluster c holds rows offsets[c]..offsets[c+1]-1).

    A query's distance to any member of cluster c is at least |q - centroid_c| - radius_c. After an
    exact search of the query's closest cluster gives an upper bound, only clusters whose lower
    bound is below it can hold the nearest neighbour; on patch features that is a few percent.
    """

    def __init__(self, bank: np.ndarray, offsets: np.ndarray) -> None:
        bank = np.asarray(bank, dtype=np.float32)
        # Rows [x, |x|^2] against queries [-2q, 1]: one GEMM gives |x|^2 - 2 q.x, the search's ranking.
        self.augmented = np.empty((len(bank), bank.shape[1] + 1), np.float32)
        self.augmented[:, :-1] = bank
        self.bank = self.augmented[:, :-1]
        self.bank_sq = self.augmented[:, -1]
        np.einsum("ij,ij->i", bank, bank, out=self.bank_sq)
        offsets = np.unique(np.asarray(offsets, dtype=np.int64))  # empty clusters dropped
        self.offsets = offsets
        sizes = np.diff(offsets)
        if not len(bank):
            self.centroids, self.radius = np.zeros((0, bank.shape[1]), np.float32), np.zeros(0, np.float32)
        else:
            self.centroids = (np.add.reduceat(bank, offsets[:-1], axis=0, dtype=np.float64) / sizes[:, None]).astype(np.float32)
            spread = distances_to(bank, self.centroids, np.repeat(np.arange(len(sizes)), sizes))
            self.radius = np.maximum.reduceat(spread, offsets[:-1]).astype(np.float32)
        self.centroid_sq = np.einsum("ij,ij->i", self.centroids, self.centroids)
        self.slack = 1e-3 * float(np.sqrt(self.bank_sq.max())) if len(bank) else 0.0

    def _scan(self, groups: list[tuple[int, np.ndarray, np.ndarray | None]], workers: int = 1
              ) -> tuple[np.ndarray, np.ndarray]:
        """For each (cluster, augmented queries [-2q, 1], their rows or None) group, per query: the min over the
        cluster's rows of |x|^2 - 2 q.x (add |q|^2 for the squared distance) and the row giving it; all groups
        concatenated. With rows, the group is those rows of the queries, gathered when it is scanned. With `workers`
        > 1 the groups go to that many threads in runs of about equal work, on one BLAS thread each: a group is the
        same product wherever it runs, so the answers are the same bits (threaded-parts' 50,000-row memory on 2 cores:
        28.5 -> 23.7 ms an image for 8 images' queries, 32.9 -> 27.6 for one image's)."""
        if workers > 1 and len(groups) > 1:
            cost = np.cumsum([len(group if rows is None else rows) * (self.offsets[cluster + 1] - self.offsets[cluster])
                              for cluster, group, rows in groups])
            cuts = np.searchsorted(cost, cost[-1] * np.arange(1, workers) / workers).tolist()
            runs = [groups[first:last] for first, last in zip([0, *cuts], [*cuts, len(groups)]) if last > first]
            with one_blas_thread():  # small products, one core each
                found = list(_scan_pool(workers, os.getpid()).map(self._scan, runs))
            return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
        values, indices = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
        for cluster, group, rows in groups:
            if rows is not None:
                group = np.take(group, rows, axis=0)  # np.take gathers rows 1.6x as fast as fancy indexing
            start, stop = int(self.offsets[cluster]), int(self.offsets[cluster + 1])
            step = max(1, DENSE_CELLS // (stop - start))
            for first in range(0, len(group), step):
                partial = group[first : first + step] @ self.augmented[start:stop].T
                index = partial.argmin(1)
                values.append(partial[np.arange(len(index)), index])
                indices.append(index + start)
        return np.concatenate(values), np.concatenate(indices)

    def _dense(self, augmented: np.ndarray, q_sq: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Every query against the whole bank, DENSE_CELLS distances at a time (same result as the pruned search);
        with `workers` > 1, the queries split across that many threads (each query's answer is its own)."""
        if workers > 1 and len(augmented) > 1:
            parts = np.array_split(np.arange(len(augmented)), min(workers, len(augmented)))
            found = list(_scan_pool(workers, os.getpid()).map(lambda rows: self._dense(augmented[rows], q_sq[rows]), parts))
            return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
        best = np.empty(len(augmented), np.float32)
        best_index = np.empty(len(augmented), np.int64)
        step = max(1, DENSE_CELLS // max(1, len(self.bank)))
        for start in range(0, len(augmented), step):
            partial = augmented[start : start + step] @ self.augmented.T
            index = partial.argmin(1)
            best[start : start + step] = partial[np.arange(len(index)), index]
            best_index[start : start + step] = index
        best += q_sq
        return np.sqrt(np.maximum(best, 0)), best_index

    def search(self, queries: np.ndarray, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact distance (float32) and bank row (int64) of each query's nearest neighbour, QUERY_CHUNK queries at a
        time: the pass-2 candidate lists grow with the queries (800 MB more for 150,000 at once).

        A few images' queries make small GEMMs: BLAS then runs on one thread throughout, as its idle threads would
        spin against the backbone's and the decoders' (juice_bottle, batch 1: 66 -> 53 ms/image with the centroid
        GEMM inside too; bottle, with the cluster scans alone: 78 -> 65). Their scan of the whole bank (where pruning
        fails, as on fine textures) is a large GEMM all the same: it splits its queries across `workers` threads
        (the caller's thread count; fine-defects, batch 1: the search 18 -> 10 ms an image). The cluster scans go to
        `workers` threads whatever the count (`_scan`).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        few = len(queries) <= SINGLE_THREAD_QUERIES  # a few images: small GEMMs, one BLAS thread; more: BLAS's default
        with one_blas_thread() if few else nullcontext():
            if len(queries) <= QUERY_CHUNK:
                return self._search(queries, workers, few)
            parts = [self._search(queries[start : start + QUERY_CHUNK], workers, few)
                     for start in range(0, len(queries), QUERY_CHUNK)]
        return np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts])

    def _search(self, queries: np.ndarray, workers: int = 1, few: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """`search` on one chunk of queries: the cluster scans on `workers` threads, a dense scan too when `few`
        (else one on BLAS's threads)."""
        q_sq = np.einsum("ij,ij->i", queries, queries)
        augmented = np.empty((len(queries), queries.shape[1] + 1), np.float32)
        np.multiply(queries, -2, out=augmented[:, :-1])
        augmented[:, -1] = 1
        centre = queries @ self.centroids.T  # a GEMM: several times faster than pairwise differences
        centre *= -2
        centre += self.centroid_sq
        centre += q_sq[:, None]
        centre_distance = np.sqrt(np.maximum(centre, 0, out=centre), out=centre)
        closest = centre_distance.argmin(1)
        # Pass 1: every query against its closest cluster; sorted by that cluster, each group is one slice.
        order = np.argsort(closest, kind="stable")
        used, starts = np.unique(closest[order], return_index=True)
        values, indices = self._scan([(c, g, None) for c, g in zip(used.tolist(), np.split(augmented[order], starts[1:]))], workers)
        best = np.empty(len(queries), np.float32)
        best_index = np.empty(len(queries), np.int64)
        best[order] = values + q_sq[order]
        best_index[order] = indices
        # Pass 2: every other cluster whose lower bound |q - c| - radius beats the pass-1 distance.
        upper = np.sqrt(np.maximum(best, 0)) + self.slack
        lower = centre_distance
        lower -= self.radius
        lower[np.arange(len(queries)), closest] = np.inf  # already searched
        candidates = lower < upper[:, None]  # queries x clusters
        fraction = float(candidates.sum(0) @ np.diff(self.offsets)) / (len(queries) * len(self.bank))
        if fraction > DENSE_FRACTION:
            return self._dense(augmented, q_sq, workers if few else 1)  # pruning would save little: large GEMMs beat many small ones
        clusters, rows = by_cluster(candidates)
        if len(rows):
            used, starts = np.unique(clusters, return_index=True)
            row_groups = np.split(rows, starts[1:])
            values, indices = self._scan([(c, augmented, group) for c, group in zip(used.tolist(), row_groups)], workers)
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
