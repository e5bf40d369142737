"""Start a Flower deployment on loopback, run the app, stop every process it started by PID.

:class:`Deployment` starts one ``flower-superlink`` and any number of ``flower-supernode`` on
127.0.0.1 with free ports, the offline switches set (no telemetry, no update check, no runtime
dependency installation, Hugging Face offline) and a private ``FLWR_HOME``; optionally with TLS
(:func:`make_certificates`: a CA and a server certificate made at start with ``cryptography``;
the SuperLink runs without ``--insecure`` and the SuperNodes and the CLI trust that CA).

Every process it starts carries an environment tag (``SHELORA_DEPLOY_TAG=<run id>:<role>``) that
Flower's own children inherit (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``,
some in their own session). :meth:`Deployment.stop` sends SIGTERM to the SuperNodes, then the
SuperLink, by PID, then finds every process still carrying the tag in ``/proc`` and ends it by
PID (SIGTERM, then SIGKILL); :meth:`Deployment.leftovers` lists what would still be running.
:meth:`Deployment.kill_supernode` kills one SuperNode and its children (a machine that dies).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SheloraError

__all__ = [
    "OFFLINE_ENV",
    "Certificates",
    "Deployment",
    "DeploymentError",
    "RunOutcome",
    "free_port",
    "make_certificates",
    "tagged_processes",
]

#: set for every process of a deployment: Flower and Hugging Face stay offline
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # besides the SuperLink's flag
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "SHELORA_QUIET": "1",
    "PYTHONUNBUFFERED": "1",
    # the SuperExec asks its SuperNode for new ClientApp tasks this often (default 1 s)
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}

_TAG = "SHELORA_DEPLOY_TAG"


class DeploymentError(SheloraError, RuntimeError):
    """A Flower process did not start, became unready, or a run did not complete."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- TLS
@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA's certificate and the SuperLink's certificate and private key."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: str | Path, *, days: int = 2) -> Certificates:
    """A fresh CA and a server certificate for ``127.0.0.1`` / ``localhost`` signed by it.

    For loopback demos and tests: short-lived (``days``), keys written without a passphrase
    (mode 0600) into ``directory``. A deployment across organisations uses certificates from
    the organisations' own CA instead.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)
    until = now + _dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shelora loopback CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = Certificates(d / "ca.pem", d / "server.pem", d / "server.key")
    out.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(out.key, 0o600)
    return out


# ---------------------------------------------------------------------------- processes
def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k] = v
    return out


def tagged_processes(tag: str, role: str | None = None) -> list[int]:
    """PIDs of live processes whose environment carries ``SHELORA_DEPLOY_TAG=tag[:role]``
    (``role=None``: any role of the deployment). Zombies are not counted."""
    want = f"{tag}:{role}".encode() if role is not None else None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        value = _environ(int(entry)).get(_TAG.encode())
        if value is None:
            continue
        if (want is not None and value != want) or not value.startswith(tag.encode() + b":"):
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(int(entry))
    return sorted(found)


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float, alive: Callable[[], list[int]]) -> list[int]:
    end = time.monotonic() + timeout
    left = [p for p in pids if p in alive()]
    while left and time.monotonic() < end:
        time.sleep(0.2)
        now = alive()
        left = [p for p in left if p in now]
    return left


@dataclass
class RunOutcome:
    """A finished ``flwr run``: its run id, status and where its output went."""

    run_id: int | None
    status: str
    returncode: int
    seconds: float
    log: Path
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status.endswith("completed") and self.returncode == 0


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1 (see the module docstring).

    Args:
        workdir: where ``flwr_home/``, ``logs/`` and ``certs/`` go (default: a new temporary
            directory, removed by :meth:`stop` unless ``keep``).
        secure: TLS with certificates made at start (no ``--insecure`` anywhere).
        torch_threads: torch threads per ClientApp process (several SuperNodes share the cores).
        extra_env: more environment for every process (e.g. ``PYTHONPATH``).
        keep: keep ``workdir`` after :meth:`stop` (logs for a post-mortem).
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        secure: bool = False,
        torch_threads: int = 1,
        extra_env: Mapping[str, str] | None = None,
        keep: bool = False,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="shelora-flower-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secure = secure
        self.keep = keep
        self.tag = uuid.uuid4().hex[:12]
        self.home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        self.home.mkdir(exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.certs = make_certificates(self.workdir / "certs") if secure else None
        bin_dir = Path(sys.executable).parent
        self.bin = {
            name: str(bin_dir / name) for name in ("flower-superlink", "flower-supernode", "flwr")
        }
        self.env = {
            **os.environ,
            **OFFLINE_ENV,
            "FLWR_HOME": str(self.home),
            "SHELORA_TORCH_THREADS": str(int(torch_threads)),
            # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) through PATH
            "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
            **(extra_env or {}),
        }
        self.port: int | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self._logs: list[Any] = []
        self._runs = 0
        self.stopped: list[int] = []

    # -------------------------------------------------------------- start
    def _spawn(self, role: str, argv: list[str], log_name: str) -> subprocess.Popen:
        fh = open(self.logs / log_name, "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(fh)
        env = {**self.env, _TAG: f"{self.tag}:{role}"}
        return subprocess.Popen(
            argv,
            env=env,
            cwd=self.workdir,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _tls_args(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        return [
            "--ssl-certfile",
            str(self.certs.cert),
            "--ssl-keyfile",
            str(self.certs.key),
            "--ssl-ca-certfile",
            str(self.certs.ca),
        ]

    def start_superlink(self, *, timeout: float = 60.0) -> None:
        """Start the SuperLink on a free port; return when its health endpoint answers 200.

        Raises:
            DeploymentError: it exited or did not become healthy within ``timeout``.
        """
        self.port = free_port()
        argv = [
            self.bin["flower-superlink"],
            *self._tls_args(),
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.superlink = self._spawn("superlink", argv, "superlink.log")
        self._write_connection()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.superlink.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited with code {self.superlink.returncode}; see "
                    f"{self.logs / 'superlink.log'}"
                )
            if self._healthy():
                return
            time.sleep(0.3)
        raise DeploymentError(
            f"the SuperLink on 127.0.0.1:{self.port} was not healthy after {timeout:g} s; see "
            f"{self.logs / 'superlink.log'}"
        )

    def _healthy(self) -> bool:
        scheme = "https" if self.certs else "http"
        ctx = None
        if self.certs is not None:
            ctx = ssl.create_default_context(cafile=str(self.certs.ca))
        try:
            with urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{self.port}/health", timeout=2, context=ctx
            ) as r:
                return r.status == 200
        except OSError:
            return False

    def _write_connection(self) -> None:
        """The CLI's connection to this SuperLink in ``$FLWR_HOME/config.toml``."""
        lines = [
            "[superlink]",
            'default = "shelora"',
            "",
            "[superlink.shelora]",
            f'address = "127.0.0.1:{self.port}"',
        ]
        if self.certs is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {json.dumps(str(self.certs.ca))}")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def start_supernode(self, node_config: Mapping[str, Any]) -> int:
        """Start one SuperNode with ``node_config`` (strings quoted, numbers as they are) on
        its own free port; returns its index (for :meth:`kill_supernode`)."""
        if self.port is None:
            raise DeploymentError("start the SuperLink first (start_superlink)")
        i = len(self.supernodes)
        pairs = " ".join(
            f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items()
        )
        argv = [self.bin["flower-supernode"]]
        if self.certs is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.certs.ca)]
        argv += [
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            pairs,
        ]
        self.supernodes.append(self._spawn(f"supernode-{i}", argv, f"supernode-{i}.log"))
        return i

    def activated(self) -> int:
        """How many SuperNodes the SuperLink has activated so far (from its log)."""
        text = (self.logs / "superlink.log").read_text(errors="replace")
        return len(re.findall(r"ActivateNode\]? ?Activated|Activated node", text))

    def wait_supernodes(self, n: int, *, timeout: float = 120.0) -> None:
        """Return when ``n`` SuperNodes are activated.

        Raises:
            DeploymentError: a SuperNode exited, or fewer than ``n`` activated in ``timeout``.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for i, p in enumerate(self.supernodes):
                if p is not None and p.poll() is not None:
                    raise DeploymentError(
                        f"SuperNode {i} exited with code {p.returncode}; see "
                        f"{self.logs / f'supernode-{i}.log'}"
                    )
            if self.activated() >= n:
                return
            time.sleep(0.3)
        raise DeploymentError(
            f"{self.activated()} of {n} SuperNodes activated after {timeout:g} s; see {self.logs}"
        )

    # -------------------------------------------------------------- run
    def run(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, Any],
        *,
        timeout: float = 1800.0,
        on_poll: Callable[[], None] | None = None,
    ) -> RunOutcome:
        """``flwr run app_dir --stream --run-config <toml>``, until it ends or ``timeout``.

        ``on_poll`` is called about twice a second while the run is going (per-round lines,
        fault injection). A run still going at ``timeout`` is stopped (``flwr stop``).
        """
        import tomli_w

        self._runs += 1
        k = self._runs
        rc_path = self.workdir / f"run-{k}.toml"
        rc_path.write_text(tomli_w.dumps(dict(run_config)))
        log = self.logs / f"flwr-run-{k}.log"
        argv = [self.bin["flwr"], "run", str(app_dir), "shelora", "--stream"]
        argv += ["--run-config", str(rc_path)]
        t0 = time.monotonic()
        proc = self._spawn(f"cli-{k}", argv, log.name)
        while proc.poll() is None:
            if on_poll is not None:
                on_poll()
            if time.monotonic() - t0 > timeout:
                run_id = self._run_id(log)
                if run_id is not None:
                    self.cli(["stop", str(run_id), "shelora"], timeout=60)
                proc.terminate()
                proc.wait(30)
                break
            time.sleep(0.5)
        if on_poll is not None:
            on_poll()
        seconds = time.monotonic() - t0
        run_id = self._run_id(log)
        status, details = "unknown", {}
        if run_id is not None:
            details = self.run_status(run_id)
            status = str(details.get("status", "unknown"))
        return RunOutcome(run_id, status, proc.returncode, seconds, log, details)

    @staticmethod
    def _run_id(log: Path) -> int | None:
        # the last run the log names: logs are appended to, so a deployment started again in the
        # same directory (a resumed run) finds its own run, not the first one
        text = log.read_text(errors="replace") if log.exists() else ""
        found = re.findall(r"[Rr]un(?: ID)?:? ?(\d{3,})", text) or re.findall(r"run (\d+)", text)
        return int(found[-1]) if found else None

    def cli(self, args: list[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment (offline, private FLWR_HOME)."""
        env = {**self.env, _TAG: f"{self.tag}:cli"}
        return subprocess.run(
            [self.bin["flwr"], *args],
            env=env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def run_status(self, run_id: int) -> dict[str, Any]:
        """``flwr ls --run-id N --format json``: the run's status and timings."""
        out = self.cli(["ls", "shelora", "--run-id", str(run_id), "--format", "json"])
        try:
            data = json.loads(out.stdout)
        except ValueError:
            return {"status": "unknown", "stdout": out.stdout[-2000:]}
        runs = data.get("runs") or []
        return dict(runs[0]) if runs else {"status": "unknown", "raw": data}

    # -------------------------------------------------------------- faults and teardown
    def kill_supernode(self, i: int, sig: int = signal.SIGKILL) -> list[int]:
        """Kill SuperNode ``i`` and every process it started (a machine that dies), by PID."""
        pids = tagged_processes(self.tag, f"supernode-{i}")
        _signal(pids, sig)
        p = self.supernodes[i]
        if p is not None:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        return pids

    def kill_superlink(self, sig: int = signal.SIGKILL) -> list[int]:
        """Kill the SuperLink and every process it started (the ServerApp among them): the
        server's machine dies mid-run. The ServerApp's checkpoint of the last finished round
        stays; running the same configuration again resumes from it."""
        pids = tagged_processes(self.tag, "superlink")
        _signal(pids, sig)
        if self.superlink is not None:
            try:
                self.superlink.wait(10)
            except subprocess.TimeoutExpired:
                self.superlink.kill()
                self.superlink.wait(10)
        return pids

    def leftovers(self) -> list[int]:
        """Processes of this deployment still running."""
        return tagged_processes(self.tag)

    def stop(self, *, grace: float = 15.0) -> list[int]:
        """Stop every process of the deployment by PID; returns the PIDs it signalled.

        SIGTERM the SuperNodes, then the SuperLink; then every process still carrying the
        deployment's tag (Flower's children, some in their own session) gets SIGTERM and,
        after ``grace`` seconds, SIGKILL.

        Raises:
            DeploymentError: a process of the deployment survived SIGKILL.
        """
        signalled: list[int] = []
        nodes = [p for p in self.supernodes if p is not None and p.poll() is None]
        _signal([p.pid for p in nodes], signal.SIGTERM)
        signalled += [p.pid for p in nodes]
        for p in nodes:
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if self.superlink is not None and self.superlink.poll() is None:
            self.superlink.terminate()
            signalled.append(self.superlink.pid)
            try:
                self.superlink.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        rest = self.leftovers()
        _signal(rest, signal.SIGTERM)
        rest = _wait_gone(rest, grace / 3, self.leftovers)
        _signal(rest, signal.SIGKILL)
        signalled += [p for p in self.leftovers() if p not in signalled]
        left = _wait_gone(self.leftovers(), 10.0, self.leftovers)
        for p in [self.superlink, *self.supernodes]:
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.wait(10)
        for fh in self._logs:
            fh.close()
        self._logs = []
        self.stopped = sorted(set(signalled))
        if left:
            raise DeploymentError(f"processes {left} of deployment {self.tag} survived SIGKILL")
        if self._own_dir and not self.keep:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.stopped

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------- one whole run
@dataclass
class DeployedRun:
    """What :func:`run_deployed` leaves: the run's records and the evidence around them.

    Attributes:
        config: the run's configuration.
        outcome: the ``flwr run`` outcome (status, Flower's run id, its network traffic).
        history: the ServerApp's round records (notebook 05's schema).
        summary: the ServerApp's ``<run>.summary.json`` (``None`` if the run did not finish).
        audit: the ServerApp's ``audit.json`` (files it opened, CKKS contexts it held).
        roles: the key directories the key holder wrote.
        results_dir: where the records are.
        stopped: PIDs :meth:`Deployment.stop` signalled.
        leftovers: processes of the deployment still running after the stop (should be none).
        seconds: ``start`` (SuperLink and SuperNodes ready), ``run`` and ``stop``.
    """

    config: Any
    outcome: RunOutcome
    history: list[dict[str, Any]]
    summary: dict[str, Any] | None
    audit: dict[str, Any] | None
    roles: Any
    results_dir: Path
    stopped: list[int]
    leftovers: list[int]
    seconds: dict[str, float]

    @property
    def wire_bytes(self) -> dict[str, int]:
        """Flower's count of the run's bytes through the SuperLink (``flwr ls``)."""
        traffic = self.outcome.details.get("network-traffic") or {}
        return {k: int(v) for k, v in traffic.items()}


def file_state(path: Path) -> tuple[int, int, int] | None:
    """``(inode, mtime_ns, size)`` of ``path`` (``None`` when it does not exist): the ServerApp
    replaces its records atomically, so a file a run has written differs from the one that was
    there before it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class RoundWatcher:
    """Follows a run's JSONL and calls ``on_round(record)`` once per new round.

    A file already there when the watcher is made (an earlier run of the same configuration in
    the same results folder, e.g. the insecure demo before the TLS one) is not this run's: it is
    ignored until the ServerApp replaces it, and then read whole (a resumed run rewrites its
    earlier rounds too)."""

    def __init__(self, path: Path, on_round: Callable[[dict[str, Any]], None] | None) -> None:
        self.path = path
        self.on_round = on_round
        self.records: list[dict[str, Any]] = []
        self._before = file_state(path)

    def poll(self) -> None:
        state = file_state(self.path)
        if state is None or state == self._before:
            return
        try:
            lines = [x for x in self.path.read_text().splitlines() if x.strip()]
            records = [json.loads(x) for x in lines]
        except (OSError, ValueError):
            return  # being replaced: read it next time
        for rec in records[len(self.records) :]:
            self.records.append(rec)
            if self.on_round is not None:
                self.on_round(rec)


def run_deployed(
    cfg: Any,
    root: str | Path,
    *,
    results_dir: str | Path | None = None,
    secure: bool = False,
    torch_threads: int = 1,
    round_timeout: float = 600.0,
    quorum_grace: float = -1.0,
    timeout: float = 3600.0,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    during: Callable[[Deployment, RoundWatcher], None] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> DeployedRun:
    """Key holder, SuperLink, one SuperNode per client, ``flwr run``, teardown: one whole run.

    Under ``root``: ``keys/`` (the key holder's role directories; the server's checkpoint and
    audit land in ``keys/server/``) and ``flower/`` (FLWR_HOME, logs, certificates). SuperNode 0
    also holds the evaluator's directory. The records go to ``results_dir`` (default
    ``root/results``).

    Args:
        on_round: called with each round's record as the ServerApp writes it.
        during: called about twice a second while the run is going, with the deployment and
            the rounds seen so far (fault injection: :meth:`Deployment.kill_supernode`).

    Every process is stopped by PID before this returns, also when the run fails.
    """
    from . import APP_DIR
    from .keys import publish_keys
    from .settings import run_config_for

    root = Path(root)
    results = Path(results_dir) if results_dir is not None else root / "results"
    roles = publish_keys(cfg, root / "keys")
    rc = run_config_for(
        cfg,
        server_dir=roles.server,
        results_dir=results,
        round_timeout=round_timeout,
        quorum_grace=quorum_grace,
    )
    metrics = results / "federated_tuning" / f"{cfg.run_name}.jsonl"
    summary_path = metrics.with_name(f"{cfg.run_name}.summary.json")
    summary_before = file_state(summary_path)  # an earlier run's summary is not this run's
    watcher = RoundWatcher(metrics, on_round)
    dep = Deployment(
        root / "flower", secure=secure, torch_threads=torch_threads, extra_env=extra_env
    )
    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    outcome = None
    try:
        dep.start_superlink()
        for i in range(cfg.num_clients):
            node = {"partition-id": i, "client-dir": str(roles.clients[i])}
            if i == 0:
                node["evaluator-dir"] = str(roles.evaluator)
            dep.start_supernode(node)
        dep.wait_supernodes(cfg.num_clients)
        seconds["start"] = time.monotonic() - t0

        def poll() -> None:
            watcher.poll()
            if during is not None:
                during(dep, watcher)

        outcome = dep.run(APP_DIR, rc, timeout=timeout, on_poll=poll)
        seconds["run"] = outcome.seconds
    finally:
        t1 = time.monotonic()
        stopped = dep.stop()
        seconds["stop"] = time.monotonic() - t1
    left = dep.leftovers()
    watcher.poll()
    fresh = file_state(summary_path) not in (None, summary_before)
    summary = json.loads(summary_path.read_text()) if fresh else None
    audit_path = roles.server / "audit.json"
    audit = json.loads(audit_path.read_text()) if audit_path.exists() else None
    return DeployedRun(
        cfg, outcome, watcher.records, summary, audit, roles, results, stopped, left, seconds
    )
