"""Backbones load real ImageNet weights offline; torchvision weights are found and hash-checked."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision

from defectscope import backbones
from defectscope.backbones import Checkpoint, load_backbone, published_checkpoint
from defectscope.data import batches
from defectscope.data.frame import Preprocess
from defectscope.data.images import normalize
from defectscope.efficientnet_lite import SameConv2d
from defectscope.errors import DefectscopeError

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


def _top_class(backbone: backbones.Backbone, image: np.ndarray) -> int:
    pre = Preprocess(256, 224, backbone.mean, backbone.std)
    x = normalize(torch.from_numpy(np.ascontiguousarray(pre.resize_crop(image).transpose(2, 0, 1)))[None], pre)
    with torch.no_grad():
        return int(backbone.network(x.contiguous(memory_format=torch.channels_last)).argmax())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_lite_has_imagenet_weights(name: str) -> None:
    backbone = load_backbone(name, strides=(4, 8, 16, 32))
    assert _top_class(backbone, skimage.data.chelsea()) in CATS
    assert _top_class(backbone, skimage.data.coffee()) == ESPRESSO
    maps = backbone(torch.zeros(2, 3, 224, 224))
    assert {s: m.shape[-1] for s, m in maps.items()} == {4: 56, 8: 28, 16: 14, 32: 7}
    assert backbone.weights_sha256.startswith(published_checkpoint(name).sha256_prefix)


def test_published_torchvision_names() -> None:
    assert published_checkpoint("resnet18") == Checkpoint("resnet18-f37072fd.pth", "f37072fd")
    assert published_checkpoint("wide_resnet50_2").file_name == "wide_resnet50_2-9ba9bcbe.pth"
    with pytest.raises(DefectscopeError, match="unknown backbone 'resnet1800'"):
        published_checkpoint("resnet1800")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache and no weights directory."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(backbones.WEIGHTS_DIR_ENV, raising=False)
    return tmp_path / "hub" / "checkpoints"


def test_torchvision_weights_from_hub_cache(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    hub.mkdir(parents=True)
    target = hub / "resnet18-f37072fd.pth"
    torch.save(state, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    # The file we made cannot carry torchvision's published hash; expect our file's own prefix instead.
    monkeypatch.setattr(backbones, "published_checkpoint", lambda name: Checkpoint(target.name, digest[:8]))
    backbone = load_backbone("resnet18", strides=(8, 16))
    assert backbone.weights_sha256 == digest
    assert torch.equal(backbone.network.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    maps = backbone(torch.zeros(1, 3, 64, 64))
    assert maps[8].shape == (1, 128, 8, 8) and maps[16].shape == (1, 256, 4, 4)


def test_torchvision_weights_with_wrong_hash_are_rejected(hub: Path) -> None:
    hub.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), hub / "resnet18-f37072fd.pth")
    with pytest.raises(DefectscopeError, match="must start with f37072fd"):
        load_backbone("resnet18")


def test_missing_weights_name_file_places_and_remedy(hub: Path) -> None:
    with pytest.raises(DefectscopeError) as error:
        load_backbone("wide_resnet50_2")
    message = str(error.value)
    assert "wide_resnet50_2-9ba9bcbe.pth" in message and str(hub) in message
    assert "--weights" in message and backbones.WEIGHTS_DIR_ENV in message


def test_explicit_weight_file_and_env_folder(hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DefectscopeError, match="does not exist"):
        load_backbone("resnet18", weights=tmp_path / "nope.pth")
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "resnet18-f37072fd.pth").write_bytes(b"garbage")
    monkeypatch.setenv(backbones.WEIGHTS_DIR_ENV, str(folder))
    with pytest.raises(DefectscopeError, match="not the published weights"):
        load_backbone("resnet18")


@pytest.mark.parametrize("kernel,groups", [(3, 8), (5, 8), (3, 1)])
@pytest.mark.parametrize("size", [(32, 32), (31, 32), (33, 30), (7, 7)])
def test_same_conv_matches_tensorflow_padding(kernel: int, groups: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = SameConv2d(8, 8, kernel, stride=2, groups=groups)
    x = torch.randn(2, 8, *size)
    pads = [max((math.ceil(n / 2) - 1) * 2 + kernel - n, 0) for n in size]
    padded = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
    expected = F.conv2d(padded, conv.weight, conv.bias, 2, 0, 1, groups)
    torch.testing.assert_close(conv(x), expected)


def test_backbone_runs_in_passes_of_its_pixel_budget_with_the_same_maps(monkeypatch) -> None:
    monkeypatch.setattr(batches, "PASS_PIXELS", 2 * 64 * 64 + 100)  # two 64 x 64 frames a pass
    backbone = load_backbone("efficientnet_lite0", (8, 16))
    passes, forward = [], backbone._forward
    backbone._forward = lambda x: passes.append(len(x)) or forward(x)
    x = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        whole = backbone(x)
        assert passes == [2, 2, 1]
        single = [backbone(x[i : i + 1]) for i in range(len(x))]
    assert batches.images_per_pass(2000, 2000) == 1  # a frame over the budget still runs, alone
    for stride in (8, 16):
        torch.testing.assert_close(whole[stride], torch.cat([s[stride] for s in single]), atol=1e-4, rtol=1e-4)


def test_freeze_through_trains_only_the_used_stages_after_the_stride() -> None:
    from defectscope.backbones import freeze_through

    backbone = load_backbone("efficientnet_lite0", (8, 16))
    freeze_through(backbone, 8)
    ends = backbone.network.stage_ends
    trainable = {n for n, p in backbone.network.named_parameters() if p.requires_grad}
    blocks = {int(n.split(".")[1]) for n in trainable if n.startswith("_blocks.")}
    assert blocks == set(range(ends[8] + 1, ends[16] + 1))
    assert not any(n.startswith(("_conv_stem", "_conv_head", "_fc")) for n in trainable)
    freeze_through(backbone, 0)
    assert any(p.requires_grad for n, p in backbone.network.named_parameters() if n.startswith("_conv_stem"))
    with pytest.raises(DefectscopeError, match="freeze must be"):
        freeze_through(backbone, 12)
