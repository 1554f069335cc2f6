"""Generalized Pareto maximum-likelihood fits of many samples at once (the tails behind low false-alarm rates).

With θ = shape / scale, the likelihood of exceedances x over a level has a closed-form best shape for each θ,
shape(θ) = mean(log(1 + θ x)), so the fit is a one-dimensional search (Grimshaw 1993): a grid, then a golden-section
refinement, for every sample in one array pass. The shape is kept at -1 or above; below it the likelihood has no
maximum (it grows without bound as the fitted end point nears the largest exceedance). A zero is a tie with the
level, not an exceedance: it takes no part in its row's fit (at zero the likelihood has no maximum either).
"""

from __future__ import annotations

import numpy as np

_GRID = np.linspace(-12.0, 8.0, 321)  # s, where θ·max(x) = exp(s) - 1: from just above -1 to tails far heavier than scores'
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
_REFINEMENTS = 60  # golden-section steps: the bracket of two grid steps shrinks below 1e-12


def _profile(x: np.ndarray, largest: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-likelihood, shape, scale) of each row of x (B, k) at the best shape for θ = (exp(s) - 1) / max(x)."""
    theta = np.expm1(s) / largest[:, None]
    count = np.maximum((x > 0).sum(-1, keepdims=True), 1)  # zeros add nothing to either sum below
    flat = np.abs(theta) < 1e-12  # θ -> 0: the exponential distribution, scale = mean(x)
    shape = np.log1p(theta[:, :, None] * x[:, None, :]).sum(-1) / count
    scale = np.where(flat, x.sum(-1, keepdims=True) / count, shape / np.where(flat, 1.0, theta))
    loglik = -count * (np.log(scale) + shape + 1.0)
    return np.where(shape < -1.0, -np.inf, loglik), shape, scale


def fit_pareto(exceedances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shapes, scales): the maximum-likelihood generalized Pareto fit (location 0) of each row's positive values
    (B, k, non-negative); a row with none gets shape 0 and a vanishing scale."""
    x = np.atleast_2d(np.asarray(exceedances, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # rows of zeros, and the shape's lower bound
        return _fit(x)


def _fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    largest = np.maximum(x.max(-1), np.finfo(np.float64).tiny)
    loglik = _profile(x, largest, np.broadcast_to(_GRID, (len(x), len(_GRID))))[0]
    best = loglik.argmax(-1)
    low, high = _GRID[np.maximum(best - 1, 0)], _GRID[np.minimum(best + 1, len(_GRID) - 1)]
    for _ in range(_REFINEMENTS):
        left, right = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
        keep_left = _profile(x, largest, left[:, None])[0][:, 0] >= _profile(x, largest, right[:, None])[0][:, 0]
        low, high = np.where(keep_left, low, left), np.where(keep_left, right, high)
    _, shape, scale = _profile(x, largest, ((low + high) / 2)[:, None])
    empty = x.max(-1) <= 0
    return np.where(empty, 0.0, shape[:, 0]), np.where(empty, largest, scale[:, 0])
