"""torchxrayvision's chest X-ray weights (``--weights txrv:NAME``) from its cache folder, read without unpickling code."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from chestxray.errors import ChestXrayError, InputError
from chestxray.model.models import TXRV_WEIGHTS, create_model, txrv_weights_path, weights_source
from chestxray.training.config import TrainConfig
from chestxray.training.train import pretrained_config

NAME = "txrv:densenet121-res224-all"


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """An untrained DenseNet-121's state dict (torchxrayvision's key names are torchvision's, as timm's)."""
    torch.manual_seed(0)
    state = timm.create_model("densenet121", pretrained=False, in_chans=1, num_classes=18).state_dict()
    return {key: value.clone() for key, value in state.items()}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _whole_model(reference: dict[str, torch.Tensor], path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Save a whole pickled model as torchxrayvision's DenseNet files are: classes of the module
    ``torchxrayvision.models`` (stand-ins here, removed again before loading), torch layers, tensors."""
    package, models = types.ModuleType("torchxrayvision"), types.ModuleType("torchxrayvision.models")
    classes = {name: type(name, (nn.Module,), {"__module__": "torchxrayvision.models"})
               for name in ("DenseNet", "_DenseBlock", "_DenseLayer")}
    for name, cls in classes.items():
        setattr(models, name, cls)
    monkeypatch.setitem(sys.modules, "torchxrayvision", package)
    monkeypatch.setitem(sys.modules, "torchxrayvision.models", models)
    root = classes["DenseNet"]()
    for key, tensor in reference.items():
        if key.startswith("classifier."):
            continue
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, classes["_DenseBlock" if "block" in part else "_DenseLayer"]())
            node = node._modules[part]
        if tensor.is_floating_point() and not leaf.startswith("running"):
            node.register_parameter(leaf, nn.Parameter(tensor.clone()))
        else:
            node.register_buffer(leaf, tensor.clone())
    root.add_module("classifier", nn.Linear(1024, 18))
    root.register_buffer("op_threshs", torch.rand(18))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(root, path)
    monkeypatch.delitem(sys.modules, "torchxrayvision.models")
    monkeypatch.delitem(sys.modules, "torchxrayvision")


def test_missing_weights_say_where_the_file_goes(home: Path) -> None:
    with pytest.raises(InputError) as err:
        create_model("densenet121", 3, NAME)
    message = str(err.value)
    expected = home / ".torchxrayvision/models_data" / TXRV_WEIGHTS["densenet121-res224-all"][0]
    assert message.startswith(f"{expected}: torchxrayvision weights densenet121-res224-all not found: download "
                              "https://github.com/mlmed/torchxrayvision/releases/download/v1/nih-pc-chex")
    assert "\n" not in message and txrv_weights_path("txrv:all") == expected


def test_a_pickled_torchxrayvision_model_loads_under_a_new_head(home: Path, reference, monkeypatch) -> None:
    _whole_model(reference, txrv_weights_path(NAME), monkeypatch)
    assert "torchxrayvision" not in sys.modules
    model = create_model("densenet121", 3, NAME, task="multilabel")
    torch.testing.assert_close(model.backbone.state_dict()["features.conv0.weight"], reference["features.conv0.weight"])
    torch.testing.assert_close(model.backbone.state_dict()["features.norm5.running_var"],
                               reference["features.norm5.running_var"])
    assert model.backbone.get_classifier().out_features == 3
    assert model.mean.item() == 0.5 and (1 - model.mean) / model.std == pytest.approx(1024)  # [0, 1] -> [-1024, 1024]
    record = weights_source(NAME)
    assert record["url"].endswith(TXRV_WEIGHTS["densenet121-res224-all"][0]) and len(record["sha256"]) == 64
    assert record["input"] == {"channels": 1, "range": [-1024.0, 1024.0], "size": 224}


def test_a_state_dict_file_loads_too(home: Path, reference) -> None:
    path = txrv_weights_path("txrv:nih")
    path.parent.mkdir(parents=True)
    torch.save({**reference, "op_threshs": torch.rand(18)}, path)
    model = create_model("densenet121", 2, "txrv:nih")
    torch.testing.assert_close(model.backbone.state_dict()["features.conv0.weight"], reference["features.conv0.weight"])


class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


@pytest.mark.parametrize("content, reason", [
    ("resnet", "weights do not match the model: "),
    ("code", "not torchxrayvision weights (it refers to "),
    ("junk", "not torchxrayvision weights ("),
])
def test_a_wrong_file_is_refused_in_one_line(home: Path, content: str, reason: str) -> None:
    path = txrv_weights_path(NAME)
    path.parent.mkdir(parents=True)
    if content == "resnet":
        torch.save(timm.create_model("resnet18", pretrained=False, in_chans=1).state_dict(), path)
    elif content == "code":
        torch.save({"x": _Payload()}, path, pickle_module=pickle)
    else:
        path.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(InputError) as err:
        create_model("densenet121", 3, NAME)
    assert str(err.value).startswith(f"{path}: {reason}") and "\n" not in str(err.value)


def test_other_architecture_or_name_is_one_line(home: Path) -> None:
    with pytest.raises(ChestXrayError, match="holds densenet121 weights, not resnet18: train with --arch densenet121"):
        create_model("resnet18", 3, NAME)
    with pytest.raises(ChestXrayError, match="unknown torchxrayvision weights 'txrv:vgg'"):
        create_model("densenet121", 3, "txrv:vgg")


def test_training_takes_torchxrayvisions_preprocessing() -> None:
    config = pretrained_config(TrainConfig(arch="densenet121", weights="txrv:chex"))
    assert (config.image_size, config.fit_mode) == (224, "crop")
    assert pretrained_config(TrainConfig()) == TrainConfig()
