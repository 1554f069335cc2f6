"""The clustered memory bank returns exactly the brute-force nearest neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.detectors.nearest import ClusteredBank, nearest
from defectscope.search import by_cluster


def _clustered_points(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, 24, generator=generator) * 3
    return centres[torch.randint(40, (count,), generator=generator)] + torch.randn(count, 24, generator=generator)


def test_pruned_search_equals_brute_force() -> None:
    bank, queries = _clustered_points(3000, 0), _clustered_points(5000, 1)
    index = ClusteredBank.build(bank, seed=0, cluster_size=50)
    assert len(index.centroids) == 60
    distances, positions = index.search(queries)
    expected, expected_positions = nearest(queries, index.bank)
    torch.testing.assert_close(distances, expected[:, 0], rtol=1e-5, atol=1e-4)
    assert (positions == expected_positions[:, 0]).float().mean() > 0.999  # ties aside
    torch.testing.assert_close((queries - index.bank[positions]).norm(dim=1), distances, rtol=1e-5, atol=1e-4)


def test_rebuilt_from_saved_tensors_searches_the_same() -> None:
    index = ClusteredBank.build(_clustered_points(2000, 2), seed=0, cluster_size=64)
    saved = index.tensors()
    again = ClusteredBank(saved["memory_bank"], saved["cluster_offsets"])
    queries = _clustered_points(2000, 3)
    assert torch.equal(index.search(queries)[0], again.search(queries)[0])


def test_empty_clusters_are_dropped() -> None:
    bank = _clustered_points(300, 4)
    index = ClusteredBank(bank, torch.tensor([0, 100, 100, 200, 300, 300]))  # clusters 1 and 4 empty
    assert len(index.centroids) == 3 and index.tensors()["cluster_offsets"].tolist() == [0, 100, 200, 300]
    queries = torch.cat([_clustered_points(500, 5), torch.zeros(5, 24)])  # zero queries sit on an empty cluster's old centre
    distances, positions = index.search(queries)
    torch.testing.assert_close(distances, nearest(queries, bank)[0][:, 0], rtol=1e-5, atol=1e-4)


def test_many_queries_are_searched_in_bounded_chunks_with_the_same_answer(monkeypatch) -> None:
    from defectscope import search

    bank, queries = _clustered_points(1500, 6), _clustered_points(2500, 7)
    index = ClusteredBank.build(bank, seed=0, cluster_size=50)
    whole = index.search(queries)
    sizes = []
    chunk_search = search.ClusterIndex._search
    monkeypatch.setattr(search, "QUERY_CHUNK", 700)
    monkeypatch.setattr(search.ClusterIndex, "_search", lambda self, q, *rest: sizes.append(len(q)) or chunk_search(self, q, *rest))
    distances, positions = index.search(queries)
    assert sizes == [700, 700, 700, 400]  # the pass-2 candidate lists never hold more than a chunk's queries
    assert torch.equal(positions, whole[1])  # the same nearest rows; OpenBLAS blocks a GEMM by its row count, which on
    torch.testing.assert_close(distances, whole[0], rtol=1e-6, atol=0)  # some CPUs moves a distance by its last bit


def test_a_few_images_queries_are_searched_on_one_blas_thread_throughout(monkeypatch) -> None:
    """BLAS threads left spinning after a search slow the backbone's next pass; a small search uses one thread, from
    the centroid product on (many queries: the library's default)."""
    from threadpoolctl import threadpool_limits

    from defectscope import search

    index = ClusteredBank.build(_clustered_points(1500, 8), seed=0, cluster_size=50)
    seen = []
    searched = search.ClusterIndex._search
    monkeypatch.setattr(search.ClusterIndex, "_search",
                        lambda self, q, *rest: seen.append(search._blas().info()[0]["num_threads"]) or searched(self, q, *rest))
    with threadpool_limits(limits=2, user_api="blas"):
        allowed = search._blas().info()[0]["num_threads"]  # 2 where there are two cores
        index.search(_clustered_points(100, 9))
        monkeypatch.setattr(search, "SINGLE_THREAD_QUERIES", 50)
        index.search(_clustered_points(100, 9))
    assert seen == [1, allowed]


def test_a_few_queries_scanning_the_whole_bank_split_across_threads_with_the_same_answer(monkeypatch) -> None:
    """Where pruning fails (fine textures), a few images' queries scan the whole bank: one large GEMM, split across
    the caller's threads (each on one BLAS thread); every query keeps its own nearest row."""
    import threading

    from defectscope import search

    monkeypatch.setattr(search, "DENSE_FRACTION", -1.0)  # every search takes the whole-bank scan
    index = search.ClusterIndex(_clustered_points(1500, 10).numpy(), ClusteredBank.build(
        _clustered_points(1500, 10), seed=0, cluster_size=50).offsets.numpy())
    queries = _clustered_points(301, 11).numpy()
    scanned = []
    dense = search.ClusterIndex._dense
    def numpy_blas_threads() -> int:  # NumPy's own BLAS (faiss may bring another, whose limit is per thread)
        return next(lib["num_threads"] for lib in search._blas().info() if "numpy" in lib["filepath"])

    monkeypatch.setattr(search.ClusterIndex, "_dense", lambda self, a, q, workers=1: scanned.append(
        (threading.current_thread().name, len(a), numpy_blas_threads())) or dense(self, a, q, workers))
    one = index.search(queries)
    assert [rows for _, rows, _ in scanned] == [301]
    scanned.clear()
    split = index.search(queries, workers=3)
    assert sorted(rows for name, rows, _ in scanned if name.startswith("defectscope-search")) == [100, 100, 101]
    assert {blas for *_, blas in scanned} == {1}  # each part on one BLAS thread: no spinning threads beside them
    assert (split[1] == one[1]).all()
    np.testing.assert_allclose(split[0], one[0], rtol=1e-6)
    expected = nearest(torch.from_numpy(queries), torch.from_numpy(index.bank))
    np.testing.assert_allclose(split[0], expected[0][:, 0].numpy(), rtol=1e-5, atol=1e-4)


def test_a_crowded_cluster_is_scanned_in_bounded_products_with_the_same_answer(monkeypatch) -> None:
    """Queries that crowd into one cluster (a plain background's patches) are scanned DENSE_CELLS distances at a
    time: every product stays bounded, and each query's nearest row is the same."""
    from defectscope import search

    bank, queries = _clustered_points(1500, 8), _clustered_points(2500, 9)
    index = ClusteredBank.build(bank, seed=0, cluster_size=50)
    whole = index.search(queries)
    cells = []
    product = np.matmul

    def recorded(left, right, *args, **kwargs):
        cells.append(left.shape[0] * right.shape[1])
        return product(left, right, *args, **kwargs)

    monkeypatch.setattr(search, "DENSE_CELLS", 500)
    monkeypatch.setattr(search, "DENSE_FRACTION", 1.0)  # the pruned scan, not the dense one
    monkeypatch.setattr(search.ClusterIndex, "_scan", _scan_recording(search.ClusterIndex._scan, recorded))
    distances, positions = index.search(queries)
    assert cells and max(cells) <= 500  # each cluster holds fewer rows than that
    assert torch.equal(positions, whole[1])
    torch.testing.assert_close(distances, whole[0], rtol=1e-6, atol=0)


def _scan_recording(scan, recorded):
    """`ClusterIndex._scan` with its products recorded (NumPy's `@` on these arrays calls matmul)."""
    def wrapped(self, groups, workers=1):
        class Recorded(np.ndarray):
            def __matmul__(self, other):
                return recorded(np.asarray(self), np.asarray(other))
        return scan(self, [(cluster, group.view(Recorded), rows) for cluster, group, rows in groups], workers)
    return wrapped


def test_the_cluster_scans_go_to_the_callers_threads_whole_clusters_each_with_the_same_bits(monkeypatch) -> None:
    """With `workers`, the pruned search's cluster scans run on that many threads, each cluster's group of queries
    whole on one of them (the same product as on one thread), so every distance is the same to the last bit."""
    import threading

    from defectscope import search

    bank, queries = _clustered_points(3000, 12), _clustered_points(6000, 13)
    built = ClusteredBank.build(bank, seed=0, cluster_size=50)
    index = search.ClusterIndex(built.bank.numpy(), built.offsets.numpy())
    monkeypatch.setattr(search, "DENSE_FRACTION", 1.0)  # the pruned scan, not the dense one
    monkeypatch.setattr(search, "SINGLE_THREAD_QUERIES", 1000)
    for count in (500, 6000):  # a few images' queries (one BLAS thread throughout) and many (BLAS's default but in scans)
        alone = index.search(queries[:count].numpy())
        runs, scan = [], search.ClusterIndex._scan

        def recorded(self, groups, workers=1):
            if workers == 1:
                runs.append((threading.current_thread().name, [group[0] for group in groups]))
            return scan(self, groups, workers)

        monkeypatch.setattr(search.ClusterIndex, "_scan", recorded)
        shared = index.search(queries[:count].numpy(), workers=2)
        monkeypatch.setattr(search.ClusterIndex, "_scan", scan)
        assert len(runs) == 4 and all(name.startswith("defectscope-search") and clusters for name, clusters in runs)
        for run in (runs[:2], runs[2:]):  # each pass: two runs of whole clusters, one after the other
            first, second = sorted((clusters for _, clusters in run), key=min)
            assert first[-1] < second[0]
        assert np.array_equal(shared[0], alone[0]) and np.array_equal(shared[1], alone[1])
    expected = nearest(queries, built.bank)  # the bank in its clusters' order
    assert torch.equal(torch.from_numpy(shared[1]), expected[1][:, 0])


@pytest.mark.parametrize("shape", [(25, 7), (1, 1), (4, 40_000)])  # the last: more clusters than 16-bit integers hold
def test_candidate_pairs_come_grouped_by_cluster_as_the_transposes_nonzero_gives_them(shape: tuple[int, int]) -> None:
    candidates = np.random.default_rng(sum(shape)).random(shape) < 0.3
    clusters, queries = by_cluster(candidates)
    expected = np.nonzero(candidates.T)
    np.testing.assert_array_equal(clusters, expected[0])
    np.testing.assert_array_equal(queries, expected[1])
