"""The predictor contract every caller scores with: a loaded model file (`MapModel`) or an exported model
(`runtime.DeployedModel`) alike."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from defectscope.data.batches import iterate_batches
from defectscope.data.decode import ImageSource
from defectscope.data.frame import Preprocess
from defectscope.prediction import Prediction, Scored, prediction_rows
from defectscope.errors import ModelChanged
from defectscope.files import file_sha256, read_regular
from defectscope.runtime import DEPLOYMENT_SUFFIX, DeployedModel, graph_files, is_deployment

if TYPE_CHECKING:
    from defectscope.calibration import Calibration


@runtime_checkable
class Predictor(Protocol):
    """A fitted scorer: its frame, whether it makes maps, its calibration, and scoring of frames or images."""

    name: str

    @property
    def preprocess(self) -> Preprocess:
        """The model frame: images are decoded, resized and cropped to it before scoring."""

    @property
    def backbone_name(self) -> str:
        """The registered backbone its features come from."""

    @property
    def localizes(self) -> bool:
        """Whether it makes a map per image (else it scores whole images only)."""

    @property
    def label_types(self) -> list[str] | None:
        """The defect types its detections carry (models that tell types apart), else None."""

    @property
    def calibration(self) -> Calibration | None:
        """The operating point (threshold and its evidence), or None before calibration."""

    @property
    def train_digests(self) -> np.ndarray | None:
        """The sha256 of each image it learned from (N x 32 uint8), or None where they were not recorded."""

    def score_frames(self, batch: np.ndarray) -> Scored:
        """uint8 frames N x 3 x h x w -> scores, finished model-frame maps and any detections."""

    def predict(self, images: Sequence[ImageSource], map_size: str | tuple[int, int] = "original",
                progress: Callable[[int], None] | None = None, keep_going: bool = False) -> Prediction:
        """Decode, frame and score images (`prediction.predict_frames`); failures NaN with `keep_going`."""


def engine_of(predictor: Predictor) -> str:
    """What runs a predictor: 'torch' for a model file, else its exported graph's engine (onnxruntime, openvino)."""
    return predictor.manifest["graph"]["engine"] if isinstance(predictor, DeployedModel) else "torch"


def load_predictor(path: Path, weights: Path | None = None, threads: int | None = None) -> Predictor:
    """A model file, or an exported model (a .dsdeploy file, run without torch on `threads` threads)."""
    if Path(path).suffix == DEPLOYMENT_SUFFIX or is_deployment(path):
        return DeployedModel(path, threads)
    from defectscope.artifacts import load_model  # torch: imported only for model files

    return load_model(path, weights)


LOAD_ATTEMPTS = 3  # loads of a model file that another command is writing, before giving up


def load_identified(path: Path, weights: Path | None = None, threads: int | None = None
                    ) -> tuple[Predictor, str, dict]:
    """A predictor with the sha256 and the manifest of the very file it was loaded from: the file is hashed before
    and after, and loaded again when another command replaced it meanwhile, so a verdict is never recorded under
    the version of a file that did not judge it."""
    from defectscope.model_header import model_info

    for _ in range(LOAD_ATTEMPTS):
        before = file_sha256(Path(path))
        predictor = load_predictor(path, weights, threads)
        manifest = predictor.manifest if isinstance(predictor, DeployedModel) else model_info(path)
        if file_sha256(Path(path)) == before:
            return predictor, before, manifest
    raise ModelChanged(f"model file {path} changed {LOAD_ATTEMPTS} times while it was loaded; start again once the "
                       "command writing it is done")


def warm_up(predictor: Predictor) -> None:
    """Score one blank frame, so that the first part after a start or a reload is judged as fast as the next: an
    engine sets itself up on its first run (bottle: OpenVINO's first request 363 ms, then 52-84; torch's 106, then 58)."""
    predictor.score_frames(np.zeros((1, 3, *predictor.preprocess.input_shape), np.uint8))


def model_files(path: Path, predictor: Predictor, sha256: str) -> dict[str, bytes]:
    """The files of a loaded model by name: the model file (whose bytes must still hash to `sha256`, the file the
    predictor was loaded from), and an export's graph files beside it (checked against its manifest when loaded);
    written into any folder, they load as the same model (how a model travels to a machine that cannot read `path`)."""
    path = Path(path)
    names = [path.name] + ([name for name, _ in graph_files(predictor.manifest)] if isinstance(predictor, DeployedModel)
                           else [])
    files = {name: read_regular(path.parent / name, "model file") for name in names}
    if hashlib.sha256(files[path.name]).hexdigest() != sha256:
        raise ModelChanged(f"model file {path} was replaced after it was loaded; run again once the command writing "
                           "it is done")
    return files


class ContractBroken(AssertionError):
    """A predictor does not keep the contract (`check_predictor`): a defect in its code, not in the user's input."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ContractBroken(what)


def check_predictor(predictor: object, images: Sequence[Path]) -> None:
    """Check the contract on a few readable images, as scikit-learn's `check_estimator` does for estimators.

    It has every member; `score_frames` gives one `Scored` of the right shapes (maps exactly when it localizes);
    `predict` gives the same scores, maps at each image's size, and an unreadable image scores NaN with verdict
    'error', never 'good'. Raises ContractBroken naming the first breach.
    """
    _require(isinstance(predictor, Predictor), f"{type(predictor).__name__} lacks members of the Predictor protocol")
    frames, sizes = next(iterate_batches(images, predictor.preprocess, len(images)))
    scored = predictor.score_frames(frames)
    count, frame_shape = len(images), predictor.preprocess.input_shape
    _require(isinstance(scored, Scored), f"score_frames gave {type(scored).__name__}, not Scored")
    _require(np.shape(scored.scores) == (count,) and bool(np.isfinite(scored.scores).all()),
             f"score_frames gave scores of shape {np.shape(scored.scores)}, not {count} finite numbers")
    maps_shape = None if scored.maps is None else np.shape(scored.maps)
    _require(maps_shape == ((count, *frame_shape) if predictor.localizes else None),
             f"score_frames gave maps of shape {maps_shape} from a predictor that localizes={predictor.localizes}")
    _require(scored.detections is None or len(scored.detections) == count, "score_frames gave detections for "
             f"{len(scored.detections or [])} frames, not {count}")
    missing = Path(images[0]).parent / "no-such-image-for-the-contract-check.png"
    prediction = predictor.predict([*images, missing], keep_going=True)
    _require(isinstance(prediction, Prediction) and len(prediction.scores) == count + 1,
             "predict did not give a Prediction of one score per image")
    _require(bool(np.allclose(prediction.scores[:count], scored.scores, rtol=1e-4, atol=1e-6)),
             "predict's scores differ from score_frames' scores of the same frames")
    rows = prediction_rows([*images, missing], prediction)
    _require(np.isnan(prediction.scores[-1]) and rows[-1]["verdict"] == "error" and bool(prediction.errors[-1]),
             "an unreadable image did not score NaN with verdict 'error' and its reason")
    if predictor.localizes:
        shapes = [None if m is None else m.shape for m in prediction.maps]
        _require(shapes == [tuple(int(v) for v in size) for size in sizes] + [None],
                 f"predict's maps have shapes {shapes}, not each image's size (and None for the unreadable one)")
    else:
        _require(prediction.maps is None, "predict gave maps from a predictor that does not localize")
    threshold = predictor.calibration.threshold if predictor.calibration else None
    _require(prediction.threshold == threshold, f"predict judged at {prediction.threshold}, not its calibration's "
             f"threshold {threshold}")
