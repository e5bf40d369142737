#!/usr/bin/env python
"""Run the notebooks in order, headlessly, with papermill; leave every number and figure in results/.

    python reproduce.py                      # quick profile: every notebook, minutes
    python reproduce.py --profile paper      # the paper-scale profile: hours on 2 cores
    python reproduce.py --only 05            # notebooks whose name contains "05"
    python reproduce.py --set rounds=1       # override a config field in every notebook
    python reproduce.py --readme             # only regenerate the README results table

Executed copies go to ``results/<profile>/notebooks/``; JSON, per-round metrics, checkpoints and
figures to ``results/<profile>/``. A failing notebook stops the run with a non-zero exit status and
a message naming the notebook and the cell. Re-running resumes interrupted federated runs from
their checkpoints.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

from shelora_core.errors import ConfigError
from shelora_core.notebook import (
    PROGRESS_MARK,
    check_override_keys,
    config_field_names,
    notebook_override_keys,
)
from shelora_core.profiles import PROFILES

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


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
    nb: Path, out_dir: Path, params: dict, kernel: str, relay: ProgressRelay | None = None
) -> float:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out = out_dir / "notebooks" / nb.name
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(
            str(nb),
            str(out),
            parameters=params,
            kernel_name=kernel,
            cwd=str(NOTEBOOKS),
            progress_bar=False,
            log_output=False,
            stdout_file=relay,  # headless progress lines reach this terminal (ProgressRelay)
            # the kernel's start-up warnings (TCP transport) are noise on this terminal
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
            request_save_on_cell_execute=True,
        )
    except PapermillExecutionError as exc:
        raise SystemExit(
            f"FAILED: notebook {nb.name}, cell {exc.cell_index} (execution count {exc.exec_count}): "
            f"{exc.ename}: {exc.evalue}\nThe executed copy with the traceback is {out}"
        ) from None
    return time.perf_counter() - t0


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def attack_table(path: Path) -> list[str]:
    """DAGER's ROUGE-1 per method, budget and attacker at the largest LoRA rank (attack.json)."""
    entries = json.loads(path.read_text())
    meta = next((e for e in entries if e["kind"] == "meta"), {})
    rows = [e for e in entries if e["kind"] == "measured"]
    rank = max(e["rank"] for e in rows)
    batches = sorted({e["batch_size"] for e in rows})
    updates = [u for u in ("round1", "later") if any(e["update"] == u for e in rows)]
    cells: dict[tuple, dict[tuple, float]] = {}
    for e in rows:
        if e["rank"] != rank or e["update"] not in updates:
            continue
        if e["method"] == "flexlora-dp" and e.get("dp_epsilon") is None:
            continue  # the noise sweep is in the notebook; the table shows the authors' epsilon
        key = (e["method"], e["budget"], e["attacker"])
        cells.setdefault(key, {})[(e["update"], e["batch_size"])] = e["rouge1"]
    head = " | ".join(f"{u} (batch {'/'.join(map(str, batches))})" for u in updates)
    out = [
        f"Gradient inversion: DAGER's ROUGE-1 on what the server receives (`{_rel(path)}`, "
        f"commit {str(meta.get('git_commit'))[:12]}; SmolLM2-135M, LoRA r = {rank} on q_proj, "
        "one FedSGD step; budget = encrypted columns per layer or the same number of values):",
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


def results_table(results_dir: Path) -> str:
    """Markdown table of results/<profile>/federated_tuning.json (generated, never hand-edited)."""
    lines = []
    path = results_dir / "federated_tuning.json"
    if path.exists():
        runs = json.loads(path.read_text())
        source = f"the {len(runs)} runs of notebook 05 (`{_rel(path)}`"
    else:  # notebook 05 has not finished this profile: the runs that did, one summary each
        done = sorted((results_dir / "federated_tuning").glob("*.summary.json"))
        runs = [json.loads(p.read_text()) for p in done]
        source = (
            f"the {len(runs)} runs of notebook 05's grid finished so far "
            f"(`{_rel(results_dir / 'federated_tuning')}/*.summary.json`"
        )
    # a run reused from an earlier notebook execution keeps the commit it was computed at
    commits = sorted(
        {str(r.get("meta", {}).get("git_commit") or "not recorded")[:12] for r in runs}
    )
    where = f"Federated tuning, {source}; computed at commit(s) {', '.join(commits)}):"
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
            lines.append(
                f"| {method} | {r['model']} | {'/'.join(map(str, r['ranks']))} | "
                f"{r['partition']} | {r['num_clients']} | {r['rounds']} x {r['local_steps']} | "
                f"{r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {r['final_macro_f1']:.3f} | "
                f"{r.get('upload_bytes_per_client', r['upload_bytes_per_round']) / 1e3:.0f} | "
                f"{r['seconds_per_client_round']:.1f} ({r.get('meta', {}).get('torch_threads', '?')}) |"
            )
        lines += [
            "",
            "*best acc*: the highest of the evaluated rounds. *s / client-round*: wall-clock of one "
            "client's round (training, encoding, decoding) with the run's torch threads; runs that "
            "shared the 2 cores with another job are slower than the clean per-step timings of "
            "`make bench` (training speed table).",
        ]
    he = results_dir / "he_cost.json"
    if he.exists():
        data = json.loads(he.read_text())
        meta = data.get("meta", {})
        paper = data.get("paper", {})
        lines += [
            "",
            f"HE cost per client-round (`{_rel(he)}`, "
            f"`make bench`, commit {str(meta.get('git_commit'))[:12]}; ranks 8/16/32, SHE-LoRA "
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
    attack = results_dir / "attack.json"
    if attack.exists():
        lines += ["", *attack_table(attack)]
    speed = results_dir / "train_speed.json"
    if speed.exists():
        d = json.loads(speed.read_text())
        lines += [
            "",
            f"Local training speed (`{_rel(speed)}`, `make bench`, commit "
            f"{str(d['meta'].get('git_commit'))[:12]}, {d['meta'].get('torch_threads')} threads):",
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
            f"Negotiation (`{_rel(neg)}`, commit {str(d['meta'].get('git_commit'))[:12]}; "
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


def update_readme(results_root: Path) -> None:
    if not README.exists() or START not in README.read_text():
        return
    parts = []
    for profile in PROFILES:
        d = results_root / profile
        finished = any((d / "federated_tuning").glob("*.summary.json"))
        if finished or (d / "federated_tuning.json").exists() or (d / "he_cost.json").exists():
            parts.append(f"**Profile `{profile}`**\n\n" + results_table(d))
    body = "\n\n".join(parts) or "_No results yet: run `make reproduce`._"
    text = README.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{START}\n{body}\n{END}{tail}")


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
    ap.add_argument("--readme", action="store_true", help="only regenerate the README table")
    ap.add_argument("--list", action="store_true", help="list the notebooks and exit")
    args = ap.parse_args(argv)

    if args.readme:
        update_readme(args.results_dir)
        return 0
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
        secs = run_notebook(nb, out_dir, params, kernel, ProgressRelay(nb.stem[:2]))
        print(f"[{i}/{len(nbs)}] {nb.stem}: done in {secs:.0f} s", flush=True)
    print(f"all done in {time.perf_counter() - total:.0f} s; results in {out_dir}")
    if args.results_dir.resolve() == (ROOT / "results").resolve():
        update_readme(args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
