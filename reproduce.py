#!/usr/bin/env python
"""Run the notebooks in order, headlessly, with papermill; leave every number and figure in results/.

    python reproduce.py                      # quick profile: every notebook, minutes
    python reproduce.py --profile paper      # the paper-scale profile: hours on 2 cores
    python reproduce.py --only 05            # notebooks whose name contains "05"
    python reproduce.py --set rounds=1       # override a config field in every notebook
    python reproduce.py --readme             # only regenerate the README results table
    python reproduce.py --cell-timeout 3600  # fail a notebook whose cell runs longer than 1 h
    python reproduce.py --notebook my.ipynb  # run another notebook the same way

Executed copies go to ``results/<profile>/notebooks/``; JSON, per-round metrics, checkpoints and
figures to ``results/<profile>/``. A failing notebook (an error in a cell, a kernel that dies, e.g.
out of memory, a cell over --cell-timeout) stops the run with a non-zero exit status and one line
starting ``FAILED:`` that names the notebook, the cell as JupyterLab counts it in the source
notebook (1-based, markdown cells included), the error and the executed copy. Re-running resumes
interrupted federated runs from their checkpoints.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

from shelora_core import claims as claims_mod
from shelora_core.errors import ConfigError
from shelora_core.notebook import (
    PROGRESS_MARK,
    check_override_keys,
    config_field_names,
    notebook_override_keys,
)
from shelora_core.profiles import PROFILES
from shelora_core.provenance import short_commit

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
CLAIMS_START, CLAIMS_END = "<!-- claims:start -->", "<!-- claims:end -->"
PROTECTION_START, PROTECTION_END = "<!-- protection:start -->", "<!-- protection:end -->"
#: notebook 07's figures shown in the README's claims section (the paper profile's when it has them)
KEY_FIGURES = (
    ("07_accuracy", "every method beside FlexLoRA under label skew with heterogeneous ranks"),
    ("07_cost_accountings", "what SHE-LoRA keeps of full HE's cost, per accounting and definition"),
    ("07_dager", "DAGER's ROUGE-1 beside the paper's"),
    (
        "07_inversion",
        '"SHE-LoRA resists gradient inversion": the worst ROUGE-1 of every attacker run',
    ),
    ("07_cost_vs_model_size", "upload per client as models grow"),
)


def notebooks(only: list[str] | None) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(o in p.stem for o in only)]
    return found


def kernel_name() -> str:
    """The venv's registered kernel (``make setup`` installs it), else the running interpreter's."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    return "shelora" if "shelora" in specs else "python3"


def parse_sets(items: list[str], known: set[str] | frozenset[str] | None = None) -> dict:
    """``--set key=value`` items as a dict (values read as Python literals where they parse).

    With ``known``, every key must be one of those names (FederatedConfig fields and the
    settings of the selected notebooks): an unknown key stops here, before any notebook starts,
    with a message naming it and the closest known name.
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value (got {item!r}), e.g. --set rounds=1")
        try:
            out[key.strip()] = _jsonable(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    if known is not None:
        try:
            check_override_keys(out, known)
        except ConfigError as exc:
            raise SystemExit(f"--set: {exc}") from None
    return out


def notebook_overrides(nb: Path, sets: dict) -> dict:
    """The ``--set`` values a notebook accepts: every FederatedConfig field, and the settings
    it has (a setting of another notebook is not passed, so ``--set ks=(2,4)`` can run with
    every notebook selected)."""
    own = config_field_names() | notebook_override_keys(nb)
    return {k: v for k, v in sets.items() if k in own}


class ProgressRelay:
    """A write-only text stream for papermill's ``stdout_file``: relays the lines a notebook
    prints with :data:`~shelora_core.notebook.PROGRESS_MARK` (headless progress) to the terminal,
    prefixed with the notebook's number and the elapsed time, and drops everything else (tables
    and figures stay in the executed copy)."""

    def __init__(self, tag: str, out=None) -> None:
        self.tag = tag
        self.out = out or sys.stdout
        self.t0 = time.perf_counter()
        self._buf = ""

    def write(self, text: str) -> int:
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self._relay(line)
        return len(text)

    def _relay(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1]
        if line.startswith(PROGRESS_MARK):
            mins, secs = divmod(int(time.perf_counter() - self.t0), 60)
            msg = line[len(PROGRESS_MARK) :]
            print(f"    {self.tag} {mins:3d}:{secs:02d}  {msg}", file=self.out, flush=True)

    def flush(self) -> None:
        """Nothing to do: a line is relayed as soon as it is complete."""


def _jsonable(value):
    """Tuples -> lists (recursively): papermill writes unknown types into the notebook as
    strings, so ``--set ranks=(8,16)`` would arrive as the text "(8, 16)"; the config turns
    lists back into tuples."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def run_notebook(
    nb: Path,
    out_dir: Path,
    params: dict,
    kernel: str,
    cell_timeout: int | None = None,
    relay: ProgressRelay | None = None,
) -> float:
    """Execute ``nb`` with papermill into ``out_dir/notebooks/``; return the seconds it took.

    Args:
        nb: any notebook (the kernel's working directory is its folder).
        out_dir: the profile's results directory; the executed copy goes to ``notebooks/``.
        params: papermill parameters (injected after the cell tagged ``parameters``).
        kernel: the kernel name.
        cell_timeout: seconds a single cell may run (papermill's ``execution_timeout``);
            ``None``: no limit. A cell over it is interrupted (so the kernel shuts down
            cleanly) and the notebook fails.
        relay: where the notebook's headless progress lines go (this terminal).

    Raises:
        SystemExit: on any failure, with the one-line message of :func:`failure_line`.
    """
    import papermill as pm

    out = out_dir / "notebooks" / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()  # a copy left by an earlier run must not be mistaken for this run's
    replies: list[dict] = []  # the error reply of the failing cell (nbclient's on_cell_error)

    def on_cell_error(execute_reply: dict | None = None, **_: object) -> None:
        replies.append(dict((execute_reply or {}).get("content") or {}))

    t0 = time.perf_counter()
    try:
        pm.execute_notebook(
            str(nb),
            str(out),
            parameters=params,
            kernel_name=kernel,
            cwd=str(nb.parent),
            progress_bar=False,
            log_output=False,
            stdout_file=relay,  # headless progress lines reach this terminal (ProgressRelay)
            # the kernel's start-up warnings (TCP transport) are noise on this terminal
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
            request_save_on_cell_execute=True,
            execution_timeout=cell_timeout,
            # on a timeout, interrupt the cell and report _TIMEOUT_REPLY as its error: shutting
            # down a kernel that is still busy makes it print its own traceback
            interrupt_on_timeout=True,
            error_on_timeout=_TIMEOUT_REPLY,
            on_cell_error=on_cell_error,
        )
    except Exception as exc:  # a raised error, a dead kernel, a timeout, a kernel that won't start
        timed_out = any(r.get("evalue") == _TIMEOUT_REPLY["evalue"] for r in replies)
        raise SystemExit(failure_line(nb, out, exc, cell_timeout, timed_out=timed_out)) from None
    return time.perf_counter() - t0


#: the error nbclient reports for a cell interrupted after ``--cell-timeout``
_TIMEOUT_REPLY = {
    "ename": "CellTimeoutError",
    "evalue": "reproduce.py: the cell ran longer than --cell-timeout and was interrupted",
    "traceback": [],
}
_MAX_ERROR_CHARS = 1000


def failure_line(
    nb: Path,
    out: Path,
    exc: BaseException,
    cell_timeout: int | None = None,
    *,
    timed_out: bool = False,
) -> str:
    """The one line ``FAILED: ...`` for a notebook that did not run to the end.

    Names the notebook, the failing cell as a user counts it in the source notebook in
    JupyterLab (1-based, markdown cells included; papermill's injected parameters cell is not
    counted), the error on one line, and the executed copy (which holds the traceback).

    Args:
        nb: the source notebook.
        out: where papermill wrote (or would have written) the executed copy.
        exc: what ``papermill.execute_notebook`` raised.
        cell_timeout: the ``--cell-timeout`` in force, named when a cell timed out.
        timed_out: the failing cell was interrupted after ``cell_timeout`` (``exc`` then
            carries the kernel's ``KeyboardInterrupt``).
    """
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if timed_out or (isinstance(exc, CellTimeoutError) and cell_timeout):
        error = (
            f"CellTimeoutError: the cell ran longer than --cell-timeout {cell_timeout} s and was "
            "stopped; raise --cell-timeout, or lower the work with --set"
        )
    elif isinstance(exc, PapermillExecutionError):
        error = f"{exc.ename}: {exc.evalue}"
    elif isinstance(exc, DeadKernelError):
        error = (
            f"DeadKernelError: the kernel died while running the cell ({exc}); usually out of "
            "memory (the OS killed it: smaller --set values or fewer jobs at once) or the code "
            "ended the process"
        )
    else:  # CellTimeoutError without --cell-timeout (nbclient's IOPub timeout); anything else
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    error = " ".join(error.split())  # one line
    if len(error) > _MAX_ERROR_CHARS:
        error = error[: _MAX_ERROR_CHARS - 3] + "..."
    copy = (
        f"the executed copy (with the traceback) is {out}"
        if out.exists()
        else "no executed copy was written"
    )
    return f"FAILED: notebook {nb.name}, {_failed_cell(nb, out, exc)}: {error}; {copy}"


def _failed_cell(nb: Path, out: Path, exc: BaseException) -> str:
    """Where ``nb`` failed, in the source notebook's numbering ("cell 7 of 12 (1-based, ...)").

    The executed copy is the source plus papermill's injected parameters cell (and, after an
    error, papermill's error-marker cells); cells are matched back to the source by their id,
    by position when the notebook has no cell ids.
    """
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    try:
        source = nbformat.read(str(nb), as_version=4).cells
        executed = nbformat.read(str(out), as_version=4).cells
    except Exception:  # the notebook did not load, or papermill failed before writing a copy
        return "before any cell ran"
    executed = [c for c in executed if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
    if isinstance(exc, PapermillExecutionError) and 0 <= exc.cell_index < len(executed):
        index = exc.cell_index
    else:  # papermill runs the cells in order and stops at the failing one: the last started
        started = [
            i for i, c in enumerate(executed) if c.metadata.get("papermill", {}).get("start_time")
        ]
        if not started:
            return "before any cell ran (the kernel did not start)"
        index = started[-1]
    cell = executed[index]
    count = f"of {len(source)} (1-based, markdown cells included, as in JupyterLab)"
    ids = [c.get("id") for c in source]
    injected = [
        i for i, c in enumerate(executed) if "injected-parameters" in c.metadata.get("tags", [])
    ]
    if injected and index == injected[0]:
        where = f"after source cell {index}" if index else "before source cell 1"
        return f"in the parameters cell papermill injected {where} {count}"
    if cell.get("id") is not None and cell.get("id") in ids:
        number = ids.index(cell.get("id")) + 1
    else:  # no cell ids: papermill inserted one cell, unless it replaced an injected one
        replaced = any("injected-parameters" in c.metadata.get("tags", []) for c in source)
        number = index + 1 - (1 if injected and injected[0] < index and not replaced else 0)
    return f"cell {number} {count}"


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def attack_table(path: Path) -> list[str]:
    """DAGER's ROUGE-1 per method, budget and attacker at the largest LoRA rank (attack.json)."""
    entries = json.loads(path.read_text())
    meta = next((e for e in entries if e["kind"] == "meta"), {})
    # the documented settings only: largest rank, the attacked step's recorded lr (not the lr
    # sweep), the authors' DP epsilon (not the noise sweep)
    rows = claims_mod.documented_attack_rows(entries)
    rank = max(e["rank"] for e in rows)
    batches = sorted({e["batch_size"] for e in rows})
    updates = [u for u in ("round1", "later") if any(e["update"] == u for e in rows)]
    cells: dict[tuple, dict[tuple, float]] = {}
    for e in rows:
        if e["update"] not in updates:
            continue
        key = (e["method"], e["budget"], e["attacker"])
        cells.setdefault(key, {})[(e["update"], e["batch_size"])] = e["rouge1"]
    head = " | ".join(f"{u} (batch {'/'.join(map(str, batches))})" for u in updates)
    lr = meta.get("sgd_lr", claims_mod.DEFAULT_ATTACK_LR)
    out = [
        f"Gradient inversion: DAGER's ROUGE-1 on what the server receives (`{_rel(path)}`, "
        f"commit {short_commit(meta.get('git_commit'))}; SmolLM2-135M, LoRA r = {rank} on q_proj, "
        f"one FedSGD step at lr {lr:g}; budget = encrypted columns per layer or the same number "
        "of values)"
        + (
            "; attacker `optimisation` is the gradient-matching attack (not DAGER, capped at a "
            "few tens of Adam steps):"
            if any(a == "optimisation" for _m, _k, a in cells)
            else ":"
        ),
        "",
        f"| method | budget | attacker | {head} |",
        "|---|---|---|" + "---|" * len(updates),
    ]
    for (method, budget, attacker), v in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])
    ):
        vals = [
            "/".join(f"{v[(u, b)]:.2f}" if (u, b) in v else "-" for b in batches) for u in updates
        ]
        k = "-" if budget is None else f"{budget:g}"
        out.append(f"| {method} | {k} | {attacker} | {' | '.join(vals)} |")
    paper = [e for e in entries if e["kind"] == "paper"]
    if paper:
        by: dict[str, list[str]] = {}
        for e in sorted(paper, key=lambda e: e["batch_size"]):
            by.setdefault(e["method"], []).append(f"{e['rouge1_percent']:g}")
        bs = "/".join(str(b) for b in sorted({e["batch_size"] for e in paper}))
        out += [
            "",
            f"Paper (SST-2, OpenLLaMA-3B, ROUGE-1 % at batch {bs}): "
            + "; ".join(f"{m} {'/'.join(v)}" for m, v in by.items())
            + ".",
        ]
    return out


def _span(values, fmt: str) -> str:
    """``fmt`` of the smallest and largest value, ``"a to b"`` (one value if they print alike)."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo} to {hi}"


def _authors_note(rows: list[dict], paper: dict, packed: dict) -> list[str]:
    """One bullet on the authors' packing rows (``shelora-authors-2^<bits>``) against our paper
    and packed modes, computed from he_cost.json (empty without those rows)."""
    by_bits: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r["method"].startswith("shelora-authors-"):
            by_bits.setdefault(int(r["global_scale_bits"]), {})[r["model"]] = r
    if not by_bits:
        return []
    hi = by_bits[max(by_bits)]  # the precise scale: its costs (the bytes and times of both match)
    first = next(iter(hi.values()))
    chain = ", ".join(map(str, first["coeff_mod_bit_sizes"]))
    text = (
        f"- **The authors' packing** ({first['columns_per_ciphertext']} A columns per ciphertext, "
        f"N = {first['poly_modulus_degree']}, [{chain}]; on {', '.join(hi)}): "
    )
    both = [m for m in hi if m in paper]
    if both:
        text += (
            "upload, our paper mode / theirs: "
            f"{_span([paper[m]['upload_bytes'] / hi[m]['upload_bytes'] for m in both], '{:.1f}')}x; "
            "client encryption, ours / theirs: "
            f"{_span([paper[m]['client_upload_seconds'] / hi[m]['client_upload_seconds'] for m in both], '{:.1f}')}x; "
            "server time, theirs / ours: "
            f"{_span([hi[m]['server_seconds_per_round'] / paper[m]['server_seconds_per_round'] for m in both], '{:.1f}')}x "
            f"({_span([hi[m]['server_seconds_per_round'] for m in both], '{:.0f}')} s per round). "
        )
    dense = [m for m in hi if m in packed]
    if dense:
        text += (
            "Our packed mode uploads "
            f"{_span([packed[m]['upload_bytes'] / hi[m]['upload_bytes'] for m in dense], '{:.2f}')}x "
            "theirs. "
        )
    text += (
        "Max relative error of the decrypted columns: "
        + "; ".join(
            f"{_span([r['max_rel_error_vs_plaintext'] for r in by_bits[b].values()], '{:.1e}')} "
            f"at scale 2^{b}"
            for b in sorted(by_bits)
        )
        + "."
    )
    low = min(by_bits)
    inner = first["coeff_mod_bit_sizes"][1:-1]
    if any(r["max_rel_error_vs_plaintext"] > 0.1 for r in by_bits[low].values()) and inner:
        text += (
            f" At 2^{low} the products are lost: TenSEAL rescales them by the {inner[0]}-bit "
            f"prime and records the scale as 2^{low}"
            + (
                " (the package's parameter check refuses it)."
                if all(r.get("package_check") for r in by_bits[low].values())
                else "."
            )
        )
    return [text]


def cost_notes(data: dict) -> list[str]:
    """What the HE cost table says, as bullets computed from he_cost.json (no typed number)."""
    rows = [r for r in data.get("rows", []) if "skipped" not in r]

    def pick(method):
        return {r["model"]: r for r in rows if r["method"] == method}

    delta, paper, full, flex = (
        pick("shelora-delta"),
        pick("shelora-paper"),
        pick("full_he"),
        pick("flexlora"),
    )
    out = ["", "What the cost table says (computed from it):", ""]
    # the full-HE rows' layout (he_cost.json's full_he_layout; zero-padded before the field)
    own = claims_mod.measured_definition(data) == "own"
    layout = "at each client's own rank" if own else "zero-padded to r_max"
    if delta:
        d0 = next(iter(delta.values()))
        setting = (
            f"ranks {'/'.join(map(str, d0['ranks']))} with budgets "
            f"{'/'.join(map(str, d0['budgets']))} columns per layer on {', '.join(delta)}"
        )
        other = (
            "zero-padded to r_max (an ablation, counted)" if own else "at each client's own rank"
        )
        out.append(
            f"- **SHE-LoRA (delta mode) against full HE {layout}** (what our `full_he` "
            f"and `fedshield` encrypt): {_span([r['upload_change_vs_full_he_pct'] for r in delta.values()], '{:+.1f}%')} "
            f"upload and {_span([r['encrypt_time_change_vs_full_he_pct'] for r in delta.values()], '{:+.1f}%')} "
            f"client encryption time at {setting}. Against full HE {other}, and "
            "against the paper's full HE (every column of A encrypted, B in plaintext), see the "
            "claims table above."
        )
        per_value = [
            (delta[m]["upload_bytes"] - flex[m]["upload_bytes"])
            / delta[m]["encrypted_values_per_client"]
            for m in delta
            if m in flex and delta[m]["encrypted_values_per_client"]
        ]
        if per_value:
            b = sum(per_value) / len(per_value)
            out.append(
                "- **SHE-LoRA against plaintext FlexLoRA**: "
                f"{_span([r['upload_vs_flexlora_x'] for r in delta.values()], '{:.2f}')}x the upload "
                f"at these budgets. In delta mode each protected column costs m encrypted values of "
                f"about {b:.0f} bytes against 4 bytes per plaintext value: for square layers the "
                f"ratio is about 1 + {b / 8:.0f} k / r, so it grows with the budget-to-rank ratio."
            )
    if paper and delta:
        both = [m for m in paper if m in delta]
        out.append(
            "- **The paper's own cipher mode** (encrypted A columns times plaintext B on the "
            "server) costs one N = 8192 ciphertext per protected column and server-side matrix "
            f"products: {_span([paper[m]['upload_bytes'] / delta[m]['upload_bytes'] for m in both], '{:.1f}')}x "
            "the upload of delta mode and "
            f"{_span([paper[m]['server_seconds_per_round'] for m in both], '{:.1f}')} s of server "
            "time per round, against "
            f"{_span([delta[m]['server_seconds_per_round'] for m in both], '{:.2f}')} s in delta "
            "mode. Delta mode is the default."
        )
    dseed, packed, pseed = (
        pick("shelora-delta-seeded"),
        pick("shelora-packed"),
        pick("shelora-packed-seeded"),
    )
    if dseed:
        out.append(
            "- **Seeded uploads** (clients encrypt with the secret key and send the seed of the "
            "second polynomial): delta mode uploads "
            f"{_span([r['upload_vs_flexlora_x'] for r in dseed.values()], '{:.2f}')}x FlexLoRA "
            f"on {', '.join(dseed)}; sums and broadcasts are full size."
        )
    if packed:
        best = pseed or packed
        out.append(
            "- **The packed paper mode** (a client's protected A columns packed densely, the "
            "server's products with rotations): "
            f"{_span([r['upload_vs_flexlora_x'] for r in packed.values()], '{:.2f}')}x FlexLoRA's "
            "upload"
            + (
                f", {_span([r['upload_vs_flexlora_x'] for r in pseed.values()], '{:.3f}')}x "
                "with seeded uploads"
                if pseed
                else ""
            )
            + f", {_span([r['server_seconds_per_round'] for r in best.values()], '{:.1f}')} s "
            f"of server time per round, a public context with Galois keys of "
            f"{_span([r['key_bytes_server'] / 1e6 for r in best.values()], '{:.1f}')} MB "
            f"(on {', '.join(best)})."
        )
    out += _authors_note(rows, paper, packed)
    ref = claims_mod.PAPER_CLAIMS["seconds_full_he"]
    model = "OpenLLaMA-3B"
    if model in full:
        secs = full[model]["client_upload_seconds"]
        how = "far below" if secs < ref.value / claims_mod.SECONDS_FACTOR else "close to"
        out.append(
            f"- **Absolute encryption times** are {how} the paper's (full HE on {model}: "
            f"{secs:.1f} s here, {layout}, vs {ref.value:.0f} s in the paper): dense "
            "packing into full ciphertexts; the paper's implementation is not known to pack "
            "densely."
        )
    return out if len(out) > 3 else []


def results_table(results_dir: Path) -> str:
    """Markdown table of results/<profile>/federated_tuning.json (generated, never hand-edited)."""
    lines = []
    # notebook 05's JSON, or (it has not finished this profile) the runs that did, one summary each
    runs, read = claims_mod.federated_tuning_runs(results_dir)
    source = (
        f"the {len(runs)} runs of notebook 05 (`{_rel(results_dir / read)}`"
        if read == claims_mod.RESULT_FILES["federated_tuning"]
        else f"the {len(runs)} runs of notebook 05's grid finished so far "
        f"(`{_rel(results_dir / 'federated_tuning')}/*.summary.json`"
    )
    # a run reused from an earlier notebook execution keeps the commit it was computed at
    commits = sorted({short_commit(r.get("meta", {}).get("git_commit")) for r in runs})
    where = f"Federated tuning, {source}; computed at commit(s) {', '.join(commits)}):"
    stale = (
        []
        if read == claims_mod.RESULT_FILES["federated_tuning"]
        else claims_mod.stale_runs(results_dir)
    )
    if stale:  # before the table: what it leaves out
        lines += [
            f"Not shown below: {len(stale)} run(s) recorded under an earlier results version of "
            "their method (its results changed since), which notebook 05 re-runs instead of "
            f"reusing: {', '.join(f'`{n}`' for n in stale)}.",
            "",
        ]
    if runs:
        lines += [
            where,
            "",
            "| method | model | ranks | partition | clients | rounds x steps | final acc | best acc "
            "| macro-F1 | upload KB / client-round | s / client-round (threads) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            method = r.get("variant") or (
                r["method"] + (f"-{r['cipher_mode']}" if r.get("cipher_mode") else "")
            )
            stop = r.get("stopped")
            rounds = f"{r['rounds']}" + (f" (stopped: round {stop['round']})" if stop else "")
            lines.append(
                f"| {method} | {r['model']} | {'/'.join(map(str, r['ranks']))} | "
                f"{r['partition']} | {r['num_clients']} | {rounds} x {r['local_steps']} | "
                f"{r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {r['final_macro_f1']:.3f} | "
                f"{r.get('upload_bytes_per_client', r['upload_bytes_per_round']) / 1e3:.0f} | "
                f"{r['seconds_per_client_round']:.1f} ({r.get('meta', {}).get('torch_threads', '?')}) |"
            )
        lines += [
            "",
            (
                "*stopped: round k*: every client sampled in round k refused to upload (their "
                "reasons are in the run's summary) and the run ended after round k - 1. "
                if any(r.get("stopped") for r in runs)
                else ""
            )
            + "*best acc*: the highest of the evaluated rounds. *s / client-round*: wall-clock of one "
            "client's round (training, encoding, decoding) with the run's torch threads; runs that "
            "shared the 2 cores with another job are slower than the clean per-step timings of "
            "`make bench` (training speed table).",
        ]
    lines += separation_block(results_dir)
    he = results_dir / "he_cost.json"
    if he.exists():
        data = json.loads(he.read_text())
        meta = data.get("meta", {})
        paper = data.get("paper", {})
        lines += [
            "",
            f"HE cost per client-round (`{_rel(he)}`, "
            f"`make bench`, commit {short_commit(meta.get('git_commit'))}; ranks 8/16/32, SHE-LoRA "
            "budgets 2/4/8 columns per layer, synthetic factors of each model's shapes):",
            "",
            "| model | method | CKKS | upload MB | vs full HE | vs FlexLoRA | encrypt s | server s / round "
            "| receive s | max rel. error |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["rows"]:
            if "skipped" in r:
                lines.append(
                    f"| {r['model']} | {r['method']} | | _not measured: {r['skipped']}_ "
                    "| | | | | | |"
                )
                continue
            scaled = (
                f" (x{r['layers'] / r['layers_measured']:.0f})" if r["scaled_from_layers"] else ""
            )
            lines.append(
                f"| {r['model']} | {r['method']}{scaled} | {r['ckks_params'] or '-'} | "
                f"{r['upload_bytes'] / 1e6:.2f} | {r['upload_change_vs_full_he_pct']:+.1f}% | "
                f"{r['upload_vs_flexlora_x']:.2f}x | {r['client_upload_seconds']:.3f} | "
                f"{r['server_seconds_per_round']:.2f} | {r['client_receive_seconds']:.2f} | "
                f"{r['max_rel_error_vs_plaintext']:.1e} |"
            )
        if paper:
            lines += [
                "",
                f"Paper (SHE-LoRA vs full HE): upload {paper['upload_reduction_vs_full_he']['v2']}% (v2) / "
                f"{paper['upload_reduction_vs_full_he']['v1']}% (v1), encryption time "
                f"{paper['encryption_time_reduction_vs_full_he']['v2']}% / "
                f"{paper['encryption_time_reduction_vs_full_he']['v1']}%; encryption seconds per round on "
                f"OpenLLaMA-3B: full HE ~{paper['encryption_seconds_openllama_3b']['full_he']:.0f}, "
                f"SHE-LoRA ~{paper['encryption_seconds_openllama_3b']['shelora']}. "
                "_(x N)_ = measured on a subset of the model's identical layers and scaled by N.",
            ]
        lines += cost_notes(data)
    attack = results_dir / "attack.json"
    if attack.exists():
        lines += ["", *attack_table(attack)]
    speed = results_dir / "train_speed.json"
    if speed.exists():
        d = json.loads(speed.read_text())
        lines += [
            "",
            f"Local training speed (`{_rel(speed)}`, `make bench`, commit "
            f"{short_commit(d['meta'].get('git_commit'))}, {d['meta'].get('torch_threads')} threads):",
            "",
            "| model | rank | batch | s / step | s / client-round (steps) | upload KB |",
            "|---|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            lines.append(
                f"| {r['model']} | {r['rank']} | {r['batch_size']} | {r['seconds_per_step']:.2f} | "
                f"{r['seconds_per_client_round']:.1f} ({r['local_steps']}) | "
                f"{r['upload_bytes'] / 1e3:.0f} |"
            )
    neg = results_dir / "negotiation.json"
    if neg.exists():
        d = json.loads(neg.read_text())
        cfg, leak, guess = d["config"], d["ope_leakage"], d["public_model_guess"]
        gvr = d["grid_vs_random"]["wide"]
        cov = d["coverage_per_client"].values()
        risk = d["risk_max_per_client"].values()
        top = leak["all_columns"][str(leak["max_index"])]
        lines += [
            "",
            f"Negotiation (`{_rel(neg)}`, commit {short_commit(d['meta'].get('git_commit'))}; "
            f"{cfg['model']}, {cfg['num_clients']} clients, ranks "
            f"{'/'.join(map(str, cfg['ranks']))}, budgets {'/'.join(map(str, cfg['he_budgets']))}, "
            f"{cfg['partition']}):",
            "",
            "| measurement | value |",
            "|---|---|",
            f"| mean Coverage per client (min .. max) | {min(cov):.3f} .. {max(cov):.3f} |",
            f"| max Risk per client (worst) | {max(risk):.3f} |",
            f"| (a, b) grid vs {gvr['runs']} random searches (wide budgets), grid better / equal "
            f"/ random better: first tier; final list (tiers are searched greedily) | "
            f"{gvr['tier1_grid_better']} / {gvr['tier1_equal']} / {gvr['tier1_random_better']}; "
            f"{gvr['final_grid_better']} / {gvr['final_equal']} / {gvr['final_random_better']} |",
            f"| OPE order leak: server's estimate of column indices from ciphertexts alone, mean "
            f"abs. error (random guess) | {top['mae']:.2f} ({top['mae_random_guess']:.1f}) of "
            f"{d['width']} columns |",
            f"| columns a server holding only the public model predicts among the clients' "
            f"proposals ({guess['public_examples']} public examples; random) | "
            f"{guess['hit_rate']:.1%} ({guess['hit_rate_random']:.1%}) |",
        ]
    return "\n".join(lines) if lines else "_No results yet: run `make reproduce`._"


def separation_block(results_dir: Path) -> list[str]:
    """Lines on ``separation.json`` (``python -m shelora_core.separation``): does a few-minute run
    separate FedAvg of factors from FlexLoRA?"""
    path = results_dir / "separation.json"
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    rows = d["rows"]
    visible = d.get("visible_in") or []
    out = [
        "",
        f"FedAvg of factors against FlexLoRA in runs of the quick profile's size "
        f"(`{_rel(path)}`, `python -m shelora_core.separation`, commit "
        f"{short_commit(d['meta'].get('git_commit'))}; {d['base']}, same seed and data for both): "
        + (
            f"FlexLoRA is visibly ahead (at least {d['visible_gap_pp']:g} points) in "
            f"{len(visible)} of {len(rows)} settings."
            if visible
            else f"no setting separates them by {d['visible_gap_pp']:g} points or more "
            f"(largest final gap {d['largest_gap_pp']:+.1f} points): in a few rounds the bias of "
            "averaging factors does not change the predictions; the quick profile shows the "
            "pipeline, the paper profile the gap."
        ),
        "",
        "| setting | FedAvg final acc | FlexLoRA final acc | FlexLoRA - FedAvg (points) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['setting']} | {r['fedavg']['final_accuracy']:.3f} | "
            f"{r['flexlora']['final_accuracy']:.3f} | {r['gap_pp']:+.1f} |"
        )
    return out + paper_gap_lines(results_dir.parent / "paper")


def paper_gap_lines(paper_dir: Path) -> list[str]:
    """The paper profile's FedAvg / FlexLoRA pair over its whole run (``separation.paper_gap``):
    the final-round gap beside its mean over every evaluation and the curves' round-to-round swing."""
    from shelora_core.separation import paper_gap

    g = paper_gap(paper_dir)
    if g is None:
        return []
    commits = " / ".join(
        f"{m} {short_commit(g['runs'][m]['commit'])}" for m in ("fedavg", "flexlora")
    )
    n = len(g["evaluations"])
    return [
        "",
        f"The same pair in the paper profile (notebook 05's runs, ranks 8/16/32, Dirichlet 0.3; "
        f"commits {commits}): FlexLoRA - FedAvg is {g['final_gap_pp']:+.1f} points at round "
        f"{g['evaluations'][-1]} and {g['mean_gap_pp']:+.1f} on average over the {n} evaluations "
        f"(FlexLoRA ahead in {g['flexlora_ahead']} of {n}); either curve moves by up to "
        f"{g['largest_swing_pp']:.1f} points between consecutive evaluations (each round samples "
        "half of the label-skewed clients), so one round's gap carries that much noise.",
    ]


FAULTS_START, FAULTS_END = "<!-- faults:start -->", "<!-- faults:end -->"


def faults_table(path: Path) -> str:
    """Markdown tables of results/<profile>/faults.json (``make faults``): outcomes per method
    and per kind of fault, and the cases that did not end as expected."""
    d = json.loads(path.read_text())
    t, cases = d["totals"], d["cases"]
    outcomes = [o for o in ("rejected", "recovered", "undetectable", "silently_accepted",
                            "obscure", "data_lost")]  # fmt: skip
    lines = [
        f"`{_rel(path)}` (commit {short_commit(d['meta'].get('git_commit'))}): **{t['tried']} cases**, "
        f"{t['rejected']} refused by name, {t['recovered']} crashes recovered, "
        f"{t['undetectable']} undetectable by design, **{t['silently_accepted']} silently "
        f"accepted, {t['obscure']} obscure, {t['data_lost']} data lost**.",
        "",
        "| where | " + " | ".join(o.replace("_", " ") for o in outcomes) + " |",
        "|---|" + "---|" * len(outcomes),
    ]
    rows: dict[str, dict[str, int]] = {}
    for c in cases:
        key = c["method"] if c["kind"] in ("upload", "broadcast") else c["kind"]
        key = f"{key} ({c['kind']})" if c["kind"] in ("upload", "broadcast") else key
        rows.setdefault(key, dict.fromkeys(outcomes, 0))[c["observed"]] += 1
    for key in sorted(rows):
        lines.append(f"| {key} | " + " | ".join(str(rows[key][o]) for o in outcomes) + " |")
    odd = [c for c in cases if not c["ok"]]
    if odd:
        lines += ["", "Cases that did not end as expected:", ""]
        lines += [f"- {c['method']} / {c['kind']} / {c['case']}: {c['observed']} "
                  f"(expected {c['expected']})" for c in odd]  # fmt: skip
    return "\n".join(lines)


DEPLOY_START, DEPLOY_END = "<!-- deployment:start -->", "<!-- deployment:end -->"


def deployment_block(path: Path) -> str:
    """results/<profile>/deployment.json (``make deploy-demo`` / ``make deploy-bench``) as
    markdown: the loopback scaling table (Flower beside in-process) and the demo runs."""
    d = json.loads(path.read_text())
    lines = [f"`{_rel(path)}`:"]
    sc = d.get("scaling")
    if sc:
        cfg = sc["config"]
        lines += [
            "",
            f"Loopback scaling (`make deploy-bench`, commit "
            f"{short_commit(sc['meta'].get('git_commit'))}, {sc['meta'].get('cpu_count', '?')} "
            f"cores): {cfg['method']} {cfg.get('cipher_mode')}, ranks "
            f"{'/'.join(str(r) for r in cfg['ranks'])}, {cfg['rounds']} rounds of "
            f"{cfg['local_steps']} steps, every client every round. Payload = shelora's message "
            "bytes; wire = Flower's count of the bytes through the SuperLink (`flwr ls`), "
            "negotiation and evaluation messages included. Load average: the machine's 1-minute "
            "load before and after the row (2 cores, shared with other work).",
            "",
            "| SuperNodes | s/round, Flower | s/round, in-process | ClientApp load s | "
            "payload up MB/round | payload down MB/round | wire MB/round | accuracy Flower / "
            "in-process | processes left | load average |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sc["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['supernodes']} | not run: {r['skipped']} |" + " |" * 8)
                continue
            acc = r.get("final_accuracy")
            ref = r.get("in_process_final_accuracy")
            accs = (
                "-"
                if acc is None
                else f"{acc:.3f} / {ref:.3f}"
                if ref is not None
                else f"{acc:.3f}"
            )
            lines.append(
                f"| {r['supernodes']} | {r['seconds_per_round']:.1f} | "
                f"{r['in_process_seconds_per_round']:.1f} | {r['client_load_seconds']:.1f} | "
                f"{r['upload_bytes_per_round'] / 1e6:.2f} | {r['download_bytes_per_round'] / 1e6:.2f} | "
                f"{r['wire_bytes_per_round'] / 1e6:.2f} | {accs} | {r['processes_left']} | "
                + "-".join(f"{x:g}" for x in r.get("load_average", []))
                + " |"
            )
    for key, label in (("demo", "insecure loopback"), ("demo_tls", "TLS")):
        run = d.get(key)
        if not run:
            continue
        hist = run.get("history") or []
        summ = run.get("summary") or {}
        audit = run.get("server_audit") or {}
        secs = [h["seconds"] for h in hist]
        mean = sum(secs) / len(secs) if secs else float("nan")
        acc = summ.get("final_accuracy")
        secrets = sum(1 for f in audit.get("opened", []) if f.endswith(("secret.ctx", "ope.key")))
        lines += [
            "",
            f"`make deploy-demo{'-tls' if key == 'demo_tls' else ''}` ({label}): "
            f"{summ.get('run_name', '?')}, {run['supernodes']} SuperNodes, {len(hist)} rounds, "
            f"status `{run['status']}`, {mean:.1f} s per round, "
            f"{run['seconds'].get('start', 0):.1f} s to start; "
            f"final accuracy {'-' if acc is None else f'{acc:.3f}'}; wire "
            f"{run['wire_bytes'].get('total-bytes', 0) / 1e6:.2f} MB; the ServerApp opened "
            f"{len(audit.get('opened', []))} files outside Python ({secrets} of them secret.ctx "
            "or ope.key) and held "
            f"{audit.get('private_contexts', '?')} private CKKS contexts; "
            f"{run['processes_stopped']} processes stopped by PID, {run['processes_left']} left.",
        ]
        name = summ.get("run_name")
        twin = path.parent / "federated_tuning" / f"{name}.jsonl"
        if name and twin.exists():  # the same configuration, run in-process (notebook 05)
            ref = [json.loads(x) for x in twin.read_text().splitlines() if x.strip()]

            def accs(records):
                return ", ".join("-" if h.get("accuracy") is None else f"{h['accuracy']:.3f}"
                                 for h in records)  # fmt: skip

            lines[-1] += (
                f" Accuracy per round on Flower {accs(hist)}; the same configuration in-process "
                f"(`{_rel(twin)}`) {accs(ref)}."
            )
    return "\n".join(lines)


def _cell(text) -> str:
    """A markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


CLAIM_COLUMNS = ("claim", "accounting", "paper", "ours", "unit", "verdict", "evidence")


def claims_table(path: Path) -> list[str]:
    """notebook 07's ``claims.json`` as a markdown table (one row per record, in order)."""
    records = json.loads(path.read_text())
    counts = claims_mod.verdict_counts(records)
    summary = "; ".join(f"{v}: {n}" for v, n in counts.items() if n)
    out = [
        f"Claims (`{_rel(path)}`, notebook 07; {len(records)} records; {summary}):",
        "",
        "| " + " | ".join(CLAIM_COLUMNS) + " |",
        "|" + "---|" * len(CLAIM_COLUMNS),
    ]
    for c in records:
        evidence = c["evidence"].split(" (")[0]
        if c.get("evidence_commit"):
            evidence += f", commit {c['evidence_commit']}"
        cells = (
            c["claim"],
            c["accounting"],
            claims_mod.format_value(c["paper_value"]),
            claims_mod.format_value(c["our_value"]),
            c["unit"],
            f"**{c['verdict']}**",
            evidence,
        )
        out.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    return out


def padding_note(records: list[dict], results_dir: Path) -> str:
    """Which full HE our ``full_he`` / ``fedshield`` encrypt (he_cost.json's layout), how many
    more values zero-padding to r_max would encrypt, and SHE-LoRA's upload saving against each
    (from claims.json and he_cost.json's ranks)."""
    he = results_dir / "he_cost.json"
    he_cost = json.loads(he.read_text()) if he.exists() else None
    ranks, _ = claims_mod.he_cost_setting(he_cost)
    own = claims_mod.measured_definition(he_cost) == "own"

    def values(definition):
        return [
            c
            for c in records
            if c["key"] == "communication"
            and c["accounting"].startswith("total upload bytes")
            and definition in c["accounting"]
            and c["our_value"] is not None
        ]

    def said(found):
        return " / ".join(f"{c['our_value']:+.2f}% ({c['basis'].split(' (')[0]})" for c in found)

    factor = f"{claims_mod.padding_factor(ranks):.2f}x"
    at = "/".join(map(str, ranks))
    if own:
        text = (
            "Our `full_he` and `fedshield` encrypt each client's factors at its own rank; "
            f"zero-padded to r_max (an ablation, counted from shapes) they would encrypt {factor} "
            f"the values at ranks {at}."
        )
    else:
        text = (
            f"Zero-padding to r_max: at ranks {at} our `full_he` and `fedshield` "
            f"encrypt {factor} the values of the clients' own factors."
        )
    mine, padded = values("our full HE"), values("zero-padded")
    if mine:
        text += (
            " SHE-LoRA (delta mode) changes the total upload by "
            f"{said(mine)} against full HE at each client's own rank"
        )
        if padded:
            text += f" and by {said(padded)} against the zero-padded one"
        text += "."
    return text


def claims_block(results_root: Path) -> str:
    """The README's claims section: each profile's claims table, the thresholds, key figures."""
    parts = []
    for profile in PROFILES:
        path = results_root / profile / "claims.json"
        if path.exists():
            note = padding_note(json.loads(path.read_text()), results_root / profile)
            parts.append(
                f"**Profile `{profile}`**\n\n" + "\n".join(claims_table(path)) + f"\n\n{note}"
            )
    if not parts:
        return "_No claims yet: run `python reproduce.py --only 07`._"
    c = claims_mod
    parts.append(
        "Verdict thresholds (`shelora_core/claims.py`): accuracy comparable within "
        f"{c.ACCURACY_TOL_PP:g} pp, and inconclusive when a setting's runs span less than "
        f"{c.SEPARATION_PP:g} pp; a reduction is met when the share of full HE's cost we keep is "
        f"at most {c.REMAINING_SHARE_FACTOR:g}x the share the paper keeps; seconds within a factor "
        f"{c.SECONDS_FACTOR:g}; DAGER defeated below {c.ROUGE_DEFEATED_BELOW:g}% ROUGE-1, "
        f"recovered from {c.ROUGE_RECOVERED_FROM:g}%, met when ours falls in the paper's band; "
        f"CKKS usable below {c.CKKS_MAX_REL_ERROR:g} max relative error."
    )
    figures = []
    for name, caption in KEY_FIGURES:
        for profile in reversed(PROFILES):  # the paper profile's figure when it exists
            path = results_root / profile / "figures" / f"{name}.png"
            if path.exists():
                figures.append(f"![{caption} ({profile} profile)]({_rel(path).as_posix()})")
                break
    if figures:
        parts.append("\n\n".join(figures))
    return "\n\n".join(parts)


def _attack_source(results_root: Path) -> Path | None:
    """The attack.json with the most measured cells (the paper profile's when it ran)."""
    best, n = None, -1
    for profile in PROFILES:
        path = results_root / profile / "attack.json"
        if path.exists():
            count = sum(1 for e in json.loads(path.read_text()) if e.get("kind") == "measured")
            if count > n:
                best, n = path, count
    return best


def protection_notes(results_root: Path) -> str:
    """What SHE-LoRA protects against, as bullets computed from attack.json (and
    negotiation.json for what the public model predicts): no typed number."""
    path = _attack_source(results_root)
    if path is None:
        return "_No attack results yet: run `python reproduce.py --only 06`._"
    entries = json.loads(path.read_text())
    meta = next((e for e in entries if e.get("kind") == "meta"), {})
    rows = claims_mod.documented_attack_rows(entries)
    rank = max(e["rank"] for e in rows)

    def rouge(method, attacker=None, update="later", budget=None):
        return _rouge1_values(rows, method, attacker, update, budget=budget)

    batches = "/".join(map(str, sorted({e["batch_size"] for e in rows if e["update"] == "later"})))
    budgets = sorted({e["budget"] for e in rows if e["method"] == "shelora" and e.get("budget")})
    lr = meta.get("sgd_lr", claims_mod.DEFAULT_ATTACK_LR)
    out = [
        f"DAGER on SmolLM2-135M (LoRA r = {rank} on every `q_proj`, one FedSGD step at lr {lr:g}, "
        f"the attack fed only the bytes the server receives; `{_rel(path)}`, notebook 06, commit "
        f"{short_commit(meta.get('git_commit'))}; ROUGE-1 from 0 to 1):",
        "",
    ]
    flex, obl = rouge("flexlora"), rouge("shelora", "oblivious")
    ada = rouge("shelora", "adaptive")
    span_b = f"{budgets[0]:g} to {budgets[-1]:g}" if budgets else "-"
    if flex and obl:
        stops = max(obl) * 100 < claims_mod.ROUGE_DEFEATED_BELOW
        out.append(
            (
                "- **As the paper claims**, SHE-LoRA stops"
                if stops
                else "- **Unlike the paper**, SHE-LoRA does not stop"
            )
            + f" DAGER as written in later rounds: ROUGE-1 {_span(flex, '{:.2f}')} under FlexLoRA, "
            f"{_span(obl, '{:.2f}')} under SHE-LoRA at batch {batches} for every budget from "
            f"{span_b} columns."
        )
    if ada:
        line = (
            "- **An attacker who knows which columns are encrypted** (the server does: it needs the "
            "column positions to aggregate) checks the visible coordinates only and gets "
            f"{_span(ada, '{:.2f}')} at every batch size and budget."
        )
        for profile in PROFILES:
            neg = results_root / profile / "negotiation.json"
            if neg.exists():
                g = json.loads(neg.read_text())["public_model_guess"]
                line += (
                    " The encrypted columns are also the massive-activation features a server "
                    f"holding only the public model predicts: {g['hit_rate']:.1%} of the proposed "
                    f"columns against {g['hit_rate_random']:.1%} for random ones (`{_rel(neg)}`, "
                    "notebook 02)."
                )
                break
        out.append(line)
    r1 = rouge("shelora", update="round1")
    secret = [
        e
        for e in rows
        if e["method"] == "shelora"
        and e["update"] == "round1-secret-a"
        and e["attacker"] == "adaptive"
    ]
    if r1:
        line = (
            f"- **In round 1** SHE-LoRA gives {_span(r1, '{:.2f}')} for both attackers: B is sent in "
            "plaintext and the initial A is a public function of the seed."
        )
        if secret:
            ks = sorted({e["budget"] for e in secret})
            lo = [e["rouge1"] for e in secret if e["budget"] == ks[0]]
            hi = [e["rouge1"] for e in secret if e["budget"] == ks[-1]]
            line += (
                f" If the initial A were secret, the adaptive attacker gets {_span(lo, '{:.2f}')} at "
                f"k = {ks[0]:g} and {_span(hi, '{:.2f}')} at k = {ks[-1]:g}."
            )
        out.append(line)
    mask = rouge("maskcrypt", "adaptive")
    if mask:
        out.append(
            f"- **MaskCrypt** at the same budgets against the adaptive attacker: {_span(mask, '{:.2f}')}."
        )
    fl = rouge("shelora+first-layers") + rouge("shelora+first-layers", update="round1")
    cost = [e for e in entries if e.get("kind") == "protection_cost"]
    if fl:
        line = (
            "- **Encrypting the whole LoRA update of the two layers DAGER reads** "
            f"(`shelora+first-layers`, ours): {_span(fl, '{:.2f}')} for both attackers in both rounds."
        )
        if cost:

            def mb(method):
                return [e["upload_bytes"] / 1e6 for e in cost if e["method"] == method]

            factors = [
                e["vs SHE-LoRA"] for e in cost if e["method"] == "shelora+first-layers(factors)"
            ]
            ranks = "/".join(str(r) for r in sorted({e["rank"] for e in cost}))
            line += (
                " Its cost depends on what is encrypted: the factors B and A of those layers cost "
                f"{_span(factors, '{:.2f}')}x SHE-LoRA's upload (their aggregation, FedAvg of "
                "factors, is not built); the exact FlexLoRA form (encrypted n s B A of those "
                f"layers) {_span(mb('shelora+first-layers(dw)'), '{:.1f}')} MB per upload at r = "
                f"{ranks} on SmolLM2 (full HE: {_span(mb('full_he'), '{:.1f}')} MB; SHE-LoRA: "
                f"{_span(mb('shelora'), '{:.1f}')} MB)."
            )
        out.append(line)
    probe = [e for e in entries if e.get("kind") == "deep_layer_probe"]
    if probe:
        true = max(e["max distance, true"] for e in probe)
        wrong = min(e["min distance, wrong"] for e in probe)
        found = all(e["true ranked first"] for e in probe)
        out.append(
            f"- **Deeper layers still leak**: in round 1 a span check at layer {probe[0]['layer']} "
            f"{'finds' if found else 'does not always find'} every sentence's first token "
            f"(distance at most {true:.0e} for the true token against at least {wrong:.2f} for the "
            "nearest wrong one), so only encrypting every layer closes the attack family."
        )
    dp = rouge("flexlora-dp")
    sweep = [
        e
        for e in entries
        if e.get("kind") == "measured"
        and e["method"] == "flexlora-dp"
        and e.get("dp_sigma") is not None
        and e["rank"] == rank
    ]
    if dp:
        line = (
            f"- **Local DP at epsilon = 10** (sigma = {meta.get('dp_sigma_eps10', float('nan')):.2f}) "
            f"gives {_span(dp, '{:.2f}')} here"
        )
        back = sorted(
            {e["dp_sigma"] for e in sweep if e["rouge1"] >= claims_mod.ROUGE_RECOVERED_FROM / 100}
        )
        if back:
            line += f"; recovery (ROUGE-1 from {claims_mod.ROUGE_RECOVERED_FROM / 100:g}) returns only at sigma <= {back[-1]:g}"
        paper = claims_mod.paper_rouge("flexlora-dp")
        line += f" (the paper: {'/'.join(f'{v:g}' for v in paper.values())}% at batch {'/'.join(map(str, paper))})."
        out.append(line)
    multi = [e["rouge1"] for e in rows if e["update"] == "multistep"]
    if multi:
        out.append(
            f"- **Multi-step AdamW local updates** (the real training loop): {_span(multi, '{:.2f}')} "
            "for every method attacked; AdamW's per-coordinate scaling breaks the span property "
            "DAGER relies on."
        )
    out += _other_attack_notes(rows)
    out += membership_notes(results_root)
    out += tradeoff_notes(results_root, prefer=path.parent.name)
    return "\n".join(out)


def _rouge1_values(
    rows: list[dict],
    method: str,
    attacker: str | None = None,
    update: str | None = "later",
    *,
    budget: int | None = None,
    batch: int | None = None,
) -> list[float]:
    """ROUGE-1 of the attack rows of ``method`` that match: ``attacker`` None means DAGER's two
    attackers (the B-channel one reads a different channel; the optimisation attacker is not
    DAGER); ``update``, ``budget`` or ``batch`` None means any."""
    return [
        e["rouge1"]
        for e in rows
        if e["method"] == method
        and (e["attacker"] == attacker if attacker else e["attacker"] in ("oblivious", "adaptive"))
        and (update is None or e["update"] == update)
        and (budget is None or e.get("budget") == budget)
        and (batch is None or e["batch_size"] == batch)
    ]


def _other_attack_notes(rows: list[dict]) -> list[str]:
    """Bullets for the attacks beyond one-step DAGER on the documented rows: multi-step plain SGD,
    the plaintext B alone, the optimisation-based reconstruction (each only when measured)."""

    def worst(method, attacker, update=None, batch=None):
        v = _rouge1_values(rows, method, attacker, update, batch=batch)
        return max(v) if v else None

    out = []
    sgd = {
        (m, a): worst(m, a, "multistep-sgd")
        for m in ("flexlora", "shelora")
        for a in ("oblivious", "adaptive")
    }
    sgd = [f"{m} / {a} {_fmt(v)}" for (m, a), v in sgd.items() if v is not None]
    if sgd:
        out.append(
            "- **Multi-step plain-SGD local updates** (DAGER's FedAvg setting), worst ROUGE-1 per "
            f"method / attacker: {'; '.join(sgd)}. Several SGD steps on one batch sum gradients that "
            "stay in the span of the batch's inputs; AdamW's per-coordinate scaling (above) does not."
        )
    bch = {u: worst("shelora", "b-channel", u) for u in ("round1", "later")}
    if any(v is not None for v in bch.values()):
        sizes = sorted({e["batch_size"] for e in rows if e["attacker"] == "b-channel"})
        per_bs = "/".join(_fmt(worst("shelora", "b-channel", "later", b)) for b in sizes)
        out.append(
            "- **The plaintext B alone** (the B channel: A's update, encrypted or not, is not used) "
            f"against SHE-LoRA: worst ROUGE-1 {_fmt(bch['round1'])} in round 1 and "
            f"{_fmt(bch['later'])} in later rounds (later rounds by batch size "
            f"{'/'.join(map(str, sizes))}: {per_bs}). Encrypting columns of A leaves this channel "
            "open."
        )
    opt = {m: worst(m, "optimisation") for m in ("flexlora", "shelora")}
    if any(v is not None for v in opt.values()):
        out.append(
            "- **An optimisation-based reconstruction** (gradient matching on the visible update, "
            "not a span check; labels and lengths given, a few tens of Adam steps): worst ROUGE-1 "
            + "; ".join(f"{_fmt(v)} against {m}" for m, v in opt.items() if v is not None)
            + (
                ": at this budget it recovers next to nothing even without encryption."
                if (opt["flexlora"] or 0) * 100 < claims_mod.ROUGE_DEFEATED_BELOW
                else "."
            )
        )
    return out


def _fmt(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def tradeoff_notes(results_root: Path, *, prefer: str = "paper") -> list[str]:
    """The trade-off of every trained variant and the cheapest setting that stops the strongest
    attacker, from notebook 06's ``tradeoff.json`` (``prefer``'s profile when it has one)."""
    paths = [results_root / p / "tradeoff.json" for p in (prefer, *PROFILES)]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        return []
    rec = json.loads(path.read_text())
    meta = rec.get("meta", {})
    out = [
        "",
        f"**What each trained variant costs and what it stops** (`{_rel(path)}`, notebook 06 "
        f"section 8, commit {short_commit(meta.get('git_commit'))}): accuracy, upload and the "
        "accounted epsilon from notebook 05's runs (MiniLM, ranks 8/16/32, Dirichlet 0.3, profile "
        f"{rec.get('profile')}); the worst ROUGE-1 over the attack grid's one-step cells for the "
        "same method (SmolLM2, a decoder: DAGER needs one), as DAGER as written and as the "
        "strongest attacker the method faces (who knows what is hidden: adaptive and B channel). "
        "The two halves are joined by method, not measured on one model.",
        "",
        "| variant | final acc | upload KB / client-round | epsilon (server) | round 1: DAGER / "
        "strongest | later: DAGER / strongest |",
        "|---|---|---|---|---|---|",
    ]
    for r in rec.get("rows", []):
        acc = _fmt(r["final_accuracy"], "{:.3f}")
        if r.get("stopped_round"):
            acc += f" (stopped: round {r['stopped_round']})"
        out.append(
            f"| {r['variant']} | {acc} | {_fmt(r['upload_bytes_per_client'] / 1e3, '{:.0f}')} | "
            f"{_fmt(r.get('epsilon_server'), '{:.3g}')} | {_fmt(r['rouge1_round1_dager'])} / "
            f"{_fmt(r['rouge1_round1_strong'])} | {_fmt(r['rouge1_later_dager'])} / "
            f"{_fmt(r['rouge1_later_strong'])} |"
        )
    cheap = rec.get("cheapest", [])
    if cheap:
        thr = cheap[0]["threshold"]
        items = []
        for m in cheap:
            c = m["cheapest"]
            if c is None:
                tried = [s for s in m["settings"] if not s["secret_init"]]
                ks = sorted({s["budget"] for s in tried if s["budget"] is not None})
                what = f" (budgets {'/'.join(map(str, ks))})" if ks else ""
                items.append(f"`{m['method']}`: no attacked setting{what}")
                continue
            setting = []
            if c["budget"] is not None:
                setting.append(f"budget {c['budget']}")
            if c["dp_sigma"] is not None:
                setting.append(f"noise multiplier {c['dp_sigma']:g}")
            elif c["dp_epsilon"] is not None:
                setting.append(f"epsilon {c['dp_epsilon']:g} per round")
            if c.get("epsilon_one_round") is not None:
                setting.append(f"one round accounts to epsilon {c['epsilon_one_round']:.2g}")
            text = ", ".join(setting) or "as built"
            items.append(f"`{m['method']}`: {text} ({c['upload_bytes'] / 1e6:.1f} MB per upload)")
        out += [
            "",
            f"- **The cheapest attacked setting that keeps the strongest attacker at ROUGE-1 <= "
            f"{thr:g} in every cell** (both rounds, every batch size and rank the grid ran): "
            + "; ".join(items)
            + ".",
        ]
        loose = [
            m["cheapest"]
            for m in cheap
            if m["cheapest"] and (m["cheapest"].get("epsilon_one_round") or 0) > 100
        ]
        if loose:
            out[-1] += (
                " Where that setting is DP noise, it stops DAGER's span check (an exact test) "
                f"at an epsilon of {_span([c['epsilon_one_round'] for c in loose], '{:.2g}')} "
                "for a single round: it defeats the attack as written and is no privacy "
                "guarantee."
            )
    return out


def membership_notes(results_root: Path) -> list[str]:
    """One bullet from the first profile's ``membership.json`` (membership inference on the
    released model, notebook 06 section 7); none when no profile has one."""
    for profile in PROFILES:
        path = results_root / profile / "membership.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        rows = rec["rows"]

        def auc(setting, method, rows=rows):
            return next(
                (r["loss_attack"]["auc"] for r in rows
                 if r["setting"] == setting and r["method"] == method),
                None,
            )  # fmt: skip

        parts = []
        for setting in dict.fromkeys(r["setting"] for r in rows):
            sel = [r for r in rows if r["setting"] == setting]
            flex, she = auc(setting, "flexlora"), auc(setting, "shelora-delta")
            dp = [r for r in sel if r["method"].endswith("-dp")]
            text = f"{setting} setting: loss-threshold AUC {flex:.2f} against FlexLoRA"
            if she is not None:
                text += f", {she:.2f} against SHE-LoRA"
            if dp:
                text += ", " + ", ".join(
                    f"{r['loss_attack']['auc']:.2f} against {r['method']} (accuracy "
                    f"{r['accuracy']:.2f})"
                    for r in dp
                )
            text += _matched_clause(rec.get("matched_utility") or (), setting)
            parts.append(text)
        agree = bool(rec["checks"]) and all(c["agree"] for c in rec["checks"])
        return [
            "- **Membership inference on the released model** (loss threshold and a reference "
            f"model, `{_rel(path)}`, notebook 06 section 7, commit "
            f"{short_commit(rec['meta'].get('git_commit'))}): "
            + "; ".join(parts)
            + ". "
            + (
                "SHE-LoRA's and FedShield-LLM's released models score exactly as FlexLoRA's and "
                "FedAvg's: encrypting the updates does not protect the released model; only noise "
                "in training moves the attack, at a cost in accuracy."
                if agree
                else "The encrypted methods' released models do NOT match their plaintext "
                "counterparts here (see the record's checks)."
            )
            + _matched_summary(rec.get("matched_utility") or ())
        ]
    return []


def _matched_clause(matched, setting: str) -> str:
    """The DP methods of ``setting`` at matched utility (``membership.json``'s
    ``matched_utility``): the matched point's whole-run epsilon and AUC and where that AUC lies
    against FlexLoRA's bootstrap interval, or that no swept epsilon reached FlexLoRA's accuracy;
    empty when the record has no such entry."""
    mine = [m for m in matched if m["setting"] == setting and m.get("reference")]
    if not mine:
        return ""
    said = []
    for m in mine:
        pt = m["matched"]
        if pt is None:
            best = max(
                (p["accuracy"] for p in m["points"] if p["accuracy"] is not None), default=None
            )
            said.append(
                f"{m['method']} reaches it at no swept epsilon (best accuracy "
                + ("-" if best is None else f"{best:.2f}")
                + ")"
            )
            continue
        eps, target = pt["epsilon"], pt.get("target_epsilon")
        shown = f"{eps:.0f}"
        if target is not None and f"{target:.0f}" != shown:
            shown += f" (target {target:g})"
        inside = m.get("loss_auc_in_reference_ci95")
        said.append(
            f"{m['method']} at epsilon {shown} over the run (delta {pt['delta']:g}; accuracy "
            f"{pt['accuracy']:.2f}) scores {pt['loss_auc']:.2f}"
            + ("" if inside is None else " (inside FlexLoRA's 95% interval)" if inside else
               " (outside FlexLoRA's 95% interval)")
            + ("" if m["bracketed"] else ", the smallest epsilon swept")
        )  # fmt: skip
    ref = mine[0]["reference"]
    return (
        f"; at matched utility (accuracy >= {mine[0]['threshold']:.3f}, FlexLoRA's "
        f"{ref['accuracy']:.3f} - {mine[0]['tolerance']:g}; the smallest such epsilon) "
        + ", ".join(said)
    )


def _matched_summary(matched) -> str:
    """One sentence on the DP methods at matched utility over every setting, from the record's
    flags: whether every matched point's loss AUC lies inside FlexLoRA's bootstrap interval."""
    hits = [m for m in matched if m.get("matched") is not None and m.get("reference")]
    missed = [m for m in matched if m.get("matched") is None and m.get("reference")]
    if not hits and not missed:
        return ""
    out = ""
    flags = [m.get("loss_auc_in_reference_ci95") for m in hits]
    if hits and all(f is True for f in flags):
        eps = min(m["matched"]["epsilon"] for m in hits)
        who = (
            "the loss AUC of every DP method that reaches it"
            if missed
            else "every DP method's loss AUC"
        )
        out += (
            f" At FlexLoRA's accuracy {who} lies inside FlexLoRA's bootstrap "
            f"95% interval, at whole-run epsilons of {eps:.0f} and more: the noise that keeps the "
            "accuracy does not measurably lower the attack there"
        )
        below = [
            p["accuracy"] < m["threshold"]
            for m in hits
            for p in m["points"]
            if p.get("calibration") == "per_round_analytic" and p["accuracy"] is not None
        ]
        if below and all(below):
            out += ", and the lower AUCs at the per-round epsilon 10 come with lower accuracy"
        out += "."
    elif hits and any(f is False for f in flags):
        out += " At FlexLoRA's accuracy the loss AUC falls outside FlexLoRA's interval for " + (
            ", ".join(
                f"{m['method']} in {m['setting']}"
                for m in hits
                if m.get("loss_auc_in_reference_ci95") is False
            )
            + "."
        )
    if missed:
        out += (
            " No swept epsilon reaches FlexLoRA's accuracy for "
            + ", ".join(f"{m['method']} in {m['setting']}" for m in missed)
            + "."
        )
    return out


def _replace_block(text: str, start: str, end: str, body: str) -> str:
    """``text`` with the lines between ``start`` and ``end`` replaced by ``body`` (unchanged if
    the markers are missing)."""
    if start not in text or end not in text:
        return text
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update_readme(results_root: Path) -> None:
    """Regenerate the README's generated blocks (results, claims, protection) from results/."""
    if not README.exists():
        return
    text = README.read_text()
    parts = []
    for profile in PROFILES:
        d = results_root / profile
        finished = any((d / "federated_tuning").glob("*.summary.json"))
        if finished or (d / "federated_tuning.json").exists() or (d / "he_cost.json").exists():
            parts.append(f"**Profile `{profile}`**\n\n" + results_table(d))
    body = "\n\n".join(parts) or "_No results yet: run `make reproduce`._"
    text = _replace_block(text, START, END, body)
    text = _replace_block(text, CLAIMS_START, CLAIMS_END, claims_block(results_root))
    text = _replace_block(text, PROTECTION_START, PROTECTION_END, protection_notes(results_root))
    deployments = [results_root / p / "deployment.json" for p in PROFILES]
    deployments = [f for f in deployments if f.exists()]
    if deployments:
        text = _replace_block(
            text, DEPLOY_START, DEPLOY_END, "\n\n".join(deployment_block(f) for f in deployments)
        )
    faults = [results_root / p / "faults.json" for p in PROFILES]
    faults = [f for f in faults if f.exists()]
    if faults:
        text = _replace_block(
            text, FAULTS_START, FAULTS_END, "\n\n".join(faults_table(f) for f in faults)
        )
    README.write_text(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expects a positive number of seconds, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--profile", choices=PROFILES, default="quick")
    ap.add_argument("--only", action="append", help="run notebooks whose name contains this")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a FederatedConfig field in every notebook",
    )
    ap.add_argument(
        "--results-dir",
        type=Path,
        default=ROOT / "results",
        help="root of the results tree (default: results/)",
    )
    ap.add_argument(
        "--cell-timeout",
        type=_positive_int,
        default=None,
        metavar="SECONDS",
        help="fail a notebook whose single cell runs longer than this (default: no limit)",
    )
    ap.add_argument(
        "--notebook",
        action="append",
        type=Path,
        metavar="PATH",
        help="run this notebook instead of notebooks/NN_*.ipynb (repeatable)",
    )
    ap.add_argument("--readme", action="store_true", help="only regenerate the README table")
    ap.add_argument("--list", action="store_true", help="list the notebooks and exit")
    args = ap.parse_args(argv)

    if args.readme:
        update_readme(args.results_dir)
        return 0
    if args.notebook:
        missing = [str(p) for p in args.notebook if not p.is_file()]
        if missing:
            print(f"no such notebook: {', '.join(missing)}", file=sys.stderr)
            return 2
        nbs = [p.resolve() for p in args.notebook]
    else:
        nbs = notebooks(args.only)
    if args.list or not nbs:
        for nb in nbs:
            print(nb.name)
        if not nbs:
            print(f"no notebook matches {args.only}", file=sys.stderr)
            return 2
        return 0
    os.environ["SHELORA_QUIET"] = "1"  # no progress bars inside headless kernels (IOPub floods)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = (args.results_dir / args.profile).resolve()
    # every --set key is checked here, before any notebook starts
    known = set(config_field_names()).union(*(notebook_override_keys(nb) for nb in nbs))
    sets = parse_sets(args.set, known)
    kernel = kernel_name()
    print(f"profile {args.profile}: {len(nbs)} notebook(s), kernel {kernel}, results in {out_dir}")
    total = time.perf_counter()
    for i, nb in enumerate(nbs, 1):
        params = {
            "profile": args.profile,
            "results_dir": str(out_dir),  # the canonical folder (notebooks default to scratch)
            "overrides": notebook_overrides(nb, sets),
        }
        print(f"[{i}/{len(nbs)}] {nb.stem}: started {time.strftime('%H:%M:%S')}", flush=True)
        secs = run_notebook(
            nb, out_dir, params, kernel, args.cell_timeout, ProgressRelay(nb.stem[:2])
        )
        print(f"[{i}/{len(nbs)}] {nb.stem}: done in {secs:.0f} s", flush=True)
    print(f"all done in {time.perf_counter() - total:.0f} s; results in {out_dir}")
    if not args.notebook and args.results_dir.resolve() == (ROOT / "results").resolve():
        update_readme(args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
