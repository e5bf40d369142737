"""What the ServerApp reads from the run config and a SuperNode from its node config.

Run config (``flwr run ... --run-config run.toml``; defaults in ``app/pyproject.toml``):

* ``config``: the run's :class:`~shelora_core.config.FederatedConfig` as JSON (public);
* ``server-dir``: the server's key directory as the key holder wrote it (``server/``: the public
  context only); the server's checkpoint is written there;
* ``results-dir``: where ``federated_tuning/<run>.jsonl`` and ``<run>.summary.json`` go (the
  results schema of notebook 05);
* ``round-timeout``: seconds a round waits for its clients; who has not answered by then is left
  out (a straggler or a dead SuperNode) and the round goes on when ``min_clients`` answered;
* ``quorum-grace``: once ``min_clients`` answered, wait at most this many more seconds for the
  rest (``< 0``: wait for everyone up to ``round-timeout``);
* ``discover-timeout``: seconds to wait for the SuperNodes before round 1;
* ``poll-interval``: seconds between polls of the SuperLink.

Node config (``flower-supernode --node-config "partition-id=0 client-dir='...'"``):

* ``partition-id``: the client id this SuperNode plays (``-1``: none, an evaluator only);
* ``client-dir``: that client's key directory (``clients/<i>/``: secret context, OPE key);
* ``evaluator-dir`` (optional): the evaluator's key directory; the SuperNode that has it
  answers the ServerApp's evaluation messages on its held-out data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import FederatedConfig
from ..errors import ConfigError

__all__ = ["NodeSettings", "ServerSettings", "run_config_for"]


def _number(rc: Mapping[str, Any], key: str, *, minimum: float) -> float:
    value = rc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(
            f"run config {key} = {value!r} is not a finite number; set e.g. {key}=60.0"
        )
    if value < minimum:
        raise ConfigError(f"run config {key} = {value!r} is below {minimum}; raise it")
    return float(value)


def _dir(cfg: Mapping[str, Any], key: str, where: str) -> Path:
    value = cfg.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} {key} is missing: set {key}='<directory>'")
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(
            f"{where} {key} = {value!r} is not a directory: point it to the "
            "directory the key holder wrote for this role"
        )
    return path


def parse_config(text: Any) -> FederatedConfig:
    """The run's configuration from the run config's ``config`` JSON (validated)."""
    if not isinstance(text, str) or text.strip() in ("", "{}"):
        raise ConfigError(
            "run config 'config' is empty: pass the run's FederatedConfig as JSON "
            "(run_config_for(cfg, ...) writes it)"
        )
    try:
        fields = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"run config 'config' is not JSON ({exc}): write it with json.dumps"
        ) from None
    if not isinstance(fields, dict):
        raise ConfigError("run config 'config' must be a JSON object of FederatedConfig fields")
    return FederatedConfig.from_dict(fields).validate()


@dataclass(frozen=True)
class ServerSettings:
    """The ServerApp's settings (see the module docstring)."""

    config: FederatedConfig
    server_dir: Path
    results_dir: Path
    round_timeout: float
    quorum_grace: float
    discover_timeout: float
    poll_interval: float

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ServerSettings:
        """Read and check the run config.

        Raises:
            ConfigError: naming the key that is missing or bad.
        """
        results = rc.get("results-dir")
        if not isinstance(results, str) or not results:
            raise ConfigError("run config results-dir is missing: set results-dir='<directory>'")
        return cls(
            config=parse_config(rc.get("config")),
            server_dir=_dir(rc, "server-dir", "run config"),
            results_dir=Path(results),
            round_timeout=_number(rc, "round-timeout", minimum=1.0),
            quorum_grace=_number(rc, "quorum-grace", minimum=-math.inf),
            discover_timeout=_number(rc, "discover-timeout", minimum=0.0),
            poll_interval=_number(rc, "poll-interval", minimum=0.01),
        )


@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's settings (see the module docstring)."""

    partition_id: int
    client_dir: Path | None
    evaluator_dir: Path | None

    @classmethod
    def from_node_config(cls, nc: Mapping[str, Any]) -> NodeSettings:
        """Read and check the node config.

        Raises:
            ConfigError: naming the key that is missing or bad.
        """
        pid = nc.get("partition-id")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < -1:
            raise ConfigError(
                f"node config partition-id = {pid!r}: give the client id this SuperNode plays "
                "(an integer >= 0), or -1 for an evaluator-only SuperNode"
            )
        client_dir = _dir(nc, "client-dir", "node config") if pid >= 0 else None
        evaluator_dir = None
        if nc.get("evaluator-dir"):
            evaluator_dir = _dir(nc, "evaluator-dir", "node config")
        if client_dir is None and evaluator_dir is None:
            raise ConfigError(
                "node config has neither a client (partition-id >= 0 and client-dir) nor "
                "evaluator-dir: this SuperNode would have nothing to do"
            )
        return cls(pid, client_dir, evaluator_dir)


def run_config_for(
    cfg: FederatedConfig,
    *,
    server_dir: str | Path,
    results_dir: str | Path,
    round_timeout: float = 600.0,
    quorum_grace: float = -1.0,
    discover_timeout: float = 120.0,
    poll_interval: float = 0.25,
) -> dict[str, Any]:
    """The run config for ``cfg`` (what ``flwr run --run-config`` passes to both apps)."""
    return {
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "server-dir": str(server_dir),
        "results-dir": str(results_dir),
        "round-timeout": float(round_timeout),
        "quorum-grace": float(quorum_grace),
        "discover-timeout": float(discover_timeout),
        "poll-interval": float(poll_interval),
    }
