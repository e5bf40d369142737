"""shelora: selective homomorphic encryption for federated LoRA, reproduced and measured.

The few names a reader needs are exported here; everything else lives in small modules named by
their one job (see the README's map of the package).

Importing the package sets ``HF_HUB_OFFLINE=1`` (and the transformers / datasets equivalents):
no model or data hub is reachable, models and data ship inside pip packages.
"""

from __future__ import annotations

import os as _os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    _os.environ.setdefault(_var, "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"

__all__ = ["FederatedConfig", "Federation", "RunResult", "__version__", "run_federated"]

_LAZY = {
    "FederatedConfig": "config",
    "Federation": "federation",
    "RunResult": "records",
    "run_federated": "federation",
}


def __getattr__(name: str):
    # Lazy: `import shelora_core.aggregation` must not pay for torch and transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
