"""The key holder of a deployment: one directory per role, written once.

:func:`publish_keys` generates the run's keys exactly as the in-process run does
(:meth:`shelora_core.checkpoint.RunDirs.keys`: one secret bundle per client with the OPE key, the
public context for the server, the secret context for the evaluator, the manifest last) and
returns the directories to hand out: ``clients/<i>/`` to SuperNode ``i`` (node config
``client-dir``), ``server/`` to the ServerApp (run config ``server-dir``) and ``evaluator/`` to
the evaluating SuperNode (node config ``evaluator-dir``). Across machines each directory is
copied to its owner alone; no other directory ever leaves the key holder.

The server's directory also gets ``model.json`` (:data:`GEOMETRY_FILE`): the public model's
adapted layers ``(m, n)`` and head shapes, so the ServerApp checks every upload against the public
model (as the in-process server does) instead of against what most uploads agree on, without
loading a model itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import RunDirs, atomic_write
from ..config import FederatedConfig
from ..methods import ckks_params_for, get_method

__all__ = ["GEOMETRY_FILE", "RoleDirs", "public_geometry", "publish_keys", "read_geometry"]

#: the public model's geometry in the server's directory
GEOMETRY_FILE = "model.json"


@dataclass(frozen=True)
class RoleDirs:
    """The directories :func:`publish_keys` wrote, one per role."""

    root: Path
    server: Path
    evaluator: Path
    clients: tuple[Path, ...]


def publish_keys(cfg: FederatedConfig, root: str | Path) -> RoleDirs:
    """Generate (or, when the key holder's manifest exists, check and reuse) the run's keys
    under ``root`` and return each role's directory.

    Methods without CKKS or OPE keys still get the (empty) role directories, so every role is
    pointed to a directory in the same way.

    Raises:
        CheckpointError: keys under ``root`` from another setup, or damaged (see
            :meth:`~shelora_core.checkpoint.RunDirs.keys`).
    """
    cfg.validate()
    dirs = RunDirs(root, cfg.num_clients)
    ckks = None
    if get_method(cfg.method, cfg).needs_crypto:
        from ..ckks import KeyHolder

        params = ckks_params_for(cfg)

        def ckks() -> KeyHolder:
            return KeyHolder.generate(params, seed=cfg.seed)

    dirs.keys(
        ckks=ckks,
        ope=cfg.uses_columns and cfg.column_order == "negotiated",
        init=cfg.secret_init,  # the clients' shared init.key: client directories only
    )
    clients = tuple(dirs.client(i) for i in range(cfg.num_clients))
    for d in (dirs.server, dirs.evaluator, *clients):
        d.mkdir(parents=True, exist_ok=True)
    geometry = dirs.server / GEOMETRY_FILE
    if not geometry.exists():
        atomic_write(geometry, json.dumps(public_geometry(cfg), indent=1).encode())
    return RoleDirs(dirs.root, dirs.server, dirs.evaluator, clients)


def public_geometry(cfg: FederatedConfig) -> dict[str, Any]:
    """The public model's adapted layers ``{name: [m, n]}`` and head ``{name: shape}`` (the
    model every participant starts from; building it loads the shipped weights)."""
    from ..federation import build_model, split_data

    train, _, _ = split_data(cfg)
    model = build_model(cfg, train.num_labels)
    return {
        "model": cfg.model,
        "layers": {k: [int(m), int(n)] for k, (m, n) in model.layer_shapes.items()},
        "head": {k: [int(x) for x in v.shape] for k, v in model.initial_head.items()},
    }


def read_geometry(server_dir: str | Path) -> dict[str, Any] | None:
    """``(layers, head)`` keyword arguments for :func:`~shelora_core.server.server_round` from the
    server's ``model.json``, or ``None`` when the key holder wrote none."""
    path = Path(server_dir) / GEOMETRY_FILE
    if not path.exists():
        return None
    try:
        g = json.loads(path.read_text())
        return {
            "layers": {k: (int(m), int(n)) for k, (m, n) in g["layers"].items()},
            "head": {k: tuple(int(x) for x in v) for k, v in g["head"].items()},
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        from ..errors import CheckpointError

        raise CheckpointError(
            f"{path} is not the key holder's model geometry ({exc}); delete it and publish the "
            "keys again (shelora_core.flower.keys.publish_keys)"
        ) from exc
