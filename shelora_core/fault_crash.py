"""Crash and disk faults of a federated run: killed at every write point, keys and checkpoints damaged.

A run is killed (an exception raised from :data:`shelora_core.checkpoint.write_hook`) before
every file it writes and before every rename that publishes a file, one kill per case, and then
run again: the resumed run must reproduce the uninterrupted one (``recovered``); anything else is
``data_lost``. FlexLoRA must match exactly; encrypted methods up to CKKS noise (TenSEAL's
encryption randomness cannot be seeded, so ciphertext bytes differ between runs).

Damaged state (a key file deleted or altered, a checkpoint corrupted, truncated or from another
configuration, the manifest gone, a client's column list gone, an older layout) must be refused
with a :class:`~shelora_core.errors.CheckpointError` and leave every key file as it was.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import FederatedConfig
from .faults import Case

__all__ = ["Crash", "crash_cases", "disk_cases", "same_history", "tiny_config"]


class Crash(BaseException):
    """Raised at a write point to kill a run (a BaseException: nothing in the run catches it)."""


def tiny_config(method: str) -> FederatedConfig:
    """A run of seconds on MiniLM: 2 clients, 2 rounds, 1 local step."""
    return FederatedConfig(
        method=method,
        model="minilm",
        num_clients=2,
        ranks=(2, 4),
        he_budgets=(1, 2),
        rounds=2,
        local_steps=1,
        batch_size=8,
        train_examples=80,
        eval_examples=16,
        calibration_examples=8,
        min_client_examples=10,
        lr=5e-3,
        max_length=16,
    )


def same_history(a: list[dict], b: list[dict], *, exact: bool) -> str:
    """``""`` when two round histories agree (timings ignored; byte counts within 1% and
    metrics within 1e-6 unless ``exact``), else what differs."""
    if len(a) != len(b):
        return f"{len(a)} rounds vs {len(b)}"
    for ra, rb in zip(a, b, strict=True):
        keys = {k for k in set(ra) | set(rb) if "seconds" not in k}
        for k in sorted(keys):
            x, y = ra.get(k), rb.get(k)
            if isinstance(x, float) and isinstance(y, float) and not exact:
                tol = 0.01 * abs(x) if "bytes" in k else 1e-6
                if not math.isclose(x, y, abs_tol=tol):
                    return f"round {ra.get('round')}: {k} {x} vs {y}"
            elif isinstance(x, int) and isinstance(y, int) and "bytes" in k and not exact:
                if abs(x - y) > 0.01 * max(abs(x), 1):
                    return f"round {ra.get('round')}: {k} {x} vs {y}"
            elif x != y:
                return f"round {ra.get('round')}: {k} {x!r} vs {y!r}"
    return ""


def _run(cfg: FederatedConfig, results: Path, model: Any, **kw: Any) -> Any:
    from .federation import Federation

    return Federation(cfg, results_dir=results, model=model, progress=False).run(**kw)


def _points(cfg: FederatedConfig, results: Path, model: Any) -> tuple[list, list[tuple]]:
    """The uninterrupted run's history and every write point it passed, in order."""
    seen: list[tuple[str, str]] = []

    def record(path: Path, step: str) -> None:
        seen.append((str(Path(path).relative_to(results)), step))

    checkpoint.write_hook = record
    try:
        history = _run(cfg, results, model).history
    finally:
        checkpoint.write_hook = None
    return history, seen


def crash_cases(
    workdir: str | Path,
    methods: tuple[str, ...] = ("flexlora", "shelora"),
    *,
    model: Any = None,
    every: int = 1,
) -> Iterator[Case]:
    """Kill a run of each method at every ``every``-th write point, resume it, compare."""
    from .lora import LoraModel

    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    if model is None:
        model = LoraModel("minilm", num_labels=2, ranks=(2, 4), alpha=16.0, seed=0)
    for method in methods:
        cfg = tiny_config(method)
        ref, points = _points(cfg, workdir / method / "ref", model)
        exact = method in ("fedavg", "flexlora")
        for k in range(0, len(points), every):
            rel, step = points[k]
            case = Case(method, "crash", f"killed before the {step} of {rel}", "recovered")
            results = workdir / method / f"k{k}"
            count = [0]

            def kill(path: Path, step_: str, k: int = k, count: list = count) -> None:
                if count[0] == k:
                    raise Crash(f"{step_} {path}")
                count[0] += 1

            checkpoint.write_hook = kill
            try:
                _run(cfg, results, model)
                killed = False
            except Crash:
                killed = True
            finally:
                checkpoint.write_hook = None
            try:
                again = _run(cfg, results, model).history
            except Exception as exc:
                case.observed, case.detail = (
                    "data_lost",
                    f"resume failed: {type(exc).__name__}: {exc}",
                )
            else:
                diff = same_history(ref, again, exact=exact)
                case.observed = "data_lost" if diff or not killed else "recovered"
                case.detail = diff or ("" if killed else "the kill point was never reached")
            yield case
            shutil.rmtree(results, ignore_errors=True)


def _key_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".ctx", ".key")
    }


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def disk_cases(workdir: str | Path, *, model: Any = None) -> Iterator[Case]:
    """Damage a stopped SHE-LoRA run's directories one way at a time; resuming must refuse by
    name and leave every remaining key file untouched."""
    from .lora import LoraModel

    workdir = Path(workdir)
    if model is None:
        model = LoraModel("minilm", num_labels=2, ranks=(2, 4), alpha=16.0, seed=0)
    cfg = tiny_config("shelora")
    base = workdir / "disk-base"
    if base.exists():
        shutil.rmtree(base)
    _run(cfg, base, model, stop_after_round=1)
    rel_root = Path("checkpoints") / cfg.run_name  # Federation.checkpoint_dir
    other = tiny_config("shelora").replace(seed=1)

    def other_checkpoint(root: Path) -> None:
        src = workdir / "disk-other"
        if not src.exists():
            _run(other, src, model, stop_after_round=1)
        theirs = src / "checkpoints" / other.run_name / "server" / "checkpoint.bin"
        shutil.copy(theirs, root / "server" / "checkpoint.bin")

    damages: list[tuple[str, Callable[[Path], None]]] = [
        ("server public context deleted", lambda r: (r / "server" / "public.ctx").unlink()),
        ("a client's secret context deleted", lambda r: (r / "clients" / "1" / "secret.ctx").unlink()),
        ("a client's OPE key deleted", lambda r: (r / "clients" / "0" / "ope.key").unlink()),
        ("the evaluator's secret context deleted", lambda r: (r / "evaluator" / "secret.ctx").unlink()),
        ("the key holder's manifest deleted", lambda r: (r / "keyholder" / "manifest.json").unlink()),
        ("the key holder's manifest damaged", lambda r: (r / "keyholder" / "manifest.json").write_text("{")),
        ("a client's secret context altered", lambda r: _flip(r / "clients" / "0" / "secret.ctx")),
        ("the server's public context replaced by a fresh key", lambda r: (r / "server" / "public.ctx").write_bytes(__import__("shelora_core.ckks", fromlist=["KeyHolder"]).KeyHolder.generate("add_only").public_bytes())),
        ("checkpoint corrupted", lambda r: _flip(r / "server" / "checkpoint.bin")),
        ("checkpoint truncated", lambda r: (r / "server" / "checkpoint.bin").write_bytes((r / "server" / "checkpoint.bin").read_bytes()[:-9])),
        ("checkpoint of another configuration", other_checkpoint),
        ("a client's column list deleted", lambda r: (r / "clients" / "1" / "columns.json").unlink()),
        ("a checkpoint in an older layout beside it", lambda r: (r / "state.json").write_text("{}")),
    ]  # fmt: skip
    for name, damage in damages:
        case = Case("shelora", "disk", name)
        results = workdir / "disk-case"
        if results.exists():
            shutil.rmtree(results)
        shutil.copytree(base, results)
        root = results / rel_root
        damage(root)
        before = _key_hashes(root)
        case.expect_refusal(lambda results=results: _run(cfg, results, model))
        if _key_hashes(root) != before:
            case.observed, case.detail = "data_lost", "key material was rewritten"
        yield case
    shutil.rmtree(workdir / "disk-case", ignore_errors=True)
