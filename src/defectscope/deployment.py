"""Export a fitted model for the torch-free runtime: the inference graph (ONNX or OpenVINO IR) and its deployment file.

The graph holds normalization, backbone, embedding, the model's scoring (PaDiM's Mahalanobis
distances, the embedding baselines, reconstruction errors) and the maps' finishing. PatchCore's
nearest-neighbour search has no fixed graph: its export is two graphs (the embedding; the scores and
maps from the distances), and the runtime searches the memory bank between them with the library's
own pruned exact search (`search.ClusterIndex`); the bank travels in the deployment file. Every
export is checked against the PyTorch model on probe images before anything is written.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as save_arrays
from torch import nn

from defectscope._version import __version__
from defectscope.artifacts import load_model, manifest_of
from defectscope.data.decode import TRAIN_DIGESTS
from defectscope.data.images import normalize
from defectscope.detectors.base import MapModel, finish_scores
from defectscope.errors import DefectscopeError
from defectscope.files import check_output_file, file_sha256, name_max, write_atomic
from defectscope.versions import check_unchanged
from defectscope.manifests import file_bytes, peek_manifest
from defectscope.runtime import (
    DEPLOYMENT_FORMAT,
    DEPLOYMENT_SUFFIX,
    DEPLOYMENT_VERSION,
    ENGINES,
    INPUT_NAME,
    OUTPUT_NAMES,
    MEMORY_NAMES,
    SEARCH_NAMES,
    DeployedModel,
    digests_record,
    memory_digest,
    graph_files,
    is_deployment,
)

OPSET = 17
GRAPH_SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml", ".bin")}
PROBE_IMAGES = 3
PARITY_RTOL = 1e-4  # exported scores agree with the PyTorch model's within this relative difference


class InferenceGraph(nn.Module):
    """uint8 frames N x 3 x h x w -> normalization, backbone, embedding, the model's `graph_scores` and the
    map finishing: image scores N, and for localizing models the model-frame maps N x h x w."""

    def __init__(self, model: MapModel) -> None:
        super().__init__()
        self.model = model
        # the model's networks (backbone, autoencoder, segmenter...), registered so their weights become the graph's initializers
        self.networks = nn.ModuleList(part for part in vars(model).values() if isinstance(part, nn.Module))

    def forward(self, frames: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        scores, frame = finish_scores(*self.model.graph_scores(self.embedded(frames)), self.model.preprocess.input_shape)
        return scores if frame is None else (scores, frame)

    def embedded(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.embed(normalize(frames, self.model.preprocess))


class SearchInputGraph(InferenceGraph):
    """The first graph of a searched model: uint8 frames -> what the search outside the graph takes (`searched_outputs`)."""

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.searched_outputs(self.embedded(frames))


class SearchOutputGraph(InferenceGraph):
    """The second graph of a searched model: nearest distances N x h x w (and region descriptors) -> image scores
    and finished model-frame maps, as `InferenceGraph` gives them."""

    def forward(self, distances: torch.Tensor, *regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return finish_scores(*self.model.score_searched(distances, *regions), self.model.preprocess.input_shape)


def _trace(graph: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str], path: Path,
           file_format: str) -> list[Path]:
    """Trace `graph` into `path` (ONNX; converted to OpenVINO IR beside it on request), the batch dimension dynamic;
    returns the graph files."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes on Python-side shapes: the frame is fixed, only the batch varies
        torch.onnx.export(graph.eval(), example, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [*inputs, *outputs]}, opset_version=OPSET,
                          dynamo=False)
    if file_format == "onnx":
        return [path]
    try:
        import openvino
    except ImportError as exc:
        raise DefectscopeError("exporting to OpenVINO needs openvino: pip install 'defectscope[openvino]'") from exc
    xml_path = path.with_suffix(".xml")
    openvino.save_model(openvino.convert_model(str(path)), str(xml_path), compress_to_fp16=False)
    return [xml_path, xml_path.with_suffix(".bin")]


def _write_graph(model: MapModel, file_format: str, folder: Path, stem: str, searched: bool) -> list[Path]:
    """Trace the model into `folder`: one graph, or for a `searched` model the graphs before and after its search
    (`stem` and `stem`-scores); returns the graph files in the order the runtime runs them."""
    example = torch.zeros(2, 3, *model.preprocess.input_shape, dtype=torch.uint8)
    if not searched:
        outputs = list(OUTPUT_NAMES[: 2 if model.localizes else 1])
        return _trace(InferenceGraph(model), (example,), [INPUT_NAME], outputs, folder / f"{stem}.onnx", file_format)
    embedding = SearchInputGraph(model)
    with torch.inference_mode():
        searched_example = embedding(example)  # the shapes the second graph takes
    names = list(SEARCH_NAMES[: len(searched_example)])
    first = _trace(embedding, (example,), [INPUT_NAME], names, folder / f"{stem}.onnx", file_format)
    distances = torch.zeros(searched_example[0].shape[:3])
    second = _trace(SearchOutputGraph(model), (distances, *searched_example[1:]), ["distances", *names[1:]], list(OUTPUT_NAMES),
                    folder / f"{stem}-scores.onnx", file_format)
    return first + second


def _probe_images(model: MapModel) -> list[np.ndarray]:
    """Seeded probe images at the frame's size: smooth gradients with noise and a bright blob."""
    rng = np.random.default_rng(0)
    height, width = model.preprocess.input_shape
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    images = []
    for k in range(PROBE_IMAGES):
        image = ramp + rng.normal(0, 8 + 8 * k, (height, width, 3))
        image[height // 3 : height // 2, width // 3 : width // 2] += 40 * k
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def check_parity(model: MapModel, deployed: DeployedModel) -> float:
    """The largest relative score difference between the PyTorch model and its export on probe images; raises above PARITY_RTOL."""
    probes = _probe_images(model)
    expected, got = model.predict(probes, map_size="input"), deployed.predict(probes, map_size="input")
    difference = float(np.max(np.abs(got.scores - expected.scores) / np.maximum(np.abs(expected.scores), 1e-12)))
    if not difference <= PARITY_RTOL:
        raise DefectscopeError(f"the exported graph disagrees with the model (relative score difference {difference:.2g} "
                               f"> {PARITY_RTOL:g}); nothing was written")
    return difference


def _descriptor(manifest: dict, memory: dict[str, np.ndarray]) -> bytes:
    """The deployment file: a safetensors file whose header holds the manifest and the digests, and whose tensors are
    the memory a searched model's runtime searches (none for the others)."""
    return file_bytes(lambda metadata: save_arrays(memory, metadata=metadata), manifest)


def _graph_targets(out: Path, file_format: str, graphs: int) -> list[Path]:
    """The graph files written beside `out`: `stem` + the format's suffixes, then `stem`-scores + them for a second graph."""
    return [out.with_name(stem + suffix) for stem in [out.stem, f"{out.stem}-scores"][:graphs]
            for suffix in GRAPH_SUFFIXES[file_format]]


def _our_graph_files(out: Path) -> set[Path]:
    """The graph files an existing deployment file at `out` lists and that still match the hashes it recorded."""
    if not (out.is_file() and is_deployment(out)):
        return set()
    try:
        listed = graph_files(peek_manifest(out))
    except DefectscopeError:
        return set()
    return {out.parent / name for name, digest in listed if (out.parent / name).is_file()
            and file_sha256(out.parent / name) == digest}


def export_model(model_path: str | Path, out: str | Path, file_format: str = "onnx", force: bool = False) -> list[Path]:
    """Write `out` (a .dsdeploy file) and its graph beside it, after checking the export against the model.

    Returns the files written. An existing file is replaced only when the deployment file already at
    `out` wrote it (its recorded sha256 still matches) or with `force`; the graph files of that earlier
    export that this one does not write are removed. The source model is never a target.
    """
    model_path, out = Path(model_path), Path(out)
    if file_format not in ENGINES:
        raise DefectscopeError(f"unknown export format {file_format!r}; choose one of: {', '.join(ENGINES)}")
    if out.suffix != DEPLOYMENT_SUFFIX:
        raise DefectscopeError(f"the output must be a {DEPLOYMENT_SUFFIX} file (its graph is written beside it), got {out}")
    source_sha256 = file_sha256(model_path)
    model = load_model(model_path)
    check_unchanged(model_path, source_sha256, "export")  # the manifest names the very file exported
    searched = model.searched_memory()
    memory = {} if searched is None else {name: np.ascontiguousarray(tensor.numpy()) for name, tensor in
                                             zip(MEMORY_NAMES, searched)}
    digests = {} if model.train_digests is None else {TRAIN_DIGESTS: np.ascontiguousarray(model.train_digests, np.uint8)}
    targets = _graph_targets(out, file_format, 1 if searched is None else 2)
    limit = name_max(out.parent)
    if any(len(os.fsencode(target.name)) > limit for target in targets):
        longest = max(len(os.fsencode(t.name)) - len(os.fsencode(out.name)) for t in targets)
        raise DefectscopeError(f"the graph files named after {out.name} would pass the file system's {limit}-byte "
                               f"names; choose a name of at most {limit - longest} bytes")
    for target in [out, *targets]:
        if model_path.exists() and target.exists() and target.resolve() == model_path.resolve():
            raise DefectscopeError(f"the export would overwrite its source model {model_path}; choose another output name")
    check_output_file(out, force, is_ours=is_deployment)
    ours = _our_graph_files(out)
    for target in targets:
        check_output_file(target, force, is_ours=lambda path: path in ours)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as folder:
        staged = _write_graph(model, file_format, Path(folder), out.stem, searched is not None)
        manifest = {
            "format": DEPLOYMENT_FORMAT,
            "format_version": DEPLOYMENT_VERSION,
            "library_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": manifest_of(model),
            "source": {"file": model_path.name, "sha256": source_sha256},
            "graph": {"files": [{"file": path.name, "sha256": file_sha256(path)} for path in staged],
                      "engine": ENGINES[file_format], "opset": OPSET,
                      **({} if searched is None else {"search": {"rows": len(memory["memory_bank"]),
                                                                 "sha256": memory_digest(memory)}})},
            "head": "map" if model.localizes else "score",
            **({} if not digests else {"train_digests": digests_record(digests[TRAIN_DIGESTS])}),
        }
        staged_descriptor = Path(folder) / out.name
        staged_descriptor.write_bytes(_descriptor(manifest, {**memory, **digests}))
        manifest["parity"] = {"probe_images": PROBE_IMAGES,
                              "max_relative_score_difference": check_parity(model, DeployedModel(staged_descriptor, 2))}
        descriptor = _descriptor(manifest, {**memory, **digests})
        for source, target in zip(staged, targets):
            write_atomic(target, source.read_bytes())
    write_atomic(out, descriptor)
    for stale in ours - {path.resolve() for path in targets} - set(targets):
        stale.unlink(missing_ok=True)
    return [out, *targets]
