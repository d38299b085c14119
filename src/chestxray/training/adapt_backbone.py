"""Label-free adaptation of the backbone to a site's images: SHOT-IM (Liang et al., ICML 2020).

The classifier layer is frozen (it holds what the labelled training images taught: the hypothesis), and
the backbone is trained on the site's unlabelled images alone so that its features suit that layer there:

- information maximisation: each prediction confident (low entropy) and the predictions diverse over the
  batch (the mean prediction of high entropy), so the site's images do not collapse onto one class;
- plus ``beta`` times the cross-entropy with SHOT's centroid pseudo-labels
  (:func:`chestxray.trust.label_free.centroid_pseudo_labels`), recomputed on the whole site at the start
  of every epoch;
- the training augmentation (:func:`chestxray.data.dataset.augment_batch`), batch norm kept in eval mode
  (the default recipe trains with frozen statistics, so the site's own statistics are never used), and
  classes the site declares absent ruled out of every loss.

Nothing here sees a label. What it cannot check without labels (whether accuracy rose) is said by the
caller; :func:`adapt_backbone` returns the losses and how many pseudo-labels changed per epoch.

Defaults follow the paper (beta 0.3, SGD with Nesterov momentum 0.9, weight decay 1e-3, a backbone learning
rate of 1e-3, i.e. its 1e-2 times the 0.1 it gives the backbone); the number of epochs is set by time:
on 2 CPU cores an epoch over 500 images at 256 px takes about a minute.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .adapt import model_outputs
from ..data.dataset import augment_batch, to_model_input
from ..errors import ChestXrayError
from ..model.models import ChestXrayNet
from ..trust.label_free import centroid_pseudo_labels

__all__ = ["BackboneAdaptation", "adapt_backbone", "BACKBONE_LR", "BACKBONE_BETA"]

BACKBONE_LR = 1e-3
BACKBONE_BETA = 0.3
_RULED_OUT = -1e4  # the logit of a class the site declares absent: no probability, no gradient


@dataclass
class BackboneAdaptation:
    """What backbone adaptation did, per epoch, measured without labels."""

    epochs: int
    lr: float
    beta: float
    loss: list[float] = field(default_factory=list)
    """The mean training loss of each epoch (entropy - diversity + beta * pseudo-label cross-entropy)."""
    pseudo_changed: list[float] = field(default_factory=list)
    """The share of the site's pseudo-labels that changed since the previous epoch (first entry: vs the parent's)."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"method": "SHOT-IM (Liang et al. 2020): backbone trained on the site's unlabelled images, classifier "
                          "frozen; entropy - diversity + beta * centroid pseudo-label cross-entropy",
                "epochs": self.epochs, "lr": self.lr, "beta": self.beta, "loss": [round(v, 4) for v in self.loss],
                "pseudo_label_changed_share": [round(v, 4) for v in self.pseudo_changed],
                "seconds": round(self.seconds, 1)}


def _masked(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~present, _RULED_OUT)


def _pseudo_labels(model: ChestXrayNet, images: np.ndarray, present: np.ndarray) -> np.ndarray:
    logits, features = model_outputs(model, images)
    logits = np.where(present, logits, _RULED_OUT)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return centroid_pseudo_labels(probs, features, present)[0]


def adapt_backbone(model: ChestXrayNet, images: np.ndarray, present: np.ndarray, *, epochs: int = 5,
                   lr: float = BACKBONE_LR, beta: float = BACKBONE_BETA, batch_size: int = 32, seed: int = 0,
                   on_epoch: Callable[[int, BackboneAdaptation], None] | None = None
                   ) -> tuple[ChestXrayNet, BackboneAdaptation]:
    """A copy of ``model`` whose backbone is adapted to the uint8 site images (N, S, S) without labels
    (module docstring); ``present``: a boolean (C,) of the classes that occur at the site.
    ``on_epoch(epoch, record)`` is called after each epoch (progress). The input model is not changed."""
    present = np.asarray(present, dtype=bool)
    if not isinstance(model, ChestXrayNet) or model.task != "multiclass":
        raise ChestXrayError("backbone adaptation needs a single multi-class model")
    if present.shape != (model.num_classes,) or present.sum() < 2:
        raise ChestXrayError("backbone adaptation needs at least two classes present at the site")
    batch_size = min(batch_size, len(images))
    if epochs < 1 or len(images) < 2:
        raise ChestXrayError("backbone adaptation needs at least one epoch and two site images "
                             f"(got {epochs} epoch(s), {len(images)} images)")
    started = time.perf_counter()
    child = copy.deepcopy(model).eval()  # eval: batch norm keeps its statistics, dropout is off
    for parameter in child.head_parameters():
        parameter.requires_grad_(False)
    trainable = [p for p in child.backbone_parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(trainable, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(seed)
    record = BackboneAdaptation(epochs, lr, beta)
    mask = torch.as_tensor(present)
    previous = _pseudo_labels(model, images, present)
    for epoch in range(1, epochs + 1):
        pseudo = _pseudo_labels(child, images, present) if epoch > 1 else previous
        record.pseudo_changed.append(float(np.mean(pseudo != previous)) if epoch > 1 else 0.0)
        previous, targets = pseudo, torch.as_tensor(pseudo)
        order = torch.randperm(len(images), generator=generator).numpy()
        order = order[: len(order) - len(order) % batch_size]  # whole batches: the diversity term needs them
        losses = []
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = to_model_input(torch.from_numpy(np.ascontiguousarray(images[rows])).unsqueeze(1))
            probs = F.softmax(_masked(child(augment_batch(batch, 1.0, generator=generator)), mask), dim=1)
            log_probs = probs.clamp_min(1e-8).log()
            entropy = -(probs * log_probs).sum(1).mean()
            mean = probs.mean(0)
            diversity = -(mean * mean.clamp_min(1e-8).log()).sum()
            loss = entropy - diversity + beta * F.nll_loss(log_probs, targets[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        record.loss.append(float(np.mean(losses)))
        if on_epoch is not None:
            on_epoch(epoch, record)
    for parameter in child.parameters():
        parameter.requires_grad_(True)
    record.seconds = time.perf_counter() - started
    return child.eval(), record
