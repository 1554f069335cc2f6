"""defectscope: learn good parts from photos, then score, localize and classify defects."""

__version__ = "0.1.0"

from defectscope.artifacts import load_model, model_info, save_model  # noqa: E402
from defectscope.backbones import list_backbones, load_backbone  # noqa: E402
from defectscope.data.images import Preprocess, read_image  # noqa: E402
from defectscope.data.layout import Dataset, Sample, load_dataset  # noqa: E402
from defectscope.data.summary import summarize  # noqa: E402
from defectscope.data.synthetic import make_demo_dataset  # noqa: E402
from defectscope.detectors import DETECTORS, Detector, Prediction, create_detector  # noqa: E402
from defectscope.errors import DefectscopeError  # noqa: E402
from defectscope.evaluation import evaluate  # noqa: E402

__all__ = [
    "DETECTORS", "Dataset", "DefectscopeError", "Detector", "Prediction", "Preprocess", "Sample",
    "create_detector", "evaluate", "list_backbones", "load_backbone", "load_dataset", "load_model",
    "make_demo_dataset", "model_info", "read_image", "save_model", "summarize",
]
