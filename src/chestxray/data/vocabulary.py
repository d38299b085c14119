"""The findings vocabulary public data sets are mapped onto, the adapters' options and policies.

CheXpert, MIMIC-CXR-JPG, PadChest, RSNA Pneumonia, VinDr-CXR and NIH ChestX-ray14 each name their
findings their own way; :mod:`chestxray.data.public` maps them onto :data:`FINDINGS`
(torchxrayvision's names, plus CheXpert's "Pleural Other" and "Support Devices") with the tables of
:data:`MAPPINGS`, so that two data sets can be pooled, or a model trained on one evaluated on
another. A label is the set of vocabulary findings of an image (joined by
:data:`~chestxray.constants.SET_SEPARATOR`); an empty label means *none of the vocabulary's
findings* (a normal image, or one whose findings all lie outside the vocabulary: those source labels
are dropped). :func:`label_mapping` describes what an adapter did; bundles record it.

Policies (:class:`SourceOptions`):

- ``uncertain`` (CheXpert, MIMIC-CXR: a finding marked ``-1``): ``ones`` counts it as present
  (U-Ones), ``zeros`` as absent (U-Zeros), ``ignore`` leaves the image out (U-Ignore at image level:
  a label here carries no per-finding mask, so an image with any uncertain finding is skipped, its
  reason naming the findings);
- ``views``: ``frontal`` (PA or AP; the default), ``pa``, ``ap``, ``lateral`` or ``all``;
- ``raters`` (VinDr-CXR): a finding counts when a ``majority`` of the radiologists who read the
  image marked it, or ``any`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ChestXrayError

__all__ = ["FINDINGS", "FORMATS", "PUBLIC_FORMATS", "UNCERTAIN_POLICIES", "VIEWS", "RATER_POLICIES", "MAPPINGS",
           "SourceOptions", "label_mapping", "view_kind", "view_kept"]

NO_FINDING = "No Finding"
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
            "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax", "Lung Opacity",
            "Fracture", "Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Other", "Support Devices")
"""The shared vocabulary (``No Finding`` is the empty label)."""

PUBLIC_FORMATS = ("nih", "chexpert", "mimic", "padchest", "rsna", "vindr")
FORMATS = ("auto", "folder", "manifest", "medmnist") + PUBLIC_FORMATS
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
VIEWS = ("frontal", "pa", "ap", "lateral", "all")
RATER_POLICIES = ("majority", "any")

_CHEXPERT = {name: (name,) for name in ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                                         "Pleural Other", "Fracture", "Support Devices")}
_CHEXPERT["Pleural Effusion"] = ("Effusion",)
_NIH = {name: (name,) for name in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
                                    "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
                                    "Pneumonia", "Pneumothorax")}
_VINDR = {"Atelectasis": ("Atelectasis",), "Cardiomegaly": ("Cardiomegaly",), "Consolidation": ("Consolidation",),
          "Infiltration": ("Infiltration",), "Lung Opacity": ("Lung Opacity",), "Nodule/Mass": ("Lung Lesion",),
          "Pleural effusion": ("Effusion",), "Pleural thickening": ("Pleural_Thickening",),
          "Pneumothorax": ("Pneumothorax",), "Pulmonary fibrosis": ("Fibrosis",)}
_RSNA = {"Target=1": ("Lung Opacity", "Pneumonia")}  # as torchxrayvision: an opacity suggesting pneumonia
_PADCHEST_TERMS = {
    "Atelectasis": ["atelectasis", "lobar atelectasis", "laminar atelectasis", "segmental atelectasis",
                    "round atelectasis", "total atelectasis"],
    "Cardiomegaly": ["cardiomegaly"], "Consolidation": ["consolidation", "air bronchogram"],
    "Edema": ["pulmonary edema", "edema"], "Emphysema": ["emphysema"], "Fibrosis": ["pulmonary fibrosis", "fibrosis"],
    "Effusion": ["pleural effusion", "loculated pleural effusion", "loculated fissural effusion", "hydropneumothorax"],
    "Hernia": ["hiatal hernia", "hernia"],
    "Infiltration": ["infiltrates", "interstitial pattern", "ground glass pattern", "reticular interstitial pattern",
                     "reticulonodular interstitial pattern", "alveolar pattern"],
    "Mass": ["mass", "pulmonary mass", "mediastinal mass"], "Nodule": ["nodule", "multiple nodules"],
    "Pleural_Thickening": ["pleural thickening", "apical pleural thickening", "calcified pleural thickening"],
    "Pneumonia": ["pneumonia", "atypical pneumonia"], "Pneumothorax": ["pneumothorax", "hydropneumothorax"],
    "Fracture": ["fracture", "rib fracture", "clavicle fracture", "vertebral fracture", "humeral fracture",
                 "callus rib fracture"],
}


def _by_term(terms: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """``{finding: [term, ...]}`` -> ``{term: (finding, ...)}`` (a term may name two findings)."""
    found: dict[str, tuple[str, ...]] = {}
    for finding, names in terms.items():
        for term in names:
            found[term] = found.get(term, ()) + (finding,)
    return found


_PADCHEST = _by_term(_PADCHEST_TERMS)
MAPPINGS: dict[str, dict[str, tuple[str, ...]]] = {"nih": _NIH, "chexpert": _CHEXPERT, "mimic": _CHEXPERT, "padchest": _PADCHEST, "rsna": _RSNA,
             "vindr": _VINDR}
_POLICIES = {"nih": ("views",), "chexpert": ("uncertain", "views"), "mimic": ("uncertain", "views"),
             "padchest": ("views",), "rsna": (), "vindr": ("raters",)}
_VIEW_KINDS = {"PA": "pa", "AP": "ap", "AP_HORIZONTAL": "ap", "AP SUPINE": "ap", "L": "lateral", "LL": "lateral",
               "RL": "lateral", "LATERAL": "lateral", "FRONTAL": "frontal"}


@dataclass(frozen=True)
class SourceOptions:
    """How a data set is read: its ``format`` (``auto``: detected from its files and column names)
    and the adapters' label and view policies (see the module's text)."""

    format: str = "auto"
    uncertain: str = "ones"
    views: str = "frontal"
    raters: str = "majority"

    def __post_init__(self) -> None:
        for name, allowed in (("format", FORMATS), ("uncertain", UNCERTAIN_POLICIES), ("views", VIEWS),
                              ("raters", RATER_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ChestXrayError(f"data {name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")


def label_mapping(name: str, options: SourceOptions) -> dict[str, Any]:
    """What adapter ``name`` made of its data set's labels: each source label and the vocabulary
    findings it became, the policies that applied, what an empty label means."""
    mapping: dict[str, Any] = {"format": name, "findings": {k: list(v) for k, v in MAPPINGS[name].items()}}
    mapping.update({policy: getattr(options, policy) for policy in _POLICIES[name]})
    mapping["empty_label"] = "none of the vocabulary's findings (other source labels are dropped)"
    return mapping


def view_kind(value: str) -> str:
    """``pa``, ``ap``, ``lateral`` or ``frontal`` for a view or projection name, else ``other``."""
    return _VIEW_KINDS.get(value.strip().upper(), "other")


def view_kept(kind: str, wanted: str) -> bool:
    """Whether an image of view ``kind`` is kept under the ``views`` policy ``wanted``."""
    if wanted == "all":
        return True
    if wanted == "frontal":
        return kind in ("pa", "ap", "frontal")
    return kind == wanted
