"""Good-only detectors; importing this package registers all of them."""

from defectscope.detectors import embedding, padim, patchcore, reconstruction, segmenter  # noqa: F401  (registration)
from defectscope.detectors.base import DETECTORS, Detector, DetectorConfig, Prediction, create_detector, detector_class

__all__ = ["DETECTORS", "Detector", "DetectorConfig", "Prediction", "create_detector", "detector_class"]
