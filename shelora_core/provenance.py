"""Meta information recorded beside every result: versions, git commit, machine, time."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["run_meta", "short_commit"]

_PACKAGES = ("torch", "transformers", "peft", "tenseal", "numpy", "evaluate", "papermill")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


#: what results are computed from: a change here makes a run's commit "-dirty"
_CODE_PATHS = (
    "shelora_core",
    "notebooks",
    "reproduce.py",
    "pyproject.toml",
    "requirements",
    "Makefile",
)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            # only the code counts: a run's own outputs (results/, the README table it
            # regenerates) do not make the results come from uncommitted code
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--"]
            + list(_CODE_PATHS),
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def short_commit(commit: str | None, width: int = 12) -> str:
    """A recorded ``git_commit`` for display: its first ``width`` hex digits, keeping the
    ``-dirty`` suffix (results computed from uncommitted code must say so wherever they are shown);
    ``"not recorded"`` when there is none."""
    if not commit:
        return "not recorded"
    c = str(commit)
    return c[:width] + ("-dirty" if c.endswith("-dirty") else "")


def run_meta(seed: int | None = None) -> dict[str, Any]:
    """Versions, git commit, machine and time, for the ``meta`` field of a results file."""
    import torch

    return {
        "time_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "seed": seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: _version(p) for p in _PACKAGES},
    }
