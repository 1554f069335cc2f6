"""Map models; importing this package registers all of them."""

from defectscope.detectors import embedding, instances, padim, patchcore, reconstruction, segmenter  # noqa: F401  (registration)
from defectscope.detectors.base import (DETECTORS, Detector, DetectorConfig, MapModel, create_detector,
                                       detector_class, good_only_models)

__all__ = ["DETECTORS", "Detector", "DetectorConfig", "MapModel", "create_detector", "detector_class",
           "good_only_models"]
