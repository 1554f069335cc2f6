"""defectscope: learn good parts from photos, then score, localize and classify defects.

Names are imported on first use (PEP 562), so `import defectscope.runtime` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from defectscope._version import __version__

_WHERE = {
    "load_model": "artifacts", "model_info": "model_header", "save_model": "artifacts",
    "list_backbones": "backbones", "load_backbone": "backbones",
    "Preprocess": "data.frame", "read_image": "data.decode",
    "Dataset": "data.layout", "Sample": "data.layout", "load_dataset": "data.layout",
    "summarize": "data.summary", "make_demo_dataset": "data.synthetic",
    "all_detectors": "detectors", "Detector": "detectors", "MapModel": "detectors", "create_detector": "detectors",
    "detector_config": "detectors",
    "Prediction": "prediction", "DefectscopeError": "errors", "evaluate": "evaluation",
    "evaluate_model": "pipeline", "fit_model": "pipeline", "predict_images": "pipeline",
}

__all__ = ["__version__", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'defectscope' has no attribute {name!r}")
    return getattr(importlib.import_module(f"defectscope.{_WHERE[name]}"), name)
