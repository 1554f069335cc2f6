"""Classification losses for long-tailed labels; each takes (logits, projections, targets).

Balanced Softmax (Ren et al. 2020), logit adjustment (Menon et al. 2021) and balanced
contrastive learning (Zhu et al. 2022) use the training-set class prior; weighted CE uses
inverse frequency or the effective number of samples (Cui et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.errors import DefectscopeError

LOSSES = ("ce", "weighted_ce", "focal", "balanced_softmax", "logit_adjusted", "logit_adjusted_posthoc", "bcl")


def class_weights(counts: torch.Tensor, scheme: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class weights averaging 1: 'inverse' frequency or 'effective' number (1 - beta) / (1 - beta^n)."""
    counts = counts.float().clamp_min(1)
    if scheme == "inverse":
        weights = 1 / counts
    elif scheme == "effective":
        weights = (1 - beta) / (1 - beta**counts)
    else:
        raise DefectscopeError(f"class weighting must be 'inverse' or 'effective', got {scheme!r}")
    return weights * len(counts) / weights.sum()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma log p_t (Lin et al. 2017)."""
    log_p = F.log_softmax(logits, 1).gather(1, targets[:, None])[:, 0]
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def balanced_contrastive_loss(projections: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    """Balanced contrastive loss: class-averaged denominators over the batch plus one prototype per class.

    For anchor i, every other item j (batch rows and class prototypes) contributes exp(z_i.z_j / t)
    divided by how many items of j's class are present; positives are the same-class items.
    """
    z = F.normalize(projections, dim=1)
    items = torch.cat([z, F.normalize(prototypes, dim=1)])
    labels = torch.cat([targets, torch.arange(len(prototypes))])
    similarity = z @ items.T / temperature
    n = len(z)
    not_self = torch.ones_like(similarity, dtype=torch.bool)
    not_self[torch.arange(n), torch.arange(n)] = False
    same_class = (labels[None, :] == targets[:, None]) & not_self
    one_hot = F.one_hot(labels, len(prototypes)).float()  # items x classes
    class_count = not_self.float() @ one_hot  # anchors x classes: items of each class, self excluded
    per_item_count = class_count.gather(1, labels[None, :].expand(n, -1))
    logits = similarity.masked_fill(~not_self, float("-inf")) - per_item_count.clamp_min(1).log()
    log_denominator = torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = similarity - log_denominator
    return -((log_prob * same_class).sum(1) / same_class.sum(1).clamp_min(1)).mean()


class ImbalanceLoss(nn.Module):
    """One of LOSSES, configured with the training-set class counts."""

    def __init__(self, name: str, counts: torch.Tensor, *, tau: float = 1.0, gamma: float = 2.0,
                 weighting: str = "inverse", beta: float = 0.999, contrastive_weight: float = 0.5,
                 temperature: float = 0.1) -> None:
        super().__init__()
        if name not in LOSSES:
            raise DefectscopeError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
        self.name, self.tau, self.gamma = name, tau, gamma
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        self.register_buffer("log_prior", (counts.float().clamp_min(1) / counts.sum()).log())
        self.register_buffer("weights", class_weights(counts, weighting, beta) if name == "weighted_ce" else torch.ones(len(counts)))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, projections: torch.Tensor | None = None,
                prototypes: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "weighted_ce":
            return F.cross_entropy(logits, targets, weight=self.weights)
        if self.name == "focal":
            return focal_loss(logits, targets, self.gamma)
        if self.name == "balanced_softmax":
            return F.cross_entropy(logits + self.log_prior, targets)
        if self.name in ("logit_adjusted", "bcl"):
            loss = F.cross_entropy(logits + self.tau * self.log_prior, targets)
            if self.name == "bcl":
                loss = loss + self.contrastive_weight * balanced_contrastive_loss(projections, prototypes, targets, self.temperature)
            return loss
        return F.cross_entropy(logits, targets)

    def decision_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits to predict with: post-hoc adjustment subtracts tau x log prior; the others use them as is."""
        return logits - self.tau * self.log_prior if self.name == "logit_adjusted_posthoc" else logits


def sample_weights(targets: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """Per-example draw weights: 'balanced' (each class equally likely), 'sqrt' (class ~ sqrt(n)), or 'none'."""
    if scheme == "none":
        return None
    counts = torch.bincount(targets).float()
    if scheme == "balanced":
        return 1 / counts[targets]
    if scheme == "sqrt":
        return counts[targets].rsqrt()
    raise DefectscopeError(f"sampling must be 'none', 'balanced' or 'sqrt', got {scheme!r}")
