"""The REST API and its web page (``static/``).

Each public name of the submodules is importable from here (``from chestxray.serving import ...``) and
imported on first use, so that importing the subpackage stays light.

Not re-exported: ``serve`` (a submodule's name, or a name two
submodules define): import those from their module.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "serve": ("MULTIPART_OVERHEAD_BYTES", "BODY_TIMEOUT_S", "MAX_CONNECTIONS_PER_CLIENT", "ApiError",
            "PredictionOut", "ModelOut", "ErrorOut", "InferenceQueue", "GuardedH11Protocol", "guarded_protocol",
            "uvicorn_options", "create_app", "app_from_environment", "background_server"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
