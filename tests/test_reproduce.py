"""reproduce.py runs the notebooks headlessly (papermill) and records results."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reproduce

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, only, *extra):
    cmd = [
        sys.executable,
        str(ROOT / "reproduce.py"),
        "--profile",
        "quick",
        "--only",
        only,
        "--results-dir",
        str(tmp_path),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


#: tiny federations for the sensitivity / negotiation notebooks (2 clients, short texts)
TINY_CLIENTS = [
    "num_clients=2",
    "train_examples=120",
    "eval_examples=32",
    "min_client_examples=10",
    "max_length=32",
]


def _sets(*items):
    return [a for s in items for a in ("--set", s)]


@pytest.mark.smoke
def test_quick_profile_executes_notebook_01_and_records_sensitivity(tmp_path):
    proc = _run(
        tmp_path,
        "01",
        *_sets(
            *TINY_CLIENTS,
            "minilm_sizes=(8,16)",
            "smollm2_sizes=(4,)",
            "smollm2_clients=1",
            "ks=(2,4,8)",
            "train_steps=2",
        ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads((tmp_path / "quick" / "sensitivity.json").read_text())
    assert set(rec["models"]) == {"minilm", "smollm2"}
    mini = rec["models"]["minilm"]
    assert mini["width"] == 384 and mini["layers"] == 6 and mini["reference_size"] == 16
    assert set(mini["client_overlap"]) == {"2", "4", "8"}
    for k, v in mini["client_overlap"].items():
        assert mini["random_overlap"][k] == pytest.approx(int(k) / 384)
        assert mini["random_overlap"][k] < v <= 1
    for layer in mini["massive"].values():
        assert layer["share"] > 2 * layer["uniform_share"]
    assert mini["calibration_overlap"]["16"] == 1.0
    assert all(0 <= v <= 1 for v in mini["variant_overlap"].values())
    assert rec["models"]["smollm2"]["width"] == 576
    assert rec["models"]["smollm2"]["client_overlap_matrix"] is None  # one client: no pairs
    assert rec["after_training"]["train_steps"] == 2 and rec["after_training"]["rel_change_A"] > 0
    assert rec["meta"]["versions"]["torch"].startswith("2.13.0")
    for name in ("sensitivity_spectra_minilm", "sensitivity_client_overlap"):
        assert (tmp_path / "quick" / "figures" / f"{name}.png").stat().st_size > 10_000


@pytest.mark.smoke
def test_quick_profile_executes_notebook_02_and_records_negotiation(tmp_path):
    proc = _run(
        tmp_path,
        "02",
        *_sets(
            *TINY_CLIENTS,
            "calibration_examples=16",
            "wide_budgets=(4,8)",
            "random_seeds=1",
            "leakage_keys=1",
            "public_examples=16",
        ),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads((tmp_path / "quick" / "negotiation.json").read_text())
    assert [c["budget"] for c in rec["clients"]] == [2, 4]
    assert len(rec["cost"]["proposal_bytes"]) == 2 and rec["cost"]["broadcast_bytes"] > 0
    for layer, cols in rec["columns"].items():  # one ordered list of the largest budget per layer
        assert len(cols) == 4 and len(set(cols)) == 4 and all(0 <= j < 384 for j in cols)
        assert [t["budget"] for t in rec["tiers"][layer]] == [2, 4]
        for t in rec["tiers"][layer]:
            assert 0 <= t["a"] <= 1 and 0 <= t["b"] <= 1 - t["a"] + 1e-9
    assert set(rec["coverage_per_client"]) == {"0", "1"}
    assert all(0 <= v <= 1 for v in rec["coverage_per_client"].values())
    assert all(0 <= v <= 1 for v in rec["risk_per_client"].values())
    assert rec["grid_vs_random"]["main"]["tier1_random_better"] == 0
    assert rec["edge_cases"]["identical_proposals"] == {"coverage": [1.0], "risk": [0.0]}
    assert rec["edge_cases"]["single_client"]["coverage"] == 1.0
    assert rec["edge_cases"]["budget_zero"]["prefix_length"] == 0
    assert "lower its HE budget" in rec["edge_cases"]["budget_above_width"]
    leak = rec["ope_leakage"]
    assert leak["exact_hit_rate_random_guess"] == pytest.approx(1 / 384)
    for v in leak["all_columns"].values():
        assert v["mae"] < 0.25 * v["mae_random_guess"] and 0 <= v["exact_hit_rate"] < 0.5
    assert 0 <= rec["public_model_guess"]["hit_rate"] <= 1
    assert rec["meta"]["versions"]["torch"].startswith("2.13.0")
    assert (tmp_path / "quick" / "figures" / "negotiation_ope_leakage.png").stat().st_size > 10_000


@pytest.mark.smoke
def test_a_failing_notebook_exits_nonzero_naming_notebook_and_cell(tmp_path):
    proc = _run(tmp_path, "05", "--set", "dirichlet_alpha=-1")
    assert proc.returncode != 0
    assert "05_federated_tuning.ipynb" in proc.stderr and "cell" in proc.stderr
    assert "dirichlet_alpha" in proc.stderr


def test_unknown_notebook_filter_exits_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "reproduce.py"),
            "--only",
            "99_nothing",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no notebook matches" in proc.stderr


def test_set_values_reach_notebooks_as_literals_tuples_as_lists():
    got = reproduce.parse_sets(["ranks=(8, 16)", "rounds=2", "name=abc", "nested={'a': (1, (2,))}"])
    assert got == {"ranks": [8, 16], "rounds": 2, "name": "abc", "nested": {"a": [1, [2]]}}


def test_readme_table_lists_finished_runs_from_their_summaries_until_the_notebook_json_exists(
    tmp_path,
):
    run = {
        "variant": "flexlora",
        "method": "flexlora",
        "model": "minilm",
        "ranks": [8, 16, 32],
        "partition": "dirichlet(0.3)",
        "num_clients": 10,
        "rounds": 20,
        "local_steps": 15,
        "final_accuracy": 0.7881,
        "best_accuracy": 0.79,
        "final_macro_f1": 0.787,
        "upload_bytes_per_client": 619_000,
        "upload_bytes_per_round": 3_095_000,
        "seconds_per_client_round": 12.34,
        "meta": {"git_commit": "abcdef1234567890", "torch_threads": 1},
    }
    (tmp_path / "federated_tuning").mkdir()
    (tmp_path / "federated_tuning" / "a.summary.json").write_text(json.dumps(run))
    row = "| flexlora | minilm | 8/16/32 | dirichlet(0.3) | 10 | 20 x 15 | 0.788 | 0.790 | 0.787 | 619 | 12.3 (1) |"
    table = reproduce.results_table(tmp_path)
    assert "the 1 runs of notebook 05's grid finished so far" in table and row in table
    assert "abcdef123456" in table
    # once notebook 05 has written its JSON, that is the source (and the summaries are not read)
    other = {**run, "meta": {"git_commit": "0123456789abcdef", "torch_threads": 2}}
    (tmp_path / "federated_tuning.json").write_text(
        json.dumps([{**run, "final_accuracy": 0.5}, other])
    )
    table = reproduce.results_table(tmp_path)
    assert "finished so far" not in table and "| 0.500 | 0.790 |" in table
    # reused runs keep their own commits: the header names every one, not the first run's
    assert "the 2 runs of notebook 05" in table
    assert "commit(s) 0123456789ab, abcdef123456" in table


# --- failures of any kind end in one FAILED line (issue 12, item 10) ------------------------

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
PARAMETERS = "profile = 'quick'\nresults_dir = ''\noverrides = {}"


def _notebook(path: Path, cells: list[str], *, parameters: bool = True, ids: bool = True) -> Path:
    """A notebook of a markdown title, a parameters cell (tagged, if ``parameters``), then
    ``cells``: code, or markdown when the text starts with ``"# "``."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    params = new_code_cell(PARAMETERS)
    if parameters:
        params.metadata["tags"] = ["parameters"]
    body = [new_markdown_cell(c) if c.startswith("# ") else new_code_cell(c) for c in cells]
    nb = new_notebook(
        cells=[new_markdown_cell("# A tiny notebook"), params, *body],
        metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}},
    )
    if not ids:  # an nbformat 4.4 notebook: cells have no ids
        nb.nbformat_minor = 4
        for c in nb.cells:
            del c["id"]
    nbformat.write(nb, str(path))
    return path


def _run_one(tmp_path: Path, nb: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "reproduce.py"), "--notebook", str(nb)]
    cmd += ["--results-dir", str(tmp_path / "results"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _failed_line(proc: subprocess.CompletedProcess) -> str:
    """The FAILED line, checking it is the only one, the last line of stderr, and that
    nothing dumped a traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    everything = (proc.stdout + proc.stderr).splitlines()
    assert sum(line.startswith("FAILED:") for line in everything) == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("FAILED:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return last


#: (id, cells after the title and parameters cell, options, 1-based source number of the
#: failing cell, what the line must say)
FAILURES = [
    (
        "raises",
        ["x = 1", "# a markdown cell", "raise ValueError('boom\\nsecond line')", "print(x)"],
        {},
        5,
        "ValueError: boom second line",
    ),
    (
        "raises_without_parameters_tag",
        ["x = 1", "raise KeyError('missing')"],
        {"parameters": False},
        4,
        "KeyError: 'missing'",
    ),
    ("raises_without_cell_ids", ["x = 1", "1 / 0"], {"ids": False}, 4, "ZeroDivisionError"),
    ("os_exit", ["x = 1", "import os\nos._exit(1)", "print(x)"], {}, 4, "DeadKernelError"),
    (
        "sigkill",
        ["import os, signal", "# killed like the OOM killer does", "os.kill(os.getpid(), 9)"],
        {},
        5,
        "DeadKernelError",
    ),
]


@pytest.mark.parametrize(
    ("cells", "options", "number", "says"),
    [f[1:] for f in FAILURES],
    ids=[f[0] for f in FAILURES],
)
def test_a_failing_notebook_ends_in_one_failed_line_with_the_source_cell(
    tmp_path, cells, options, number, says
):
    nb = _notebook(tmp_path / "tiny.ipynb", cells, **options)
    total = len(cells) + 2
    line = _failed_line(_run_one(tmp_path, nb))
    assert line.startswith(f"FAILED: notebook tiny.ipynb, cell {number} of {total} (1-based")
    assert says in line
    copy = tmp_path / "results" / "quick" / "notebooks" / "tiny.ipynb"
    assert str(copy) in line and copy.exists()


def test_a_cell_over_the_timeout_fails_the_notebook_naming_the_cell_and_the_timeout(tmp_path):
    nb = _notebook(tmp_path / "slow.ipynb", ["import time", "time.sleep(120)", "print('never')"])
    t0 = time.perf_counter()
    proc = _run_one(tmp_path, nb, "--cell-timeout", "2")
    assert time.perf_counter() - t0 < 60
    line = _failed_line(proc)
    assert line.startswith("FAILED: notebook slow.ipynb, cell 4 of 5 (1-based")
    assert "CellTimeoutError" in line and "--cell-timeout 2 s" in line


def test_a_notebook_that_ends_passes_with_a_cell_timeout(tmp_path):
    nb = _notebook(tmp_path / "ok.ipynb", ["x = 1 + 1", "assert x == 2"])
    proc = _run_one(tmp_path, nb, "--cell-timeout", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout + proc.stderr
    assert (tmp_path / "results" / "quick" / "notebooks" / "ok.ipynb").exists()


@pytest.mark.parametrize("bad", ["0", "-5", "soon"])
def test_cell_timeout_must_be_a_positive_number_of_seconds(tmp_path, bad):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "reproduce.py"), "--cell-timeout", bad, "--list"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--cell-timeout" in proc.stderr


def test_failure_line_in_the_injected_parameters_cell_and_before_any_cell(tmp_path):
    """Without a kernel: an executed copy whose injected parameters cell failed, and none."""
    import nbformat
    from nbclient.exceptions import DeadKernelError
    from nbformat.v4 import new_code_cell

    nb = _notebook(tmp_path / "src.ipynb", ["x = 1"])
    executed = nbformat.read(str(nb), as_version=4)
    injected = new_code_cell("overrides = {}")
    injected.metadata["tags"] = ["injected-parameters"]
    executed.cells.insert(2, injected)
    for i, cell in enumerate(executed.cells):
        cell.metadata["papermill"] = {"start_time": "2026-01-01T00:00:00" if i <= 2 else None}
    out = tmp_path / "out.ipynb"
    nbformat.write(executed, str(out))
    line = reproduce.failure_line(nb, out, DeadKernelError("Kernel died"))
    assert line.startswith(
        "FAILED: notebook src.ipynb, in the parameters cell papermill injected after source "
        "cell 2 of 3 (1-based"
    )
    line = reproduce.failure_line(
        nb, tmp_path / "missing.ipynb", RuntimeError("kernel failed\nto start")
    )
    assert line == (
        "FAILED: notebook src.ipynb, before any cell ran: RuntimeError: kernel failed; "
        "no executed copy was written"
    )


def test_an_unknown_set_key_fails_before_any_notebook_starts_with_a_did_you_mean(tmp_path):
    import time

    t0 = time.perf_counter()
    proc = _run(tmp_path, "05", "--set", "round=1", "--set", "rounds=1")
    assert time.perf_counter() - t0 < 30  # no kernel was started (it used to take ~33 s)
    assert proc.returncode != 0 and "started" not in proc.stdout
    assert "--set: unknown override(s) ['round']" in proc.stderr
    assert "did you mean 'rounds' for 'round'?" in proc.stderr
    assert not (tmp_path / "quick").exists()


def test_set_keys_are_checked_against_the_selected_notebooks_settings():
    nbs = {p.name[:2]: p for p in reproduce.notebooks(None)}
    known = set(reproduce.config_field_names()) | reproduce.notebook_override_keys(nbs["01"])
    assert reproduce.parse_sets(["ks=(2,4)", "rounds=1"], known) == {"ks": [2, 4], "rounds": 1}
    with pytest.raises(SystemExit, match=r"did you mean 'reps' for 'rep'\?"):
        reproduce.parse_sets(["rep=2"], set(reproduce.notebook_override_keys(nbs["03"])))
    # each notebook receives the config fields and its own settings, not another notebook's
    sets = {"ks": [2, 4], "reps": 2, "rounds": 1}
    assert reproduce.notebook_overrides(nbs["01"], sets) == {"ks": [2, 4], "rounds": 1}
    assert reproduce.notebook_overrides(nbs["03"], sets) == {"reps": 2, "rounds": 1}
    assert reproduce.notebook_overrides(nbs["05"], sets) == {"rounds": 1}


def test_progress_relay_prints_only_marked_lines_prefixed_with_the_notebook(monkeypatch):
    import io

    out = io.StringIO()
    relay = reproduce.ProgressRelay("05", out)
    mark = reproduce.PROGRESS_MARK
    relay.write("a table row\n" + mark + "run 1/15 shelora-delta-withhold r=8/16/32 ")
    relay.write("minilm: round 1/3, loss 0.5\nanother row\n")
    relay.write(f"{mark}half a line")
    relay.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("    05   0:00  ")
    assert lines[0].endswith(
        "run 1/15 shelora-delta-withhold r=8/16/32 minilm: round 1/3, loss 0.5"
    )
    relay.write("\n")  # the line completes
    assert out.getvalue().splitlines()[-1].endswith("half a line")


def _membership_row(setting, method, auc, accuracy=0.7):
    return {"setting": setting, "method": method, "accuracy": accuracy,
            "loss_attack": {"auc": auc}}  # fmt: skip


@pytest.mark.parametrize("agree", [True, False])
def test_the_protection_section_reads_membership_inference_from_its_record(tmp_path, agree):
    assert reproduce.membership_notes(tmp_path) == []  # no record: no bullet
    rows = [
        _membership_row("overfit", "flexlora", 0.7123),
        _membership_row("overfit", "shelora-delta", 0.7123 if agree else 0.5),
        _membership_row("overfit", "flexlora-dp", 0.5123, accuracy=0.55),
    ]
    rec = {"rows": rows, "meta": {"git_commit": "abc123"},
           "checks": [{"agree": agree}]}  # fmt: skip
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "membership.json").write_text(json.dumps(rec))
    (line,) = reproduce.membership_notes(tmp_path)
    assert (
        "AUC 0.71 against FlexLoRA" in line and "0.51 against flexlora-dp (accuracy 0.55)" in line
    )
    assert ("does not protect the released model" in line) == agree
    assert ("do NOT match" in line) == (not agree)


def test_the_protection_section_reads_the_tradeoff_record(tmp_path):
    assert reproduce.tradeoff_notes(tmp_path) == []  # no record: nothing
    row = {
        "variant": "shelora-dp-delta", "final_accuracy": 0.5637, "stopped_round": 7,
        "upload_bytes_per_client": 6.0e6, "epsilon_server": 30.1, "rouge1_round1_dager": 0.0,
        "rouge1_round1_strong": 0.0, "rouge1_later_dager": 0.0, "rouge1_later_strong": None,
    }  # fmt: skip
    setting = {"budget": None, "dp_sigma": 1e-8, "dp_epsilon": None, "secret_init": False,
               "upload_bytes": 35.4e6, "epsilon_one_round": 1.0e17}  # fmt: skip
    rec = {
        "profile": "quick",
        "meta": {"git_commit": "abc123"},
        "rows": [row],
        "cheapest": [
            {"method": "flexlora-dp", "threshold": 0.1, "cheapest": setting, "settings": [setting]},
            {"method": "shelora", "threshold": 0.1, "cheapest": None,
             "settings": [{**setting, "budget": k, "dp_sigma": None} for k in (1, 4)]},
        ],
    }  # fmt: skip
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "tradeoff.json").write_text(json.dumps(rec))
    text = "\n".join(reproduce.tradeoff_notes(tmp_path))
    assert (
        "| shelora-dp-delta | 0.564 (stopped: round 7) | 6000 | 30.1 | 0.00 / 0.00 | 0.00 / - |"
        in text
    )
    assert "`flexlora-dp`: noise multiplier 1e-08, one round accounts to epsilon 1e+17" in text
    assert "`shelora`: no attacked setting (budgets 1/4)" in text
    assert "no privacy guarantee" in text and "commit abc123" in text


def test_the_protection_section_reports_multi_step_sgd_the_b_channel_and_the_optimisation_attack():
    def row(method, attacker, update, bs, rouge1):
        return {
            "method": method,
            "attacker": attacker,
            "update": update,
            "batch_size": bs,
            "rouge1": rouge1,
        }

    assert reproduce._other_attack_notes([row("flexlora", "oblivious", "later", 1, 1.0)]) == []
    rows = [
        row("flexlora", "oblivious", "multistep-sgd", 1, 1.0),
        row("shelora", "adaptive", "multistep-sgd", 4, 0.75),
        row("shelora", "b-channel", "round1", 1, 0.5),
        row("shelora", "b-channel", "later", 1, 1.0),
        row("shelora", "b-channel", "later", 8, 0.125),
        row("flexlora", "optimisation", "later", 1, 0.25),
    ]
    sgd, bch, opt = reproduce._other_attack_notes(rows)
    assert "flexlora / oblivious 1.00; shelora / adaptive 0.75" in sgd
    assert (
        "0.50 in round 1 and 1.00 in later rounds (later rounds by batch size 1/8: 1.00/0.12)"
        in bch
    )
    assert "0.25 against flexlora" in opt and "next to nothing" not in opt  # 25 % is not nothing
