"""The torch-free runtime: run an exported model (`defectscope export model`) with onnxruntime or OpenVINO.

An export is two files side by side: the inference graph (`.onnx`, or OpenVINO's `.xml` + `.bin`)
and a deployment file (`.dsdeploy`: safetensors whose header holds the model's manifest, the frame,
the threshold and the graph's sha256). The graph gives image scores and finished model-frame maps;
decoding, framing and placing the maps are the library's own NumPy/Pillow code, so `predict`
returns what the PyTorch model returns. Importing this module does not import torch; OpenCV is
optional (it decodes PNG faster, to the same pixels).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays

from defectscope.data.decode import ImageSource, expand_inputs
from defectscope.data.frame import Preprocess
from defectscope.errors import DefectscopeError
from defectscope.files import file_sha256, json_text
from defectscope.manifests import is_manifest_file, read_header_manifest
from defectscope.prediction import Prediction, predict_frames, prediction_rows

if TYPE_CHECKING:
    from defectscope.thresholds import Calibration

DEPLOYMENT_FORMAT = "defectscope-deployment"
DEPLOYMENT_VERSION = 2
DEPLOYMENT_SUFFIX = ".dsdeploy"
INPUT_NAME, OUTPUT_NAMES = "image", ("score", "map")
ENGINES = {"onnx": "onnxruntime", "openvino": "openvino"}  # export format -> runtime that runs it
HEADS = ("map", "score")  # graph outputs: image scores and model-frame maps | image scores only


class Engine(Protocol):
    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """uint8 N x 3 x h x w frames -> the graph's outputs, in OUTPUT_NAMES order."""


class OnnxEngine:
    """An onnxruntime session on the CPU."""

    def __init__(self, graph: Path, threads: int | None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise DefectscopeError("running an ONNX export needs onnxruntime: pip install 'defectscope[onnx]'") from exc
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would spin against decoding
        self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {INPUT_NAME: batch})


class OpenVinoEngine:
    """An OpenVINO model compiled for the CPU, in float32 (no silent bf16 on CPUs that have it)."""

    def __init__(self, graph: Path, threads: int | None) -> None:
        try:
            import openvino
        except ImportError as exc:
            raise DefectscopeError("running an OpenVINO export needs openvino: pip install 'defectscope[openvino]'") from exc
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.model = openvino.Core().compile_model(str(graph), "CPU", config)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        results = self.model(batch)
        return [results[output] for output in self.model.outputs]


def is_deployment(path: str | Path) -> bool:
    """Whether `path` is a deployment file written by `defectscope export model` (reads the header only)."""
    return is_manifest_file(Path(path), DEPLOYMENT_FORMAT)


class DeployedModel:
    """An exported model: `predict` gives the library's `Prediction` (score, verdict, map at the original size)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise DefectscopeError(f"cannot read deployment file {self.path}: {exc.strerror or exc}") from exc
        self.manifest = read_header_manifest(data, self.path, DEPLOYMENT_FORMAT, DEPLOYMENT_VERSION, "deployment file")
        try:
            load_arrays(data)  # the layout must be intact: a truncated or altered file is refused
        except (SafetensorError, ValueError) as exc:
            raise DefectscopeError(f"deployment file {self.path} is corrupt: {exc}") from exc
        try:
            model, graph = self.manifest["model"], self.manifest["graph"]
            self.head = self.manifest["head"]
            self.preprocess = Preprocess.from_dict(model["preprocess"])
            self.name = str(model["detector"])
            self.calibration_dict = model.get("calibration")
            self.threshold = None if self.calibration_dict is None else float(self.calibration_dict["threshold"])
            graph_path = self.path.parent / Path(graph["file"]).name  # beside this file, never elsewhere
            self.batch_limit = graph.get("batch_limit") or None
            expected, engine = graph["sha256"], graph["engine"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DefectscopeError(f"deployment file {self.path} is damaged: its manifest is incomplete ({exc})") from exc
        if self.head not in HEADS or engine not in ENGINES.values():
            raise DefectscopeError(f"deployment file {self.path} needs head {self.head!r} / engine {engine!r}, "
                                   "which this defectscope does not know; upgrade defectscope")
        if not graph_path.is_file():
            raise DefectscopeError(f"the graph {graph_path.name} of {self.path} is missing; copy it beside the deployment file")
        if file_sha256(graph_path) != expected:
            raise DefectscopeError(f"the graph {graph_path} does not match {self.path} (sha256 differs); export again")
        self.engine: Engine = (OnnxEngine if engine == "onnxruntime" else OpenVinoEngine)(graph_path, threads)
        self.batch_size = int(model.get("config", {}).get("batch_size", 32))

    @property
    def localizes(self) -> bool:
        return self.head != "score"

    @property
    def calibration(self) -> Calibration | None:
        """The model's calibration (thresholds.Calibration, imported on use: it needs SciPy, the runtime does not)."""
        from defectscope.thresholds import Calibration

        return None if self.calibration_dict is None else Calibration.from_dict(self.calibration_dict)

    def score_frames(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 frames N x 3 x h x w -> image scores and model-frame maps (None for image-level models)."""
        step = self.batch_limit or len(batch)
        parts = [self.engine.run(batch[start : start + step]) for start in range(0, len(batch), step)]
        scores = np.concatenate([part[0] for part in parts]).reshape(len(batch))
        return scores, np.concatenate([part[1] for part in parts]) if self.head == "map" else None

    def predict(self, images: Sequence[ImageSource], map_size: str | tuple[int, int] = "original",
                progress: Callable[[int], None] | None = None, keep_going: bool = False) -> Prediction:
        """Score images as `MapModel.predict` does; unreadable images stop the call or, with `keep_going`, score NaN."""
        return predict_frames(images, self.preprocess, self.batch_size, self.score_frames, self.threshold, self.localizes,
                              map_size, keep_going, progress)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m defectscope.runtime MODEL.dsdeploy IMAGES...`: one JSON line per image.

    Exit 0 when every image was scored, 3 when some could not be (verdict 'error'), 2 on bad input.
    """
    parser = argparse.ArgumentParser(prog="python -m defectscope.runtime", description=main.__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="deployment file written by `defectscope export model`")
    parser.add_argument("inputs", type=Path, nargs="+", help="images or folders of images")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's choice)")
    args = parser.parse_args(argv)
    try:
        model = DeployedModel(args.model, args.threads)
        paths = expand_inputs(args.inputs)
        rows = prediction_rows(paths, model.predict(paths, keep_going=True))
    except DefectscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(json_text(row, indent=None))
    return 3 if any(row["verdict"] == "error" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
