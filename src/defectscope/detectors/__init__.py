"""Map models by registry name; a model's module is imported when it is first asked for (`detector_class`)."""

from defectscope.detectors.base import (Detector, DetectorConfig, MapModel, all_detectors, create_detector,
                                       detector_class, detector_config, good_only_models)

__all__ = ["Detector", "DetectorConfig", "MapModel", "all_detectors", "create_detector", "detector_class",
           "detector_config", "good_only_models"]
