"""SHE-LoRA and every baseline on Flower's Deployment Engine (Flower 1.41, Message API).

The ServerApp (:mod:`.server_app`) and the ClientApp (:mod:`.client_app`) call the round engine's
steps (:mod:`shelora_core.client`, :mod:`shelora_core.server`) exactly as the in-process loop
(:mod:`shelora_core.federation`) does; Flower only carries their bytes, as raw ``uint8`` arrays
(:mod:`.wire`). The roles keep their own keys: the key holder (:mod:`.keys`, through
:meth:`shelora_core.checkpoint.RunDirs.keys`) writes one directory per client, one for the
server (public context only) and one for the evaluator; each SuperNode is pointed to its own
directory by its node config, the ServerApp to the server's by the run config.

:mod:`.launch` starts a SuperLink and SuperNodes on loopback (free ports, offline switches, a
temporary ``FLWR_HOME``, TLS optional), runs the app and stops every process it started by PID;
:mod:`.demo` is ``make deploy-demo`` and ``make deploy-bench``.

Importing this package imports no Flower module: the submodules do.
"""

from __future__ import annotations

from pathlib import Path

#: the Flower app bundle's directory (its ``pyproject.toml`` names the ServerApp and ClientApp)
APP_DIR = Path(__file__).resolve().parent / "app"

__all__ = ["APP_DIR"]
