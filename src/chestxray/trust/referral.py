"""The referral rule, in one place: when a prediction must go to a reader rather than be trusted.

Refer an image when its conformal prediction set holds more or fewer than one class (the model cannot
tell the classes apart at the set's coverage, or no class fits), when it is out of distribution, when
its DICOM header says it is not a frontal chest radiograph (``not_frontal_cxr: ...``, from
:mod:`chestxray.data.dicomcheck`), or when it could not be read at all. Each reason is one string
starting with its kind (:data:`UNCERTAIN`, :data:`OUT_OF_DISTRIBUTION`, the header check's
``not_frontal_cxr``, :data:`UNREADABLE`).

- :func:`referral_reasons`: a classified prediction's own reasons (what ``Prediction.reasons`` holds);
- :func:`referral`: every reason, an unreadable input's included (the SR, the worklist and the
  inference log carry these);
- :func:`refer_mask`: the same rule over arrays of held-out or evaluated images (the drift
  reference's referral rate, the evaluation's selective accuracy).
"""

from __future__ import annotations

__all__ = ["UNCERTAIN", "OUT_OF_DISTRIBUTION", "NOT_FRONTAL", "UNREADABLE", "KINDS", "reason_kind", "referral_reasons",
           "referral", "refer_mask"]

from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.dicomcheck import REASON_PREFIX
from ..stats.ood import OODGuard, typicality

if TYPE_CHECKING:
    from ..data.dicomcheck import HeaderCheck

UNCERTAIN = "uncertain"
OUT_OF_DISTRIBUTION = "out_of_distribution"
UNREADABLE = "unreadable"
NOT_FRONTAL = REASON_PREFIX
"""The header check's kind (``not_frontal_cxr``), worded by :func:`chestxray.data.dicomcheck.check_header`."""
KINDS = (UNCERTAIN, OUT_OF_DISTRIBUTION, NOT_FRONTAL, UNREADABLE)


def reason_kind(reason: str) -> str | None:
    """Which of :data:`KINDS` a reason is (``None``: another kind)."""
    kind = reason.partition(":")[0]
    return kind if kind in KINDS else None


def referral_reasons(prediction: Any, header: HeaderCheck | None, coverage: float | None,
                     guard: OODGuard | None) -> list[str]:
    """Why a classified prediction must be referred to a reader rather than trusted; empty when nothing
    says so (and for a prediction that failed: :func:`referral` adds its error).

    A conformal set with more than one class or none, an out-of-distribution image, a DICOM header
    that says the image is not a frontal chest radiograph.
    """
    if prediction.error:
        return []
    reasons = []
    found = prediction.prediction_set
    if found is not None and len(found) != 1:
        level = f"{100 * coverage:g}%" if coverage is not None else ""
        reasons.append(f"{UNCERTAIN}: the {level} prediction set holds {', '.join(found)}" if found
                       else f"{UNCERTAIN}: no class fits (the {level} prediction set is empty)")
    if prediction.ood:
        threshold = f" above the threshold {guard.threshold:.1f}" if guard is not None else ""
        percentile = "" if prediction.ood_percentile is None else \
            f", {typicality(prediction.ood_percentile, guard.quantile if guard is not None else None)}"
        reasons.append(f"{OUT_OF_DISTRIBUTION}: score {prediction.ood_score:.1f}{threshold}{percentile}")
    if header is not None:
        reasons += list(header.reasons)
    return reasons


def referral(prediction: Any | None, header_reasons: list[str] | None = None) -> tuple[bool, list[str]]:
    """``(refer, reasons)`` with every reason to refer: the header check's (``header_reasons``), an
    unreadable input (``unreadable: <error>``), and the prediction's own (``prediction.reasons``, see
    :func:`referral_reasons`). ``prediction`` None: not classified because of the header."""
    reasons = list(header_reasons or [])
    if prediction is not None and prediction.error:
        reasons.append(f"{UNREADABLE}: {prediction.error}")
    elif prediction is not None:
        reasons += [reason for reason in prediction.reasons if reason not in reasons]
    return bool(reasons), reasons


def refer_mask(sets: np.ndarray | None, ood_flags: np.ndarray | None = None,
               header_failed: np.ndarray | None = None) -> np.ndarray:
    """The rule over N images: refer where the boolean set matrix (N, C) is not one class, the OOD flag
    is set or the header check failed (each ``None``: that check did not run, so it refers nothing)."""
    n = next(len(a) for a in (sets, ood_flags, header_failed) if a is not None)
    refer = np.zeros(n, dtype=bool)
    if sets is not None:
        refer |= np.asarray(sets).sum(1) != 1
    if ood_flags is not None:
        refer |= np.asarray(ood_flags, dtype=bool)
    if header_failed is not None:
        refer |= np.asarray(header_failed, dtype=bool)
    return refer
