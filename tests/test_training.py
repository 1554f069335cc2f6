"""The training engine: loss goes down, seeds reproduce, early stopping restores the best weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defectscope.errors import DefectscopeError
from defectscope.training.augment import augment
from defectscope.training.engine import TrainSettings, train


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs of tiny 'images', labelled by blob."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g)
    y = (torch.arange(64) % 2).long()
    x[y == 1] += 1.0
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, training: bool) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("optimizer,schedule", [("adam", "constant"), ("adamw", "cosine"), ("sgd", "step")])
def test_loss_goes_down(optimizer: str, schedule: str) -> None:
    x, y = _problem()
    history = train(_model(), _loss, x, y, TrainSettings(epochs=15, lr=0.05, optimizer=optimizer, schedule=schedule),
                    batch_size=16, seed=0)
    assert len(history.train_loss) == 15
    assert history.train_loss[-1] < 0.6 * history.train_loss[0]


def test_same_seed_same_numbers_other_seed_other_numbers() -> None:
    x, y = _problem()
    settings = TrainSettings(epochs=3, lr=0.01)
    runs = [train(_model(), _loss, x, y, settings, batch_size=8, seed=seed).train_loss for seed in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_early_stopping_restores_best_weights() -> None:
    x, y = _problem()
    model = _model()
    flipped = 1 - y[48:]  # validation labels opposite to training: validation loss rises as training succeeds
    history = train(model, _loss, x[:48], y[:48], TrainSettings(epochs=200, lr=0.05, patience=3), batch_size=16, seed=0,
                    validation=(x[48:], flipped))
    assert history.stopped_early and len(history.val_loss) < 200
    assert len(history.val_loss) - 1 - history.best_epoch == 3
    model.eval()
    with torch.no_grad():
        restored = float(_loss(model, x[48:], flipped, False))
    assert restored == pytest.approx(min(history.val_loss), rel=1e-5)


def test_weighted_sampling_draws_by_weight() -> None:
    x, y = _problem()
    seen = []

    def counting_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, training: bool) -> torch.Tensor:
        if training:
            seen.append(yb)
        return _loss(model, xb, yb, training)

    weights = torch.where(y == 1, 1.0, 0.0)
    train(_model(), counting_loss, x, y, TrainSettings(epochs=2), batch_size=16, seed=0, sample_weights=weights)
    assert torch.cat(seen).eq(1).all()


def test_bad_settings_are_named() -> None:
    x, y = _problem()
    for settings, message in [(TrainSettings(optimizer="rmsprop"), "optimizer"), (TrainSettings(epochs=0), "epochs"),
                              (TrainSettings(lr=-1.0), "lr"), (TrainSettings(schedule="poly"), "schedule")]:
        with pytest.raises(DefectscopeError, match=message):
            train(_model(), _loss, x, y, settings, batch_size=8, seed=0)


def test_augment_is_seeded_per_image_and_keeps_shape() -> None:
    batch = torch.rand(6, 3, 16, 16)
    options = TrainSettings(hflip=True, vflip=True, rotate=15.0, color_jitter=0.2)
    first = augment(batch, torch.Generator().manual_seed(3), options)
    again = augment(batch, torch.Generator().manual_seed(3), options)
    other = augment(batch, torch.Generator().manual_seed(4), options)
    assert first.shape == batch.shape
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    flipped = augment(batch, torch.Generator().manual_seed(0), TrainSettings(hflip=True))
    for image, out in zip(batch, flipped):
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
    assert torch.equal(augment(batch, torch.Generator(), TrainSettings()), batch)  # nothing switched on: unchanged
