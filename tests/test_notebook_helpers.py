"""shelora_core.notebook: the cell helpers the notebooks share (fast: no model is loaded)."""

import ast
import doctest
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from shelora_core import notebook
from shelora_core.ckks import lora_like
from shelora_core.errors import ConfigError
from shelora_core.notebook import (
    METRICS_MIME,
    PROGRESS_MARK,
    attack_override_keys,
    best_time,
    check_override_keys,
    config_field_names,
    notebook_override_keys,
    parse_overrides,
    progress,
    read_notebook,
    results_paths,
    round_printer,
    scratch_dir,
    settings,
    settings_table,
    show,
    store_metadata,
    to_json,
    write_json,
)
from shelora_core.profiles import profile_config

ROOT = Path(__file__).resolve().parent.parent
TABLE = {
    "quick": {"sizes": (16, 32), "k": 8, "config": {"num_clients": 6}},
    "paper": {"sizes": (16, 32, 64), "k": 8, "config": {"num_clients": 10}},
}


# --- to_json / write_json ---------------------------------------------------------------------


def test_to_json_turns_nan_and_infinity_into_none():
    got = to_json({"a": math.nan, "b": [np.float64("inf"), -math.inf, np.float32("nan")], "c": 1.5})
    assert got == {"a": None, "b": [None, None, None], "c": 1.5}


def test_to_json_turns_numpy_scalars_into_python_scalars_of_the_same_kind():
    got = to_json([np.int64(3), np.float32(0.5), np.float64(0.25), np.bool_(True), np.str_("x")])
    assert got == [3, 0.5, 0.25, True, "x"]
    assert [type(v) for v in got] == [int, float, float, bool, str]


def test_to_json_recurses_into_mappings_tuples_and_arrays_with_str_keys():
    record = {1: (np.int32(2), {np.int64(3): np.array([[1.0, np.nan]])}), "s": "text", "n": None}
    assert to_json(record) == {"1": [2, {"3": [[1.0, None]]}], "s": "text", "n": None}


def test_to_json_output_is_strict_json():
    text = json.dumps(to_json({"x": [np.float32(1e-3), math.nan, np.int8(-1)]}), allow_nan=False)
    assert json.loads(text) == {"x": [pytest.approx(1e-3), None, -1]}


def test_write_json_writes_indented_strict_json_and_returns_the_path(tmp_path):
    record = {"seed": 0, "err": np.float64(1e-8), "missing": math.nan, "sizes": (4096, 8192)}
    out = write_json(record, tmp_path / "r.json")
    assert out == tmp_path / "r.json"
    text = out.read_text()
    assert text == json.dumps(
        {"seed": 0, "err": 1e-8, "missing": None, "sizes": [4096, 8192]}, indent=1
    )
    assert "NaN" not in text


def test_write_json_matches_the_notebooks_former_writers_on_their_records(tmp_path):
    # notebooks 01, 02 and 04 wrote json.dumps(record, indent=1, default=float) and 03 / 06
    # json.dumps(clean(record), indent=1, allow_nan=False): same text for finite records
    record = {
        "settings": {"ks": (2, 4), "k": 8},
        "share": np.float64(0.123456789),
        "f32": np.float32(0.1),
        "rows": [{"layer": "q", "ratio": 1 / 3}],
        "by_size": {"16": 0.5},
    }
    old = json.dumps(record, indent=1, default=float)
    assert write_json(record, tmp_path / "r.json").read_text() == old


# --- overrides and settings -------------------------------------------------------------------


def test_parse_overrides_reads_tuples_lists_and_dicts_back_from_their_string_form():
    given = {"ks": "(2, 4)", "sizes": "[8]", "nested": "{'a': (1, (2,))}", "name": "shelora"}
    got = parse_overrides(given)
    assert got == {"ks": (2, 4), "sizes": [8], "nested": {"a": (1, (2,))}, "name": "shelora"}
    assert given["ks"] == "(2, 4)"  # the input is not modified


def test_parse_overrides_passes_values_that_are_not_literal_strings():
    given = {"rounds": 1, "ranks": [8, 16], "lr": 1e-3, "partition": "dirichlet", "x": None}
    assert parse_overrides(given) == given


def test_parse_overrides_names_an_override_that_does_not_parse():
    with pytest.raises(ValueError, match=r"override ks='\(2, 4' .*does not parse"):
        parse_overrides({"ks": "(2, 4"})


def test_settings_returns_a_copy_of_the_profile_without_overrides():
    s, config = settings("paper", TABLE)
    assert s == TABLE["paper"] and config == {}
    s["k"] = 99
    assert TABLE["paper"]["k"] == 8


def test_settings_names_the_unknown_profile_and_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown profile 'fast'; choose one of \['paper', 'quick'\]"
    ):
        settings("fast", TABLE)


def test_settings_applies_setting_overrides_and_returns_config_overrides_apart():
    s, config = settings("quick", TABLE, {"sizes": "(4,)", "num_clients": 2, "ranks": "(8, 16)"})
    assert s["sizes"] == (4,) and s["k"] == 8
    assert config == {"num_clients": 2, "ranks": (8, 16)}
    # the config overrides are what profile_config takes
    assert profile_config("quick", **config).ranks == (8, 16)


def test_settings_names_the_unknown_override_and_the_allowed_settings():
    with pytest.raises(ValueError) as err:
        settings("quick", TABLE, {"k": 4, "sizez": (8,), "nope": 1})
    msg = str(err.value)
    assert "unknown override(s) ['nope', 'sizez']" in msg
    assert "FederatedConfig fields or one of ['config', 'k', 'sizes']" in msg


def test_settings_refuses_to_override_a_fixed_setting_and_does_not_offer_it():
    with pytest.raises(
        ValueError, match=r"\['config'\]: use FederatedConfig fields or one of \['k', 'sizes'\]"
    ):
        settings("quick", TABLE, {"config": {"num_clients": 2}}, fixed=("config",))
    s, config = settings("quick", TABLE, {"num_clients": 2}, fixed=("config",))
    assert s["config"] == {"num_clients": 6} and config == {"num_clients": 2}


def test_settings_with_explicit_config_fields():
    s, config = settings("quick", TABLE, {"k": 2}, config_fields=())
    assert s["k"] == 2 and config == {}
    with pytest.raises(ValueError, match=r"\['rounds'\]: use one of \['config', 'k', 'sizes'\]"):
        settings("quick", TABLE, {"rounds": 1}, config_fields=())


def test_config_field_names_are_the_federated_config_fields():
    names = config_field_names()
    assert {"num_clients", "ranks", "he_budgets", "seed"} <= names
    assert "sizes" not in names


def test_settings_table_lists_settings_then_config_fields():
    cfg = profile_config("quick", num_clients=2)
    table = settings_table(TABLE["quick"], cfg, ("num_clients", "ranks"), skip=("config",))
    assert isinstance(table, pd.DataFrame) and table.index.name == "setting"
    assert table["value"].to_dict() == {
        "sizes": "(16, 32)",
        "k": "8",
        "config.num_clients": "2",
        "config.ranks": str(cfg.ranks),
    }
    assert list(settings_table({"a": 1}).index) == ["a"]


# --- folders, figures, timing -----------------------------------------------------------------


def test_results_paths_creates_the_figures_folder(tmp_path):
    results, figures = results_paths(str(tmp_path / "quick"))
    assert results == tmp_path / "quick" and figures == results / "figures"
    assert figures.is_dir()
    assert results_paths(results) == (results, figures)  # again: no error


@pytest.mark.filterwarnings("ignore:.*non-interactive:UserWarning")
def test_show_saves_the_png_prints_its_path_and_closes_the_figure(tmp_path, capsys):
    plt.switch_backend("agg")  # headless: plt.show() does nothing
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert show(fig, "line", tmp_path) is None
    path = tmp_path / "line.png"
    assert path.stat().st_size > 1000
    assert capsys.readouterr().out == f"figure: {path}\n"
    assert not plt.fignum_exists(fig.number)


def test_best_time_returns_the_shortest_time_and_the_last_result():
    calls = []

    def fn():
        calls.append(len(calls))
        return len(calls)

    seconds, out = best_time(fn, 3)
    assert calls == [0, 1, 2] and out == 3
    assert 0 <= seconds < 1
    with pytest.raises(ValueError, match="at least 1"):
        best_time(fn, 0)


def test_lora_like_is_public_and_seeded():
    x = lora_like(np.random.default_rng(0), 1000)
    assert x.shape == (1000,) and np.array_equal(x, lora_like(np.random.default_rng(0), 1000))
    assert np.sum(np.abs(x) > 0.2) <= 10  # the 1% outliers; N(0, 0.02) stays far below


def test_module_example_runs():
    assert doctest.testmod(notebook).failed == 0


# --- the notebooks use the package, they do not copy it ---------------------------------------


def _notebook_code(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _package_functions() -> set[str]:
    names = set()
    for py in (ROOT / "shelora_core").rglob("*.py"):
        tree = ast.parse(py.read_text())
        names |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=str)
def test_no_notebook_defines_a_function_the_package_has(path):
    package = _package_functions() | {"clean", "jsonable"}  # the former JSON writers too
    defined = {
        node.name
        for code in _notebook_code(path)
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.FunctionDef)
    }
    assert not defined & package, f"{path.name} re-implements {sorted(defined & package)}"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=str)
def test_notebooks_write_their_json_and_figures_through_the_package(path):
    code = "\n".join(_notebook_code(path))
    assert "from shelora_core.notebook import" in code
    assert "write_json(" in code and "json.dumps" not in code
    assert "results_paths(results_dir, profile)" in code and ".mkdir(" not in code


# --- overrides as text, checked keys, did-you-mean --------------------------------------------


@pytest.mark.parametrize(
    "text", ['{"rounds": 1, "ranks": [8, 16]}', "{'rounds': 1, 'ranks': (8, 16)}", "  "]
)
def test_parse_overrides_accepts_the_json_or_literal_text_papermill_passes(text):
    got = parse_overrides(text)
    assert got == ({} if not text.strip() else {"rounds": 1, "ranks": got["ranks"]})
    if text.strip():
        assert list(got["ranks"]) == [8, 16]
    assert parse_overrides(None) == {}


def test_parse_overrides_names_text_that_is_not_a_dict_and_how_to_write_it():
    with pytest.raises(ConfigError, match=r"does not parse as JSON or a Python literal"):
        parse_overrides("{rounds: 1")
    with pytest.raises(ConfigError, match=r"is a list, not a dict: pass e.g. \{\"rounds\": 1\}"):
        parse_overrides("[1, 2]")


def test_parse_overrides_checks_keys_with_a_did_you_mean():
    known = config_field_names() | {"ks"}
    assert parse_overrides({"rounds": 1, "ks": "(2,)"}, known=known) == {"rounds": 1, "ks": (2,)}
    with pytest.raises(ConfigError) as err:
        parse_overrides('{"round": 1, "zzz": 2}', known=known)
    msg = str(err.value)
    assert "unknown override(s) ['round', 'zzz']" in msg
    assert "use FederatedConfig fields or one of ['ks']" in msg
    assert "did you mean 'rounds' for 'round'?" in msg and "for 'zzz'" not in msg
    assert isinstance(err.value, ValueError)  # ConfigError keeps the built-in base


def test_check_override_keys_lists_every_name_when_the_config_fields_are_not_all_known():
    with pytest.raises(ConfigError, match=r"use one of \['k', 'sizes'\]; did you mean 'sizes'"):
        check_override_keys(["size"], {"k", "sizes"})
    check_override_keys([], set())  # nothing to check
    with pytest.raises(
        ConfigError, match=r"\['round'\]: use a FederatedConfig field; did you mean"
    ):
        check_override_keys(["round"], config_field_names())


def test_settings_suggests_the_closest_setting():
    with pytest.raises(ConfigError, match=r"did you mean 'sizes' for 'sizez'\?"):
        settings("quick", TABLE, {"sizez": (8,)})
    s, _ = settings("quick", TABLE, '{"k": 2}')  # text, as the papermill command line passes it
    assert s["k"] == 2


def _nb(tmp_path, *cells):
    path = tmp_path / "nb.ipynb"
    path.write_text(
        json.dumps({"cells": [{"cell_type": "code", "source": c, "metadata": {}} for c in cells]})
    )
    return path


def test_notebook_override_keys_reads_the_settings_table_without_running_it(tmp_path):
    path = _nb(
        tmp_path,
        "%%time\nnot python",
        'SETTINGS = {"quick": dict(k=8, ks=(2,), config={}), "paper": {"k": 8, "extra": 1}}\n'
        'S, c = settings(profile, SETTINGS, overrides, fixed=("config",))',
    )
    assert notebook_override_keys(path) == {"k", "ks", "extra"}
    assert notebook_override_keys(_nb(tmp_path, "x = 1")) == frozenset()
    attack = notebook_override_keys(_nb(tmp_path, "plan = attack_plan(profile)"))
    assert attack == attack_override_keys() >= {"n_batches", "batch_sizes", "methods"}
    with pytest.raises(ConfigError, match="is not a readable notebook"):
        notebook_override_keys(tmp_path / "missing.ipynb")


def test_the_notebooks_settings_keys_are_found():
    keys = {p.name[:2]: notebook_override_keys(p) for p in NOTEBOOKS}
    assert {"minilm_sizes", "ks", "train_steps"} <= keys["01"]
    assert "wide_budgets" in keys["02"] and "config" not in keys["02"]  # fixed
    assert keys["03"] == {"reps", "n_values", "n_summands", "sizes"}
    assert "svd_sizes" in keys["04"] and keys["05"] == frozenset()
    assert {"batch_sizes", "n_batches"} <= keys["06"]


# --- papermill sees typed, documented parameters ----------------------------------------------

NOTEBOOKS = sorted((ROOT / "notebooks").glob("0[1-6]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reports_a_type_and_a_help_for_every_parameter(path):
    import papermill as pm

    params = pm.inspect_notebook(str(path))
    assert {"profile", "results_dir", "overrides"} <= set(params)
    for name, p in params.items():
        assert p["inferred_type_name"] not in ("None", ""), f"{path.name}: {name} has no type"
        assert len(p["help"]) > 10, f"{path.name}: {name} has no help"
    assert params["results_dir"]["default"] == '""'  # interactive runs write to scratch
    assert params["overrides"]["inferred_type_name"] == "dict"


# --- the scratch folder -----------------------------------------------------------------------


def test_an_empty_results_dir_means_the_scratch_folder_of_the_profile(capsys):
    results, figures = results_paths("", "paper")
    assert results == ROOT / "results" / "scratch" / "paper" == scratch_dir("paper")
    assert figures.is_dir()
    assert "scratch folder" in capsys.readouterr().out
    assert results_paths(None, "paper")[0] == results
    with pytest.raises(ConfigError, match="results_dir is empty and no profile"):
        results_paths("")


def test_the_scratch_folder_is_git_ignored():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "results/scratch/" in ignored and "results/*/export/" in ignored


# --- headless progress ------------------------------------------------------------------------


def test_progress_lines_carry_the_mark_only_when_headless(monkeypatch, capsys):
    monkeypatch.setenv("SHELORA_QUIET", "1")
    progress("run 1/2")
    monkeypatch.setenv("SHELORA_QUIET", "0")
    progress("run 2/2")
    assert capsys.readouterr().out == f"{PROGRESS_MARK}run 1/2\nrun 2/2\n"


def test_round_printer_prints_the_full_label_once_per_round(monkeypatch, capsys):
    label = "run 12/15 shelora-delta-withhold r=8/16/32 minilm dirichlet(0.3)"  # > 40 characters
    monkeypatch.setenv("SHELORA_QUIET", "1")
    printer = round_printer(label, rounds=20)
    printer({"round": 3, "train_loss": 0.5, "accuracy": None, "seconds": 12.3})
    printer({"round": 4, "train_loss": 0.25, "accuracy": 0.75, "seconds": 9.6})
    assert capsys.readouterr().out.splitlines() == [
        f"{PROGRESS_MARK}{label}: round 3/20, loss 0.500, 12 s",
        f"{PROGRESS_MARK}{label}: round 4/20, loss 0.250, acc 0.750, 10 s",
    ]
    monkeypatch.setenv("SHELORA_QUIET", "0")
    assert round_printer(label) is None  # interactive: the tqdm bar shows the rounds
    assert round_printer(label, enabled=True) is not None


# --- recorded metrics -------------------------------------------------------------------------


def test_store_metadata_outside_ipython_prints_and_read_notebook_reads_the_outputs(
    tmp_path, capsys
):
    store_metadata("acc", np.float64(0.5))
    assert capsys.readouterr().out == "recorded acc = 0.5\n"
    out = {"output_type": "display_data", "metadata": {}}
    nb = {
        "cells": [
            {"cell_type": "markdown", "source": "x"},
            {"cell_type": "code", "outputs": [{**out, "data": {METRICS_MIME: {"acc": 0.5}}}]},
            {
                "cell_type": "code",
                "outputs": [
                    {"output_type": "stream", "text": "hi"},
                    {**out, "data": {METRICS_MIME: {"acc": 0.75, "n": [1, 2]}}},
                ],
            },
        ]
    }
    path = tmp_path / "run.ipynb"
    path.write_text(json.dumps(nb))
    assert read_notebook(path) == {"acc": 0.75, "n": [1, 2]}
    with pytest.raises(ConfigError, match="is not a readable executed notebook"):
        read_notebook(tmp_path / "none.ipynb")


def test_store_metadata_in_a_kernel_displays_json_and_text(monkeypatch):
    import IPython

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr("IPython.display.display", lambda obj, raw: shown.append((obj, raw)))
    store_metadata("acc", {"a": np.float32(0.25), "b": math.nan})
    assert shown == [
        (
            {
                METRICS_MIME: {"acc": {"a": 0.25, "b": None}},
                "text/plain": "recorded acc = {'a': 0.25, 'b': None}",
            },
            True,
        )
    ]
