"""chestxray: train, evaluate, explain and serve chest X-ray classifiers.

Not a diagnostic device: models built with it are research tools.
"""

from __future__ import annotations

__version__ = "0.1.0"
