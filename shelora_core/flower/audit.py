"""What a role's process opened and which CKKS contexts it holds: evidence for "keys where they
belong" (the ServerApp opens no secret file and holds no private context).

:func:`install` adds a :func:`sys.addaudithook` hook that records the path of every ``open``
event (``open()``, ``Path.read_bytes()``, ``os.open``; C libraries that open files themselves are
not seen, and shelora reads every key file from Python). :func:`report` lists the paths outside
the Python installation and counts the TenSEAL contexts alive in the process, private or public.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
from typing import Any

__all__ = ["install", "report"]

_opened: list[Any] = []
_installed = False


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(args[0])  # nothing else here: the hook runs inside every open()


def install() -> None:
    """Start recording opened paths in this process (once; hooks cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True


def _system_prefixes() -> tuple[str, ...]:
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    roots.update(p for p in sysconfig.get_paths().values() if p)
    roots.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)  # the package
    roots.update(("/proc", "/sys", "/dev", "/etc", "/usr", "/lib"))
    return tuple(sorted(roots))


def report() -> dict[str, Any]:
    """``{"installed", "opened", "contexts", "private_contexts"}``: the opened paths outside the
    Python installation and this package (absolute, sorted, unique) and the TenSEAL contexts
    alive in this process."""
    skip = _system_prefixes()
    paths = set()
    for p in list(_opened):
        s = os.path.abspath(os.fsdecode(p))
        if not s.startswith(skip):
            paths.add(s)
    contexts, private = 0, 0
    ts = sys.modules.get("tenseal")
    if ts is not None:
        with warnings.catch_warnings():  # isinstance() touches deprecated torch attributes
            warnings.simplefilter("ignore")
            found = [obj for obj in gc.get_objects() if isinstance(obj, ts.Context)]
        for obj in found:
            contexts += 1
            private += bool(obj.is_private())
    return {
        "installed": _installed,
        "opened": sorted(paths),
        "contexts": contexts,
        "private_contexts": private,
    }
