"""The key holder of a deployment: one directory per role, written once.

:func:`publish_keys` generates the run's keys exactly as the in-process run does
(:meth:`shelora_core.checkpoint.RunDirs.keys`: one secret bundle per client with the OPE key, the
public context for the server, the secret context for the evaluator, the manifest last) and
returns the directories to hand out: ``clients/<i>/`` to SuperNode ``i`` (node config
``client-dir``), ``server/`` to the ServerApp (run config ``server-dir``) and ``evaluator/`` to
the evaluating SuperNode (node config ``evaluator-dir``). Across machines each directory is
copied to its owner alone; no other directory ever leaves the key holder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import RunDirs
from ..config import FederatedConfig
from ..methods import ckks_params_for, get_method

__all__ = ["RoleDirs", "publish_keys"]


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

    dirs.keys(ckks=ckks, ope=cfg.uses_columns and cfg.column_order == "negotiated")
    clients = tuple(dirs.client(i) for i in range(cfg.num_clients))
    for d in (dirs.server, dirs.evaluator, *clients):
        d.mkdir(parents=True, exist_ok=True)
    return RoleDirs(dirs.root, dirs.server, dirs.evaluator, clients)
