"""A run on disk: one directory per role, keys written once, a checkpoint consistent by construction.

Layout of ``<results_dir>/checkpoints/<run>/``::

    keyholder/   secret.ctx  public.ctx  manifest.json   (written last: the keys are complete)
    server/      public.ctx  checkpoint.bin              (no secret context, no OPE key)
    clients/<i>/ secret.ctx  [ope.key]  [init.key]  [columns*.json]  (client i's keys and lists)
    evaluator/   secret.ctx                              (reads the global model)

* **Keys are generated once, all together.** Every role's files are written into a staging
  directory and moved into place with the key holder's ``manifest.json`` last; a run whose manifest
  exists finds every key it needs or fails with :class:`~shelora_core.errors.CheckpointError`
  naming the missing file. Key material is never written over existing key material: a fresh key
  pair would make every ciphertext in the checkpoint undecryptable. Leftovers of a setup that was
  interrupted before its manifest (never used to encrypt anything: no round had started) are
  removed and the keys generated again.
* **One checkpoint file.** ``server/checkpoint.bin`` is one shelora message (kind
  ``"checkpoint"``, SHA-256 protected) holding the round, the configuration's fingerprint, the
  history and the last broadcast: written atomically, so the round and the broadcast cannot
  disagree. The per-round JSONL and the summary are derived from it (rewritten on resume).
* Copying the server's state means copying ``server/``: it holds nothing a client owns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, MessageError
from .messages import Message, decode, encode

__all__ = ["KeyBundle", "RunDirs", "atomic_write", "write_hook"]

_MANIFEST_VERSION = 1
_LEGACY = ("state.json", "broadcast.bin", "keys")


#: called with ``(path, step)`` at every point where a run writes to disk (``step`` is
#: ``"write"`` before a temporary file is written, ``"replace"`` before it replaces ``path``):
#: the fault-injection suite raises there to kill a run at every write point
write_hook: Callable[[Path, str], None] | None = None


def _at(path: Path, step: str) -> None:
    if write_hook is not None:
        write_hook(path, step)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, fsync, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _at(path, "write")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    _at(path, "replace")
    os.replace(tmp, path)


@dataclass
class KeyBundle:
    """The key material of a run, as bytes, read from the role directories.

    Attributes:
        client_secret: every client's secret CKKS context (``None``: the method has no CKKS).
        server_public: the server's public context.
        evaluator_secret: the evaluator's secret context.
        ope_key: the clients' shared OPE key (``None``: no negotiation).
        init_key: the clients' shared secret from which the initial adapter's A is derived
            (``secret_init``; ``None``: the public seeded initialisation). The server never
            holds it.
        fingerprint: the CKKS key's fingerprint (from the manifest).
    """

    client_secret: bytes | None = None
    server_public: bytes | None = None
    evaluator_secret: bytes | None = None
    ope_key: bytes | None = None
    init_key: bytes | None = None
    fingerprint: str | None = None


class RunDirs:
    """The role directories of one run (see the module docstring)."""

    def __init__(self, root: str | Path, num_clients: int) -> None:
        self.root = Path(root)
        self.num_clients = int(num_clients)

    # ---------------------------------------------------------------- paths
    @property
    def keyholder(self) -> Path:
        return self.root / "keyholder"

    @property
    def server(self) -> Path:
        return self.root / "server"

    @property
    def evaluator(self) -> Path:
        return self.root / "evaluator"

    def client(self, i: int) -> Path:
        return self.root / "clients" / str(int(i))

    @property
    def manifest(self) -> Path:
        return self.keyholder / "manifest.json"

    @property
    def checkpoint(self) -> Path:
        return self.server / "checkpoint.bin"

    def _check_legacy(self) -> None:
        old = [self.root / n for n in _LEGACY if (self.root / n).exists()]
        if old:
            raise CheckpointError(
                f"{self.root} holds a checkpoint in the layout of an older shelora "
                f"({', '.join(p.name for p in old)}): it cannot be verified; delete {self.root} "
                "to run this configuration again from round 1"
            )

    # ---------------------------------------------------------------- keys
    def keys(self, *, ckks: Any = None, ope: bool = False, init: bool = False) -> KeyBundle:
        """The run's keys: read them when the manifest says they are complete, else generate.

        Args:
            ckks: a :class:`~shelora_core.ckks.KeyHolder` factory (called with no argument) for
                methods that encrypt, or ``None``.
            ope: whether the clients need an OPE key (SHE-LoRA's negotiation).
            init: whether the clients need a shared initialisation key (``secret_init``:
                32 random bytes from the operating system, written only to the clients' and
                the key holder's directories).

        Raises:
            CheckpointError: a key file of a complete setup is missing or altered, or the keys
                on disk were made for another need (CKKS / OPE) than this run's.
        """
        self._check_legacy()
        if self.manifest.exists():
            return self._read_keys(ckks=ckks is not None, ope=ope, init=init)
        if ckks is None and not ope and not init:  # nothing to keep secret
            return KeyBundle()
        if self.checkpoint.exists():
            raise CheckpointError(
                f"{self.checkpoint} exists but the key holder's manifest {self.manifest} does "
                "not: the keys that encrypted this checkpoint are gone and new ones cannot read "
                f"it. Restore {self.keyholder} or delete {self.root} to start over"
            )
        self._discard_interrupted_setup()
        return self._generate(ckks, ope, init)

    def _discard_interrupted_setup(self) -> None:
        """Remove what an interrupted key setup left (no manifest, no checkpoint: never used)."""
        for d in (self.root / ".setup", self.keyholder, self.evaluator, self.root / "clients"):
            if d.exists():
                shutil.rmtree(d)
        for name in ("public.ctx",):
            p = self.server / name
            if p.exists():
                p.unlink()

    def _generate(self, ckks: Any, ope: bool, init: bool = False) -> KeyBundle:
        from .ope import OPEKey

        stage = self.root / ".setup"
        files: dict[str, bytes] = {}
        bundle = KeyBundle()
        if ckks is not None:
            kh = ckks()
            bundle.client_secret = bundle.evaluator_secret = kh.secret_bytes()
            bundle.server_public = kh.public_bytes()
            bundle.fingerprint = kh.fingerprint
            files["keyholder/secret.ctx"] = files["evaluator/secret.ctx"] = kh.secret_bytes()
            files["keyholder/public.ctx"] = files["server/public.ctx"] = kh.public_bytes()
            for i in range(self.num_clients):
                files[f"clients/{i}/secret.ctx"] = kh.secret_bytes()
        if ope:
            bundle.ope_key = OPEKey.generate().to_bytes()
            for i in range(self.num_clients):
                files[f"clients/{i}/ope.key"] = bundle.ope_key
        if init:  # the clients' shared secret for the initial A: never in the server's directory
            bundle.init_key = os.urandom(32)
            files["keyholder/init.key"] = bundle.init_key
            for i in range(self.num_clients):
                files[f"clients/{i}/init.key"] = bundle.init_key
        for rel, data in files.items():
            atomic_write(stage / rel, data)
        manifest = {
            "version": _MANIFEST_VERSION,
            "fingerprint": bundle.fingerprint,
            "ckks": ckks is not None,
            "ope": ope,
            "init": init,
            "num_clients": self.num_clients,
            "files": {rel: hashlib.sha256(d).hexdigest() for rel, d in sorted(files.items())},
        }
        # move every role's files into place; the key holder's manifest goes last
        for rel in sorted(files, key=lambda r: r.startswith("keyholder/")):
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _at(dest, "replace")
            os.replace(stage / rel, dest)
        atomic_write(self.manifest, json.dumps(manifest, indent=1).encode())
        shutil.rmtree(stage, ignore_errors=True)
        return bundle

    def _read_keys(self, *, ckks: bool, ope: bool, init: bool = False) -> KeyBundle:
        try:
            manifest = json.loads(self.manifest.read_text())
            files = dict(manifest["files"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{self.manifest} is damaged ({exc}); restore it or delete {self.root}"
            ) from None
        made = (bool(manifest.get("ckks")), bool(manifest.get("ope")), bool(manifest.get("init")))
        if made != (ckks, ope, init):
            raise CheckpointError(
                f"the keys in {self.root} were made for ckks={made[0]}, ope={made[1]}, "
                f"init={made[2]}; this run needs ckks={ckks}, ope={ope}, init={init}. Delete "
                f"{self.root} to start this configuration over"
            )

        def read(rel: str) -> bytes:
            path = self.root / rel
            if not path.exists():
                raise CheckpointError(
                    f"key file {path} is missing; the manifest {self.manifest} lists it. Restore "
                    f"it (new keys could not decrypt this run's checkpoint) or delete {self.root}"
                )
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != files.get(rel):
                raise CheckpointError(
                    f"key file {path} differs from the one the key holder wrote (SHA-256 "
                    f"mismatch with {self.manifest}); restore it or delete {self.root}"
                )
            return data

        bundle = KeyBundle(fingerprint=manifest.get("fingerprint"))
        for i in range(self.num_clients):  # every client must still hold its keys
            if ckks:
                bundle.client_secret = read(f"clients/{i}/secret.ctx")
            if ope:
                bundle.ope_key = read(f"clients/{i}/ope.key")
            if init:
                bundle.init_key = read(f"clients/{i}/init.key")
        if ckks:
            bundle.server_public = read("server/public.ctx")
            bundle.evaluator_secret = read("evaluator/secret.ctx")
        return bundle

    # ---------------------------------------------------------------- column lists
    def columns_name(self, round_: int) -> str:
        return "columns.json" if round_ == 1 else f"columns_r{round_}.json"

    def save_columns(self, round_: int, payload: dict[str, Any]) -> None:
        """Every client keeps the column list it decrypted (negotiated before ``round_``)."""
        data = json.dumps(payload, indent=1).encode()
        for i in range(self.num_clients):
            atomic_write(self.client(i) / self.columns_name(round_), data)

    def load_columns(self, round_: int) -> dict[str, Any] | None:
        """The list negotiated before ``round_`` if every client holds the same one, else
        ``None`` (an interrupted negotiation: it is run again, nothing was aggregated with it)."""
        seen = set()
        for i in range(self.num_clients):
            path = self.client(i) / self.columns_name(round_)
            if not path.exists():
                return None
            seen.add(path.read_bytes())
        if len(seen) != 1:
            return None
        try:
            return json.loads(seen.pop())
        except ValueError:
            return None

    # ---------------------------------------------------------------- the server's checkpoint
    def save_checkpoint(
        self, *, round_: int, broadcast: bytes, history: list[dict], fingerprint: str, config: dict
    ) -> None:
        """One atomic file: the round, the history and the broadcast together."""
        header = {
            "round": int(round_),
            "fingerprint": fingerprint,
            "config": config,
            "history": history,
        }
        tensors = {"broadcast": np.frombuffer(broadcast, dtype=np.uint8)}
        atomic_write(self.checkpoint, encode(Message("checkpoint", header, tensors)))

    def load_checkpoint(self, fingerprint: str) -> tuple[int, bytes | None, list[dict]]:
        """``(last round, its broadcast, history)``, or ``(0, None, [])`` without a checkpoint.

        Raises:
            CheckpointError: a damaged checkpoint, one of another configuration, or one whose
                parts disagree (round, history and broadcast).
        """
        self._check_legacy()
        if not self.checkpoint.exists():
            return 0, None, []
        try:
            msg = decode(self.checkpoint.read_bytes(), expect_kind="checkpoint")
            h = msg.header
            round_, history = int(h["round"]), list(h["history"])
            broadcast = msg.tensors["broadcast"].tobytes()
            bc_round = decode(broadcast, expect_kind="broadcast").header.get("round")
        except (MessageError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {self.checkpoint} is damaged ({exc}); delete {self.root} to start "
                "this configuration over"
            ) from None
        if h.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"checkpoint {self.checkpoint} belongs to another configuration (fingerprint "
                f"{h.get('fingerprint')}, this run {fingerprint}); delete {self.root}"
            )
        rounds = [r.get("round") for r in history]
        if bc_round != round_ or rounds != list(range(1, round_ + 1)):
            raise CheckpointError(
                f"checkpoint {self.checkpoint} is inconsistent: round {round_}, broadcast of "
                f"round {bc_round}, history of rounds {rounds}; delete {self.root}"
            )
        return round_, broadcast, history
