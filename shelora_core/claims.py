"""The papers' headline claims beside our results: one record per claim and accounting.

Notebook 07 turns the results JSON of a profile (``results/<profile>/*.json``) into
``claims.json``: a list of records ``{claim, paper_value, our_value, unit, accounting, verdict,
source, evidence, ...}``; ``reproduce.py --readme`` shows that list as the README's claims table.
Nothing here trains a model: every value is read from a results file, or *counted from shapes*
(the upload of a scheme from layer shapes, ranks and budgets, with bytes per ciphertext measured
once at the CKKS parameters), or, for the authors' CKKS setting only, measured in a second with
TenSEAL (:func:`measure_product_error`). Each record says which (``basis``).

Verdicts (:data:`VERDICTS`) and their thresholds (module constants, so a reader can check them):

* ``reproduced``: our value meets the claim under an accounting of our own (or a neutral one).
* ``reproduced under the paper's accounting``: it meets the claim only as the paper counts
  (its "full HE" baseline, its attacker); the other accountings of the same claim say how much
  of it survives a different count.
* ``not reproduced``: it does not meet the claim under that accounting.
* ``inconclusive``: the data cannot decide (e.g. every method of the setting ends at the same
  accuracy, so "SHE-LoRA matches FlexLoRA" says nothing).
* ``no data``: the results file the claim needs is missing for this profile.

Three accountings of the communication and encryption-time claims against full HE, and two
definitions of "full HE" (plus a zero-padded variant, an ablation):

========================  =====================================================================
accounting                what is counted (per client and round, mean over the clients)
========================  =====================================================================
encrypted values          numbers put under encryption (independent of packing)
ciphertext bytes          serialized CKKS ciphertexts only
total upload bytes        everything a client uploads: ciphertexts + float32 plaintext factors
========================  =====================================================================

* ``paper`` full HE (the SHE-LoRA paper's baseline, the path of its code): every column of ``A``
  encrypted in the paper's cipher mode (one N = 8192 ciphertext of ``r_i`` values per column),
  ``B`` in plaintext. SHE-LoRA is compared in the same cipher mode (``shelora-paper``).
* ``own`` full HE (ours): ``A`` and ``B`` encrypted at each client's own rank, densely packed
  (FedShield-LLM's parameters). SHE-LoRA is compared in our default cipher mode (``delta``). Our
  ``full_he`` and ``fedshield`` methods run it (results version 4), so ``he_cost.json``
  measures it.
* ``padded`` full HE (ablation): ``A`` and ``B`` zero-padded to ``r_max`` (what those methods
  encrypted before results version 4), counted from shapes.

Which definition ``he_cost.json``'s ``full_he`` row measured is read from its
``full_he_layout`` field (:func:`measured_definition`; a file without it is from the zero-padded
code): that definition's rows are *measured*, the others *counted*.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assets import MODELS
from .errors import SheloraError
from .provenance import short_commit

__all__ = [
    "ATTACKER_TEXT",
    "CKKS_MAX_REL_ERROR",
    "FULL_HE_DEFINITIONS",
    "INCONCLUSIVE",
    "LAYOUT_DEFINITIONS",
    "MODEL_SHAPES",
    "NOT_REPRODUCED",
    "NO_DATA",
    "PAPER_CLAIMS",
    "REPRODUCED",
    "UNDER_PAPER",
    "UPDATE_TEXT",
    "VERDICTS",
    "CiphertextSize",
    "CostShape",
    "PaperClaim",
    "accuracy_claims",
    "all_claims",
    "ciphertext_sizes",
    "cost_claims",
    "count_costs",
    "ckks_claims",
    "dager_claims",
    "documented_attack_rows",
    "format_value",
    "inversion_claims",
    "inversion_matrix",
    "federated_tuning_runs",
    "load_results",
    "stale_runs",
    "padding_factor",
    "paper_rouge",
    "measure_product_error",
    "measured_definition",
    "measured_scheme",
    "counted_vs_measured",
    "reduction_table",
    "results_commit",
    "verdict_difference",
    "verdict_reduction",
    "verdict_rouge",
    "verdict_seconds",
]

# --------------------------------------------------------------------------------------------
# Verdicts and thresholds
# --------------------------------------------------------------------------------------------
REPRODUCED = "reproduced"
UNDER_PAPER = "reproduced under the paper's accounting"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NO_DATA = "no data"
VERDICTS = (REPRODUCED, UNDER_PAPER, NOT_REPRODUCED, INCONCLUSIVE, NO_DATA)

#: accuracy: "comparable" = final accuracies within this many percentage points
ACCURACY_TOL_PP = 1.0
#: a setting separates methods when its runs' final accuracies span at least this many points;
#: below it an accuracy comparison is ``inconclusive``
SEPARATION_PP = 1.0
#: a reduction (e.g. -99.71%) is met when the share we keep, 100 + ours, is at most this factor
#: times the share the paper keeps, 100 + paper (the comparison that matters near -100%)
REMAINING_SHARE_FACTOR = 1.25
#: absolute seconds: met within this factor either way (different machines and libraries)
SECONDS_FACTOR = 2.0
#: DAGER ROUGE-1 (%): below ``ROUGE_DEFEATED_BELOW`` the attack is defeated, from
#: ``ROUGE_RECOVERED_FROM`` on the text is recovered, in between partial; a ROUGE claim is met
#: when ours falls in the paper's band
ROUGE_DEFEATED_BELOW = 10.0
ROUGE_RECOVERED_FROM = 50.0
#: CKKS: an aggregation is usable when its max relative error is below this
CKKS_MAX_REL_ERROR = 1e-3


def _verdict(passed: bool | None, paper_accounting: bool) -> str:
    if passed is None:
        return NO_DATA
    if not passed:
        return NOT_REPRODUCED
    return UNDER_PAPER if paper_accounting else REPRODUCED


def verdict_difference(
    diff_pp: float | None,
    *,
    tol_pp: float = ACCURACY_TOL_PP,
    informative: bool = True,
    paper_accounting: bool = False,
) -> str:
    """Verdict on "comparable": ``|diff_pp| <= tol_pp``; ``inconclusive`` if not ``informative``.

    Args:
        diff_pp: ours minus the reference, in percentage points (``None``: no data).
        tol_pp: the tolerance.
        informative: whether the setting separates methods at all (see :data:`SEPARATION_PP`).
        paper_accounting: the comparison is the paper's accounting (see the module docstring).
    """
    if diff_pp is None:
        return NO_DATA
    if not informative:
        return INCONCLUSIVE
    return _verdict(abs(diff_pp) <= tol_pp, paper_accounting)


def verdict_reduction(
    ours_pct: float | None,
    paper_pct: float,
    *,
    paper_accounting: bool = False,
    factor: float = REMAINING_SHARE_FACTOR,
) -> str:
    """Verdict on a reduction claim (percent change, e.g. -99.71): the share we keep,
    ``100 + ours_pct``, must be at most ``factor`` times the share the paper keeps.

    Args:
        ours_pct: our change in percent (``None``: no data).
        paper_pct: the paper's change in percent (negative).
        paper_accounting: the comparison is the paper's accounting.
        factor: see :data:`REMAINING_SHARE_FACTOR`.
    """
    if ours_pct is None:
        return NO_DATA
    return _verdict(100.0 + ours_pct <= factor * (100.0 + paper_pct), paper_accounting)


def verdict_seconds(
    ours: float | None, paper: float, *, factor: float = SECONDS_FACTOR, paper_accounting=False
) -> str:
    """Verdict on an absolute time: within ``factor`` of the paper's, either way."""
    if ours is None:
        return NO_DATA
    ok = ours > 0 and paper > 0 and 1.0 / factor <= ours / paper <= factor
    return _verdict(ok, paper_accounting)


def rouge_band(rouge_pct: float) -> str:
    """``"defeated"``, ``"partial"`` or ``"recovered"`` for a ROUGE-1 in percent."""
    if rouge_pct < ROUGE_DEFEATED_BELOW:
        return "defeated"
    return "recovered" if rouge_pct >= ROUGE_RECOVERED_FROM else "partial"


def verdict_rouge(
    ours_pct: float | None, paper_pct: float | None, *, paper_accounting: bool = False
) -> str:
    """Verdict on a DAGER ROUGE-1 claim: ours falls in the paper's band (:func:`rouge_band`);
    with no paper number (a qualitative "the attack fails") the band must be ``defeated``."""
    if ours_pct is None:
        return NO_DATA
    want = "defeated" if paper_pct is None else rouge_band(paper_pct)
    return _verdict(rouge_band(ours_pct) == want, paper_accounting)


# --------------------------------------------------------------------------------------------
# The papers' claims
# --------------------------------------------------------------------------------------------
SHELORA = "SHE-LoRA (Liu et al., ICLR 2026; arXiv:2505.21051v2)"
SHELORA_V1 = "SHE-LoRA arXiv:2505.21051v1"
FEDSHIELD = "FedShield-LLM (Mia & Amini, 2025; arXiv:2506.05640v1)"


@dataclass(frozen=True)
class PaperClaim:
    """One number (or statement) a paper reports.

    Attributes:
        key: identifier.
        claim: what the paper says, in words.
        value: the reported number (``None`` for a statement without one).
        unit: unit of ``value``.
        source: paper and place (abstract, section).
    """

    key: str
    claim: str
    value: float | None
    unit: str
    source: str


def _claims(*items: PaperClaim) -> dict[str, PaperClaim]:
    return {c.key: c for c in items}


#: the paper values this package compares against (DAGER values also in
#: :data:`shelora_core.attacks.grid.PAPER_ROUGE1`, cost values in
#: :data:`shelora_core.he_cost.PAPER`; a test keeps them equal)
PAPER_CLAIMS: dict[str, PaperClaim] = _claims(
    PaperClaim(
        "accuracy",
        "SHE-LoRA's accuracy is comparable to non-private FlexLoRA (read as a difference of 0)",
        0.0,
        "pp",
        f"{SHELORA}, abstract ('maintains performance comparable to non-private baselines'); "
        "experiments under Dirichlet(0.3) label skew with heterogeneous ranks",
    ),
    PaperClaim(
        "communication",
        "SHE-LoRA's communication vs full HE",
        -99.71,
        "%",
        f"{SHELORA}, abstract ('reduces communication overhead by 99.71% ... compared to HE "
        f"baselines'); {SHELORA_V1} abstract: -94.901%",
    ),
    PaperClaim(
        "encryption_time",
        "SHE-LoRA's encryption time vs full HE",
        -99.87,
        "%",
        f"{SHELORA}, abstract ('... and encryption time by 99.87%'); {SHELORA_V1} abstract: "
        "-99.829%",
    ),
    PaperClaim(
        "seconds_shelora",
        "SHE-LoRA encrypts a client's round on OpenLLaMA-3B in about 0.6 s",
        0.6,
        "s",
        f"{SHELORA}, experiments: encryption time per round, OpenLLaMA-3B",
    ),
    PaperClaim(
        "seconds_full_he",
        "full HE encrypts a client's round on OpenLLaMA-3B in about 480 s",
        480.0,
        "s",
        f"{SHELORA}, experiments: encryption time per round, OpenLLaMA-3B",
    ),
    *(
        PaperClaim(
            f"dager_{method}_b{batch}",
            f"DAGER's ROUGE-1 against {label} at batch {batch}",
            value,
            "% ROUGE-1",
            f"{SHELORA}, experiments: DAGER on SST-2 with OpenLLaMA-3B, batch 4 / 8 / 16",
        )
        for method, label, values in (
            ("flexlora", "FlexLoRA", (95.18, 61.14, 10.27)),
            ("shelora", "SHE-LoRA", (0.72, 0.98, 0.0)),
            ("flexlora-dp", "FlexLoRA-DP", (86.25, 80.28, 68.62)),
            ("maskcrypt", "MaskCrypt", (89.16, 61.49, 10.91)),
        )
        for batch, value in zip((4, 8, 16), values, strict=True)
    ),
    PaperClaim(
        "fedshield_accuracy",
        "FedShield-LLM's encrypted aggregation keeps the accuracy of the plaintext aggregation "
        "it encrypts (FHE, unlike DP, adds no noise; read as a difference of 0)",
        0.0,
        "pp",
        f"{FEDSHIELD}, abstract ('outperforms existing methods while maintaining robust privacy "
        "protection')",
    ),
    PaperClaim(
        "fedshield_dager",
        "FedShield-LLM protects against gradient inversion (no number given)",
        None,
        "% ROUGE-1",
        f"{FEDSHIELD}, abstract (inference attacks such as gradient inversion)",
    ),
    PaperClaim(
        "inversion_shelora",
        "SHE-LoRA resists gradient inversion (paper: DAGER's ROUGE-1 0.72 % at batch 4)",
        0.72,
        "% ROUGE-1",
        f"{SHELORA}, experiments: DAGER on SST-2 with OpenLLaMA-3B (the paper's only attacker: "
        "DAGER as written, on a later round's update)",
    ),
    PaperClaim(
        "authors_ckks",
        "the authors' CKKS context (N = 8192, [60, 40, 60], scale 2^24) aggregates correctly "
        "(the server's ciphertext x plaintext products; no error reported)",
        None,
        "max rel. error",
        "SHE-LoRA's public code (github.com/liyan2015/SHE-LoRA): its CKKS context parameters",
    ),
)


def paper_rouge(method: str) -> dict[int, float]:
    """The paper's DAGER ROUGE-1 (%) of ``method`` by batch size (from :data:`PAPER_CLAIMS`)."""
    out = {}
    for key, c in PAPER_CLAIMS.items():
        if key.startswith(f"dager_{method}_b"):
            out[int(key.rsplit("_b", 1)[1])] = c.value
    return out


# --------------------------------------------------------------------------------------------
# Reading the results of a profile
# --------------------------------------------------------------------------------------------
RESULT_FILES = {
    "federated_tuning": "federated_tuning.json",
    "he_cost": "he_cost.json",
    "attack": "attack.json",
    "negotiation": "negotiation.json",
    "encryption": "encryption.json",
    "aggregation": "aggregation.json",
    "sensitivity": "sensitivity.json",
    "train_speed": "train_speed.json",
}


def load_results(results_dir: str | Path) -> dict[str, Any]:
    """Every results file of a profile folder that exists, parsed, by :data:`RESULT_FILES` key.

    ``federated_tuning`` falls back to the per-run ``federated_tuning/*.summary.json`` when
    notebook 05 has not written its JSON yet; ``sources`` maps each key to the file(s) read.

    Raises:
        SheloraError: if a file exists but is not valid JSON (names the file).
    """
    root = Path(results_dir)
    out: dict[str, Any] = {"sources": {}}
    for key, name in RESULT_FILES.items():
        path = root / name
        if path.exists():
            out[key] = _read_json(path)
            out["sources"][key] = name
    if "federated_tuning" not in out:
        runs, source = federated_tuning_runs(root)
        if runs:
            out["federated_tuning"] = runs
            out["sources"]["federated_tuning"] = source
    return out


def federated_tuning_runs(results_dir: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """``(runs, source)``: notebook 05's summaries of a profile folder, from its
    ``federated_tuning.json`` when notebook 05 wrote one, else the per-run
    ``federated_tuning/*.summary.json`` of the runs that finished so far (each keeps the commit it
    was computed at; :func:`stale_runs` left out); ``source`` is the file or pattern read, relative to the folder
    (``([], None)`` when there is neither).

    Raises:
        SheloraError: if a file exists but is not valid JSON (names the file).
    """
    root = Path(results_dir)
    collected = root / RESULT_FILES["federated_tuning"]
    if collected.exists():
        return _read_json(collected), RESULT_FILES["federated_tuning"]
    stale = set(stale_runs(root))
    done = [
        p
        for p in sorted((root / "federated_tuning").glob("*.summary.json"))
        if p.name.removesuffix(".summary.json") not in stale
    ]
    if not done:
        return [], None
    return [_read_json(p) for p in done], "federated_tuning/*.summary.json"


def stale_runs(results_dir: str | Path) -> list[str]:
    """Run names of a profile folder's ``federated_tuning/`` whose per-round rows carry another
    results version than this code stamps on the run's method (``records.results_version``: the
    method's results changed since, e.g. full HE and FedShield-LLM at each client's own rank).
    Notebook 05 re-runs them instead of reusing them, so :func:`federated_tuning_runs` leaves
    them out. A summary without its per-round JSONL, or without a method, cannot be checked and
    is not listed."""
    from .records import rows_current

    out = []
    for p in sorted((Path(results_dir) / "federated_tuning").glob("*.summary.json")):
        name = p.name.removesuffix(".summary.json")
        rows_path = p.with_name(f"{name}.jsonl")
        method = _read_json(p).get("method")
        if method is None or not rows_path.exists():
            continue
        rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
        if not rows_current(rows, method):
            out.append(name)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SheloraError(
            f"{path} is not valid JSON ({exc}); re-run the notebook that writes it"
        ) from None


def results_commit(record: Any) -> str | None:
    """The git commit(s) a results record was computed at (first 12 characters, comma-joined).

    A dict reads its ``meta``; a list (attack.json's entries, or run summaries) reads its
    ``kind == "meta"`` entry or each element's ``meta``.
    """
    metas: list[Mapping[str, Any]] = []
    if isinstance(record, Mapping):
        metas = [record.get("meta") or {}]
    elif isinstance(record, list):
        for e in record:
            if isinstance(e, Mapping):
                metas.append(e if e.get("kind") == "meta" else (e.get("meta") or {}))
    commits = sorted({short_commit(m["git_commit"]) for m in metas if m.get("git_commit")})
    return ", ".join(commits) or None


def _row(
    claim: PaperClaim,
    our_value: float | None,
    accounting: str,
    verdict: str,
    evidence: str,
    *,
    basis: str,
    claim_text: str | None = None,
    paper_value: float | None = None,
    unit: str | None = None,
    commit: str | None = None,
    note: str = "",
) -> dict[str, Any]:
    return {
        "key": claim.key,
        "claim": claim_text or claim.claim,
        "paper_value": claim.value if paper_value is None else paper_value,
        "our_value": None if our_value is None else float(our_value),
        "unit": unit or claim.unit,
        "accounting": accounting,
        "verdict": verdict,
        "source": claim.source,
        "evidence": evidence,
        "evidence_commit": commit,
        "basis": basis,
        "note": note,
    }


# --------------------------------------------------------------------------------------------
# Accuracy (notebook 05's runs)
# --------------------------------------------------------------------------------------------
def run_label(run: Mapping[str, Any]) -> str:
    """A run's method label as in the README table (``variant`` when recorded)."""
    return run.get("variant") or (
        run["method"] + (f"-{run['cipher_mode']}" if run.get("cipher_mode") else "")
    )


def run_setting(run: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(model, ranks, partition)`` of a run, e.g. ``("minilm", "8/16/32", "dirichlet(0.3)")``."""
    return run["model"], "/".join(map(str, run["ranks"])), run["partition"]


def accuracy_claims(runs: Sequence[Mapping[str, Any]] | None, source: str) -> list[dict]:
    """SHE-LoRA (both cipher modes) against FlexLoRA, and FedShield-LLM against the plaintext
    aggregation it encrypts (FedAvg of factors), in every setting that has both runs.

    ``our_value`` is the difference of final accuracies in percentage points. A setting whose
    runs all end within :data:`SEPARATION_PP` of each other gives ``inconclusive``.
    """
    pairs = (
        ("accuracy", "shelora-delta", "flexlora", "SHE-LoRA (delta mode) - FlexLoRA"),
        ("accuracy", "shelora-paper", "flexlora", "SHE-LoRA (paper mode) - FlexLoRA"),
        ("fedshield_accuracy", "fedshield", "fedavg", "FedShield-LLM - FedAvg of factors"),
    )
    if not runs:
        return [
            _row(PAPER_CLAIMS[key], None, what, NO_DATA, f"{source} (missing)", basis="measured")
            for key, _, _, what in pairs
        ]
    by_setting: dict[tuple, dict[str, Mapping]] = {}
    for r in runs:
        by_setting.setdefault(run_setting(r), {})[run_label(r)] = r
    rows = []
    for setting, labelled in by_setting.items():
        finals = [r["final_accuracy"] for r in labelled.values()]
        spread = 100 * (max(finals) - min(finals))
        informative = spread >= SEPARATION_PP
        where = f"{setting[0]}, ranks {setting[1]}, {setting[2]}"
        for key, ours, ref, what in pairs:
            if ours not in labelled or ref not in labelled:
                continue
            a, b = labelled[ours]["final_accuracy"], labelled[ref]["final_accuracy"]
            diff = 100 * (a - b)
            note = f"final accuracy {a:.3f} vs {b:.3f}; the setting's {len(finals)} runs span {spread:.1f} pp"
            if not informative:
                note += f" (< {SEPARATION_PP:g} pp: the setting does not separate methods)"
            rows.append(
                _row(
                    PAPER_CLAIMS[key],
                    diff,
                    f"{what}, final accuracy ({where}); tolerance {ACCURACY_TOL_PP:g} pp",
                    verdict_difference(diff, informative=informative),
                    f"{source} ({labelled[ours]['run_name']}, {labelled[ref]['run_name']})",
                    basis="measured",
                    commit=results_commit([labelled[ours], labelled[ref]]),
                    note=note,
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# Costs counted from shapes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostShape:
    """The LoRA-adapted projections of a model, for counting costs.

    Attributes:
        name: display name (the ``model`` of ``he_cost.json`` rows where it measured it).
        layers: transformer blocks.
        modules: ``(module, m, n)`` per adapted projection of a block: ``m`` outputs (rows of
            ``B``), ``n`` inputs (columns of ``A``, SHE-LoRA's columns).
        params_b: nominal parameter count, billions (for plots).
        source: where the shapes come from.
    """

    name: str
    layers: int
    modules: tuple[tuple[str, int, int], ...]
    params_b: float
    source: str

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """``{"layers.<i>.<module>": (m, n)}`` for every adapted projection."""
        return {
            f"layers.{i}.{mod}": (m, n) for i in range(self.layers) for mod, m, n in self.modules
        }


def _square(name, layers, d, params_b, source, modules=("q_proj", "v_proj")) -> CostShape:
    return CostShape(name, layers, tuple((mod, d, d) for mod in modules), params_b, source)


def _smollm2() -> CostShape:
    spec = MODELS["smollm2"]
    mods = tuple((t, *spec.module_shapes[t]) for t in spec.default_targets)
    return CostShape(
        "SmolLM2-135M", spec.layers, mods, 0.135, "the shipped model (shelora_core.assets)"
    )


#: adapted shapes (``q_proj`` and ``v_proj`` as in the SHE-LoRA paper; SmolLM2: ``q_proj``, as
#: trained and benchmarked here) from the models' published configurations
MODEL_SHAPES: dict[str, CostShape] = {
    s.name: s
    for s in (
        _smollm2(),
        _square("OpenLLaMA-3B", 26, 3200, 3.4, "published config: hidden_size 3200, 26 layers"),
        _square("LLaMA-2-7B", 32, 4096, 6.7, "published config: hidden_size 4096, 32 layers"),
        _square("LLaMA-2-13B", 40, 5120, 13.0, "published config: hidden_size 5120, 40 layers"),
        _square(
            "LLaMA-30B", 60, 6656, 32.5, "published config (LLaMA-1 30B): hidden 6656, 60 layers"
        ),
        CostShape(
            "LLaMA-2-70B",
            80,
            (("q_proj", 8192, 8192), ("v_proj", 1024, 8192)),
            69.0,
            "published config: hidden_size 8192, 80 layers, 8 key-value heads of 128 "
            "(v_proj 8192 -> 1024)",
        ),
    )
}


@dataclass(frozen=True)
class CiphertextSize:
    """Bytes of one serialized fresh ciphertext under a parameter set, and where it comes from."""

    params: str
    poly_modulus_degree: int
    nbytes: int
    source: str

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


#: N = 16384 for the paper-mode layout when a layer has more outputs than an N = 8192
#: ciphertext has slots (the server's product needs m <= N / 2)
_N16384 = ("n16384", 16384, (60, 40, 40, 60), 40)


def ciphertext_sizes(
    encryption: Mapping[str, Any] | None = None, *, measure: bool = True
) -> dict[str, CiphertextSize]:
    """Bytes per ciphertext for the parameter sets the cost counts use.

    ``add_only`` (N = 4096, SHE-LoRA delta mode) and ``fedshield`` (N = 8192: full HE, and the
    paper mode's one-ciphertext-per-column layout) come from ``encryption.json`` (notebook 03)
    when given; missing ones, and ``n16384``, are measured now (one throw-away key each, well
    under a second) with :func:`shelora_core.ckks.measure.ciphertext_bytes`.

    Args:
        encryption: the parsed ``encryption.json``, or ``None``.
        measure: measure what ``encryption`` lacks (``False``: leave it out).
    """
    out: dict[str, CiphertextSize] = {}
    for row in (encryption or {}).get("precision", []):
        if row.get("set") in ("add_only", "fedshield") and row.get("ciphertext bytes"):
            out[row["set"]] = CiphertextSize(
                row["set"],
                int(row["N"]),
                int(row["ciphertext bytes"]),
                "measured (encryption.json)",
            )
    if measure:
        from .ckks.measure import ciphertext_bytes
        from .ckks.params import CKKSParams, get_params

        for name in ("add_only", "fedshield"):
            if name not in out:
                p = get_params(name)
                out[name] = CiphertextSize(
                    name, p.poly_modulus_degree, ciphertext_bytes(p), "measured now"
                )
        name, n, chain, scale = _N16384
        out[name] = CiphertextSize(
            name, n, ciphertext_bytes(CKKSParams(name, n, chain, scale)), "measured now"
        )
    return out


#: the schemes :func:`count_costs` counts
SCHEMES = {
    "flexlora": "FlexLoRA (plaintext factors)",
    "shelora-delta": "SHE-LoRA, delta mode (encrypted dW columns, dense N = 4096)",
    "shelora-paper": "SHE-LoRA, paper mode (one N = 8192 ciphertext per A column)",
    "full_he-paper": "full HE, paper's definition (every A column encrypted as in paper mode, B plain)",
    "full_he-paper-dense": "full HE, paper's definition, A packed densely instead",
    "full_he-own": "full HE, ours (A and B at each client's own rank, dense N = 8192; what "
    "full_he / fedshield run)",
    "full_he-padded": "full HE zero-padded to r_max (ablation; what full_he / fedshield ran "
    "before results version 4)",
}

#: full-HE definitions: (full-HE scheme, the SHE-LoRA scheme compared with it, label, whether
#: it is the paper's accounting)
FULL_HE_DEFINITIONS = {
    "paper": ("full_he-paper", "shelora-paper", "paper's full HE (every A column, B plain)", True),
    "own": ("full_he-own", "shelora-delta", "our full HE (A and B at each client's rank)", False),
    "padded": (
        "full_he-padded",
        "shelora-delta",
        "full HE zero-padded to r_max (ablation)",
        False,
    ),
}
ACCOUNTINGS = {
    "encrypted_values": "encrypted values",
    "ciphertext_bytes": "ciphertext bytes",
    "upload_bytes": "total upload bytes",
}


def count_costs(
    shape: CostShape,
    ranks: Sequence[int],
    budgets: Sequence[int],
    sizes: Mapping[str, CiphertextSize],
) -> dict[str, dict[str, float]]:
    """Per-client upload of every scheme of :data:`SCHEMES`, counted from shapes.

    Mean over the clients (client i has rank ``ranks[i]`` and SHE-LoRA budget ``budgets[i]``
    columns per adapted projection). Plaintext factors are float32 (4 bytes a value); message
    headers are not counted (under 0.5% of the measured uploads). SHE-LoRA's encrypted values
    come from :func:`shelora_core.methods.budget.encrypted_values`, the count the methods use.

    Returns:
        scheme -> ``encrypted_values``, ``ciphertexts``, ``ciphertext_bytes``,
        ``plaintext_bytes``, ``upload_bytes``, ``ciphertext_params``.

    Raises:
        SheloraError: if ``ranks`` and ``budgets`` differ in length or are empty.
    """
    from .config import FederatedConfig
    from .methods.budget import encrypted_values

    if not ranks or len(ranks) != len(budgets):
        raise SheloraError(
            f"count_costs needs one budget per rank, got ranks={tuple(ranks)} and "
            f"budgets={tuple(budgets)}; pass lists of equal length"
        )
    shapes = shape.layer_shapes()
    n_mods = len(shapes)
    r_max = max(ranks)
    dense, add = sizes["fedshield"], sizes["add_only"]
    too_wide = max(m for m, _ in shapes.values()) > sizes["fedshield"].slots
    column = sizes["n16384"] if too_wide and "n16384" in sizes else dense
    cfg = FederatedConfig(
        method="shelora",
        cipher_mode="delta",
        num_clients=len(ranks),
        ranks=tuple(ranks),
        he_budgets=tuple(budgets),
    )
    per: dict[str, list[dict[str, float]]] = {s: [] for s in SCHEMES}

    def add_row(scheme, values, cts, size, plain):
        per[scheme].append(
            {
                "encrypted_values": float(values),
                "ciphertexts": float(cts),
                "ciphertext_bytes": float(cts * size.nbytes) if size else 0.0,
                "plaintext_bytes": float(plain),
                "ciphertext_params": size.params if size else None,
            }
        )

    for i, (r, k) in enumerate(zip(ranks, budgets, strict=True)):
        factors = 4.0 * sum(r * (m + n) for m, n in shapes.values())
        add_row("flexlora", 0, 0, None, factors)
        v = encrypted_values(cfg, i, shapes)
        add_row("shelora-delta", v, math.ceil(v / add.slots), add, factors)
        add_row("shelora-paper", k * r * n_mods, k * n_mods, column, factors)
        a_vals = sum(r * n for _, n in shapes.values())
        b_plain = 4.0 * sum(r * m for m, _ in shapes.values())
        a_cols = sum(n for _, n in shapes.values())
        add_row("full_he-paper", a_vals, a_cols, column, b_plain)
        add_row("full_he-paper-dense", a_vals, math.ceil(a_vals / dense.slots), dense, b_plain)
        own = sum(r * (m + n) for m, n in shapes.values())
        add_row("full_he-own", own, math.ceil(own / dense.slots), dense, 0.0)
        pad = sum(r_max * (m + n) for m, n in shapes.values())
        add_row("full_he-padded", pad, math.ceil(pad / dense.slots), dense, 0.0)
    out = {}
    for scheme, rows in per.items():
        mean = {
            k: sum(r[k] for r in rows) / len(rows)
            for k in ("encrypted_values", "ciphertexts", "ciphertext_bytes", "plaintext_bytes")
        }
        mean["upload_bytes"] = mean["ciphertext_bytes"] + mean["plaintext_bytes"]
        mean["ciphertext_params"] = rows[0]["ciphertext_params"]
        out[scheme] = mean
    return out


def padding_factor(ranks: Sequence[int]) -> float:
    """How many times the values of the clients' own factors a full HE zero-padded to
    ``r_max`` encrypts: ``r_max / mean(r_i)`` (every layer has ``r (m + n)`` values at rank r)."""
    return max(ranks) * len(ranks) / sum(ranks)


def change_pct(ours: float, ref: float) -> float | None:
    """``100 (ours / ref - 1)``; ``None`` when ``ref`` is 0."""
    return 100.0 * (ours / ref - 1.0) if ref else None


def reduction_table(counts: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """SHE-LoRA's change against each full-HE definition under each accounting (counted).

    One row per (definition, SHE-LoRA scheme, accounting); both cipher modes are compared with
    every definition, the pair of :data:`FULL_HE_DEFINITIONS` is flagged ``headline``.
    """
    rows = []
    for definition, (ref, headline, label, paper_acc) in FULL_HE_DEFINITIONS.items():
        for scheme in ("shelora-paper", "shelora-delta"):
            for acc, acc_label in ACCOUNTINGS.items():
                rows.append(
                    {
                        "definition": definition,
                        "full HE": label,
                        "SHE-LoRA": scheme,
                        "accounting": acc_label,
                        "change_pct": change_pct(counts[scheme][acc], counts[ref][acc]),
                        "headline": scheme == headline,
                        "paper_accounting": paper_acc,
                    }
                )
    return rows


def _he_row(he_cost: Mapping | None, model: str, method: str) -> Mapping | None:
    for r in (he_cost or {}).get("rows", []):
        if r.get("model") == model and r.get("method") == method and "skipped" not in r:
            return r
    return None


#: ``he_cost.json`` method -> the scheme of :func:`count_costs` that counts the same upload
#: (``full_he``: the scheme of the row's ``full_he_layout``, :func:`measured_scheme`)
MEASURED_AS = {
    "flexlora": "flexlora",
    "shelora-delta": "shelora-delta",
    "shelora-paper": "shelora-paper",
    "full_he": "full_he-own",
}

#: ``he_cost.json``'s ``full_he_layout`` -> the full-HE definition it measured
LAYOUT_DEFINITIONS = {"own-rank": "own", "padded": "padded"}
#: the layout of an ``he_cost.json`` row without ``full_he_layout`` (written before results
#: version 4 of ``full_he``, when its factors were zero-padded to r_max)
LEGACY_LAYOUT = "padded"


def measured_definition(he_cost: Mapping | None, model: str | None = None) -> str:
    """The full-HE definition (``"own"`` or ``"padded"``) ``he_cost.json``'s ``full_he`` row
    measured, from its ``full_he_layout`` (of ``model``'s row when given); without any row,
    the layout the code measures now (:data:`shelora_core.he_cost.FULL_HE_LAYOUT`).

    Raises:
        SheloraError: the row names a layout this module does not know.
    """
    rows = [
        r
        for r in (he_cost or {}).get("rows", [])
        if r.get("method") == "full_he" and (model is None or r.get("model") == model)
    ]
    if rows:
        layout = rows[0].get("full_he_layout", LEGACY_LAYOUT)
    else:
        from .he_cost import FULL_HE_LAYOUT as layout
    if layout not in LAYOUT_DEFINITIONS:
        raise SheloraError(
            f"he_cost.json: full_he_layout = {layout!r} is not one of "
            f"{sorted(LAYOUT_DEFINITIONS)}; re-run the benchmark (make bench) with this code"
        )
    return LAYOUT_DEFINITIONS[layout]


def measured_scheme(row: Mapping[str, Any]) -> str | None:
    """The scheme of :func:`count_costs` that counts what an ``he_cost.json`` row measured
    (``full_he``: by its ``full_he_layout``), ``None`` for a method it does not count."""
    if row.get("method") == "full_he":
        layout = row.get("full_he_layout", LEGACY_LAYOUT)
        return (
            FULL_HE_DEFINITIONS[LAYOUT_DEFINITIONS[layout]][0]
            if layout in LAYOUT_DEFINITIONS
            else None
        )
    return MEASURED_AS.get(row.get("method"))


def counted_vs_measured(
    he_cost: Mapping | None, counts: Mapping[str, Mapping[str, Mapping[str, float]]]
) -> list[dict[str, Any]]:
    """Counted uploads beside the ones ``he_cost.json`` measured on real messages.

    Args:
        he_cost: the parsed ``he_cost.json`` (``None``: no rows).
        counts: model name -> :func:`count_costs` of that model at ``he_cost.json``'s ranks
            and budgets.

    Returns:
        One row per measured (model, method) that has a counted scheme: measured and counted
        upload bytes and encrypted values, and their ratios (counted / measured).
    """
    rows = []
    for r in (he_cost or {}).get("rows", []):
        scheme = measured_scheme(r)
        if "skipped" in r or scheme is None or r.get("model") not in counts:
            continue
        c = counts[r["model"]][scheme]
        rows.append(
            {
                "model": r["model"],
                "method": r["method"],
                "scheme": scheme,
                "measured upload bytes": r["upload_bytes"],
                "counted upload bytes": c["upload_bytes"],
                "upload counted / measured": c["upload_bytes"] / r["upload_bytes"],
                "measured encrypted values": r["encrypted_values_per_client"],
                "counted encrypted values": c["encrypted_values"],
                "scaled_from_layers": r.get("scaled_from_layers", False),
            }
        )
    return rows


def he_cost_setting(he_cost: Mapping | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(ranks, budgets)`` of ``he_cost.json``'s SHE-LoRA rows; the benchmark's defaults
    (ranks 8/16/32, budgets 2/4/8, :func:`shelora_core.he_cost.measure_method`) without it."""
    for r in (he_cost or {}).get("rows", []):
        if r.get("budgets") and r.get("ranks"):
            return tuple(r["ranks"]), tuple(r["budgets"])
    return (8, 16, 32), (2, 4, 8)


#: how each full-HE definition's layout reads in a claim's accounting and basis
_LAYOUT_TEXT = {"own": "at each client's own rank", "padded": "zero-padded to r_max"}


def cost_claims(
    he_cost: Mapping | None,
    sizes: Mapping[str, CiphertextSize],
    *,
    model: str = "OpenLLaMA-3B",
) -> list[dict]:
    """Communication and encryption-time claims on ``model`` (the paper's): counted under the
    three accountings and the ``paper`` / ``own`` definitions; measured (``he_cost.json``) for
    the definition its ``full_he`` row ran (:func:`measured_definition`: ``own`` since results
    version 4), with the other of ``own`` / ``padded`` counted from shapes; plus the absolute
    encryption seconds (measured).
    """
    ranks, budgets = he_cost_setting(he_cost)
    counts = count_costs(MODEL_SHAPES[model], ranks, budgets, sizes)
    setting = f"{model}, ranks {'/'.join(map(str, ranks))}, budgets {'/'.join(map(str, budgets))}"
    used = {c["ciphertext_params"] for c in counts.values()} - {None}
    ct_source = "; ".join(
        sorted(f"{s.params}: {s.source}" for s in sizes.values() if s.params in used)
    )
    counted = f"counted from shapes (bytes per ciphertext {ct_source})"
    count_source = "counted from shapes (shelora_core.claims.count_costs)"
    comm, enc = PAPER_CLAIMS["communication"], PAPER_CLAIMS["encryption_time"]
    rows = []
    for definition in ("paper", "own"):
        ref, she, label, paper_acc = FULL_HE_DEFINITIONS[definition]
        for acc, acc_label in ACCOUNTINGS.items():
            value = change_pct(counts[she][acc], counts[ref][acc])
            rows.append(
                _row(
                    comm,
                    value,
                    f"{acc_label}; {SCHEMES[she]} vs {label}; {setting}",
                    verdict_reduction(value, comm.value, paper_accounting=paper_acc),
                    count_source,
                    basis=counted,
                )
            )
    he_source = "he_cost.json" if he_cost else "he_cost.json (missing)"
    commit = results_commit(he_cost) if he_cost else None
    she_m, full_m = _he_row(he_cost, model, "shelora-delta"), _he_row(he_cost, model, "full_he")
    # the definition he_cost.json measured, and the other one of own / padded (counted)
    meas = measured_definition(he_cost, model)
    other = "padded" if meas == "own" else "own"
    meas_ref, other_ref = FULL_HE_DEFINITIONS[meas][0], FULL_HE_DEFINITIONS[other][0]
    value = (
        she_m["upload_change_vs_full_he_pct"]
        if she_m and "upload_change_vs_full_he_pct" in she_m
        else None
    )
    rows.append(
        _row(
            comm,
            value,
            f"total upload bytes; {SCHEMES['shelora-delta']} vs "
            f"{FULL_HE_DEFINITIONS[meas][2]}; {setting}",
            verdict_reduction(value, comm.value),
            he_source,
            basis="measured (make bench)",
            commit=commit,
        )
    )
    if other == "padded":  # the ablation, counted (own is counted above under every accounting)
        value = change_pct(
            counts["shelora-delta"]["upload_bytes"], counts[other_ref]["upload_bytes"]
        )
        rows.append(
            _row(
                comm,
                value,
                f"total upload bytes; {SCHEMES['shelora-delta']} vs "
                f"{FULL_HE_DEFINITIONS[other][2]}; {setting}",
                verdict_reduction(value, comm.value),
                count_source,
                basis=counted,
                note=f"zero-padding to r_max encrypts {padding_factor(ranks):.2f}x the values of "
                "the clients' own factors",
            )
        )
    # encryption time: the paper's definition as a ciphertext count (same N on both sides: the
    # time per ciphertext cancels); ours from measured seconds
    ref, she, label, _ = FULL_HE_DEFINITIONS["paper"]
    value = change_pct(counts[she]["ciphertexts"], counts[ref]["ciphertexts"])
    rows.append(
        _row(
            enc,
            value,
            f"ciphertexts encrypted (same N = 8192 on both sides, so time per ciphertext "
            f"cancels); {SCHEMES[she]} vs {label}; {setting}",
            verdict_reduction(value, enc.value, paper_accounting=True),
            count_source,
            basis="counted from shapes",
        )
    )
    # the measured definition's change is he_cost.json's; the other's scales the measured full-HE
    # seconds by the counted ciphertexts (encryption time is linear in them at one N)
    secs: dict[str, float | None] = {meas: None, other: None}
    note = ""
    if she_m and full_m:
        scale = counts[other_ref]["ciphertexts"] / counts[meas_ref]["ciphertexts"]
        secs[meas] = she_m.get("encrypt_time_change_vs_full_he_pct")
        secs[other] = change_pct(
            she_m["client_upload_seconds"], full_m["client_upload_seconds"] * scale
        )
        note = (
            f"SHE-LoRA {she_m['client_upload_seconds']:.3f} s; full HE "
            f"{full_m['client_upload_seconds']:.2f} s measured ({_LAYOUT_TEXT[meas]}), x "
            f"{scale:.3f} (counted ciphertexts, {other} / {meas}) for the {other} definition"
        )
    for definition in ("own", "padded"):  # the order of the table
        measured = definition == meas
        rows.append(
            _row(
                enc,
                secs[definition],
                f"client encryption seconds; {SCHEMES['shelora-delta']} vs "
                f"{FULL_HE_DEFINITIONS[definition][2]}; {setting}",
                verdict_reduction(secs[definition], enc.value),
                he_source,
                basis="measured (make bench)"
                if measured
                else f"measured SHE-LoRA seconds; full HE seconds measured ({_LAYOUT_TEXT[meas]}) "
                f"and scaled by the counted ciphertexts ({_LAYOUT_TEXT[definition]})",
                commit=commit,
                note="" if measured else note,
            )
        )
    for key, method in (
        ("seconds_shelora", "shelora-paper"),
        ("seconds_shelora", "shelora-delta"),
        ("seconds_full_he", "full_he"),
    ):
        m = _he_row(he_cost, model, method)
        secs = m["client_upload_seconds"] if m else None
        scaled = m and m.get("scaled_from_layers")
        rows.append(
            _row(
                PAPER_CLAIMS[key],
                secs,
                f"client encryption seconds per round, {method} ({model}, ranks "
                f"{'/'.join(map(str, ranks))}; "
                f"{_LAYOUT_TEXT[meas] + ', ' if method == 'full_he' else ''}this machine)",
                verdict_seconds(secs, PAPER_CLAIMS[key].value),
                he_source,
                basis="measured (make bench)"
                + (f", on {m['layers_measured']} layers scaled to {m['layers']}" if scaled else ""),
                commit=commit,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# DAGER (notebook 06's attack.json)
# --------------------------------------------------------------------------------------------
#: the learning rate of the attacked FedSGD step when attack.json's meta does not record it
#: (:class:`shelora_core.attacks.grid.Cell`'s default)
DEFAULT_ATTACK_LR = 1e3


def documented_attack_rows(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The measured cells of ``attack.json`` at the documented settings, one per table cell.

    Kept: the largest LoRA rank; the attacked step's learning rate recorded in the meta
    (``sgd_lr``; the learning-rate sweep's other rates are dropped); no DP noise sweep
    (``dp_sigma``) and, for ``flexlora-dp``, the authors' epsilon only (``dp_epsilon`` set).
    If a cell is still recorded twice, the last record wins.
    """
    meta = next((e for e in entries if e.get("kind") == "meta"), {})
    lr = float(meta.get("sgd_lr", DEFAULT_ATTACK_LR))
    rows = [e for e in entries if e.get("kind") == "measured"]
    if not rows:
        return []
    rank = max(e["rank"] for e in rows)
    keep: dict[tuple, Mapping[str, Any]] = {}
    for e in rows:
        if e["rank"] != rank or not math.isclose(float(e.get("lr", lr)), lr):
            continue
        if e.get("dp_sigma") is not None:
            continue
        if e["method"] == "flexlora-dp" and e.get("dp_epsilon") is None:
            continue
        key = (
            e["method"],
            e.get("budget"),
            e["attacker"],
            e["update"],
            e["batch_size"],
            e.get("steps"),
            e.get("span_tol"),
        )
        keep[key] = e
    return list(keep.values())


def dager_claims(entries: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """DAGER's ROUGE-1 beside the paper's, at the largest batch size both report (or ours and
    the paper's smallest when none is shared), in later rounds at the largest budget.

    The paper's attacker is DAGER as written (``oblivious``); the ``adaptive`` attacker, who
    knows which columns are encrypted (the server does), and round 1 are our accountings.
    """
    cases = (
        # claim method, attack method, attacker, update, paper's accounting, label
        ("flexlora", "flexlora", "oblivious", "later", False, "FlexLoRA"),
        ("flexlora-dp", "flexlora-dp", "oblivious", "later", False, "FlexLoRA-DP (epsilon 10)"),
        ("maskcrypt", "maskcrypt", "oblivious", "later", False, "MaskCrypt"),
        ("shelora", "shelora", "oblivious", "later", True, "SHE-LoRA"),
        ("shelora", "shelora", "adaptive", "later", False, "SHE-LoRA"),
        ("shelora", "shelora", "oblivious", "round1", False, "SHE-LoRA"),
        ("fedshield", "fedshield", "oblivious", "later", False, "FedShield-LLM"),
    )
    if not entries:
        return [
            _row(
                PAPER_CLAIMS["fedshield_dager" if m == "fedshield" else f"dager_{m}_b4"],
                None,
                f"{att} attacker, {upd}",
                NO_DATA,
                "attack.json (missing)",
                basis="measured",
            )
            for m, _, att, upd, _, _ in cases
        ]
    rows_all = documented_attack_rows(entries)
    meta = next((e for e in entries if e.get("kind") == "meta"), {})
    commit = results_commit(entries)
    out = []
    for claim_method, method, attacker, update, paper_acc, label in cases:
        cells = [
            e
            for e in rows_all
            if e["method"] == method and e["attacker"] == attacker and e["update"] == update
        ]
        paper = paper_rouge(claim_method)
        if not cells:
            claim = PAPER_CLAIMS.get(f"dager_{claim_method}_b4") or PAPER_CLAIMS["fedshield_dager"]
            out.append(
                _row(
                    claim,
                    None,
                    f"{attacker} attacker, {update}",
                    NO_DATA,
                    "attack.json (no such cell)",
                    basis="measured",
                    commit=commit,
                )
            )
            continue
        budget = max((e.get("budget") or 0) for e in cells)
        cells = [e for e in cells if (e.get("budget") or 0) == budget]
        ours_b = sorted({e["batch_size"] for e in cells})
        common = sorted(set(ours_b) & set(paper))
        batch = common[-1] if common else ours_b[-1]
        paper_batch = batch if batch in paper else (min(paper) if paper else None)
        cell = next(e for e in cells if e["batch_size"] == batch)
        ours = 100.0 * cell["rouge1"]
        if claim_method == "fedshield":
            claim, paper_value = PAPER_CLAIMS["fedshield_dager"], None
        else:
            claim = PAPER_CLAIMS[f"dager_{claim_method}_b{paper_batch}"]
            paper_value = claim.value
        where = f"batch {batch}" + (
            f" (paper: batch {paper_batch})" if paper_batch not in (None, batch) else ""
        )
        attacker_text = (
            "DAGER as written (oblivious)"
            if attacker == "oblivious"
            else "adaptive attacker (knows the encrypted columns, as the server does)"
        )
        acc = (
            f"{attacker_text}, {'round 1' if update == 'round1' else 'later rounds'}, {where}"
            + (f", budget {budget:g}" if budget else "")
            + f"; SmolLM2-135M, LoRA r = {cell['rank']}, step lr {meta.get('sgd_lr', DEFAULT_ATTACK_LR):g}"
        )
        out.append(
            _row(
                claim,
                ours,
                acc,
                verdict_rouge(ours, paper_value, paper_accounting=paper_acc),
                "attack.json",
                basis="measured",
                claim_text=f"DAGER's ROUGE-1 against {label}"
                + ("" if paper_value is None else f" (paper: batch {paper_batch})"),
                paper_value=paper_value,
                commit=commit,
                note=f"band: ours {rouge_band(ours)}"
                + ("" if paper_value is None else f", paper {rouge_band(paper_value)}"),
            )
        )
    return out


#: what each attacker of notebook 06 is, in the words of the claims table
ATTACKER_TEXT = {
    "oblivious": "DAGER as written (oblivious: the paper's attacker)",
    "adaptive": "adaptive DAGER (knows the encrypted columns, as the server does)",
    "b-channel": "DAGER on the plaintext B alone",
    "optimisation": "optimisation-based reconstruction (not a span check)",
}
#: the attacked update, in words
UPDATE_TEXT = {
    "later": "a later round's FedSGD step",
    "round1": "round 1's FedSGD step (the initial A is public)",
    "round1-secret-a": "round 1 with a secret initial A",
    "multistep": "multi-step AdamW local update",
    "multistep-sgd": "multi-step plain-SGD local update",
}
#: the SHE-LoRA family in the order the inversion claim lists it
_INVERSION_METHODS = ("shelora", "shelora-dp", "shelora+first-layers")
_ATTACKER_ORDER = ("oblivious", "adaptive", "b-channel", "optimisation")


def _position(order: Sequence[str], name: str) -> int:
    """``name``'s place in ``order``; names not listed come after every listed one."""
    return order.index(name) if name in order else len(order)


def _inversion_groups(
    entries: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str, str], list[Mapping[str, Any]]]:
    """The documented attack cells on the SHE-LoRA family, grouped by (variant, attacker,
    update) in the order the inversion claim lists them."""
    cells: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for e in documented_attack_rows(entries):
        if e["method"] in _INVERSION_METHODS:
            cells.setdefault((e["method"], e["attacker"], e["update"]), []).append(e)

    def order(key: tuple[str, str, str]) -> tuple:
        method, attacker, update = key
        att = (
            _ATTACKER_ORDER.index(attacker) if attacker in _ATTACKER_ORDER else len(_ATTACKER_ORDER)
        )
        upd = list(UPDATE_TEXT).index(update) if update in UPDATE_TEXT else len(UPDATE_TEXT)
        return _INVERSION_METHODS.index(method), upd, att, attacker, update

    return {k: cells[k] for k in sorted(cells, key=order)}


def inversion_matrix(
    entries: Sequence[Mapping[str, Any]] | None,
) -> tuple[dict[tuple[str, str], float], list[str], list[str]]:
    """The inversion claim as a grid for :func:`shelora_core.plots.threat_matrix`: worst ROUGE-1
    (%) per ("variant · update", attacker), with the row and column order."""
    cells: dict[tuple[str, str], float] = {}
    for (method, attacker, update), group in _inversion_groups(entries or []).items():
        cells[(f"{method} · {update}", attacker)] = 100.0 * max(e["rouge1"] for e in group)
    rows = list(dict.fromkeys(r for r, _ in cells))
    cols = sorted({a for _, a in cells}, key=lambda a: (_position(_ATTACKER_ORDER, a), a))
    return cells, rows, cols


def inversion_claims(entries: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """ "SHE-LoRA resists gradient inversion", qualified: one record per (variant, attacker,
    attacked update) that notebook 06 measured on the SHE-LoRA family, holding the **worst**
    ROUGE-1 over every batch size and HE budget of the documented cells (not the paper's one
    batch and largest budget: a defence holds only where it holds everywhere).

    The verdict compares the band (:func:`rouge_band`) with the paper's "defeated"; the record of
    plain SHE-LoRA under DAGER as written on a later round is the paper's own accounting, every
    other record is a threat the paper did not evaluate (its verdict says whether the claim
    survives it).
    """
    claim = PAPER_CLAIMS["inversion_shelora"]
    if not entries:
        return [
            _row(
                claim,
                None,
                "every attacker of notebook 06 on SHE-LoRA",
                NO_DATA,
                "attack.json (missing)",
                basis="measured",
            )
        ]
    meta = next((e for e in entries if e.get("kind") == "meta"), {})
    commit = results_commit(entries)
    cells = _inversion_groups(entries)
    out = []
    for (method, attacker, update), group in cells.items():
        worst = max(group, key=lambda e: e["rouge1"])
        ours = 100.0 * worst["rouge1"]
        batches = sorted({e["batch_size"] for e in group})
        budgets = sorted({e.get("budget") for e in group if e.get("budget") is not None})
        paper_acc = (method, attacker, update) == ("shelora", "oblivious", "later")
        where = f"batch {'/'.join(map(str, batches))}" + (
            f", budget {'/'.join(f'{b:g}' for b in budgets)}" if budgets else ""
        )
        label = method if method != "shelora" else "SHE-LoRA"
        accounting = (
            f"{label}; {ATTACKER_TEXT.get(attacker, attacker)} on "
            f"{UPDATE_TEXT.get(update, update)}; worst over {where} ({len(group)} cells); "
            f"SmolLM2-135M, LoRA r = {worst['rank']}, step lr {meta.get('sgd_lr', DEFAULT_ATTACK_LR):g}"
        )
        worst_at = f"batch {worst['batch_size']}" + (
            f", budget {worst['budget']:g}" if worst.get("budget") is not None else ""
        )
        out.append(
            _row(
                claim,
                ours,
                accounting,
                verdict_rouge(ours, claim.value, paper_accounting=paper_acc),
                "attack.json",
                basis="measured",
                claim_text=claim.claim
                + ("" if paper_acc else ", against a threat the paper did not evaluate"),
                commit=commit,
                note=f"band: {rouge_band(ours)} (worst at {worst_at})",
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# The authors' CKKS setting
# --------------------------------------------------------------------------------------------
#: the authors' CKKS context and ours for the same product (paper mode)
AUTHORS_CKKS = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": (60, 40, 60), "scale_bits": 24}
OUR_PAPER_MODE_CKKS = {
    "poly_modulus_degree": 8192,
    "coeff_mod_bit_sizes": (60, 40, 40, 60),
    "scale_bits": 40,
}


def measure_product_error(
    poly_modulus_degree: int,
    coeff_mod_bit_sizes: Sequence[int],
    scale_bits: int,
    *,
    rank: int = 8,
    m: int = 576,
    clients: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """The paper mode's server product under a CKKS context built directly with TenSEAL.

    ``clients`` encrypt one LoRA-like column of ``A`` (``rank`` values, N(0, 0.02)) each; the
    server multiplies each by its client's plaintext weighted ``B`` (``m x rank``, N(0, 0.01)
    times 1/clients) with ``CKKSVector.mm`` and adds the products; the key holder decrypts. No
    security or scale check is run: this measures settings the package itself refuses.

    Returns:
        ``max_abs_error``, ``max_rel_error`` (max abs error / max |exact|), the parameters, and
        ``seconds`` (key generation included).
    """
    import time

    import numpy as np
    import tenseal as ts

    t0 = time.perf_counter()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree, coeff_mod_bit_sizes=list(coeff_mod_bit_sizes)
    )
    ctx.global_scale = 2.0**scale_bits
    ctx.generate_galois_keys()
    rng = np.random.default_rng(seed)
    exact = np.zeros(m)
    total = None
    for _ in range(clients):
        a = rng.normal(0.0, 0.02, rank)
        b = rng.normal(0.0, 0.01, (m, rank)) / clients
        exact += b @ a
        prod = ts.ckks_vector(ctx, a.tolist()).mm(b.T.tolist())
        total = prod if total is None else total + prod
    got = np.asarray(total.decrypt()[:m])
    err = float(np.max(np.abs(got - exact)))
    return {
        "poly_modulus_degree": poly_modulus_degree,
        "coeff_mod_bit_sizes": list(coeff_mod_bit_sizes),
        "scale_bits": scale_bits,
        "rank": rank,
        "m": m,
        "clients": clients,
        "max_abs_error": err,
        "max_rel_error": err / float(np.max(np.abs(exact))),
        "seconds": time.perf_counter() - t0,
    }


def ckks_claims(authors: Mapping[str, Any] | None, ours: Mapping[str, Any] | None) -> list[dict]:
    """The authors' CKKS setting: usable if the product's max relative error is below
    :data:`CKKS_MAX_REL_ERROR`; ``ours`` (the same product in our paper-mode set) goes in the
    note for reference."""
    claim = PAPER_CLAIMS["authors_ckks"]
    value = None if authors is None else authors["max_rel_error"]
    passed = None if value is None else value < CKKS_MAX_REL_ERROR
    note = (
        ""
        if ours is None
        else (
            f"ours (N = {ours['poly_modulus_degree']}, {ours['coeff_mod_bit_sizes']}, scale "
            f"2^{ours['scale_bits']}): {ours['max_rel_error']:.1e}"
        )
    )
    acc = (
        "the server's ciphertext x plaintext products, summed over clients and decrypted"
        + (
            f" (r = {authors['rank']}, m = {authors['m']}, {authors['clients']} clients)"
            if authors
            else ""
        )
        + f"; usable below {CKKS_MAX_REL_ERROR:g}"
    )
    return [
        _row(
            claim,
            value,
            acc,
            _verdict(passed, False),
            "measured by notebook 07 with TenSEAL (no results file)",
            basis="measured now",
            note=note,
        )
    ]


# --------------------------------------------------------------------------------------------
# Everything, and formatting
# --------------------------------------------------------------------------------------------
def all_claims(
    results: Mapping[str, Any],
    sizes: Mapping[str, CiphertextSize],
    *,
    ckks_authors: Mapping[str, Any] | None = None,
    ckks_ours: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every claim record of a profile, in the order of notebook 07's sections.

    Args:
        results: :func:`load_results` of the profile.
        sizes: :func:`ciphertext_sizes`.
        ckks_authors, ckks_ours: :func:`measure_product_error` results (``None``: no data).
    """
    src = results.get("sources", {})
    return [
        *accuracy_claims(
            results.get("federated_tuning"), src.get("federated_tuning", "federated_tuning.json")
        ),
        *cost_claims(results.get("he_cost"), sizes),
        *dager_claims(results.get("attack")),
        *inversion_claims(results.get("attack")),
        *ckks_claims(ckks_authors, ckks_ours),
    ]


def format_value(value: float | None) -> str:
    """How a claim value is written in tables: ``-`` for none, 2 decimals for ordinary
    magnitudes, 2 significant digits in exponent form below 0.01."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:.2f}"


def verdict_counts(claims: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many records carry each verdict (every verdict listed, zeros included)."""
    out = dict.fromkeys(VERDICTS, 0)
    for c in claims:
        out[c["verdict"]] += 1
    return out
