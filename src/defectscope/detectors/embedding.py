"""Image-level baselines on pooled pretrained features: k-NN distance, PCA reconstruction error, one-class SVM."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.svm import OneClassSVM

from defectscope.detectors.base import Detector, DetectorConfig, register
from defectscope.detectors.nearest import nearest
from defectscope.errors import check_fitted
from defectscope.settings import require_range


@dataclass
class EmbeddingConfig(DetectorConfig):
    """neighbours (knn), variance kept (pca), nu and gamma (ocsvm; gamma 0 means sklearn's 'scale')."""

    neighbours: int = 1
    variance: float = 0.95
    nu: float = 0.1
    gamma: float = 0.0

    def check(self) -> None:
        super().check()
        require_range("neighbours", self.neighbours, 1)
        require_range("variance", self.variance, 0, 1, low_open=True, high_open=True)
        require_range("nu", self.nu, 0, 1, low_open=True)
        require_range("gamma", self.gamma, 0)


class EmbeddingDetector(Detector):
    """Global-average-pooled features of the two deepest stages, standardized on the training set."""

    config_class = EmbeddingConfig
    config: EmbeddingConfig
    localizes = False
    strides = (16, 32)
    min_images = 3  # a calibration fold's refit standardizes by the spread of the other images: two at least
    learned: dict[str, torch.Tensor]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.learned = {}

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        maps = self.require_backbone()(batch)
        return torch.cat([F.adaptive_avg_pool2d(maps[s].float(), 1).flatten(1) for s in sorted(maps)], 1)

    def fit_features(self, features: torch.Tensor) -> dict[str, Any]:
        self.learned = {"feature_mean": features.mean(0), "feature_std": features.std(0).clamp_min(1e-6)}
        self.learned.update(self.fit_standardized(self._standardize(features)))
        # Row-major copies, as a loaded model file has: the GEMM path (and last bits) follow the layout.
        self.learned = {name: tensor.contiguous() for name, tensor in self.learned.items()}
        return {"feature_dim": features.shape[1]}

    def _standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.learned["feature_mean"]) / self.learned["feature_std"]

    def score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, None]:
        check_fitted(self.learned, self.name)
        return self.score_standardized(self._standardize(features)), None

    @abstractmethod
    def fit_standardized(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Learn from standardized training features; returns the tensors to keep."""

    @abstractmethod
    def score_standardized(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly score per standardized feature row (higher = more anomalous)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.learned)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.learned = dict(tensors)


@register
class KNNDetector(EmbeddingDetector):
    name = "knn"

    def fit_standardized(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"bank": x}

    def score_standardized(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.learned["bank"]
        distances, _ = nearest(x, bank, k=min(self.config.neighbours, len(bank)))
        return distances.mean(1)


@register
class PCADetector(EmbeddingDetector):
    name = "pca"

    def fit_standardized(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with np.errstate(invalid="ignore"):  # images all alike: no variance to share out, every component is kept
            pca = PCA(n_components=self.config.variance, svd_solver="full", random_state=self.config.seed).fit(x.numpy())
        return {"pca_mean": torch.from_numpy(pca.mean_).float(), "components": torch.from_numpy(pca.components_).float()}

    def score_standardized(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self.learned["pca_mean"]
        components = self.learned["components"]
        residual = centred - (centred @ components.T) @ components
        return (residual * residual).sum(1)


@register
class OCSVMDetector(EmbeddingDetector):
    name = "ocsvm"

    def fit_standardized(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        spread = float(x.var())  # 0 for images all alike: then 1.0, as scikit-learn's gamma="scale" takes it
        gamma = self.config.gamma or (1.0 / (x.shape[1] * spread) if spread > 0 else 1.0)
        svm = OneClassSVM(kernel="rbf", nu=self.config.nu, gamma=gamma).fit(x.numpy())
        return {
            "support_vectors": torch.from_numpy(svm.support_vectors_).float(),
            "dual_coef": torch.from_numpy(svm.dual_coef_[0]).float(),
            "intercept": torch.tensor([float(svm.intercept_[0]), gamma]),
        }

    def score_standardized(self, x: torch.Tensor) -> torch.Tensor:
        """Negated decision function (higher = more anomalous), computed without sklearn at predict time."""
        intercept, gamma = self.learned["intercept"].tolist()
        squared = torch.cdist(x, self.learned["support_vectors"]).pow(2)
        return -(torch.exp(-gamma * squared) @ self.learned["dual_coef"] + intercept)
