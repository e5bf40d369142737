"""claims.py: the papers' claims, our values from results JSON, verdicts; claims.json vs README."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import reproduce
from shelora_core import claims as C

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------------------------
def test_reduction_verdict_compares_the_share_kept_with_the_papers():
    # the paper keeps 0.29%; the threshold is 1.25 x 0.29 = 0.3625%
    assert C.verdict_reduction(-99.80, -99.71) == C.REPRODUCED
    assert C.verdict_reduction(-99.64, -99.71) == C.REPRODUCED
    assert C.verdict_reduction(-99.63, -99.71) == C.NOT_REPRODUCED
    assert C.verdict_reduction(-94.2, -99.71) == C.NOT_REPRODUCED
    assert C.verdict_reduction(-99.80, -99.71, paper_accounting=True) == C.UNDER_PAPER
    assert C.verdict_reduction(-90.0, -99.71, paper_accounting=True) == C.NOT_REPRODUCED
    assert C.verdict_reduction(None, -99.71) == C.NO_DATA


def test_difference_seconds_and_rouge_verdicts():
    assert C.verdict_difference(-0.5) == C.REPRODUCED
    assert C.verdict_difference(1.5) == C.NOT_REPRODUCED
    assert C.verdict_difference(0.0, informative=False) == C.INCONCLUSIVE
    assert C.verdict_difference(None, informative=False) == C.NO_DATA
    assert C.verdict_seconds(0.61, 0.6) == C.REPRODUCED
    assert C.verdict_seconds(1.3, 0.6) == C.NOT_REPRODUCED
    assert C.verdict_seconds(14.8, 480.0) == C.NOT_REPRODUCED
    assert C.rouge_band(0.0) == "defeated" and C.rouge_band(30) == "partial"
    assert C.rouge_band(61.14) == "recovered"
    assert C.verdict_rouge(100.0, 61.14) == C.REPRODUCED
    assert C.verdict_rouge(0.0, 86.25) == C.NOT_REPRODUCED
    assert C.verdict_rouge(0.0, 0.98, paper_accounting=True) == C.UNDER_PAPER
    assert C.verdict_rouge(100.0, 0.98) == C.NOT_REPRODUCED
    assert C.verdict_rouge(5.0, None) == C.REPRODUCED  # "the attack fails", no number
    assert C.verdict_rouge(30.0, None) == C.NOT_REPRODUCED


# --------------------------------------------------------------------------------------------
# accuracy from notebook 05's runs
# --------------------------------------------------------------------------------------------
def _run(label, acc, *, ranks=(8, 16, 32), partition="dirichlet(0.3)", commit="abc"):
    method, _, mode = label.partition("-")
    return {
        "run_name": f"{label}_run",
        "method": method,
        "variant": label,
        "model": "minilm",
        "ranks": list(ranks),
        "partition": partition,
        "final_accuracy": acc,
        "meta": {"git_commit": commit},
    }


def test_accuracy_claims_from_runs():
    runs = [
        _run("flexlora", 0.800),
        _run("shelora-delta", 0.795),
        _run("shelora-paper", 0.780),
        _run("fedavg", 0.700),
        _run("fedshield", 0.704, commit="def"),
        _run("flexlora", 0.9, ranks=(8,), partition="iid"),  # another setting, no SHE-LoRA
    ]
    rows = C.accuracy_claims(runs, "federated_tuning.json")
    assert [r["key"] for r in rows] == ["accuracy", "accuracy", "fedshield_accuracy"]
    delta, paper, fedshield = rows
    assert math.isclose(delta["our_value"], -0.5) and delta["verdict"] == C.REPRODUCED
    assert math.isclose(paper["our_value"], -2.0) and paper["verdict"] == C.NOT_REPRODUCED
    assert math.isclose(fedshield["our_value"], 0.4) and fedshield["verdict"] == C.REPRODUCED
    assert fedshield["evidence_commit"] == "abc, def"
    assert "shelora-delta_run" in delta["evidence"] and "flexlora_run" in delta["evidence"]


def test_accuracy_is_inconclusive_when_the_setting_does_not_separate_methods():
    runs = [_run(lab, 0.655) for lab in ("flexlora", "shelora-delta", "fedavg", "fedshield")]
    rows = C.accuracy_claims(runs, "federated_tuning.json")
    assert {r["verdict"] for r in rows} == {C.INCONCLUSIVE}
    assert all(r["our_value"] == 0.0 for r in rows)
    assert {r["verdict"] for r in C.accuracy_claims(None, "x.json")} == {C.NO_DATA}


# --------------------------------------------------------------------------------------------
# costs counted from shapes
# --------------------------------------------------------------------------------------------
SIZES = {
    "add_only": C.CiphertextSize("add_only", 16, 100, "test"),  # 8 slots
    "fedshield": C.CiphertextSize("fedshield", 32, 200, "test"),  # 16 slots
    "n16384": C.CiphertextSize("n16384", 64, 400, "test"),  # 32 slots
}
TOY = C.CostShape("toy", 2, (("q", 8, 6),), 0.001, "test")  # 2 layers, m = 8, n = 6


def test_count_costs_by_hand():
    c = C.count_costs(TOY, (2, 4), (1, 2), SIZES)
    # FlexLoRA: 4 bytes x r (m + n) x 2 layers = 224 and 448
    assert c["flexlora"]["upload_bytes"] == 336 and c["flexlora"]["ciphertexts"] == 0
    # delta: k m values per layer (16, 32), ceil(/8 slots) = 2, 4 ciphertexts of 100 bytes
    assert c["shelora-delta"]["encrypted_values"] == 24
    assert c["shelora-delta"]["ciphertext_bytes"] == 300
    assert c["shelora-delta"]["upload_bytes"] == 636
    # paper mode: one ciphertext per protected column and layer (2, 4) of r values (4, 16)
    assert c["shelora-paper"]["encrypted_values"] == 10 and c["shelora-paper"]["ciphertexts"] == 3
    assert c["shelora-paper"]["ciphertext_bytes"] == 600
    # the paper's full HE: every A column (n = 6 per layer) in its own ciphertext, B plain
    assert c["full_he-paper"]["encrypted_values"] == 36 and c["full_he-paper"]["ciphertexts"] == 12
    assert c["full_he-paper"]["plaintext_bytes"] == 192
    assert c["full_he-paper"]["upload_bytes"] == 2400 + 192
    # ours at own rank: r (m + n) x 2 = 56, 112 values -> 4, 7 ciphertexts of 16 slots
    assert c["full_he-own"]["encrypted_values"] == 84 and c["full_he-own"]["ciphertexts"] == 5.5
    # zero-padded to r_max = 4: 112 values each -> 7 ciphertexts
    assert c["full_he-padded"]["upload_bytes"] == 1400
    assert c["full_he-padded"]["encrypted_values"] / c["full_he-own"]["encrypted_values"] == (
        pytest.approx(C.padding_factor((2, 4)))
    )


def test_paper_mode_uses_the_larger_ring_when_a_layer_is_wider_than_its_slots():
    wide = C.CostShape("wide", 1, (("q", 20, 6),), 0.001, "test")  # m = 20 > 16 slots
    c = C.count_costs(wide, (2,), (1,), SIZES)
    assert c["shelora-paper"]["ciphertext_params"] == "n16384"
    assert c["shelora-paper"]["ciphertext_bytes"] == 400
    assert c["full_he-own"]["ciphertext_params"] == "fedshield"
    with pytest.raises(C.SheloraError, match="one budget per rank"):
        C.count_costs(TOY, (2, 4), (1,), SIZES)


def test_reduction_table_and_padding_factor():
    c = C.count_costs(TOY, (2, 4), (1, 2), SIZES)
    rows = C.reduction_table(c)
    head = {(r["definition"], r["accounting"]): r for r in rows if r["headline"]}
    got = head[("paper", "encrypted values")]["change_pct"]
    assert got == pytest.approx(100 * (10 / 36 - 1))
    assert head[("own", "total upload bytes")]["change_pct"] == pytest.approx(
        100 * (636 / 1100 - 1)
    )
    assert head[("paper", "ciphertext bytes")]["paper_accounting"] is True
    assert C.padding_factor((8, 16, 32)) == pytest.approx(32 / (56 / 3))


def test_counts_agree_with_the_measured_uploads_of_he_cost_json():
    results = C.load_results(ROOT / "results" / "quick")
    if "he_cost" not in results or "encryption" not in results:
        pytest.skip("results/quick has no he_cost.json / encryption.json")
    sizes = C.ciphertext_sizes(results["encryption"], measure=False)
    ranks, budgets = C.he_cost_setting(results["he_cost"])
    counts = {
        name: C.count_costs(C.MODEL_SHAPES[name], ranks, budgets, sizes)
        for name in ("SmolLM2-135M", "OpenLLaMA-3B")
    }
    rows = C.counted_vs_measured(results["he_cost"], counts)
    assert len(rows) >= 6
    for r in rows:
        assert r["upload counted / measured"] == pytest.approx(1.0, abs=0.01), r
        assert r["counted encrypted values"] == pytest.approx(r["measured encrypted values"]), r


def _he_cost(layout=None):
    """A toy he_cost.json: SHE-LoRA delta and full HE on OpenLLaMA-3B (``layout``: the
    ``full_he_layout`` of every row, ``None``: a file from before the field)."""
    extra = {} if layout is None else {"full_he_layout": layout}
    return {
        "rows": [
            {
                "model": "OpenLLaMA-3B",
                "method": "shelora-delta",
                "ranks": [8, 16, 32],
                "budgets": [2, 4, 8],
                "upload_change_vs_full_he_pct": -94.0,
                "encrypt_time_change_vs_full_he_pct": -96.0,
                "client_upload_seconds": 0.5,
                **extra,
            },
            {
                "model": "OpenLLaMA-3B",
                "method": "full_he",
                "ranks": [8, 16, 32],
                "budgets": None,
                "client_upload_seconds": 10.0,
                **extra,
            },
        ],
        "meta": {"git_commit": "0123456789abcdef"},
    }


def _by_definition(rows, key, definition):
    label = C.FULL_HE_DEFINITIONS[definition][2]
    return [
        r
        for r in rows
        if r["key"] == key
        and f"vs {label};" in r["accounting"]
        and r["accounting"].startswith(("total upload bytes", "client encryption seconds"))
    ]


def test_cost_claims_measured_rows_need_he_cost_and_counted_rows_do_not():
    rows = C.cost_claims(None, SIZES)
    by_basis = {r["verdict"] for r in rows if r["basis"].startswith("counted")}
    assert C.NO_DATA not in by_basis
    measured = [r for r in rows if r["evidence"].startswith("he_cost.json")]
    assert measured and {r["verdict"] for r in measured} == {C.NO_DATA}
    secs = [
        r
        for r in C.cost_claims(_he_cost("own-rank"), SIZES)
        if r["key"] == "seconds_shelora" and "shelora-delta" in r["accounting"]
    ]
    assert secs[0]["our_value"] == 0.5 and secs[0]["verdict"] == C.REPRODUCED


def test_cost_claims_measure_the_own_rank_full_he_and_count_the_padded_one():
    # Arrange: he_cost.json from this code (full HE at each client's own rank)
    ranks = (8, 16, 32)
    counts = C.count_costs(C.MODEL_SHAPES["OpenLLaMA-3B"], ranks, (2, 4, 8), SIZES)

    # Act
    rows = C.cost_claims(_he_cost("own-rank"), SIZES)

    # Assert: the own definition's upload and seconds rows are he_cost.json's, measured
    own_up, own_secs = (
        _by_definition(rows, k, "own") for k in ("communication", "encryption_time")
    )
    measured = [r for r in own_up if r["basis"] == "measured (make bench)"]
    assert [r["our_value"] for r in measured] == [-94.0]
    assert measured[0]["evidence_commit"] == "0123456789ab"
    assert [r["our_value"] for r in own_secs] == [-96.0]
    assert own_secs[0]["basis"] == "measured (make bench)"
    # ... the padded ablation is counted from shapes, the upload from counts alone and the
    # seconds scaled from the measured full HE by the counted ciphertexts
    pad_up, pad_secs = (
        _by_definition(rows, k, "padded") for k in ("communication", "encryption_time")
    )
    assert len(pad_up) == 1 and pad_up[0]["basis"].startswith("counted from shapes")
    want = 100 * (
        counts["shelora-delta"]["upload_bytes"] / counts["full_he-padded"]["upload_bytes"] - 1
    )
    assert pad_up[0]["our_value"] == pytest.approx(want)
    assert "1.71x" in pad_up[0]["note"]
    scale = counts["full_he-padded"]["ciphertexts"] / counts["full_he-own"]["ciphertexts"]
    assert scale > 1
    assert pad_secs[0]["our_value"] == pytest.approx(100 * (0.5 / (10.0 * scale) - 1))
    assert "scaled by the counted ciphertexts (zero-padded to r_max)" in pad_secs[0]["basis"]
    # the absolute full-HE seconds say which layout they measured
    full = next(r for r in rows if r["key"] == "seconds_full_he")
    assert "at each client's own rank" in full["accounting"] and full["our_value"] == 10.0
    # the verdict logic is unchanged: -94% keeps 6% of full HE, far from the paper's 0.29%
    assert measured[0]["verdict"] == C.NOT_REPRODUCED


def test_cost_claims_read_a_legacy_he_cost_json_as_zero_padded():
    # Arrange: he_cost.json written before full_he_layout existed (full HE zero-padded to r_max)
    rows = C.cost_claims(_he_cost(None), SIZES)

    # Assert: its numbers are the padded definition's, measured; own-rank seconds are scaled
    pad_up, pad_secs = (
        _by_definition(rows, k, "padded") for k in ("communication", "encryption_time")
    )
    assert [(r["our_value"], r["basis"]) for r in pad_up + pad_secs] == [
        (-94.0, "measured (make bench)"),
        (-96.0, "measured (make bench)"),
    ]
    own_secs = _by_definition(rows, "encryption_time", "own")
    assert own_secs[0]["basis"].startswith("measured SHE-LoRA seconds; full HE seconds measured")
    full = next(r for r in rows if r["key"] == "seconds_full_he")
    assert "zero-padded to r_max" in full["accounting"]
    assert C.measured_definition(_he_cost(None)) == "padded"
    assert C.measured_definition(_he_cost("own-rank")) == "own"
    assert C.measured_definition(None) == "own"  # what this code's benchmark measures
    with pytest.raises(C.SheloraError, match="full_he_layout = 'diagonal'"):
        C.measured_definition(_he_cost("diagonal"))


def test_measured_full_he_rows_are_checked_against_the_scheme_of_their_layout():
    row = {"method": "full_he", "model": "SmolLM2-135M"}
    assert C.measured_scheme({**row, "full_he_layout": "own-rank"}) == "full_he-own"
    assert C.measured_scheme(row) == "full_he-padded"  # before the field: zero-padded
    assert C.measured_scheme({"method": "shelora-delta"}) == "shelora-delta"
    assert C.measured_scheme({"method": "maskcrypt-delta"}) is None


# --------------------------------------------------------------------------------------------
# DAGER
# --------------------------------------------------------------------------------------------
def _cell(method, attacker, update, batch, rouge, *, budget=None, rank=256, lr=1000.0, **kw):
    return {
        "kind": "measured",
        "method": method,
        "attacker": attacker,
        "update": update,
        "batch_size": batch,
        "rouge1": rouge,
        "budget": budget,
        "rank": rank,
        "lr": lr,
        "dp_sigma": kw.get("dp_sigma"),
        "dp_epsilon": kw.get("dp_epsilon"),
    }


def test_documented_attack_rows_keep_the_recorded_lr_and_drop_the_sweeps(tmp_path):
    entries = [
        {"kind": "meta", "sgd_lr": 1000.0, "git_commit": "feedbeef" * 5},
        _cell("flexlora", "oblivious", "later", 1, 1.0),
        _cell("flexlora", "oblivious", "later", 1, 0.59, lr=1.0),  # the lr sweep, recorded later
        _cell("flexlora", "oblivious", "later", 1, 0.2, rank=8),  # a smaller rank
        _cell("flexlora-dp", "oblivious", "later", 1, 1.0, dp_sigma=1e-12),  # the noise sweep
        _cell("flexlora-dp", "oblivious", "later", 1, 0.0, dp_epsilon=10.0),
    ]
    rows = C.documented_attack_rows(entries)
    assert [(r["method"], r["rouge1"]) for r in rows] == [("flexlora", 1.0), ("flexlora-dp", 0.0)]
    path = tmp_path / "attack.json"
    path.write_text(json.dumps(entries))
    table = "\n".join(reproduce.attack_table(path))
    assert "| flexlora | - | oblivious | 1.00 |" in table and "0.59" not in table
    assert "| flexlora-dp | - | oblivious | 0.00 |" in table


def test_dager_claims_separate_the_papers_attacker_from_ours():
    entries = [{"kind": "meta", "sgd_lr": 1000.0}]
    for b in (1, 4):
        entries += [
            _cell("flexlora", "oblivious", "later", b, 1.0),
            _cell("shelora", "oblivious", "later", b, 0.0, budget=4),
            _cell("shelora", "adaptive", "later", b, 1.0, budget=4),
            _cell("shelora", "oblivious", "later", b, 0.5, budget=2),  # not the largest budget
        ]
    rows = {(r["key"], r["accounting"].split(",")[0]): r for r in C.dager_claims(entries)}
    flex = rows[("dager_flexlora_b4", "DAGER as written (oblivious)")]
    assert flex["our_value"] == 100.0 and flex["paper_value"] == 95.18
    assert flex["verdict"] == C.REPRODUCED
    obl = rows[("dager_shelora_b4", "DAGER as written (oblivious)")]
    assert (
        obl["our_value"] == 0.0
        and obl["verdict"] == C.UNDER_PAPER
        and "budget 4" in obl["accounting"]
    )
    ada = rows[("dager_shelora_b4", "adaptive attacker (knows the encrypted columns")]
    assert ada["our_value"] == 100.0 and ada["verdict"] == C.NOT_REPRODUCED
    missing = [r for r in C.dager_claims(entries) if r["our_value"] is None]
    assert missing and {r["verdict"] for r in missing} == {C.NO_DATA}  # no DP / MaskCrypt cells
    assert {r["verdict"] for r in C.dager_claims(None)} == {C.NO_DATA}


def test_inversion_claims_hold_the_worst_cell_of_every_threat_and_flag_the_papers_own():
    entries = [{"kind": "meta", "sgd_lr": 1000.0}]
    entries += [
        # DAGER as written on a later round: defeated at the largest budget, partial at a small
        # one and a larger batch -- the worst cell is the one the claim must carry
        _cell("shelora", "oblivious", "later", 1, 0.0, budget=16),
        _cell("shelora", "oblivious", "later", 4, 0.3, budget=1),
        _cell("shelora", "adaptive", "later", 1, 1.0, budget=16),
        _cell("shelora", "oblivious", "round1", 1, 0.9, budget=16),
        _cell("shelora+first-layers", "adaptive", "later", 2, 0.02, budget=16),
        _cell("flexlora", "oblivious", "later", 1, 1.0),  # not the SHE-LoRA family: no record
        _cell("shelora", "adaptive", "later", 1, 0.0, budget=16, rank=8),  # not the documented rank
    ]
    rows = C.inversion_claims(entries)
    assert [r["accounting"].split(" on ")[0] for r in rows] == [
        "SHE-LoRA; DAGER as written (oblivious: the paper's attacker)",
        "SHE-LoRA; adaptive DAGER (knows the encrypted columns, as the server does)",
        "SHE-LoRA; DAGER as written (oblivious: the paper's attacker)",
        "shelora+first-layers; adaptive DAGER (knows the encrypted columns, as the server does)",
    ]
    paper, adaptive, round1, first = rows
    assert paper["our_value"] == 30.0 and "worst at batch 4, budget 1" in paper["note"]
    # partial is not "defeated": the paper's own accounting does not reproduce at budget 1
    assert paper["verdict"] == C.NOT_REPRODUCED and "did not evaluate" not in paper["claim"]
    assert adaptive["our_value"] == 100.0 and adaptive["verdict"] == C.NOT_REPRODUCED
    assert "did not evaluate" in adaptive["claim"] and "round 1" in round1["accounting"]
    assert first["our_value"] == 2.0 and first["verdict"] == C.REPRODUCED
    cells, row_names, cols = C.inversion_matrix(entries)
    assert row_names == ["shelora · later", "shelora · round1", "shelora+first-layers · later"]
    assert cols == ["oblivious", "adaptive"] and cells[("shelora · later", "oblivious")] == 30.0
    assert [r["verdict"] for r in C.inversion_claims(None)] == [C.NO_DATA]
    sizes = C.ciphertext_sizes(
        C.load_results(ROOT / "results" / "quick").get("encryption"), measure=False
    )
    claim_keys = [r["key"] for r in C.all_claims({"attack": entries}, sizes)]
    assert claim_keys.count("inversion_shelora") == 4


# --------------------------------------------------------------------------------------------
# the authors' CKKS setting, and the paper values kept in one place
# --------------------------------------------------------------------------------------------
def test_the_authors_ckks_setting_fails_the_product_and_ours_does_not():
    authors = C.measure_product_error(**C.AUTHORS_CKKS, rank=4, m=64)
    ours = C.measure_product_error(**C.OUR_PAPER_MODE_CKKS, rank=4, m=64)
    assert authors["max_rel_error"] > 0.1
    assert ours["max_rel_error"] < 1e-4
    (row,) = C.ckks_claims(authors, ours)
    assert row["verdict"] == C.NOT_REPRODUCED and row["our_value"] == authors["max_rel_error"]
    assert C.ckks_claims(ours, None)[0]["verdict"] == C.REPRODUCED
    assert C.ckks_claims(None, None)[0]["verdict"] == C.NO_DATA


def test_paper_values_agree_with_the_other_tables_of_the_package():
    from shelora_core.attacks.grid import PAPER_ROUGE1
    from shelora_core.he_cost import PAPER, SHAPES

    for method, by_batch in PAPER_ROUGE1.items():
        assert C.paper_rouge(method) == by_batch
    assert C.PAPER_CLAIMS["communication"].value == PAPER["upload_reduction_vs_full_he"]["v2"]
    assert (
        C.PAPER_CLAIMS["encryption_time"].value
        == PAPER["encryption_time_reduction_vs_full_he"]["v2"]
    )
    secs = PAPER["encryption_seconds_openllama_3b"]
    assert C.PAPER_CLAIMS["seconds_shelora"].value == secs["shelora"]
    assert C.PAPER_CLAIMS["seconds_full_he"].value == secs["full_he"]
    for shape in SHAPES.values():
        ours = C.MODEL_SHAPES[shape.name]
        assert ours.layer_shapes() == shape.layer_shapes()
    for c in C.PAPER_CLAIMS.values():
        assert c.source and c.unit


def test_format_value():
    assert C.format_value(None) == "-"
    assert C.format_value(-99.8125) == "-99.81"
    assert C.format_value(0.0) == "0.00"
    assert C.format_value(7.7e-6) == "7.7e-06"


# --------------------------------------------------------------------------------------------
# claims.json and the README agree
# --------------------------------------------------------------------------------------------
def _readme_claims() -> dict[str, list[dict[str, str]]]:
    """The README's claims block parsed back: profile -> rows (column -> cell text)."""
    text = (ROOT / "README.md").read_text()
    start, end = text.index("<!-- claims:start -->"), text.index("<!-- claims:end -->")
    out: dict[str, list[dict[str, str]]] = {}
    profile = None
    for line in text[start:end].splitlines():
        if line.startswith("**Profile `"):
            profile = line.split("`")[1]
            out[profile] = []
        elif line.startswith("| ") and profile and not line.startswith("| claim |"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            out[profile].append(dict(zip(reproduce.CLAIM_COLUMNS, cells, strict=True)))
    return out


def test_readme_claims_table_agrees_with_claims_json():
    parsed = _readme_claims()
    files = {p: ROOT / "results" / p / "claims.json" for p in ("quick", "paper")}
    present = {p: f for p, f in files.items() if f.exists()}
    assert present, "no results/<profile>/claims.json: run python reproduce.py --only 07"
    assert set(parsed) == set(present)
    for profile, path in present.items():
        records = json.loads(path.read_text())
        rows = parsed[profile]
        assert len(rows) == len(records), profile
        for row, rec in zip(rows, records, strict=True):
            assert row["claim"] == rec["claim"]
            assert row["accounting"] == rec["accounting"]
            assert row["verdict"] == f"**{rec['verdict']}**"
            assert row["unit"] == rec["unit"]
            for col, key in (("paper", "paper_value"), ("ours", "our_value")):
                if rec[key] is None:
                    assert row[col] == "-"
                else:
                    assert float(row[col]) == pytest.approx(rec[key], rel=0.01, abs=0.006)
            assert rec["verdict"] in C.VERDICTS


def test_readme_has_no_stale_typed_cost_numbers_and_its_blocks_are_current():
    text = (ROOT / "README.md").read_text()
    for stale in ("40-85 s", "0.1-1.2 s", "~14 s here"):
        assert stale not in text
    results = ROOT / "results"
    for start, end, body in (
        (reproduce.CLAIMS_START, reproduce.CLAIMS_END, reproduce.claims_block(results)),
        (reproduce.PROTECTION_START, reproduce.PROTECTION_END, reproduce.protection_notes(results)),
    ):
        block = text[text.index(start) + len(start) : text.index(end)]
        assert block.strip() == body.strip(), f"{start}: run python reproduce.py --readme"


def test_cost_notes_are_computed_from_he_cost_json():
    row = {
        "model": "OpenLLaMA-3B",
        "ranks": [8, 16, 32],
        "budgets": [2, 4, 8],
        "upload_bytes": 50.0,
        "encrypted_values_per_client": 1.0,
        "server_seconds_per_round": 2.5,
        "client_upload_seconds": 0.6,
        "upload_change_vs_full_he_pct": -94.25,
        "encrypt_time_change_vs_full_he_pct": -95.5,
        "upload_vs_flexlora_x": 2.0,
    }
    data = {
        "rows": [
            {**row, "method": "shelora-delta"},
            {
                **row,
                "method": "shelora-paper",
                "upload_bytes": 100.0,
                "server_seconds_per_round": 61.0,
            },
            {**row, "method": "flexlora", "upload_bytes": 18.0},
            {**row, "method": "full_he", "client_upload_seconds": 12.34},
        ]
    }
    notes = "\n".join(reproduce.cost_notes(data))
    assert "-94.2% upload" in notes and "-95.5% client encryption time" in notes
    assert "about 32 bytes" in notes  # (50 - 18) bytes / 1 encrypted value
    assert "2.0x the upload of delta mode" in notes and "61.0 s of server time" in notes
    assert "12.3 s here" in notes and "far below" in notes
    # which full HE the rows measured comes from their full_he_layout (none: zero-padded)
    assert "against full HE zero-padded to r_max**" in notes
    own = {**data, "rows": [{**r, "full_he_layout": "own-rank"} for r in data["rows"]]}
    notes = "\n".join(reproduce.cost_notes(own))
    assert "against full HE at each client's own rank**" in notes
    assert "Against full HE zero-padded to r_max (an ablation, counted)" in notes
    assert (
        "12.3 s here, at each client's own rank" in notes and "zero-padded to r_max," not in notes
    )


def test_padding_note_names_the_layout_of_he_cost_json(tmp_path):
    rows = C.cost_claims(_he_cost("own-rank"), SIZES)
    (tmp_path / "he_cost.json").write_text(json.dumps(_he_cost("own-rank")))
    note = reproduce.padding_note(rows, tmp_path)
    assert note.startswith("Our `full_he` and `fedshield` encrypt each client's factors at its own")
    assert "(an ablation, counted from shapes) they would encrypt 1.71x" in note
    assert "-94.00% (measured)" in note  # the measured row of the own definition
    padded = _by_definition(rows, "communication", "padded")[0]["our_value"]
    assert f"by {padded:+.2f}% (counted from shapes) against the zero-padded one" in note
    (tmp_path / "he_cost.json").write_text(json.dumps(_he_cost(None)))
    legacy = reproduce.padding_note(C.cost_claims(_he_cost(None), SIZES), tmp_path)
    assert legacy.startswith("Zero-padding to r_max: at ranks 8/16/32 our `full_he`")
    assert "by -94.00% (measured) against the zero-padded one" in legacy


# --------------------------------------------------------------------------------------------
# the notebook, headless
# --------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_quick_profile_executes_notebook_07_and_records_the_claims(tmp_path):
    src = ROOT / "results" / "quick"
    dst = tmp_path / "quick"
    dst.mkdir()
    for p in src.glob("*.json"):
        if p.name != "claims.json":
            shutil.copy(p, dst / p.name)
    if (src / "federated_tuning").exists():
        shutil.copytree(src / "federated_tuning", dst / "federated_tuning")
    cmd = [sys.executable, str(ROOT / "reproduce.py"), "--profile", "quick", "--only", "07",
           "--results-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    claims = json.loads((dst / "claims.json").read_text())
    assert {c["verdict"] for c in claims} <= set(C.VERDICTS)
    # recorded values: the measured reduction (against the full HE of he_cost.json's layout) is
    # he_cost.json's, DAGER's is attack.json's
    he_cost = json.loads((src / "he_cost.json").read_text())
    want = next(
        r["upload_change_vs_full_he_pct"]
        for r in he_cost["rows"]
        if r.get("model") == "OpenLLaMA-3B" and r.get("method") == "shelora-delta"
    )
    label = C.FULL_HE_DEFINITIONS[C.measured_definition(he_cost)][2]
    measured = next(
        c for c in claims
        if c["key"] == "communication" and c["basis"] == "measured (make bench)"
    )  # fmt: skip
    assert f"vs {label};" in measured["accounting"]
    assert measured["our_value"] == pytest.approx(want)
    attack = json.loads((src / "attack.json").read_text())
    she = [
        e for e in C.documented_attack_rows(attack)
        if e["method"] == "shelora" and e["attacker"] == "adaptive" and e["update"] == "later"
    ]  # fmt: skip
    ada = next(c for c in claims if c["accounting"].startswith("adaptive attacker"))
    assert ada["our_value"] in {100 * e["rouge1"] for e in she}
    ckks = next(c for c in claims if c["key"] == "authors_ckks")
    assert ckks["our_value"] > 0.1 and ckks["verdict"] == C.NOT_REPRODUCED
    # the qualified inversion claim carries the worst cell of the same threat
    inv = next(
        c for c in claims
        if c["key"] == "inversion_shelora" and c["accounting"].startswith("SHE-LoRA; adaptive")
        and "a later round" in c["accounting"]
    )  # fmt: skip
    assert inv["our_value"] == max(100 * e["rouge1"] for e in she)
    for name in ("07_accuracy", "07_cost_accountings", "07_dager", "07_cost_vs_model_size",
                 "07_inversion"):  # fmt: skip
        assert (dst / "figures" / f"{name}.png").stat().st_size > 10_000


def test_federated_tuning_runs_prefers_notebook_05s_record_then_the_finished_runs(tmp_path):
    assert C.federated_tuning_runs(tmp_path) == ([], None)
    runs = tmp_path / "federated_tuning"
    runs.mkdir()
    for name in ("b", "a"):
        (runs / f"{name}.summary.json").write_text(json.dumps({"run_name": name}))
    (runs / "a.jsonl").write_text("{}\n")  # per-round rows are not summaries
    got, source = C.federated_tuning_runs(tmp_path)
    assert [r["run_name"] for r in got] == [
        "a",
        "b",
    ] and source == "federated_tuning/*.summary.json"
    assert C.load_results(tmp_path)["sources"]["federated_tuning"] == source
    (tmp_path / "federated_tuning.json").write_text(json.dumps([{"run_name": "all"}]))
    assert C.federated_tuning_runs(tmp_path) == ([{"run_name": "all"}], "federated_tuning.json")
    (tmp_path / "federated_tuning.json").write_text("{not json")
    with pytest.raises(C.SheloraError, match="federated_tuning.json is not valid JSON"):
        C.federated_tuning_runs(tmp_path)


def test_runs_of_an_earlier_results_version_are_stale_and_left_out(tmp_path):
    from shelora_core.records import results_version

    runs = tmp_path / "federated_tuning"
    runs.mkdir()
    current = results_version("fedshield")
    for name, version in (("old", current - 1), ("new", current)):
        (runs / f"{name}.summary.json").write_text(
            json.dumps({"run_name": name, "method": "fedshield"})
        )
        rows = [{"round": r, "results_version": version} for r in (1, 2)]
        (runs / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert C.stale_runs(tmp_path) == ["old"]
    got, _ = C.federated_tuning_runs(tmp_path)
    assert [r["run_name"] for r in got] == ["new"]
