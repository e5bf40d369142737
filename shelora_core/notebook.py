"""Cell helpers the notebooks share: settings and overrides, output folders, figures, JSON records.

Every notebook starts the same way: it picks its settings for the profile papermill passed, applies
the ``overrides`` of ``reproduce.py --set`` to them or to its :class:`~shelora_core.FederatedConfig`,
creates ``<results_dir>/figures``, then saves and shows figures and writes one strict-JSON record.
Those steps live here so that a notebook keeps only its narration and its measurements.

Interactive runs (JupyterLab, or papermill without ``results_dir``) write to a git-ignored scratch
folder, ``results/scratch/<profile>/`` (:func:`scratch_dir`); only ``reproduce.py`` passes the
committed ``results/<profile>``. Headless runs print one marked line per step
(:func:`progress`, :func:`round_printer`), which ``reproduce.py`` relays to its terminal. Each
notebook records its key metrics in its own outputs (:func:`store_metadata`), which the smoke tests
read back from the executed copy (:func:`read_notebook`).

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
import difflib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import ConfigError

__all__ = [
    "METRICS_MIME",
    "PROGRESS_MARK",
    "attack_override_keys",
    "best_time",
    "check_override_keys",
    "config_field_names",
    "headless",
    "notebook_override_keys",
    "parse_overrides",
    "progress",
    "read_notebook",
    "results_paths",
    "round_printer",
    "scratch_dir",
    "settings",
    "settings_table",
    "show",
    "store_metadata",
    "to_json",
    "write_json",
]

T = TypeVar("T")


def config_field_names() -> frozenset[str]:
    """Names of the :class:`~shelora_core.FederatedConfig` fields (what ``overrides`` may set)."""
    from .config import FederatedConfig

    return frozenset(FederatedConfig.__dataclass_fields__)


def attack_override_keys() -> frozenset[str]:
    """The override keys notebook 06's attack grid knows: its settings (``n_batches``,
    ``max_tokens``, ...), its cell filters (``batch_sizes``, ``ranks``, ``updates``,
    ``methods``, ``attackers``) and the optimisation attacker's caps; see :func:`shelora_core.attacks.grid.apply_overrides`."""
    from .attacks import grid

    return frozenset(grid._SETTINGS) | frozenset(grid._FILTERS) | frozenset(grid._CAPS)


def check_override_keys(keys: Iterable[str], known: Iterable[str]) -> None:
    """Raise :class:`~shelora_core.errors.ConfigError` for the keys of ``keys`` not in ``known``.

    The message names every unknown key, what is allowed (the FederatedConfig fields as a group
    when ``known`` holds them all, they are many, and every other name) and, for each unknown
    key with a close match, a did-you-mean (:func:`difflib.get_close_matches`).

    Parameters
    ----------
    keys
        The override names given.
    known
        Every name accepted.
    """
    known = frozenset(known)
    unknown = sorted(set(keys) - known)
    if not unknown:
        return
    fields = config_field_names()
    if fields <= known:
        own = sorted(known - fields)
        allowed = f"FederatedConfig fields or one of {own}" if own else "a FederatedConfig field"
    else:
        allowed = f"one of {sorted(known)}"
    hints = [
        f"did you mean {close[0]!r} for {key!r}?"
        for key in unknown
        if (close := difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6))
    ]
    raise ConfigError(
        f"unknown override(s) {unknown}: use {allowed}" + ("; " + " ".join(hints) if hints else "")
    )


def _read_literal(text: str, what: str) -> Any:
    """``text`` as JSON, else as a Python literal (``ConfigError`` naming ``what`` otherwise)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise ConfigError(
            f"{what} does not parse as JSON or a Python literal: {exc}; write e.g. "
            '\'{"rounds": 1, "ranks": [8, 16]}\''
        ) from None


def parse_overrides(
    overrides: Mapping[str, Any] | str | None, *, known: Iterable[str] | None = None
) -> dict[str, Any]:
    """``overrides`` as a dict, with literal strings read back as Python values.

    papermill writes a parameter it cannot express as a literal (a tuple, e.g.
    ``ks=(2, 4)``) into the notebook as its ``repr`` string; a string value that starts with
    ``(``, ``[`` or ``{`` is therefore parsed with :func:`ast.literal_eval`. Other values pass
    unchanged. The papermill command line passes ``-p overrides '{"rounds": 1}'`` as a string:
    ``overrides`` itself may be the JSON or Python-literal text of a dict (``""`` or ``None``:
    no overrides).

    Parameters
    ----------
    overrides
        Override name -> value, as papermill injected it, or the text of such a dict.
    known
        When given, every override name must be one of these (the notebook's settings and the
        configuration fields it accepts): :func:`check_override_keys`.

    Returns
    -------
    dict
        A new dict; ``overrides`` is not modified.

    Raises
    ------
    ConfigError
        (a ``ValueError``) If a string value or ``overrides`` itself is not a valid literal, if
        ``overrides`` is not a dict, or for a name outside ``known`` (names it, with a
        did-you-mean).
    """
    if overrides is None:
        overrides = {}
    if isinstance(overrides, str):
        overrides = (
            _read_literal(overrides, f"overrides={overrides!r}") if overrides.strip() else {}
        )
    if not isinstance(overrides, Mapping):
        raise ConfigError(
            f"overrides={overrides!r} is a {type(overrides).__name__}, not a dict: pass e.g. "
            '{"rounds": 1} (papermill: -p overrides \'{"rounds": 1}\')'
        )
    out = {}
    for key, value in overrides.items():
        if isinstance(value, str) and value[:1] in "([{":
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as exc:
                raise ConfigError(
                    f"override {key}={value!r} looks like a literal but does not parse: {exc}"
                ) from None
        out[str(key)] = value
    if known is not None:
        check_override_keys(out, known)
    return out


def _literal_keys(node: ast.expr) -> set[str]:
    """String keys of a dict display or of a ``dict(...)`` call with keywords."""
    if isinstance(node, ast.Dict):
        return {
            k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
        }
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
        return {k.arg for k in node.keywords if k.arg}
    return set()


def notebook_override_keys(path: str | Path) -> frozenset[str]:
    """The override names a notebook accepts besides the FederatedConfig fields, read from its
    code without running it (``reproduce.py`` checks ``--set`` before any notebook starts).

    They are the keys of its ``SETTINGS`` table (a dict literal of profile -> ``dict(...)``),
    less the ones its :func:`settings` call lists as ``fixed``; a notebook that calls
    ``attack_plan`` (06) also accepts :func:`attack_override_keys`.

    Parameters
    ----------
    path
        A ``.ipynb`` file.

    Raises
    ------
    ConfigError
        If the file is not a notebook (names it).
    """
    try:
        cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is not a readable notebook: {exc}") from None
    keys: set[str] = set()
    fixed: set[str] = set()
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell["source"])
        try:
            tree = ast.parse(source)
        except SyntaxError:  # a cell magic: not Python
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "SETTINGS" for t in node.targets)
                and isinstance(node.value, ast.Dict)
            ):
                for table in node.value.values:
                    keys |= _literal_keys(table)
            elif isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name == "attack_plan":
                    keys |= attack_override_keys()
                if name == "settings":
                    for kw in node.keywords:
                        if kw.arg == "fixed" and isinstance(kw.value, (ast.Tuple, ast.List)):
                            fixed |= {e.value for e in kw.value.elts if isinstance(e, ast.Constant)}
    return frozenset(keys - fixed)


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
    ConfigError
        (a ``ValueError``) For an unknown profile (names it and the profiles of ``table``) or an
        override that is neither a setting (outside ``fixed``) nor a configuration field (names
        it, the settings it could have been and the closest name).
    """
    if profile not in table:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {sorted(table)}")
    out = dict(table[profile])
    if overrides is None:
        return out, {}
    given = parse_overrides(overrides)
    fields = config_field_names() if config_fields is None else frozenset(config_fields)
    settable = set(out) - set(fixed)
    check_override_keys(given, settable | fields)
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


def scratch_dir(profile: str) -> Path:
    """Where an interactive run of ``profile`` writes: ``results/scratch/<profile>/`` of the
    checkout that holds this package (``make setup`` installs it editable), git-ignored; outside
    a checkout, ``results/scratch/<profile>/`` under the working directory."""
    root = Path(__file__).resolve().parent.parent
    if not ((root / "notebooks").is_dir() and (root / "pyproject.toml").is_file()):
        root = Path.cwd()
    return root / "results" / "scratch" / profile


def results_paths(results_dir: str | Path | None, profile: str | None = None) -> tuple[Path, Path]:
    """``(results, figures)``: ``results_dir`` and its ``figures`` folder (created).

    An empty ``results_dir`` (``""`` or ``None``, a notebook's default) means an interactive run:
    the results go to :func:`scratch_dir` of ``profile`` (the path is printed), so that "Run All"
    in JupyterLab never rewrites the committed ``results/<profile>/``; ``reproduce.py`` passes
    that folder explicitly.

    Raises
    ------
    ConfigError
        If ``results_dir`` is empty and no ``profile`` is given.
    """
    if not results_dir:
        if profile is None:
            raise ConfigError(
                "results_dir is empty and no profile was given: pass results_dir (e.g. "
                "'../results/quick') or the profile whose scratch folder to use"
            )
        results = scratch_dir(profile)
        print(
            f"results_dir not set: writing to the scratch folder {results} (git-ignored); "
            "set results_dir to write elsewhere (reproduce.py writes results/<profile>)"
        )
    else:
        results = Path(results_dir)
    figures = results / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    return results, figures


# ------------------------------------------------------------------ headless progress
#: headless progress lines start with this mark; ``reproduce.py`` relays the marked lines of a
#: notebook's output to its terminal (and only those)
PROGRESS_MARK = "[progress] "


def headless() -> bool:
    """True when progress bars are off (``SHELORA_QUIET=1``, as ``reproduce.py`` sets for its
    kernels): the same test as :func:`shelora_core.federation.quiet`, without importing torch."""
    return os.environ.get("SHELORA_QUIET", "0") not in ("", "0", "false", "False")


def progress(message: str, *, file: Any = None) -> None:
    """Print one progress line; headless, it starts with :data:`PROGRESS_MARK` so that
    ``reproduce.py`` shows it on its terminal."""
    mark = PROGRESS_MARK if headless() else ""
    print(f"{mark}{message}", file=file or sys.stdout, flush=True)


def round_printer(
    label: str, *, rounds: int | None = None, enabled: bool | None = None, file: Any = None
) -> Callable[[Mapping[str, Any]], None] | None:
    """An ``on_round`` callback for :meth:`~shelora_core.federation.Federation.run` (and
    :func:`~shelora_core.federation.run_federated`) that prints one line per federated round
    with the full run ``label`` (the progress bars cut labels to 40 characters).

    Parameters
    ----------
    label
        The run's full label, e.g. ``"shelora-delta-random minilm r=8/16/32 dirichlet(0.3)"``.
    rounds
        The run's number of rounds, shown as ``round i/rounds``.
    enabled
        Print or not; default :func:`headless` (interactively the tqdm bar shows the rounds).
    file
        Where to print (default ``sys.stdout``).

    Returns
    -------
    callable or None
        ``on_round(record)``, or ``None`` when disabled (``Federation.run`` accepts ``None``).

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> printer = round_printer("fedavg minilm r=8 iid", rounds=3, enabled=True, file=out)
    >>> printer({"round": 2, "train_loss": 0.6931, "accuracy": 0.655, "seconds": 4.2})
    >>> out.getvalue().rstrip().endswith("fedavg minilm r=8 iid: round 2/3, loss 0.693, acc 0.655, 4 s")
    True
    """
    if not (headless() if enabled is None else enabled):
        return None
    total = f"/{rounds}" if rounds is not None else ""

    def on_round(record: Mapping[str, Any]) -> None:
        parts = [f"{label}: round {record.get('round')}{total}"]
        if record.get("train_loss") is not None:
            parts.append(f"loss {record['train_loss']:.3f}")
        if record.get("accuracy") is not None:
            parts.append(f"acc {record['accuracy']:.3f}")
        if record.get("seconds") is not None:
            parts.append(f"{record['seconds']:.0f} s")
        progress(", ".join(parts), file=file)

    return on_round


# ------------------------------------------------------------------ recorded metrics
#: the MIME type of the metrics a notebook records in its outputs (:func:`store_metadata`)
METRICS_MIME = "application/vnd.shelora.metrics+json"


def store_metadata(name: str, value: Any) -> None:
    """Record ``value`` as the metric ``name`` in the notebook's outputs.

    The value (made strict-JSON by :func:`to_json`) is displayed under :data:`METRICS_MIME`,
    with a ``text/plain`` line for readers, so the executed notebook carries it and a test reads
    it back with :func:`read_notebook` (the "store metadata / read notebook" pattern of
    Microsoft Recommenders and scrapbook). Outside IPython the text line is printed.
    """
    value = to_json(value)
    bundle = {METRICS_MIME: {name: value}, "text/plain": f"recorded {name} = {value!r}"}
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython ships with ipykernel
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(bundle["text/plain"])
        return
    display(bundle, raw=True)


def read_notebook(path: str | Path) -> dict[str, Any]:
    """The metrics an executed notebook recorded with :func:`store_metadata` (name -> value;
    a name recorded twice keeps its last value).

    Raises
    ------
    ConfigError
        If ``path`` is not a readable notebook (names it).
    """
    try:
        cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is not a readable executed notebook: {exc}") from None
    out: dict[str, Any] = {}
    for cell in cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if METRICS_MIME in data:
                out.update(data[METRICS_MIME])
    return out


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
