"""The epoch loop: optimizer, schedule, seeded shuffling or weighted sampling, validation, early stopping."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from defectscope.errors import DefectscopeError
from defectscope.settings import Settings, require_range

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")
# loss_fn(model, inputs, targets, training) -> scalar loss; `training` says whether to augment
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, bool], torch.Tensor]
EpochProgress = Callable[[int, int, float, float | None], None]


@dataclass
class TrainSettings(Settings):
    """Hyperparameters of one training run (mixed into every trained model's config)."""

    epochs: int = 50
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    patience: int = 0
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    rotate: float = 0.0
    color_jitter: float = 0.0

    def check(self) -> None:
        super().check()
        if self.optimizer not in OPTIMIZERS:
            raise DefectscopeError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise DefectscopeError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise DefectscopeError(f"epochs must be a whole number >= 1, got {self.epochs!r}")
        require_range("lr", self.lr, 0, low_open=True)
        require_range("momentum", self.momentum, 0, 1)
        for name in ("patience", "weight_decay", "rotate", "color_jitter"):
            require_range(name, getattr(self, name), 0)

    @property
    def augments(self) -> bool:
        return bool(self.hflip or self.vflip or self.rot90 or self.rotate or self.color_jitter)


@dataclass
class History:
    """Per-epoch mean losses and what the loop decided."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "best_epoch": self.best_epoch,
                "stopped_early": self.stopped_early, "seconds": self.seconds}


def make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    kind = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=settings.lr, weight_decay=settings.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: constant, cosine to zero, or x0.1 at 2/3 of the epochs."""
    if settings.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs)
    if settings.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, max(1, settings.epochs * 2 // 3), 0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)


def _mean_loss(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
            total += float(loss_fn(model, x, y, False)) * len(x)
    return total / len(inputs)


def train(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, settings: TrainSettings,
          *, batch_size: int, seed: int, validation: tuple[torch.Tensor, torch.Tensor] | None = None,
          sample_weights: torch.Tensor | None = None, progress: EpochProgress | None = None) -> History:
    """Train `model` in place; returns the loss history.

    Batches are a seeded shuffle of `inputs` each epoch, or, with `sample_weights`, a seeded draw
    with replacement of as many rows. With validation data and `patience` > 0, training stops after
    that many epochs without a lower validation loss and the best weights are restored.
    """
    settings.check()
    if len(inputs) == 0:
        raise DefectscopeError("no training examples")
    if inputs.dim() == 4:  # images: channels-last convolutions are about twice as fast on the CPU
        model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DefectscopeError("the model has no trainable parameters")
    optimizer = make_optimizer(params, settings)
    schedule = make_schedule(optimizer, settings)
    history, best, best_state, start = History(), float("inf"), None, time.perf_counter()
    with torch.enable_grad():
        for epoch in range(settings.epochs):
            model.train()
            if sample_weights is None:
                order = torch.randperm(len(inputs), generator=generator)
            else:
                order = torch.multinomial(sample_weights, len(inputs), replacement=True, generator=generator)
            total, seen = 0.0, 0
            for batch in order.split(batch_size):
                if len(batch) < 2 and len(order) > 1:
                    continue  # a lone example would break batch normalization
                loss = loss_fn(model, inputs[batch], targets[batch], True)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, seen = total + loss.item() * len(batch), seen + len(batch)
            schedule.step()
            history.train_loss.append(total / max(seen, 1))
            val = _mean_loss(model, loss_fn, *validation, batch_size) if validation and len(validation[0]) else None
            if val is not None:
                history.val_loss.append(val)
                if val < best:
                    best, history.best_epoch = val, epoch
                    if settings.patience:
                        best_state = copy.deepcopy(model.state_dict())
                elif settings.patience and epoch - history.best_epoch >= settings.patience:
                    history.stopped_early = True
            if progress:
                progress(epoch + 1, settings.epochs, history.train_loss[-1], val)
            if history.stopped_early:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history.seconds = time.perf_counter() - start
    return history
