"""Tests for chestxray.models: registry, offline ImageNet weights, local weight files, freezing."""

from __future__ import annotations

import socket

import pytest
import timm.models._builder
import torch
from safetensors.torch import save_file
from skimage import color, data, transform

from chestxray.errors import ChestXrayError, InputError
from chestxray.model.models import ChestXrayNet, create_model, list_models

CAT_CLASSES = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def gray_cat() -> torch.Tensor:
    """scikit-image's cat photo as one gray 224 px image in [0, 1], shape (1, 1, 224, 224)."""
    gray = transform.resize(color.rgb2gray(data.chelsea()), (224, 224), anti_aliasing=True)
    return torch.from_numpy(gray).float()[None, None]


def top5(model: ChestXrayNet, x: torch.Tensor) -> set[int]:
    with torch.no_grad():
        return set(model.eval()(x).topk(5).indices[0].tolist())


def test_offline_imagenet_weights_recognise_a_cat(gray_cat: torch.Tensor) -> None:
    # Same path as training models (key mapping, 1-channel stem, normalisation buffers); only the head is kept.
    pretrained = create_model("tf_efficientnet_lite0", num_classes=1000, weights="imagenet")
    assert top5(pretrained, gray_cat) & CAT_CLASSES

    torch.manual_seed(0)
    random = create_model("tf_efficientnet_lite0", num_classes=1000, weights="none")
    assert not top5(random, gray_cat) & CAT_CLASSES


def test_imagenet_backbone_loaded_and_head_fresh() -> None:
    torch.manual_seed(0)
    first = create_model("tf_efficientnet_lite0", num_classes=3)
    torch.manual_seed(1)
    second = create_model("tf_efficientnet_lite0", num_classes=3)
    assert first.backbone.conv_stem.weight.shape[1] == 1
    assert all(torch.equal(a, b) for a, b in zip(first.backbone_parameters(), second.backbone_parameters()))
    assert not torch.equal(first.backbone.classifier.weight, second.backbone.classifier.weight)
    assert (float(first.mean), float(first.std)) == (0.5, 0.5)


# the larger backbones take seconds each to build on 2 cores: the slow tier builds them
HEAVY = {"resnet50", "densenet121", "vgg16", "tf_efficientnet_lite2", "mobilenetv3_large_100"}


@pytest.mark.parametrize("arch", [pytest.param(arch, marks=pytest.mark.slow) if arch in HEAVY else arch
                                  for arch in list_models()])
def test_every_named_arch_builds(arch: str) -> None:
    model = create_model(arch, num_classes=3, weights="none").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        assert model.features(x).ndim == 2
        assert model.to(memory_format=torch.channels_last)(x).shape == (2, 3)


def test_multilabel_has_the_same_output_shape() -> None:
    model = create_model("resnet18", num_classes=3, weights="none", task="multilabel").eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)
    assert model.task == "multilabel"


def test_gray_statistics_come_from_the_pretrained_config() -> None:
    model = create_model("resnet18", num_classes=2, weights="none")
    assert float(model.mean) == pytest.approx(sum((0.485, 0.456, 0.406)) / 3)
    assert float(model.std) == pytest.approx(sum((0.229, 0.224, 0.225)) / 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_round_trip(tmp_path, suffix: str) -> None:
    source = create_model("resnet18", num_classes=2, weights="none").eval()
    full, bare = tmp_path / f"full{suffix}", tmp_path / f"bare{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), full)
        save_file(source.backbone.state_dict(), bare)
    else:
        torch.save(source.state_dict(), full)
        torch.save(source.backbone.state_dict(), bare)
    x = torch.rand(2, 1, 64, 64)
    for path in (full, bare):
        loaded = create_model("resnet18", num_classes=2, weights=path).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), source(x))


def test_weights_file_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="not found"):
        create_model("resnet18", num_classes=2, weights=tmp_path / "absent.safetensors")
    other = tmp_path / "other.safetensors"
    save_file(create_model("resnet18", num_classes=5, weights="none").state_dict(), other)
    with pytest.raises(InputError, match="another shape") as err:
        create_model("resnet18", num_classes=2, weights=other)
    assert "\n" not in str(err.value)
    wrong_arch = tmp_path / "wrong.safetensors"
    save_file(create_model("mobilenetv3_large_100", num_classes=2, weights="none").state_dict(), wrong_arch)
    with pytest.raises(InputError, match="missing"):
        create_model("resnet18", num_classes=2, weights=wrong_arch)


def test_imagenet_without_internet_names_offline_choices(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("no network")

    # The hub would retry for about a minute without network; fail at once the same way.
    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args: [])  # as if the host resolved
    with pytest.raises(ChestXrayError) as err:
        create_model("resnet18", num_classes=2, weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in ("tf_efficientnet_lite0", "tf_efficientnet_lite2", "PATH", "none"))


def test_unknown_arch_and_task() -> None:
    with pytest.raises(ChestXrayError, match="unknown architecture"):
        create_model("no_such_net", weights="none")
    with pytest.raises(ChestXrayError, match="unknown task"):
        create_model("resnet18", weights="none", task="regression")


def test_freeze_backbone_leaves_only_the_head_trainable() -> None:
    model = create_model("resnet18", num_classes=2, weights="none")
    model.freeze_backbone(True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head_parameters()} == {id(p) for p in model.backbone.fc.parameters()}
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("arch", "frozen_prefixes", "trained_prefix"), [
    ("tf_efficientnet_lite0", ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2."), "blocks.3."),
    ("resnet18", ("conv1.", "bn1.", "layer1.", "layer2."), "layer3."),
    ("densenet121", ("features.conv0.", "features.norm0.", "features.denseblock1.", "features.transition1.",
                     "features.denseblock2."), "features.transition2."),
])
def test_frozen_stride_freezes_the_stages_up_to_that_down_sampling(arch, frozen_prefixes, trained_prefix) -> None:
    model = create_model(arch, num_classes=3, weights="none")
    model.freeze_to_stride(8)
    names = [name for name, _ in model.backbone.named_parameters()]
    frozen = {name for name, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {name for name in names if name.startswith(frozen_prefixes)}
    assert any(name.startswith(trained_prefix) for name in names)
    assert all(p.requires_grad for p in model.head_parameters())
    model.freeze_to_stride(0)  # nothing more, nothing less
    assert {name for name, p in model.backbone.named_parameters() if not p.requires_grad} == frozen


def test_an_unresolvable_hub_fails_at_once(monkeypatch) -> None:
    def unresolvable(host, *args):
        raise socket.gaierror(-2, "Name or service not known")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("the hub must not be tried"))
    with pytest.raises(ChestXrayError, match="huggingface.co is unreachable.*tf_efficientnet_lite0"):
        create_model("resnet18", num_classes=2, weights="imagenet")
