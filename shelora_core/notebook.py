"""Cell helpers the notebooks share: settings and overrides, output folders, figures, JSON records.

Every notebook starts the same way: it picks its settings for the profile papermill passed, applies
the ``overrides`` of ``reproduce.py --set`` to them or to its :class:`~shelora_core.FederatedConfig`,
creates ``<results_dir>/figures``, then saves and shows figures and writes one strict-JSON record.
Those steps live here so that a notebook keeps only its narration and its measurements.

Examples
--------
The cell after a notebook's ``parameters`` cell:

>>> SETTINGS = {"quick": dict(k=8, ks=(2, 4)), "paper": dict(k=8, ks=(2, 4, 8))}
>>> S, config = settings("quick", SETTINGS, {"ks": "(2,)", "rounds": 1})
>>> S, config
({'k': 8, 'ks': (2,)}, {'rounds': 1})
"""

from __future__ import annotations

import ast
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "best_time",
    "config_field_names",
    "parse_overrides",
    "results_paths",
    "settings",
    "settings_table",
    "show",
    "to_json",
    "write_json",
]

T = TypeVar("T")


def config_field_names() -> frozenset[str]:
    """Names of the :class:`~shelora_core.FederatedConfig` fields (what ``overrides`` may set)."""
    from .config import FederatedConfig

    return frozenset(FederatedConfig.__dataclass_fields__)


def parse_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` with literal strings read back as Python values.

    papermill writes a parameter it cannot express as a literal (a tuple, e.g.
    ``ks=(2, 4)``) into the notebook as its ``repr`` string; a string that starts with ``(``,
    ``[`` or ``{`` is therefore parsed with :func:`ast.literal_eval`. Other values pass unchanged.

    Parameters
    ----------
    overrides
        Override name -> value, as papermill injected it.

    Returns
    -------
    dict
        A new dict; ``overrides`` is not modified.

    Raises
    ------
    ValueError
        If such a string is not a valid literal (names the override).
    """
    out = {}
    for key, value in overrides.items():
        if isinstance(value, str) and value[:1] in "([{":
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as exc:
                raise ValueError(
                    f"override {key}={value!r} looks like a literal but does not parse: {exc}"
                ) from None
        out[key] = value
    return out


def settings(
    profile: str,
    table: Mapping[str, Mapping[str, Any]],
    overrides: Mapping[str, Any] | None = None,
    *,
    config_fields: Iterable[str] | None = None,
    fixed: Iterable[str] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A notebook's settings for ``profile``, with ``overrides`` applied.

    Parameters
    ----------
    profile
        Key of ``table`` (``"quick"`` or ``"paper"``).
    table
        Profile -> the notebook's settings (a dict of its own knobs).
    overrides
        ``reproduce.py --set`` values (parsed by :func:`parse_overrides`). An override naming a
        setting replaces it; one naming a field of ``config_fields`` goes to the second return
        value (a name in both does both). ``None``: no overrides are applied or checked.
    config_fields
        Names accepted for the run's configuration; default: every
        :class:`~shelora_core.FederatedConfig` field (:func:`config_field_names`).
    fixed
        Settings that overrides cannot change (e.g. a nested dict of configuration fields:
        override those fields by name instead).

    Returns
    -------
    settings : dict
        A copy of ``table[profile]`` with the overrides of its keys applied.
    config : dict
        The overrides naming configuration fields, for ``FederatedConfig(**...)`` or
        :func:`~shelora_core.profiles.profile_config`.

    Raises
    ------
    ValueError
        For an unknown profile (names it and the profiles of ``table``) or an override that is
        neither a setting (outside ``fixed``) nor a configuration field (names it and the
        settings it could have been).
    """
    if profile not in table:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(table)}")
    out = dict(table[profile])
    if overrides is None:
        return out, {}
    given = parse_overrides(overrides)
    fields = config_field_names() if config_fields is None else frozenset(config_fields)
    settable = set(out) - set(fixed)
    unknown = sorted(set(given) - settable - fields)
    if unknown:
        allowed = "FederatedConfig fields or one of" if fields else "one of"
        raise ValueError(f"unknown override(s) {unknown}: use {allowed} {sorted(settable)}")
    out.update({k: v for k, v in given.items() if k in settable})
    return out, {k: v for k, v in given.items() if k in fields}


def settings_table(
    settings: Mapping[str, Any],
    config: Any = None,
    fields: Iterable[str] = (),
    *,
    skip: Iterable[str] = (),
):
    """The settings of a run as a one-column table (``pandas.DataFrame`` indexed by setting).

    Parameters
    ----------
    settings
        The notebook's settings (values shown with ``str``).
    config
        A :class:`~shelora_core.FederatedConfig` whose ``fields`` are appended as
        ``config.<field>`` rows.
    fields
        Configuration fields to show.
    skip
        Settings not shown.
    """
    import pandas as pd

    hidden = set(skip)
    rows = [{"setting": k, "value": str(v)} for k, v in settings.items() if k not in hidden]
    if config is not None:
        rows += [{"setting": f"config.{k}", "value": str(getattr(config, k))} for k in fields]
    return pd.DataFrame(rows).set_index("setting")


def results_paths(results_dir: str | Path) -> tuple[Path, Path]:
    """``(results, figures)``: ``results_dir`` and its ``figures`` folder (created)."""
    results = Path(results_dir)
    figures = results / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    return results, figures


def show(fig, name: str, figures: str | Path) -> None:
    """Save ``fig`` as ``<figures>/<name>.png``, print the path, show it inline and close it."""
    import matplotlib.pyplot as plt

    from .plots import save

    print("figure:", save(fig, Path(figures) / f"{name}.png"))
    plt.show()
    plt.close(fig)


def to_json(obj: Any) -> Any:
    """``obj`` as strict-JSON-ready Python values, recursively.

    Mapping keys become ``str``, tuples lists, numpy arrays nested lists, numpy scalars Python
    scalars, and NaN / infinity ``None`` (JSON has no such numbers). Other values pass unchanged.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(record: Any, path: str | Path) -> Path:
    """Write ``to_json(record)`` to ``path`` (indent 1, strict JSON); returns the path."""
    path = Path(path)
    path.write_text(json.dumps(to_json(record), indent=1, allow_nan=False), encoding="utf-8")
    return path


def best_time(fn: Callable[[], T], repeats: int = 5) -> tuple[float, T]:
    """The shortest wall-clock time of ``repeats`` calls of ``fn`` (seconds) and the last result.

    Raises
    ------
    ValueError
        If ``repeats`` is below 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (got {repeats})")
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out  # type: ignore[return-value]
