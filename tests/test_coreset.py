"""The pruned greedy coreset picks exactly what the plain farthest-first loop picks."""

from __future__ import annotations

import pytest
import torch

from defectscope.detectors.coreset import coreset_indices, greedy_coreset, greedy_cover


def _plain_greedy(points: torch.Tensor, count: int, start: int) -> list[int]:
    distances = (points - points[start]).norm(dim=1)
    chosen = []
    for _ in range(count):
        index = int(distances.argmax())
        chosen.append(index)
        distances = torch.minimum(distances, (points - points[index]).norm(dim=1))
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_plain_greedy(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, 12, generator=generator) * 4
    points = centres[torch.randint(20, (2500,), generator=generator)] + torch.randn(2500, 12, generator=generator)
    assert greedy_coreset(points, 250, start=seed).tolist() == _plain_greedy(points, 250, seed)


@pytest.mark.parametrize("count", [1, 40, 1200])
def test_the_cover_is_each_points_nearest_chosen_point(count: int) -> None:
    generator = torch.Generator().manual_seed(count)
    points = torch.randn(2500, 12, generator=generator) * torch.rand(2500, 1, generator=generator) * 5
    chosen, distance, owner = greedy_cover(points, count, start=7)
    assert torch.equal(chosen, greedy_coreset(points, count, start=7))
    exact = torch.cdist(points.double(), points[chosen].double())
    torch.testing.assert_close(distance.double(), exact.min(1).values, rtol=1e-4, atol=1e-2)
    assert (owner == exact.argmin(1)).float().mean() > 0.999  # ties aside
    assert (owner[chosen] == torch.arange(count)).all() and (distance[chosen] < 1e-2).all()
    assert (owner >= 0).all() and distance[7] > 0  # `start` is not chosen: points covered by it were searched again


def test_ratio_and_determinism() -> None:
    features = torch.randn(1000, 300, generator=torch.Generator().manual_seed(0))
    first = coreset_indices(features, 0.1, seed=4)
    assert len(first) == 100 and len(set(first.tolist())) == 100
    assert torch.equal(first, coreset_indices(features, 0.1, seed=4))


def test_the_selection_runs_numpys_blas_on_one_thread(monkeypatch) -> None:
    """Each step multiplies a few thousand rows by one vector: a second BLAS thread makes that several times slower."""
    from threadpoolctl import threadpool_info

    from defectscope.detectors import coreset

    seen, selection = [], coreset._greedy
    monkeypatch.setattr(coreset, "_greedy", lambda *args, **kwargs: seen.append(
        [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]) or selection(*args, **kwargs))
    points = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    greedy_coreset(points, 50)
    greedy_cover(points, 50)
    assert len(seen) == 2 and all(threads and set(threads) == {1} for threads in seen)


def test_extending_a_coreset_that_already_covers_every_point_adds_none() -> None:
    points = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    covered = torch.full((300,), 0.5)
    assert greedy_coreset(points, 300, covered=covered, stop_within=1.0).tolist() == []
    assert len(greedy_coreset(points, 300, covered=covered, stop_within=0.1)) > 0
