"""Trust that speaks plainly: the source caution names what the audit found, the OOD percentile says what it means."""

from __future__ import annotations

import pandas as pd

from chestxray.data.audit import how_images_differ
from chestxray.stats.ood import typicality
from chestxray.inference.predict import source_caution


def test_the_percentile_says_what_it_means() -> None:
    assert typicality(82.0, 0.99) == "less typical than 82% of training X-rays: usual"
    assert typicality(95.4, 0.99).endswith(": unusual")
    assert typicality(99.5, 0.99).endswith(": unlike the training X-rays (flagged)")
    assert typicality(None).startswith("not checked")


def test_the_source_caution_names_the_difference_in_plain_words() -> None:
    table = pd.DataFrame({"label": ["covid19"] * 4 + ["normal"] * 6,
                          "format": ["PNG", "PNG", "PNG", "JPEG"] + ["JPEG"] * 6,
                          "mode": ["RGB"] * 4 + ["L"] * 6,
                          "width": [1800, 1900, 2000, 1700] + [1000, 1100, 1024, 990, 1200, 1050]})
    how = how_images_differ(table, "covid19")
    assert "mostly stored as PNG (75%) where the others are JPEG" in how
    assert "mostly in colour (RGB) (100%) where the others are grayscale" in how
    assert "wider (median 1850 px against 1037 px)" in how
    caution = source_caution("covid19", 1.0, how)
    assert caution.startswith("caution: this model's covid19 training images came from a different source")
    assert "rather than the disease" in caution and "may be called covid19 for that reason alone" in caution
    assert how in caution and "AUC 1.00" in caution
    assert "(" not in source_caution("covid19", 0.9).split("source")[1].split(",")[0]  # no details: none invented
