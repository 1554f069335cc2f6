"""The place view beside PatchCore's patch view: each patch's distance judged against how good parts vary at its place.

The patch view scores a patch by its distance to the nearest good patch, wherever that good patch came from. On a
product with a fixed layout some places vary a lot between good parts (a highlight, a label's print) and others
hardly at all (an empty tray, the bottle's rim): a distance that is ordinary in the first kind of place is a defect
in the second. Here every cell of the patch grid keeps the mean and the spread of its cross-fitted good distances;
a patch's place z is its distance in those units, and the place score of an image is its largest z. On a product
without a fixed layout every place varies alike, so the place score repeats the patch score.

A calibration image's place z comes from the statistics without that image (leave one out, exact from the sums): an
image that is part of its own place statistics would look more ordinary than an unseen one, and the stated
false-alarm rate would not hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_IMAGES = 20  # fewer cross-fitted good maps: a place's spread would be mostly noise, so no place view
SPREAD_FLOOR = 0.1  # a place's spread counts as at least this share of the median place's (never divide by ~0)
LEAST_SPREAD = 1e-6  # and as at least this, when most places never vary (identical good images)


@dataclass
class PlaceStats:
    """Per cell of the patch grid: count, sums and sums of squares of cross-fitted good distances (float64)."""

    count: int
    sums: torch.Tensor
    squares: torch.Tensor

    @classmethod
    def of(cls, grids: torch.Tensor) -> PlaceStats:
        """N x h x w distance grids -> their statistics."""
        grids = grids.double()
        return cls(len(grids), grids.sum(0), (grids * grids).sum(0))

    def mean_and_spread(self) -> tuple[torch.Tensor, torch.Tensor]:
        """h x w mean and spread (the standard deviation, at least SPREAD_FLOOR of the median place's), float32."""
        mean, spread = _moments(self.count, self.sums, self.squares)
        return mean.float(), spread.clamp_min(self.floor()).float()

    def floor(self) -> float:
        """The least spread a place counts with: SPREAD_FLOOR of the median place's (at least LEAST_SPREAD)."""
        return max(LEAST_SPREAD, SPREAD_FLOOR * float(_moments(self.count, self.sums, self.squares)[1].median()))

    def left_out_scores(self, grids: torch.Tensor) -> torch.Tensor:
        """Place scores of N grids counted here, each from the statistics without it (leave one out; the floor
        from all of them)."""
        grids = grids.double()
        mean, spread = _moments(self.count - 1, self.sums - grids, self.squares - grids * grids)
        return place_scores(grids, mean, spread.clamp_min(self.floor())).float()


def _moments(count: int, sums: torch.Tensor, squares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation from a count, sums and sums of squares."""
    mean = sums / count
    return mean, (squares / count - mean * mean).clamp_min(0).sqrt()


def place_scores(grids: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """N x h x w distance grids -> each image's place score: its largest place z."""
    return ((grids.float() - mean) / spread).flatten(1).amax(1)
