"""The torch-free runtime: run an exported model (`defectscope export model`) with onnxruntime or OpenVINO.

An export is a deployment file (`.dsdeploy`: safetensors whose header holds the model's manifest,
the frame, the threshold and the sha256 of every graph file) with its inference graph beside it
(`.onnx`, or OpenVINO's `.xml` + `.bin`). The graph gives image scores and finished model-frame maps;
decoding, framing and placing the maps are the library's own NumPy/Pillow code, so `predict`
returns what the PyTorch model returns. A PatchCore export is two graphs, and its memory bank (the
deployment file's tensors) is searched between them by the library's own exact search
(`search.ClusterIndex`). Importing this module does not import torch; OpenCV is optional (it decodes
PNG faster, to the same pixels).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays

from defectscope.calibration import Calibration
from defectscope.data.batches import images_per_pass
from defectscope.data.decode import TRAIN_DIGESTS, ImageSource, expand_inputs, skipped_note
from defectscope.data.frame import Preprocess
from defectscope.errors import DefectscopeError
from defectscope.files import json_text, read_regular
from defectscope.manifests import is_manifest_file, read_header_manifest
from defectscope.model_header import model_info
from defectscope.names import check_threads
from defectscope.prediction import Prediction, Scored, predict_frames, prediction_rows
from defectscope.search import ClusterIndex

DEPLOYMENT_FORMAT = "defectscope-deployment"
DEPLOYMENT_VERSION = 4  # 3: every graph file and the manifest itself hashed; 4: PatchCore searches outside its graphs
MAX_DEPLOYMENT_BYTES = 2 << 30  # a manifest, and PatchCore's memory bank (at most memory_limit rows)
MAX_GRAPH_BYTES = 8 << 30
DEPLOYMENT_SUFFIX = ".dsdeploy"
INPUT_NAME, OUTPUT_NAMES = "image", ("score", "map")
SEARCH_NAMES = ("patches", "regions")  # what a searched model's first graph gives: patch features, region descriptors
MEMORY_NAMES = ("memory_bank", "cluster_offsets")  # the searched memory, in the deployment file
ENGINES = {"onnx": "onnxruntime", "openvino": "openvino"}  # export format -> runtime that runs it
HEADS = ("map", "score")  # graph outputs: image scores and model-frame maps | image scores only


class Engine(Protocol):
    chunk: int  # images per run

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's inputs by name (uint8 N x 3 x h x w frames as INPUT_NAME) -> its outputs, in order."""


def _engine_error(engine: str, exc: Exception) -> DefectscopeError:
    return DefectscopeError(f"{engine} cannot load the graph: {' '.join(str(exc).split())[:300]}; export the model again")


class OnnxEngine:
    """An onnxruntime session on the CPU, built from the graph's verified bytes (no file is read behind them); it runs
    `chunk` images at a time."""

    def __init__(self, files: list[bytes], threads: int | None, chunk: int) -> None:
        self.chunk = chunk
        try:
            import onnxruntime
        except ImportError as exc:
            raise DefectscopeError("running an ONNX export needs onnxruntime: pip install 'defectscope[onnx]'") from exc
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would spin against decoding
        try:
            self.session = onnxruntime.InferenceSession(files[0], options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
            raise _engine_error("onnxruntime", exc) from exc

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, inputs)


class OpenVinoEngine:
    """An OpenVINO model compiled for the CPU in float32, read from the verified bytes of its .xml and .bin; a graph
    whose inputs are fixed but for the batch is compiled for one image a run (a static shape: bottle, PatchCore
    416/384, 20-23 -> 17-19 ms an image over a batch, 24-28 -> 22-24 at batch 1); any other graph runs `chunk` images
    at a time."""

    def __init__(self, files: list[bytes], threads: int | None, chunk: int) -> None:
        try:
            import openvino
        except ImportError as exc:
            raise DefectscopeError("running an OpenVINO export needs openvino: pip install 'defectscope[openvino]'") from exc
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            core = openvino.Core()
            weights = openvino.Tensor(np.frombuffer(files[1], np.uint8).copy())
            model = core.read_model(files[0], weights)
            shapes = [list(graph_input.get_partial_shape())[1:] for graph_input in model.inputs]
            self.chunk = 1 if all(dim.is_static for shape in shapes for dim in shape) else chunk
            if self.chunk == 1:
                model.reshape({graph_input.get_any_name(): [1, *(dim.get_length() for dim in shape)]
                               for graph_input, shape in zip(model.inputs, shapes)})
            self.model = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types
            raise _engine_error("OpenVINO", exc) from exc

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.model(inputs)
        return [results[output] for output in self.model.outputs]


ENGINE_FILES = {"onnxruntime": (".onnx",), "openvino": (".xml", ".bin")}  # the files each engine reads, in order


def graph_files(manifest: object) -> list[tuple[str, str]]:
    """(file name, sha256) of every graph file a deployment manifest lists (a searched model's two graphs one after
    the other); plain names only, checked."""
    try:
        graph = manifest["graph"]  # type: ignore[index]
        listed = [(entry["file"], entry["sha256"]) for entry in graph["files"]]
        suffixes = ENGINE_FILES[graph["engine"]] * (2 if "search" in graph else 1)
    except (KeyError, TypeError) as exc:
        raise DefectscopeError(f"its manifest does not list its graph files ({exc})") from exc
    if len(listed) != len(suffixes) or not all(
            isinstance(name, str) and isinstance(digest, str) and Path(name).name == name and not name.startswith(".")
            and name.endswith(suffix) for (name, digest), suffix in zip(listed, suffixes)):
        raise DefectscopeError(f"its manifest's graph files {listed!r:.200} are not plain {' + '.join(suffixes)} file names")
    return listed


def memory_digest(memory: dict[str, np.ndarray]) -> str:
    """The sha256 of a searched model's memory (MEMORY_NAMES, in order: dtype, shape and bytes of each)."""
    digest = hashlib.sha256()
    for name in MEMORY_NAMES:
        array = np.ascontiguousarray(memory[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _whole(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DefectscopeError(f"its {what} must be a whole number >= 1, got {value!r:.40}")
    return value


def _threshold(calibration: object) -> float | None:
    if calibration is None:
        return None
    value = calibration.get("threshold") if isinstance(calibration, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise DefectscopeError(f"its threshold must be a positive finite number, got {value!r:.40}")
    return float(value)


def is_deployment(path: str | Path) -> bool:
    """Whether `path` is a deployment file written by `defectscope export model` (reads the header only)."""
    return is_manifest_file(Path(path), DEPLOYMENT_FORMAT)


def checked_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a deployment file (`read_deployment`, with every graph file it lists beside it and intact) or
    of a model file (`model_header.model_info`), each file checked whole; no model is built and no torch imported."""
    if not is_deployment(path):
        return model_info(path)
    manifest = read_deployment(path)[0]
    try:
        listed = graph_files(manifest)
    except DefectscopeError as exc:
        raise DefectscopeError(f"deployment file {path} is damaged: {exc}") from exc
    for name, digest in listed:
        verified_graph(Path(path), name, digest)
    return manifest


def verified_graph(deployment: Path, name: str, digest: str) -> bytes:
    """The bytes of a graph file beside the deployment file, refused unless they hash to what the manifest recorded."""
    path = deployment.parent / name  # beside this file, never elsewhere
    if not path.is_file():
        raise DefectscopeError(f"the graph file {name} of {deployment} is missing; copy it beside the deployment file")
    data = read_regular(path, "graph file", MAX_GRAPH_BYTES)
    if hashlib.sha256(data).hexdigest() != digest:
        raise DefectscopeError(f"the graph file {path} does not match {deployment} (sha256 differs: altered, truncated "
                               "or from another export); export again")
    return data


def read_deployment(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A deployment file's manifest (format, version and digest checked) and tensors (its layout intact), without
    building its engines: what `DeployedModel` starts from and `defectscope info` prints."""
    data = read_regular(path, "deployment file", MAX_DEPLOYMENT_BYTES)
    manifest = read_header_manifest(data, path, DEPLOYMENT_FORMAT, DEPLOYMENT_VERSION, "deployment file",
                                    DEPLOYMENT_VERSION)
    if manifest["format_version"] < DEPLOYMENT_VERSION:
        raise DefectscopeError(f"deployment file {path} is from an older defectscope (format "
                               f"{manifest['format_version']}); export the model again")
    try:
        return manifest, load_arrays(data)  # the layout must be intact: a truncated or altered file is refused
    except (SafetensorError, ValueError) as exc:
        raise DefectscopeError(f"deployment file {path} is corrupt: {exc}") from exc


class DeployedModel:
    """An exported model: `predict` gives the library's `Prediction` (score, verdict, map at the original size)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        check_threads(threads)
        self.path = Path(path)
        self.search_threads = threads or os.cpu_count() or 1  # the search's: the engines' count, else every core
        self.manifest, memory = read_deployment(self.path)
        try:
            model, graph = self.manifest["model"], self.manifest["graph"]
            self.head, engine = self.manifest["head"], graph["engine"]
            if self.head not in HEADS or engine not in ENGINES.values():
                raise DefectscopeError(f"it needs head {self.head!r:.40} / engine {engine!r:.40}, which this defectscope "
                                       "does not know; upgrade defectscope")
            self.preprocess = Preprocess.from_dict(model["preprocess"])
            self.name = model["detector"]
            if not isinstance(self.name, str):
                raise DefectscopeError("its detector name is not text")
            self.calibration_dict = model.get("calibration")
            self.threshold = _threshold(self.calibration_dict)
            self.batch_size = _whole(model.get("config", {}).get("batch_size", 32), "batch size")
            listed = graph_files(self.manifest)
            self.train_digests = _train_digests(memory.pop(TRAIN_DIGESTS, None), self.manifest.get("train_digests"))
            self.index = None if "search" not in graph else _memory_index(memory, graph["search"])
        except DefectscopeError as exc:
            raise DefectscopeError(f"deployment file {self.path} is damaged: {exc}") from exc
        except (KeyError, TypeError, AttributeError) as exc:
            raise DefectscopeError(f"deployment file {self.path} is damaged: its manifest is incomplete ({exc})") from exc
        files = [verified_graph(self.path, name, digest) for name, digest in listed]
        per_graph = len(ENGINE_FILES[engine])
        build = OnnxEngine if engine == "onnxruntime" else OpenVinoEngine
        per_pass = images_per_pass(*self.preprocess.input_shape)  # as the library's backbone passes
        self.engine: Engine = build(files[:per_graph], threads, per_pass)
        self.scores_engine: Engine | None = None if self.index is None else build(files[per_graph:], threads, per_pass)

    @property
    def localizes(self) -> bool:
        return self.head != "score"

    @property
    def label_types(self) -> None:
        """None: an exported graph gives scores and maps, never typed detections."""
        return None

    @property
    def backbone_name(self) -> str:
        return str(self.manifest["model"]["config"].get("backbone", "unknown"))

    @property
    def calibration(self) -> Calibration | None:
        """The model's calibration, checked."""
        return None if self.calibration_dict is None else Calibration.from_dict(self.calibration_dict)

    def score_frames(self, batch: np.ndarray) -> Scored:
        """uint8 frames N x 3 x h x w -> image scores and model-frame maps (None for image-level models)."""
        if self.index is not None:
            return self._score_searched(batch)
        outputs = _in_chunks(self.engine, {INPUT_NAME: batch})
        return Scored(outputs[0].reshape(len(batch)), outputs[1] if self.head == "map" else None)

    def _score_searched(self, batch: np.ndarray) -> Scored:
        """The first graph's patch features, each one's nearest memory row by the library's exact search (the whole
        batch at once: its GEMMs are larger), then the second graph's scores and maps from those distances (and the
        first graph's region descriptors)."""
        searched = _in_chunks(self.engine, {INPUT_NAME: batch})
        patches = searched[0]
        queries = patches.reshape(-1, patches.shape[-1])
        distances = self.index.search(queries, self.search_threads)[0].reshape(patches.shape[:3])
        scores, maps = _in_chunks(self.scores_engine, {"distances": distances, **dict(zip(SEARCH_NAMES[1:], searched[1:]))})
        return Scored(scores.reshape(len(batch)), maps)

    def predict(self, images: Sequence[ImageSource], map_size: str | tuple[int, int] = "original",
                progress: Callable[[int], None] | None = None, keep_going: bool = False) -> Prediction:
        """Score images as `MapModel.predict` does; unreadable images stop the call or, with `keep_going`, score NaN."""
        return predict_frames(images, self.preprocess, self.batch_size, self.score_frames, self.threshold, self.localizes,
                              map_size, keep_going, progress)


def _in_chunks(engine: Engine, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`engine.run` on `engine.chunk` images at a time, each output joined over the chunks."""
    count = len(next(iter(inputs.values())))
    runs = [engine.run({name: value[start : start + engine.chunk] for name, value in inputs.items()})
            for start in range(0, count, engine.chunk)]
    return [np.concatenate(outputs) for outputs in zip(*runs)]


def digests_record(digests: np.ndarray) -> dict[str, Any]:
    """What a deployment manifest records of its training images' digests: their count and the sha256 of their bytes."""
    return {"images": len(digests), "sha256": hashlib.sha256(np.ascontiguousarray(digests).tobytes()).hexdigest()}


def _train_digests(digests: np.ndarray | None, recorded: object) -> np.ndarray | None:
    """The training images' digests of a deployment file, checked against its manifest's record (None: not recorded)."""
    if digests is None and recorded is None:
        return None
    if digests is None or digests.dtype != np.uint8 or digests.ndim != 2 or digests.shape[1] != 32 \
            or recorded != digests_record(digests):
        raise DefectscopeError("its training images' digests do not match its manifest (altered or truncated); export again")
    return digests


def _memory_index(memory: dict[str, np.ndarray], search: object) -> ClusterIndex:
    """The searched memory of a deployment file, checked against the digest its manifest recorded, as an index."""
    if not isinstance(search, dict) or set(memory) != set(MEMORY_NAMES) or search.get("sha256") != memory_digest(memory):
        raise DefectscopeError("its memory bank does not match the digest its manifest recorded (altered or truncated); "
                               "export again")
    bank, offsets = memory["memory_bank"], memory["cluster_offsets"]
    if bank.ndim != 2 or bank.dtype != np.float32 or offsets.ndim != 1 or offsets.dtype != np.int64 or not len(offsets) \
            or offsets[0] != 0 or offsets[-1] != len(bank) or np.any(np.diff(offsets) < 0) or not np.isfinite(bank).all():
        raise DefectscopeError("its memory bank is not a finite float32 matrix with int64 cluster offsets over its rows")
    return ClusterIndex(bank, offsets)


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
        skipped: list[Path] = []
        paths = expand_inputs(args.inputs, skipped)
        rows = prediction_rows(paths, model.predict(paths, keep_going=True))
    except DefectscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(json_text(row, indent=None))
    if skipped:
        print(f"warning: {skipped_note(skipped)}", file=sys.stderr)
    return 3 if any(row["verdict"] == "error" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
