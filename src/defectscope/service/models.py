"""The models a service serves: loaded once from files or folders, each with its batcher and labelled scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectscope.artifacts import load_model, model_info
from defectscope.files import file_sha256
from defectscope.data.layout import load_dataset
from defectscope.detectors.base import MapModel
from defectscope.errors import DefectscopeError
from defectscope.evaluation import evaluate
from defectscope.experiments.config import SAFE_NAME
from defectscope.service.batching import Batcher
from defectscope.service.config import ServiceConfig

MODEL_SUFFIX = ".dsmodel"


@dataclass
class Labelled:
    """A model's scores on a labelled test set, kept for the threshold and review pages (paths stay server-side)."""

    records: list[dict[str, Any]]  # path, defect, label, score per image; the id is the index

    def public(self) -> list[dict[str, Any]]:
        return [{"id": i, "name": Path(r["path"]).name, "defect": r["defect"], "label": r["label"], "score": r["score"]}
                for i, r in enumerate(self.records)]


@dataclass
class ServedModel:
    """One loaded model file and what the service keeps beside it."""

    name: str
    path: Path
    detector: MapModel
    sha256: str
    batcher: Batcher
    labelled: Labelled | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        calibration = self.detector.calibration
        return {"name": self.name, "detector": self.detector.name, "sha256": self.sha256,
                "threshold": calibration.threshold if calibration else None,
                "localizes": self.detector.localizes, "labelled_images": len(self.labelled.records) if self.labelled else 0}


def model_files(sources: list[Path]) -> list[Path]:
    """Model files given directly, and every *.dsmodel in the folders given."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = sorted(source.glob(f"*{MODEL_SUFFIX}"))
            if not found:
                raise DefectscopeError(f"folder {source} holds no {MODEL_SUFFIX} model files")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise DefectscopeError(f"{source} does not exist")
    return files


def serve_model(path: Path, name: str, config: ServiceConfig, labelled: Path | None = None) -> ServedModel:
    """Load one model file for serving; with a labelled dataset folder, score its test split once."""
    if not SAFE_NAME.match(name):
        raise DefectscopeError(f"model name '{name}' must be letters, digits, '.', '_' or '-'")
    detector = load_model(path)
    batcher = Batcher(detector, config.max_batch, config.batch_wait_ms, config.max_queue, config.max_queue_pixels)
    served = ServedModel(name, path, detector, file_sha256(path), batcher, manifest=model_info(path))
    if labelled is not None:
        served.labelled = Labelled(evaluate(detector, load_dataset(labelled)).records)
    return served


def load_served(sources: list[Path], config: ServiceConfig | None = None, labelled: Path | None = None
                ) -> dict[str, ServedModel]:
    """Every model of the sources by name (the file name without .dsmodel); names must be unique."""
    served: dict[str, ServedModel] = {}
    for path in model_files(sources):
        name = path.name.removesuffix(MODEL_SUFFIX)
        if name in served:
            raise DefectscopeError(f"two model files are named {name}: {served[name].path} and {path}")
        served[name] = serve_model(path, name, config or ServiceConfig(), labelled)
    return served
