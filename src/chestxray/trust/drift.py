"""Drift monitoring for a served model: is what it is being sent still like its training images?

A :class:`DriftMonitor` keeps a rolling window of the last ``window`` predictions (a bounded deque:
memory does not grow with traffic): their OOD percentiles, predicted classes and referrals. It
compares the window with the training reference stored in the bundle:

* OOD percentiles: by construction, held-out training X-rays have percentiles spread evenly over
  0-100 (median 50). The window drifts when its median percentile is above
  :data:`MEDIAN_PERCENTILE_LIMIT` or more than :data:`FLAGGED_SHARE_LIMIT` of it is flagged OOD.
* Predicted-class shares: against the shares predicted on the held-out images, by the total
  variation distance (half the sum of absolute differences), drifting above :data:`SHARE_DISTANCE_LIMIT`.
* Referral rate: drifting when it exceeds the held-out rate by more than :data:`REFERRAL_EXCESS_LIMIT`.

Nothing is judged before :data:`MIN_WINDOW` predictions (state ``warming up``). The state and its
reasons are in ``/healthz``; a change of state is logged once. Every figure is exported in the
Prometheus text format through ``prometheus-client`` on a registry of the monitor's own (several apps
in one process do not collide).
"""

from __future__ import annotations

__all__ = ["DEFAULT_WINDOW", "MIN_WINDOW", "MEDIAN_PERCENTILE_LIMIT", "FLAGGED_SHARE_LIMIT", "SHARE_DISTANCE_LIMIT",
           "REFERRAL_EXCESS_LIMIT", "DriftMonitor"]

import logging
import threading
from collections import deque
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

DEFAULT_WINDOW = 500
MIN_WINDOW = 50
MEDIAN_PERCENTILE_LIMIT = 75.0
FLAGGED_SHARE_LIMIT = 0.10
SHARE_DISTANCE_LIMIT = 0.25
REFERRAL_EXCESS_LIMIT = 0.20
OK, DRIFTING, WARMING_UP = "ok", "drifting", "warming up"
log = logging.getLogger("chestxray.drift")


class DriftMonitor:
    """Rolling comparison of served predictions with the training reference (see the module docstring).

    ``classes``: the model's classes; ``reference``: the bundle's ``extra["reference"]``
    (``predicted_shares``, ``referral_rate``; either may be missing, and that part is then not checked).
    Thread-safe: ``record`` may be called from any thread.
    """

    def __init__(self, classes: list[str], reference: dict[str, Any] | None = None, *,
                 window: int = DEFAULT_WINDOW, min_window: int = MIN_WINDOW) -> None:
        self.classes = list(classes)
        self.reference = dict(reference or {})
        self.min_window = min_window
        self._percentiles: deque[float] = deque(maxlen=window)
        self._flagged: deque[bool] = deque(maxlen=window)
        self._labels: deque[int] = deque(maxlen=window)
        self._referred: deque[bool] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._state = WARMING_UP
        self.registry = CollectorRegistry()
        self._predictions = Counter("chestxray_predictions", "Predictions answered.", ["label"],
                                    registry=self.registry)
        self._referrals = Counter("chestxray_referrals", "Predictions answered with refer.", registry=self.registry)
        self._ood = Counter("chestxray_ood_flagged", "Predictions flagged out of distribution.",
                            registry=self.registry)
        self._gauges = {
            "median": Gauge("chestxray_window_ood_percentile_median",
                            "Median OOD percentile in the window (training reference: 50).", registry=self.registry),
            "flagged": Gauge("chestxray_window_ood_flagged_share", "Share of the window flagged OOD "
                             "(training reference: about 0.01).", registry=self.registry),
            "referral": Gauge("chestxray_window_referral_rate", "Share of the window referred.",
                              registry=self.registry),
            "distance": Gauge("chestxray_window_class_share_distance", "Total variation distance between the "
                              "window's predicted-class shares and the training reference.", registry=self.registry),
            "size": Gauge("chestxray_window_size", "Predictions in the rolling window.", registry=self.registry),
            "drifting": Gauge("chestxray_drifting", "1 when the window has drifted from the training reference.",
                              registry=self.registry),
        }
        self._share = Gauge("chestxray_window_class_share", "Share of the window predicted as each class.",
                            ["label"], registry=self.registry)
        self._reference_share = Gauge("chestxray_reference_class_share",
                                      "Share of held-out training images predicted as each class.", ["label"],
                                      registry=self.registry)
        for name, share in (self.reference.get("predicted_shares") or {}).items():
            self._reference_share.labels(name).set(share)

    def record(self, label: str, ood_percentile: float | None, ood: bool, refer: bool) -> None:
        """Add one answered prediction to the window (and the counters)."""
        index = self.classes.index(label) if label in self.classes else -1
        with self._lock:
            if ood_percentile is not None:
                self._percentiles.append(float(ood_percentile))
            self._flagged.append(bool(ood))
            self._labels.append(index)
            self._referred.append(bool(refer))
            self._predictions.labels(label or "none").inc()
            if refer:
                self._referrals.inc()
            if ood:
                self._ood.inc()
            summary = self._summary()
            state = summary["state"]
            changed, self._state = state != self._state, state
        if changed:
            log.warning("drift state %s: %s", state, "; ".join(summary["reasons"]) or "back within the reference")

    def status(self) -> dict[str, Any]:
        """``{"state": "ok" | "drifting" | "warming up", "reasons": [...], "window": n, ...}`` with the window's figures."""
        with self._lock:
            return self._summary()

    def metrics(self) -> bytes:
        """Every figure in the Prometheus text exposition format."""
        self.status()
        return generate_latest(self.registry)

    def _summary(self) -> dict[str, Any]:
        """The window's figures and state; the caller holds the lock."""
        n = len(self._labels)
        figures: dict[str, Any] = {"window": n}
        reasons: list[str] = []
        not_checked = [what for what, known in (
            ("OOD percentiles (no guard with held-out scores)", bool(self._percentiles) or not n),
            ("predicted-class shares (no reference in the bundle)", bool(self.reference.get("predicted_shares"))),
            ("referral rate (no reference in the bundle at the served coverage)", self.reference.get("referral_rate") is not None))
            if not known]
        if self._percentiles:
            median = float(np.median(self._percentiles))
            figures["ood_percentile_median"] = median
            if median > MEDIAN_PERCENTILE_LIMIT:
                reasons.append(f"median OOD percentile {median:.0f} (training images: 50; limit "
                               f"{MEDIAN_PERCENTILE_LIMIT:.0f})")
        if n:
            flagged = float(np.mean(self._flagged))
            referral = float(np.mean(self._referred))
            labels = np.asarray(self._labels)
            shares = {name: float((labels == k).mean()) for k, name in enumerate(self.classes)}
            figures.update(ood_flagged_share=flagged, referral_rate=referral, class_shares=shares)
            if flagged > FLAGGED_SHARE_LIMIT:
                reasons.append(f"{100 * flagged:.0f}% flagged out of distribution (limit {100 * FLAGGED_SHARE_LIMIT:.0f}%)")
            reference = self.reference.get("predicted_shares")
            if reference:
                distance = 0.5 * sum(abs(shares[c] - float(reference.get(c, 0.0))) for c in self.classes)
                figures["class_share_distance"] = distance
                self._gauges["distance"].set(distance)
                if distance > SHARE_DISTANCE_LIMIT:
                    reasons.append(f"predicted-class shares moved by {distance:.2f} (total variation; limit "
                                   f"{SHARE_DISTANCE_LIMIT:.2f})")
            expected = self.reference.get("referral_rate")
            if expected is not None and referral > float(expected) + REFERRAL_EXCESS_LIMIT:
                reasons.append(f"referral rate {100 * referral:.0f}% against {100 * float(expected):.0f}% on "
                               "held-out training images")
            self._gauges["flagged"].set(flagged)
            self._gauges["referral"].set(referral)
            for name, share in shares.items():
                self._share.labels(name).set(share)
        if "ood_percentile_median" in figures:
            self._gauges["median"].set(figures["ood_percentile_median"])
        self._gauges["size"].set(n)
        state = WARMING_UP if n < self.min_window else DRIFTING if reasons else OK
        self._gauges["drifting"].set(1 if state == DRIFTING else 0)
        return {"state": state, "reasons": reasons if state != WARMING_UP else [], "not_checked": not_checked,
                **figures}
