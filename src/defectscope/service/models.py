"""The models a service serves: model files and exported models, loaded once from files or folders, each with its
batcher and labelled scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectscope.data.layout import load_dataset
from defectscope.errors import DefectscopeError
from defectscope.evaluation import evaluate
from defectscope.names import MODEL_SUFFIX, SAFE_NAME, as_text, version_of
from defectscope.predictor import Predictor, engine_of, load_identified, warm_up
from defectscope.runtime import DEPLOYMENT_SUFFIX, DeployedModel
from defectscope.service.batching import Batcher
from defectscope.service.config import ServiceConfig
from defectscope.versions import VersionStore

SERVED_SUFFIXES = (MODEL_SUFFIX, DEPLOYMENT_SUFFIX)  # model files, and exported models (onnxruntime or OpenVINO)


@dataclass
class Labelled:
    """A model's scores on a labelled test set, kept for the threshold and review pages (paths stay server-side)."""

    records: list[dict[str, Any]]  # path, defect, label, score per image; the id is the index

    def public(self) -> list[dict[str, Any]]:
        return [{"id": i, "name": as_text(Path(r["path"]).name), "defect": r["defect"], "label": r["label"], "score": r["score"]}
                for i, r in enumerate(self.records)]


@dataclass
class ServedModel:
    """One loaded model (model file or exported model) and what the service keeps beside it."""

    name: str
    path: Path
    detector: Predictor
    sha256: str
    batcher: Batcher
    labelled: Labelled | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def engine(self) -> str:
        """What runs it: 'torch' for a model file, else the exported graph's engine."""
        return engine_of(self.detector)

    @property
    def version(self) -> str:
        """The served file's version: the first 12 hex digits of its sha256 (the audit trail records the whole)."""
        return version_of(self.sha256)

    @property
    def versions(self) -> VersionStore:
        """The store of this model file's versions, beside it (model files only: exports are made from them)."""
        return VersionStore.of(self.path)[0]

    @property
    def writable(self) -> bool:
        """Whether new models can be written from it (threshold, teaching): model files only, not exports."""
        return not isinstance(self.detector, DeployedModel)

    def summary(self) -> dict[str, Any]:
        calibration = self.detector.calibration
        return {"name": self.name, "detector": self.detector.name, "sha256": self.sha256, "version": self.version,
                "engine": self.engine,
                "threshold": calibration.threshold if calibration else None,
                "localizes": self.detector.localizes, "labelled_images": len(self.labelled.records) if self.labelled else 0}


def model_files(sources: list[Path]) -> list[Path]:
    """Model files given directly, and every *.dsmodel and *.dsdeploy in the folders given."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            found = sorted(path for suffix in SERVED_SUFFIXES for path in source.glob(f"*{suffix}"))
            if not found:
                raise DefectscopeError(f"folder {source} holds no {MODEL_SUFFIX} model files nor {DEPLOYMENT_SUFFIX} exports")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise DefectscopeError(f"{source} does not exist")
    return files


def serve_model(path: Path, name: str, config: ServiceConfig, labelled: Path | None = None) -> ServedModel:
    """Load one model file or exported model for serving; with a labelled dataset folder, score its test split once."""
    if not SAFE_NAME.match(name):
        raise DefectscopeError(f"model name '{name}' must be letters, digits, '.', '_' or '-'")
    detector, sha256, manifest = load_identified(path, threads=config.engine_threads)
    warm_up(detector)
    batcher = Batcher(detector, config.max_batch, config.batch_wait_ms, config.max_queue, config.max_queue_pixels)
    served = ServedModel(name, path, detector, sha256, batcher, manifest=manifest)
    if labelled is not None:
        served.labelled = Labelled(evaluate(detector, load_dataset(labelled)).records)
    return served


def load_served(sources: list[Path], config: ServiceConfig | None = None, labelled: Path | None = None
                ) -> dict[str, ServedModel]:
    """Every model of the sources by name (the file name without .dsmodel or .dsdeploy); names must be unique."""
    served: dict[str, ServedModel] = {}
    for path in model_files(sources):
        name = path.name.removesuffix(path.suffix) if path.suffix in SERVED_SUFFIXES else path.name
        if name in served:
            raise DefectscopeError(f"two model files are named {name}: {served[name].path} and {path}")
        served[name] = serve_model(path, name, config or ServiceConfig(), labelled)
    for name, model in served.items():  # once every model loaded: a refused start keeps no versions
        if model.path.suffix == MODEL_SUFFIX:
            try:  # the file as served now is a version: the first, or one that replaced the active one on disk
                model.versions.adopt(name)
            except OSError as exc:
                raise DefectscopeError(f"cannot keep the versions of {model.path} beside it ({exc.strerror or exc}); "
                                       "serve model files from a folder the service may write") from exc
    return served
