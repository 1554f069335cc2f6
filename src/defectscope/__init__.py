"""defectscope: learn good parts from photos, then score, localize and classify defects."""

from defectscope._version import __version__
from defectscope.artifacts import load_model, model_info, save_model
from defectscope.backbones import list_backbones, load_backbone
from defectscope.data.images import Preprocess, read_image
from defectscope.data.layout import Dataset, Sample, load_dataset
from defectscope.data.summary import summarize
from defectscope.data.synthetic import make_demo_dataset
from defectscope.detectors import DETECTORS, Detector, MapModel, Prediction, create_detector
from defectscope.errors import DefectscopeError
from defectscope.evaluation import evaluate
from defectscope.pipeline import evaluate_model, fit_model, predict_images

__all__ = [
    "DETECTORS", "Dataset", "DefectscopeError", "Detector", "MapModel", "Prediction", "Preprocess", "Sample",
    "__version__", "create_detector", "evaluate", "evaluate_model", "fit_model", "list_backbones", "load_backbone",
    "load_dataset", "load_model", "make_demo_dataset", "model_info", "predict_images", "read_image", "save_model",
    "summarize",
]
