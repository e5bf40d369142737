"""``make deploy-demo`` and ``make deploy-bench``: SHE-LoRA on Flower's Deployment Engine, on
loopback, with every process stopped by PID at the end.

``python -m shelora_core.flower.demo [--secure]`` starts a SuperLink and N SuperNodes on
127.0.0.1 (free ports, offline switches, a temporary ``FLWR_HOME``), runs SHE-LoRA (delta cipher
mode, negotiated columns, ranks 8/16/32, Dirichlet 0.3) for a few rounds on MiniLM, prints one
line per round (clients answered, bytes up and down, seconds), writes the ServerApp's records to
``results/<profile>/deployment/federated_tuning/`` (notebook 05's schema) and the run's summary
to ``results/<profile>/deployment.json``, and stops every process it started.

``python -m shelora_core.flower.demo bench`` measures, for 3, 10 and 20 SuperNodes, the seconds
per round and the bytes per round (shelora's payload and Flower's count of the bytes through the
SuperLink), next to the same configuration run in-process, into ``deployment.json``'s
``scaling`` entry. Every run is bounded (``--timeout``) and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write
from ..config import FederatedConfig
from ..profiles import PROFILES, profile_config
from .launch import DeployedRun, run_deployed

__all__ = ["bench", "demo", "demo_config", "main", "scaling_config"]

ROOT = Path(__file__).resolve().parents[2]


def demo_config(profile: str, *, supernodes: int = 3, rounds: int = 3) -> FederatedConfig:
    """The demo's run: SHE-LoRA delta with negotiated columns, heterogeneous ranks, Dirichlet."""
    return profile_config(
        profile,
        method="shelora",
        cipher_mode="delta",
        ranks=(8, 16, 32),
        partition="dirichlet",
        num_clients=supernodes,
        rounds=rounds,
    )


def scaling_config(profile: str, supernodes: int) -> FederatedConfig:
    """A scaling run: the demo's method, every client every round, 2 short rounds."""
    base = demo_config(profile, supernodes=supernodes, rounds=2)
    need = supernodes * base.min_client_examples * 2
    train = None if base.train_examples is None else max(base.train_examples, need)
    return base.replace(local_steps=2, train_examples=train, eval_examples=100, eval_every=2)


def round_line(rec: dict[str, Any], cfg: FederatedConfig) -> str:
    """The per-round line: clients answered, bytes up and down, seconds, accuracy."""
    from ..server import sample_clients

    asked = len(sample_clients(cfg, rec["round"]))
    acc = rec.get("accuracy")
    return (
        f"round {rec['round']}/{cfg.rounds}: {rec['clients']}/{asked} clients answered, "
        f"up {rec['upload_bytes'] / 1e6:.2f} MB, down {rec['download_bytes'] / 1e6:.2f} MB, "
        f"{rec['seconds']:.1f} s" + (f", accuracy {acc:.3f}" if acc is not None else "")
    )


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(data, indent=1, default=str) + "\n").encode())


def _portable(path: str, tmp: Path) -> str:
    """``path`` relative to the run's temporary directory (``<tmp>/...``) or the repository."""
    p = Path(path)
    if p.is_relative_to(tmp):
        return f"<tmp>/{p.relative_to(tmp)}"
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def _run_record(run: DeployedRun, *, secure: bool) -> dict[str, Any]:
    """What deployment.json keeps of a deployed run (paths made portable)."""
    audit = dict(run.audit or {})
    tmp = run.roles.root.parent
    audit["opened"] = [_portable(x, tmp) for x in audit.get("opened", [])]
    return {
        "secure": secure,
        "supernodes": run.config.num_clients,
        "status": run.outcome.status,
        "flower_run_id": run.outcome.run_id,
        "seconds": run.seconds,
        "wire_bytes": run.wire_bytes,
        "processes_stopped": len(run.stopped),
        "processes_left": len(run.leftovers),
        "server_audit": audit,
        "summary": run.summary,
        "history": run.history,
    }


def demo(
    profile: str = "quick",
    *,
    supernodes: int = 3,
    rounds: int = 3,
    secure: bool = False,
    results: Path | None = None,
    timeout: float = 3600.0,
) -> DeployedRun:
    """Run the demo (see the module docstring) and return what it left."""
    cfg = demo_config(profile, supernodes=supernodes, rounds=rounds)
    results = results or ROOT / "results" / profile
    mode = "TLS (certificates made at start)" if secure else "insecure loopback"
    print(f"deploy-demo: {cfg.run_name}: {supernodes} SuperNodes, {rounds} rounds, {mode}")
    with tempfile.TemporaryDirectory(prefix="shelora-deploy-") as tmp:
        run = run_deployed(
            cfg,
            tmp,
            results_dir=results / "deployment",
            secure=secure,
            timeout=timeout,
            on_round=lambda rec: print("  " + round_line(rec, cfg), flush=True),
        )
    print(
        f"flower run {run.outcome.run_id}: {run.outcome.status}; "
        f"{run.seconds.get('start', 0):.1f} s to start, {run.seconds.get('run', 0):.1f} s to run; "
        f"wire bytes (SuperLink) {run.wire_bytes.get('total-bytes', 0) / 1e6:.2f} MB"
    )
    audit = run.audit or {}
    print(
        f"server audit: opened {len(audit.get('opened', []))} files outside Python, "
        f"{audit.get('private_contexts', '?')} private CKKS contexts"
    )
    print(
        f"stopped {len(run.stopped)} processes by PID; {len(run.leftovers)} left running"
        + (f": {run.leftovers}" if run.leftovers else "")
    )
    path = results / "deployment.json"
    data = _load(path)
    data["demo_tls" if secure else "demo"] = _run_record(run, secure=secure)
    _save(path, data)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if not run.outcome.ok or run.leftovers:
        raise SystemExit(1)
    return run


#: measured resident memory of one SuperNode with its SuperExec (Flower's, ~0.25 GB) and of a
#: ClientApp process holding torch, MiniLM and its data (~0.65 GB); all ClientApps of a round
#: run at once
GB_PER_SUPERNODE = 0.25 + 0.65


def memory_needed(supernodes: int) -> float:
    """GB a loopback run with ``supernodes`` SuperNodes needs at its peak, plus 1.5 GB for the
    SuperLink, the ServerApp and the in-process reference and 2 GB left for the rest of the
    machine."""
    return supernodes * GB_PER_SUPERNODE + 3.5


#: a run stops (every process by PID) when the machine's free memory falls below this
MIN_FREE_GB = 1.0


def _memory_watchdog(dep: Any, watcher: Any) -> None:
    """``during`` hook of a bench run: stop before the machine runs out of memory."""
    free = memory_available()
    if free is not None and free < MIN_FREE_GB:
        from .launch import DeploymentError

        raise DeploymentError(
            f"only {free:.1f} GB of memory left: the run was stopped before the machine ran "
            "out; run deploy-bench with fewer --sizes or on an idle machine"
        )


def memory_available() -> float | None:
    """``MemAvailable`` in GB (``None`` where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def _save_scaling(
    results: Path, profile: str, sizes: tuple[int, ...], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write the rows measured so far into ``deployment.json`` (after every size: a run stopped
    later keeps them); rows of sizes not run this time are kept when the configuration is the
    same."""
    from ..provenance import run_meta

    path = results / "deployment.json"
    data = _load(path)
    config = scaling_config(profile, sizes[0]).to_dict() | {"num_clients": "per row"}
    old = data.get("scaling") or {}
    if old.get("config") == config:  # the same runs: keep the rows of sizes not run this time
        ran = {r["supernodes"] for r in rows}
        rows = [r for r in old.get("rows", []) if r["supernodes"] not in ran] + rows
        rows.sort(key=lambda r: r["supernodes"])
    data["scaling"] = {
        "what": (
            "loopback, one machine: a SuperLink and N SuperNodes as separate processes; "
            "seconds per round include Flower starting a ClientApp process per message"
        ),
        "config": config,
        "rows": rows,
        "meta": run_meta(0),
    }
    _save(path, data)
    return data["scaling"]


def bench(
    profile: str = "quick",
    *,
    sizes: tuple[int, ...] = (3, 10, 20),
    results: Path | None = None,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Loopback scaling: seconds and bytes per round for each number of SuperNodes, beside the
    same configuration in-process; written to ``deployment.json`` (``scaling``)."""
    from ..federation import Federation

    results = results or ROOT / "results" / profile
    rows = []
    for n in sizes:
        cfg = scaling_config(profile, n)
        need, have = memory_needed(n), memory_available()
        if have is not None and have < need:
            print(
                f"deploy-bench: {n} SuperNodes skipped: ~{need:.1f} GB needed, {have:.1f} GB free"
            )
            rows.append({"supernodes": n, "skipped": f"~{need:.1f} GB needed, {have:.1f} GB free"})
            continue
        print(f"deploy-bench: {n} SuperNodes ({cfg.run_name})", flush=True)
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="shelora-bench-") as tmp:
            run = run_deployed(
                cfg,
                Path(tmp) / "flower",
                timeout=timeout,
                on_round=lambda rec, cfg=cfg: print("  " + round_line(rec, cfg), flush=True),
                during=_memory_watchdog,
            )
            if not run.outcome.ok or run.leftovers:
                raise SystemExit(f"the {n}-SuperNode run failed: {run.outcome}")
            t0 = time.perf_counter()
            ref = Federation(cfg, results_dir=Path(tmp) / "inproc", progress=False).run()
            inproc_total = time.perf_counter() - t0
        hist, rh = run.history, ref.history
        rounds = len(hist)
        row = {
            "supernodes": n,
            "rounds": rounds,
            "seconds_per_round": float(np.mean([h["seconds"] for h in hist])),
            "seconds_per_round_after_first": float(np.mean([h["seconds"] for h in hist[1:]]))
            if rounds > 1
            else None,
            "client_load_seconds": float(np.mean([h.get("client_load_seconds", 0) for h in hist])),
            "upload_bytes_per_round": float(np.mean([h["upload_bytes"] for h in hist])),
            "download_bytes_per_round": float(np.mean([h["download_bytes"] for h in hist])),
            "broadcast_bytes": hist[-1]["broadcast_bytes"],
            "negotiation_bytes": int(
                sum(
                    h.get("negotiation_upload_bytes", 0) + h.get("negotiation_broadcast_bytes", 0)
                    for h in hist
                )
            ),
            "key_bytes_public": hist[-1]["key_bytes_public"],
            "wire_bytes_total": run.wire_bytes.get("total-bytes"),
            "wire_bytes_per_round": (run.wire_bytes.get("total-bytes") or 0) / rounds,
            "run_seconds": run.seconds.get("run"),
            "start_seconds": run.seconds.get("start"),
            "stop_seconds": run.seconds.get("stop"),
            "processes_left": len(run.leftovers),
            "final_accuracy": hist[-1].get("accuracy"),
            "in_process_seconds_per_round": float(np.mean([h["seconds"] for h in rh])),
            "in_process_total_seconds": inproc_total,
            "in_process_upload_bytes_per_round": float(np.mean([h["upload_bytes"] for h in rh])),
            "in_process_final_accuracy": rh[-1].get("accuracy"),
            # the machine's 1-minute load average before and after (other work shares the cores)
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        rows.append(row)
        _save_scaling(results, profile, sizes, rows)
        print(
            f"  {n} SuperNodes: {row['seconds_per_round']:.1f} s/round on Flower, "
            f"{row['in_process_seconds_per_round']:.1f} s/round in-process; "
            f"{row['wire_bytes_per_round'] / 1e6:.2f} MB/round through the SuperLink",
            flush=True,
        )
    scaling = _save_scaling(results, profile, sizes, rows)
    print(f"wrote {results / 'deployment.json'}")
    return scaling


def main(argv: list[str] | None = None) -> None:
    # SIGTERM unwinds like Ctrl-C: run_deployed's cleanup stops every Flower process by PID
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(prog="python -m shelora_core.flower.demo", description=__doc__)
    p.add_argument("what", nargs="?", choices=("demo", "bench"), default="demo")
    p.add_argument("--profile", choices=PROFILES, default="quick")
    p.add_argument("--supernodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="3,10,20", help="bench: SuperNode counts, comma-separated")
    p.add_argument("--secure", action="store_true", help="TLS with certificates made at start")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    a = p.parse_args(argv)
    if a.what == "bench":
        bench(a.profile, sizes=tuple(int(x) for x in a.sizes.split(",")), timeout=a.timeout)
    else:
        demo(
            a.profile,
            supernodes=a.supernodes,
            rounds=a.rounds,
            secure=a.secure,
            timeout=a.timeout,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
